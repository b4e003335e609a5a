"""What the tests share besides fixtures: the CLI runner, the S3 servers, the training
helpers, generated data and the kubelet stand-in (fixtures are in tests/conftest.py)."""
