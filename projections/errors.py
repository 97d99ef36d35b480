"""Errors of the read side, under the one GpuwardenError tree."""

from __future__ import annotations

from gpuwarden.engine.core.errors import GpuwardenError


class ProjectionStoreError(GpuwardenError):
    """The projection store cannot do what was asked (not open, unusable file)."""


class TimeFormatError(GpuwardenError):
    """A --since/--until value is neither a duration like 2h nor an ISO-8601 time."""


class TaskNotFoundError(GpuwardenError):
    """No event of the log names this task."""


class ExportFormatError(GpuwardenError):
    """A line of an exported JSONL file is malformed; the message names the line."""


class TimelineError(GpuwardenError):
    """A timeline was asked for nothing (neither or both of task and GPU) or has no events."""
