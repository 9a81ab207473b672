"""The one error a study raises for bad input."""

from __future__ import annotations


class StudyError(Exception):
    """A one-line message for the user; the sweeper prints it and exits with status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(f"sweeper: error: {message}")
