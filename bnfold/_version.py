"""The version of bnfold (one place; the package, the report and the CLI read it)."""

__version__ = "0.1.0"
