"""One small tree of errors, so callers can catch gpuwarden's own faults in one place."""

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


class ConcurrencyError(GpuwardenError):
    """An append's expected last subject sequence was stale: someone else wrote first."""

    def __init__(self, subject: str, expected: int | None, actual: int | None) -> None:
        super().__init__(
            f"concurrent write on {subject}: expected last sequence {expected}, "
            f"server has {actual if actual is not None else 'unknown'}"
        )
        self.subject = subject
        self.expected = expected
        self.actual = actual


class StreamConfigError(GpuwardenError):
    """An existing stream's configuration is incompatible with what gpuwarden needs."""


class EventLogError(GpuwardenError):
    """The event log could not do what was asked (server error, timeout, refused batch)."""


class PolicyError(GpuwardenError):
    """A policy file or table is malformed; the message names the file and the key."""


class ScenarioError(GpuwardenError):
    """A scenario file is malformed; the message names the file, the step or key."""


class TaskRequestError(GpuwardenError):
    """A task-create request is invalid; `field` names what is wrong."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NatsServerError(GpuwardenError):
    """The embedded nats-server could not be started or reached."""


class ContainerStartError(GpuwardenError):
    """The container engine refused to create or start a container.

    The message carries the daemon's own text (missing image, missing executable,
    device request refused, engine unreachable), so the fault can be classified from it.
    """


class ContainerRuntimeError(GpuwardenError):
    """The container engine failed outside a start: unreachable, or its event stream broke."""


class GpuProbeError(GpuwardenError):
    """NVML could not be initialised or read (no driver, no library, GPU lost)."""
