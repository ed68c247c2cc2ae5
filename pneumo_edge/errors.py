"""The errors a user can cause, as the library raises them; the CLI maps each to its exit
code (:class:`UsageError` 2, :class:`Interrupted` 130). A leaf module."""

from __future__ import annotations

__all__ = ["UsageError", "Interrupted"]


class UsageError(ValueError):
    """A bad option, path, model or data folder; the message is one line naming it."""


class Interrupted(RuntimeError):
    """Ctrl-C during a run; the message says what was kept."""
