"""sdbatch's errors: one for the user, one per item.

- `UserError`: a job that cannot start or cannot finish because of something its user
  can fix (a spec field, a manifest value, a checkpoint, credentials, a full disk). It
  carries one `Problem` per line; `sdbatch`'s CLI prints each as `error: …` and exits 1,
  never with a traceback. Every module raises this type.
- `StoreError`: a `UserError` raised by storage. It is the only kind callers tell
  apart: the write stage stops storing at the first one and hands the rest back as
  unstored rows, so a full disk keeps what was already written.
- `ItemFailure`: one work item could not be rendered (a missing init image, a LoRA that
  did not load, NaN output). The job goes on; the item becomes a failure row with
  `error_type` and the message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Problem(str):
    """One line to print, and where it is when known (`file`, `field`, `value`).

    A `str`, so problems read, compare and print as the lines they are."""

    file: str | None
    field: str | None
    value: Any

    def __new__(
        cls, message: str, *, file: str | None = None, field: str | None = None, value: Any = None
    ) -> Problem:
        problem = super().__new__(cls, message)
        problem.file, problem.field, problem.value = file, field, value
        return problem


class UserError(Exception):
    """Something the user must fix; `problems` holds one readable line per problem."""

    def __init__(self, problems: str | Sequence[str]):
        lines = [problems] if isinstance(problems, str) else problems
        self.problems: list[Problem] = []
        for line in lines:
            if isinstance(line, Problem):
                self.problems.append(line)
            else:  # a multi-line message is as many problems
                self.problems.extend(Problem(part) for part in str(line).splitlines() or [""])
        super().__init__("\n".join(self.problems))


class StoreError(UserError):
    """A storage problem that stops the job; the message names the URI and the cause."""


class ItemFailure(Exception):
    """One item that cannot be rendered: its failure row's `error_type` and message."""

    def __init__(self, error_type: str, message: str):
        self.error_type = error_type
        super().__init__(message)
