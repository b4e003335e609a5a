"""Exit codes shared by every command; Kubernetes' podFailurePolicy keys on them."""

EXIT_OK = 0
EXIT_RETRY = 1  # transient failure: the Job controller may retry the pod
EXIT_BAD_INPUT = 2  # bad config or input: retrying cannot help, fail the Job
EXIT_PREEMPTED = 3  # checkpoint written after SIGTERM: resubmit to continue


class BadInput(Exception):
    """Bad config or input. The message is one line naming the file, record or key."""


class StorageError(Exception):
    """Object storage refused a request for a reason retrying will not fix."""


class TransientStorageError(Exception):
    """Object storage refused a request even with fresh credentials, for a reason that may
    pass (an expired or rotated token, a denial after earlier successes): worth a retry.
    Deliberately not a StorageError, which means exit 2."""
