"""The package version (its own module, so that parts of the package can read it without importing
the package root, which imports them)."""

__version__ = "0.1.0"
