"""The package version (kept equal to pyproject.toml by a test; read without importlib.metadata)."""

__version__ = "0.1.0"
