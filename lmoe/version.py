"""The one place of lmoe's version (pyproject.toml reads it; adapters record it)."""

__version__ = "0.1.0"
