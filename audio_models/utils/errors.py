"""Errors that carry a message meant for the user, not a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's configuration or input, reported as one clear line.

    The runner catches it before any work starts, prints the message and exits non-zero.
    """


def model_unavailable(model: str, revision: str | None, exc: BaseException) -> UserError:
    """The one message for a hub model that cannot be loaded (offline, not cached, no such
    repository): what failed and how to make it available."""
    where = f"revision {revision}" if revision else "its default revision"
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(
        f"cannot load model {model!r} ({where}): {first}. Without network access, download it "
        f"first (huggingface-cli download {model}{' --revision ' + revision if revision else ''})"
        " or pass a local directory as extractor.model"
    )


class ExtractionError(Exception):
    """An item could not be processed at a given stage; becomes a row in ``failures.parquet``."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
