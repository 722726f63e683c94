"""User-facing errors of avsm.

:class:`AvsmError` is raised for problems with the user's inputs or usage (a
missing or corrupt file, an image that cannot be registered, an output that
would overwrite an input).  Its message is a single line naming the file, so a
command-line front end can print it as is, without a traceback.
"""

from __future__ import annotations

import os

__all__ = ["AvsmError"]


def _one_line(text: str) -> str:
    """Collapse whitespace (newlines included) so the message fits on one line."""
    return " ".join(str(text).split())


class AvsmError(Exception):
    """An input or usage error, reported as one line ``"<file>: <problem>"``.

    Args:
        problem: what is wrong, e.g. ``"image contains NaN or Inf voxels"``.
            Newlines are collapsed to spaces.
        path: the file (or directory) concerned, as the user gave it; omitted
            from the message when ``None``.

    Attributes:
        problem: the one-line problem description.
        path: the file path as a string, or ``None``.
    """

    def __init__(self, problem: str, path: str | os.PathLike[str] | None = None) -> None:
        self.problem: str = _one_line(problem)
        self.path: str | None = None if path is None else os.fspath(path)
        super().__init__(self.problem, self.path)

    def __str__(self) -> str:
        if self.path is None:
            return self.problem
        return f"{_one_line(self.path)}: {self.problem}"

    def __reduce__(self) -> tuple[type[AvsmError], tuple[str, str | None]]:
        return (type(self), (self.problem, self.path))
