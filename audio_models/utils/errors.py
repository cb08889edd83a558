"""Errors that carry a message meant for the user, not a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's configuration or input, reported as one clear line.

    The runner catches it before any work starts, prints the message and exits non-zero.
    """


class ExtractionError(Exception):
    """An item could not be processed at a given stage; becomes a row in ``failures.parquet``."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
