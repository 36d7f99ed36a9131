"""The training job and its launch helpers (not part of the installed package)."""
