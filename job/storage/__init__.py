"""One interface to local folders and S3 (or any S3-compatible store).

URIs are plain paths, `file://` paths or `s3://bucket/key`. Writes are atomic: a local
file is written beside its target and renamed; an S3 object appears whole when its PUT
(or multipart upload) completes. Credentials come only from boto3's standard chain
(environment, shared config, web identity / pod identity); transient S3 errors are
retried by botocore's "standard" mode with exponential backoff and jitter. An expired token
(or a denial on a client that has worked before) drops the cached client and retries once
with a fresh one, which re-reads the credential chain (a rotated web-identity token); if
that fails too the error is a TransientStorageError (exit 1), never a StorageError (exit 2).

The modules: uri (names and joins), s3 (the client, configure(), retries), read, stream
(open_read), listing, fences (the lease's fence), write (atomic writes, commit, deletion),
transfer (uploads, downloads, to_local), versioned (compare-and-swap). This package
re-exports what callers use as `storage.<name>`; state (the client, the settings, the
fences) lives in its one module, reached only through that module's functions.
"""

from job.storage.fences import fence, fenced, unfence
from job.storage.listing import expand, list_files, list_names
from job.storage.read import exists, fingerprint, read_bytes, read_range, read_text, size, wait_for
from job.storage.s3 import client, configure
from job.storage.stream import open_read
from job.storage.transfer import (
    download_dir,
    download_file,
    staged,
    to_local,
    upload_dir,
    upload_file,
)
from job.storage.uri import contained, inside, is_s3, join, local_path, split_s3
from job.storage.versioned import delete_if, read_versioned, write_if
from job.storage.write import (
    commit,
    delete,
    delete_prefix,
    sha256_file,
    uncommit,
    write_bytes,
    write_text,
)

__all__ = [
    "client",
    "commit",
    "configure",
    "contained",
    "delete",
    "delete_if",
    "delete_prefix",
    "download_dir",
    "download_file",
    "exists",
    "expand",
    "fence",
    "fenced",
    "fingerprint",
    "inside",
    "is_s3",
    "join",
    "list_files",
    "list_names",
    "local_path",
    "open_read",
    "read_bytes",
    "read_range",
    "read_text",
    "read_versioned",
    "sha256_file",
    "size",
    "split_s3",
    "staged",
    "to_local",
    "uncommit",
    "unfence",
    "upload_dir",
    "upload_file",
    "wait_for",
    "write_bytes",
    "write_if",
    "write_text",
]
