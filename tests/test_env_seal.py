"""Sealed env: values open only with the cluster's key, names stay visible, plain passes."""

from __future__ import annotations

import base64
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from gpuwarden.adapters.env_seal import (
    KEY_PREFIX,
    SEALED_PREFIX,
    EnvKey,
    EnvSealError,
    ensure_env_key,
    is_sealed,
    open_env,
    seal_env,
)

KEY = EnvKey.generate()
ENV = {"HF_TOKEN": "hf_s3cr3t", "EMPTY": "", "UNICODE": "žluťoučký kůň ✓"}


def test_sealed_values_round_trip_and_keep_their_names() -> None:
    sealed = seal_env(ENV, KEY.public_bytes)
    assert list(sealed) == list(ENV)
    assert all(is_sealed(v) and v.startswith(SEALED_PREFIX) for v in sealed.values())
    assert "hf_s3cr3t" not in "".join(sealed.values())
    assert open_env(sealed, KEY) == ENV


def test_equal_values_never_look_equal_once_sealed() -> None:
    first, second = (seal_env({"A": "same"}, KEY.public_bytes)["A"] for _ in range(2))
    assert first != second


def test_plain_values_pass_through_with_or_without_a_key() -> None:
    mixed = {**seal_env({"HF_TOKEN": "t"}, KEY.public_bytes), "SEED": "1"}
    assert open_env(mixed, KEY) == {"HF_TOKEN": "t", "SEED": "1"}
    assert open_env({"SEED": "1"}, None) == {"SEED": "1"}
    assert open_env({}, None) == {}


def tampered(value: str) -> str:
    raw = bytearray(base64.b64decode(value.removeprefix(SEALED_PREFIX)))
    raw[-1] ^= 1
    return SEALED_PREFIX + base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (tampered, "does not open"),
        (lambda v: v[:-8], "does not open"),  # truncated
        (lambda v: SEALED_PREFIX + "not base64!", "does not open"),
        (lambda v: SEALED_PREFIX, "does not open"),
    ],
)
def test_a_damaged_sealed_value_is_an_error_naming_the_variable(
    change: Callable[[str], str], words: str
) -> None:
    sealed = seal_env({"HF_TOKEN": "t", "SEED": "1"}, KEY.public_bytes)
    sealed["HF_TOKEN"] = change(sealed["HF_TOKEN"])
    with pytest.raises(EnvSealError) as info:
        open_env(sealed, KEY)
    assert info.value.name == "HF_TOKEN"
    assert "HF_TOKEN" in str(info.value) and words in str(info.value)


def test_another_clusters_key_or_no_key_cannot_open_it() -> None:
    sealed = seal_env({"HF_TOKEN": "t"}, KEY.public_bytes)
    with pytest.raises(EnvSealError, match="HF_TOKEN does not open"):
        open_env(sealed, EnvKey.generate())
    with pytest.raises(EnvSealError, match="HF_TOKEN is sealed and there is no env key"):
        open_env(sealed, None)


def test_the_key_file_is_private_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "env.key"
    KEY.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith(KEY_PREFIX)
    assert [p.name for p in path.parent.iterdir()] == ["env.key"]  # no temporary left
    loaded = EnvKey.load(path)
    assert loaded.public_bytes == KEY.public_bytes
    assert open_env(seal_env(ENV, KEY.public_bytes), loaded) == ENV


def test_ensure_makes_a_key_once_and_then_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "env.key"
    made = ensure_env_key(path)
    again = ensure_env_key(path)
    assert made.public_bytes == again.public_bytes
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "does not exist"),
        ("hello\n", "is not a gpuwarden env key"),
        (KEY_PREFIX + "%%%\n", "not base64"),
        (KEY_PREFIX + base64.b64encode(b"short").decode(), "5 bytes where 32"),
    ],
)
def test_a_bad_key_file_is_a_clear_error(tmp_path: Path, content: str | None, words: str) -> None:
    path = tmp_path / "env.key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EnvSealError, match=words) as info:
        EnvKey.load(path)
    assert str(path) in str(info.value)


def test_the_engine_opens_a_run_command_for_its_node_only() -> None:
    from gpuwarden.adapters.env_seal import command_opener
    from gpuwarden.engine.core.commands import RunCommand, StopCommand

    key = EnvKey.generate()
    sealed = seal_env({"HF_TOKEN": "hf_secret", "PLAIN": "x"}, key.public_bytes)
    run = RunCommand(id="c1", node="n1", task_id="t", attempt=1, image="i", command=("a",),
                     env=sealed)  # fmt: skip
    opened = command_opener(key)(run)
    assert isinstance(opened, RunCommand) and opened.env == {"HF_TOKEN": "hf_secret", "PLAIN": "x"}
    stop = StopCommand(id="c2", node="n1", task_id="t", attempt=1)
    assert command_opener(key)(stop) is stop
