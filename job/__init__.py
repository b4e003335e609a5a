"""mlmjob: masked-language-model training as a containerized batch job."""

__version__ = "0.1.0"
