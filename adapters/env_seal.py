"""Sealed task env: a secret in `env` reaches the one node that runs the task, and no one else.

Every node agent, auditor and read model reads GW_EVENTS, so a `task.submitted` that held
`HF_TOKEN` in clear would hand it to all of them. The task API seals each value with the
cluster's env key (libsodium's sealed box through PyNaCl: X25519 + XSalsa20-Poly1305, an
ephemeral sender key per value, so equal values never look equal); the engine opens them
only when it builds the run command for the node that got the task, and the API opens them
only for the task's owner or an operator. Names stay visible: which variables a task sets
is part of its audit trail, their values are not.

A sealed value is `gw-sealed:v1:` + base64 of the box. Values without the prefix (events
written before sealing, or by an insecure setup without a key) pass through unchanged.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

import msgspec
from gpuwarden.engine.core.commands import Command, RunCommand
from gpuwarden.engine.core.errors import GpuwardenError
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

log = logging.getLogger("gpuwarden.env_seal")

SEALED_PREFIX: Final = "gw-sealed:v1:"
KEY_PREFIX: Final = "gw-env-key:v1:"  # the key file: this, then base64 of the private key
KEY_BYTES: Final = 32


class EnvSealError(GpuwardenError):
    """A sealed env value cannot be opened, or the env key cannot be read or written.

    `name` is the variable concerned, where there is one.
    """

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class EnvKey:
    """The cluster's env key pair: the API seals with its public half, the engine opens."""

    __slots__ = ("private",)

    def __init__(self, private: PrivateKey) -> None:
        self.private = private

    @classmethod
    def generate(cls) -> EnvKey:
        return cls(PrivateKey.generate())

    @property
    def public_bytes(self) -> bytes:
        return bytes(self.private.public_key)

    def save(self, path: Path) -> None:
        """Write the key file readable by its owner only, atomically (never half a key)."""
        path = Path(path)
        text = KEY_PREFIX + base64.b64encode(bytes(self.private)).decode() + "\n"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        except OSError as exc:
            raise EnvSealError(f"cannot write env key {path}: {exc}") from exc
        try:
            with os.fdopen(fd, "w") as out:  # mkstemp creates it 0600
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise EnvSealError(f"cannot write env key {path}: {exc}") from exc

    @classmethod
    def load(cls, path: Path) -> EnvKey:
        path = Path(path)
        try:
            text = path.read_text().strip()
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise EnvSealError(
                f"env key {path} does not exist (`gpuwarden up` makes one; copy it to every "
                "engine of this cluster)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise EnvSealError(f"cannot read env key {path}: {exc}") from exc
        if not text.startswith(KEY_PREFIX):
            raise EnvSealError(f"{path} is not a gpuwarden env key (it must start {KEY_PREFIX})")
        try:
            raw = base64.b64decode(text.removeprefix(KEY_PREFIX), validate=True)
        except (binascii.Error, ValueError):
            raise EnvSealError(f"env key {path} is damaged: not base64") from None
        if len(raw) != KEY_BYTES:
            raise EnvSealError(
                f"env key {path} is damaged: {len(raw)} bytes where {KEY_BYTES} are expected"
            )
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("env key %s is readable by others than its owner; chmod 600 it", path)
        return cls(PrivateKey(raw))


def ensure_env_key(path: Path) -> EnvKey:
    """The key at `path`, made (and saved) when there is none yet."""
    path = Path(path)
    if path.exists():
        return EnvKey.load(path)
    key = EnvKey.generate()
    key.save(path)
    log.info("made a new env key at %s", path)
    return key


def is_sealed(value: str) -> bool:
    return value.startswith(SEALED_PREFIX)


def seal_env(env: Mapping[str, str], public: bytes) -> dict[str, str]:
    """Each value sealed to `public`; the names unchanged."""
    box = SealedBox(PublicKey(public))
    return {
        name: SEALED_PREFIX + base64.b64encode(box.encrypt(value.encode())).decode()
        for name, value in env.items()
    }


def open_env(env: Mapping[str, str], key: EnvKey | None) -> dict[str, str]:
    """The env in clear: sealed values opened with `key`, plain ones as they are."""
    box = SealedBox(key.private) if key is not None else None
    opened: dict[str, str] = {}
    for name, value in env.items():
        if not is_sealed(value):
            opened[name] = value
            continue
        if box is None:
            raise EnvSealError(f"env {name} is sealed and there is no env key here", name=name)
        try:
            raw = base64.b64decode(value.removeprefix(SEALED_PREFIX), validate=True)
            opened[name] = box.decrypt(raw).decode()
        except (binascii.Error, ValueError, CryptoError, UnicodeDecodeError):
            raise EnvSealError(
                f"env {name} does not open with this env key (damaged, or sealed with "
                "another cluster's key)",
                name=name,
            ) from None
    return opened


def command_opener(key: EnvKey | None) -> Callable[[Command], Command]:
    """For the engine's dispatcher: a run command with its task's env in clear, for the
    one node it goes to (on `gw.cmd.<node>`, which only that node may consume)."""

    def opened(command: Command) -> Command:
        if isinstance(command, RunCommand) and any(map(is_sealed, command.env.values())):
            return msgspec.structs.replace(command, env=open_env(command.env, key))
        return command

    return opened
