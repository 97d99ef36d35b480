"""The two streams' configurations, and creating or checking them.

GW_EVENTS: limits retention, file storage, never trimmed per subject, deny_delete and
deny_purge, atomic batches allowed. GW_CMDS: a work queue. A stream that exists with a
setting gpuwarden relies on changed is an error, and is left as it is.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import anyio
import nats.errors
import nats.js.errors
from gpuwarden.engine.core.wire import (
    COMMAND_SUBJECTS,
    COMMANDS_STREAM,
    EVENT_SUBJECTS,
    EVENTS_STREAM,
)
from gpuwarden.engine.ports import EventLogError, StreamConfigError
from nats.js import JetStreamContext, api


def events_stream_config(replicas: int, duplicate_window_s: float) -> api.StreamConfig:
    return api.StreamConfig(
        name=EVENTS_STREAM,
        subjects=[EVENT_SUBJECTS],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.OLD,
        max_msgs_per_subject=-1,
        deny_delete=True,
        deny_purge=True,
        allow_atomic=True,
        duplicate_window=duplicate_window_s,
        num_replicas=replicas,
    )


def commands_stream_config(replicas: int, duplicate_window_s: float) -> api.StreamConfig:
    return api.StreamConfig(
        name=COMMANDS_STREAM,
        subjects=[COMMAND_SUBJECTS],
        retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE,
        duplicate_window=duplicate_window_s,
        num_replicas=replicas,
    )


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def check_compatible(wanted: api.StreamConfig, found: api.StreamConfig) -> None:
    """Raise StreamConfigError naming the first field where `found` breaks gpuwarden."""
    name = wanted.name
    if sorted(found.subjects or []) != sorted(wanted.subjects or []):
        raise _mismatch(name, "subjects", wanted.subjects, found.subjects)
    for field in ("retention", "storage"):
        want, have = _plain(getattr(wanted, field)), _plain(getattr(found, field))
        if want != have:
            raise _mismatch(name, field, want, have)
    for flag in ("deny_delete", "deny_purge", "allow_atomic"):
        if getattr(wanted, flag) and not getattr(found, flag):
            raise _mismatch(name, flag, True, getattr(found, flag))
    if wanted.max_msgs_per_subject in (-1, 0) and (found.max_msgs_per_subject or -1) > 0:
        raise _mismatch(name, "max_msgs_per_subject", -1, found.max_msgs_per_subject)


def _mismatch(stream: str | None, field: str, want: Any, have: Any) -> StreamConfigError:
    return StreamConfigError(
        f"stream {stream} exists with an incompatible {field}: {have!r} "
        f"(gpuwarden needs {want!r}); it was left unchanged"
    )


async def ensure_stream(js: JetStreamContext, config: api.StreamConfig, timeout_s: float) -> None:
    """Create or check one stream; a cluster still forming is waited for (deadline)."""
    assert config.name is not None
    deadline = anyio.current_time() + max(timeout_s, 10.0)
    while True:
        try:
            info = await _find_or_create(js, config)
            break
        except (nats.errors.Error, TimeoutError) as exc:
            # "no suitable peers for placement" (10005) and friends: a JetStream
            # cluster whose servers have not all met yet. Try again until the deadline.
            if anyio.current_time() >= deadline:
                raise EventLogError(
                    f"cannot create stream {config.name}: {exc or type(exc).__name__} "
                    "(only the engine and admin may create streams: start the engine "
                    "first)"
                ) from exc
            await anyio.sleep(0.2)
    if info is not None:
        check_compatible(config, info.config)


async def _find_or_create(js: JetStreamContext, config: api.StreamConfig) -> api.StreamInfo | None:
    assert config.name is not None
    try:
        return await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(config)
            return None
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == 10058:  # already in use: lost a creation race
                return await js.stream_info(config.name)
            raise
