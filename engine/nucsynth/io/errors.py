"""The error every reader raises for a malformed input file."""

from __future__ import annotations

from pathlib import Path

__all__ = ["FormatError"]


class FormatError(ValueError):
    """An input file or folder does not follow its documented format.

    The message always names the offending file (or folder) and says what was wrong and
    what was expected. It is a ``ValueError``, so the CLI reports it without a traceback.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
