"""Errors with messages meant for users (the CLI prints them without a traceback)."""


class ConversionError(ValueError):
    """A checkpoint that cannot be converted or loaded; the message says why and what would work."""
