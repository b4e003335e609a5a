"""One module per mlmjob command: what the CLI calls."""
