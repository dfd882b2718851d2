"""The version of bnjax (read by pyproject.toml and written into every workdir)."""

__version__ = "0.2.0"
