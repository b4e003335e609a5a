"""`python -m job.config`: the config reference table, to paste into the README."""

from job.config.reference import reference_table

print(reference_table(), end="")
