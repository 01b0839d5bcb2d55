"""One thin script per stage: `python -m stages.<name> --help`."""
