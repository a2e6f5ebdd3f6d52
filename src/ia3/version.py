"""The package version, in a module of its own so that modules of the package read it without importing `ia3`'s
`__init__` (which imports them)."""

__version__ = "0.1.0"
