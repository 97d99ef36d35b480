"""Commands the engine sends to node agents on `gw.cmd.<node>` (pure data).

Each command carries the id of the decision event that caused it; that id is the
`Nats-Msg-Id`, so a resent command is dropped by the server.
"""

from __future__ import annotations

from typing import Final, TypeAlias

import msgspec
from gpuwarden.engine.errors import EventDecodeError


class _Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    id: str  # = the msg id; derived from the deciding event
    node: str
    task_id: str
    attempt: int
    causation_id: str | None = None


class RunCommand(_Command, frozen=True, tag="run"):
    image: str
    command: tuple[str, ...]
    env: dict[str, str] = msgspec.field(default_factory=dict)
    gpu_uuids: tuple[str, ...] = ()
    memory_mb: int | None = None


class StopCommand(_Command, frozen=True, tag="stop"):
    reason: str = ""
    container_id: str | None = None
    # Seconds between SIGTERM and SIGKILL; None: the agent's own default. 0 for a process
    # on a GPU that failed under it (it will not shut down cleanly, and its task waits
    # on that exit to give its GPUs back).
    grace_s: float | None = None


class RemoveCommand(_Command, frozen=True, tag="remove"):
    container_id: str | None = None


Command: TypeAlias = RunCommand | StopCommand | RemoveCommand

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Command)


def encode_command(command: Command) -> bytes:
    return _encoder.encode(command)


def decode_command(data: bytes) -> Command:
    try:
        command: Command = _decoder.decode(data)
        return command
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise EventDecodeError(f"invalid command: {exc}") from None
