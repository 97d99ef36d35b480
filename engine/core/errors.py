"""The core's errors, the root of one small tree: callers catch gpuwarden's own faults
in one place (`GpuwardenError`). Errors of a port live with the port (`engine/ports.py`);
errors of one adapter live beside it."""

from __future__ import annotations


class GpuwardenError(Exception):
    """Base of every error gpuwarden raises on purpose."""


class EventDecodeError(GpuwardenError):
    """A payload is not a well-formed event of the catalog.

    `path` names the field (msgspec's `$.field` notation) where that is known.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class PolicyError(GpuwardenError):
    """A policy file or table is malformed; the message names the file and the key."""


class TaskRequestError(GpuwardenError):
    """A task-create request is invalid; `field` names what is wrong."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
