"""The error a job reports to its user: one readable message, never a traceback."""

from __future__ import annotations


class RunError(Exception):
    """A job that cannot start or cannot finish; the message says why."""
