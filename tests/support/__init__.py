"""What the tests share besides fixtures: the CLI runner, the S3 servers, the training
helpers, generated data and the kubelet stand-in (fixtures are in tests/conftest.py)."""

import os

# One compute thread per process (this one and every process it starts), set before torch
# is imported: the suite runs several workers, each starting torchrun's processes, on two
# cores; with a thread per core each, OpenMP's spinning threads fight over them and the
# tiny models the tests train gain nothing from a second thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# No test reaches the Hugging Face Hub (tests talk to loopback only): set before
# huggingface_hub, datasets and transformers read it at import, for this process and every
# process it starts. The push tests' stand-in Hub turns it off (support.hub.hub_env).
os.environ["HF_HUB_OFFLINE"] = "1"
