"""Ground floor: the errors a researcher can act on (a bad value, a missing or corrupt file).

Entry points print a UserError as one line and exit non-zero (console.py); anything else is a bug and keeps
its traceback. Nothing here imports from the package, so the store, config and every stage may raise them.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names the field or file, the value, and what is allowed or how to mend it."""


class CorruptArtifact(UserError):
    """A stored adapter or vector file is missing or does not match its recorded sha256."""
