"""Errors a user can act on.

Every problem caused by input (a file, a parameter, a dataset) raises a
:class:`LatentlabError` whose message is one line naming the file or key and
what is wrong. The CLI prints that line and exits with status 2, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LatentlabError(Exception):
    """A problem with the user's input, reported as one line."""

    def __init__(self, message: str) -> None:
        # Collapse newlines so the message stays one line however it was built.
        super().__init__(" ".join(str(message).split()))


class ConfigError(LatentlabError):
    """An unknown key, a wrong type or an out-of-range value in params.yaml."""


class DataError(LatentlabError):
    """A dataset file that is missing, malformed or inconsistent."""


class ValidationFailed(LatentlabError):
    """A Great Expectations expectation failed on a dataset split."""
