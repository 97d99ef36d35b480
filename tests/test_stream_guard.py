"""The stream guard: what it says about GW_EVENTS, and what the real server lets happen.

Measured on nats-server 2.15.1 with nothing but nats-py (see the tests below): a stream
delete succeeds although the stream denies deletes (deny_delete is about messages), and
the next `ensure_streams` creates an empty stream with a new creation time; an update
may set max_msgs (the history is trimmed at once) but can not turn deny_delete or
deny_purge off; purges and message deletes are refused; an update and a server restart
keep the creation time.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import nats.js.errors
import pytest
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.adapters.stream_guard import (
    StreamChangedError,
    StreamIdentity,
    StreamMissingError,
    check_stream,
    decode_identity,
    encode_identity,
    read_identity,
    stream_is_sound,
    stream_problem,
)
from gpuwarden.engine.cli import query as cli
from gpuwarden.engine.core.wire import EVENTS_STREAM
from gpuwarden.engine.ports import EventLogError
from gpuwarden.projections.store import STREAM_META, ProjectionStore

from tests.test_projections_log import sample_log
from tests.test_projections_nats import publish

CLI = [sys.executable, "-m", "gpuwarden.engine.cli"]
CREATED = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
LATER = CREATED + timedelta(days=3)
WHOLE = StreamIdentity(created=CREATED, first_seq=1, last_seq=40, messages=40)


def ident(**changes: Any) -> StreamIdentity:
    fields = {f: getattr(WHOLE, f) for f in WHOLE.__struct_fields__}
    return StreamIdentity(**{**fields, **changes})


# --- stream_problem, the pure part -----------------------------------------------------


@pytest.mark.parametrize(
    ("now", "seen", "folded"),
    [
        (ident(first_seq=0, last_seq=0, messages=0), None, 0),  # a new, empty stream
        (WHOLE, None, 0),
        (WHOLE, None, 40),
        (WHOLE, WHOLE, 40),
        (WHOLE, ident(last_seq=10, messages=10), 10),  # the same stream, grown
    ],
)
def test_a_whole_stream_has_no_problem(
    now: StreamIdentity, seen: StreamIdentity | None, folded: int
) -> None:
    assert stream_problem(now, seen=seen, folded=folded) is None
    assert stream_is_sound(now)


@pytest.mark.parametrize(
    ("now", "words"),
    [
        (ident(first_seq=38, messages=3), ("trimmed", "starts at sequence 38", "(first_seq)")),
        (ident(first_seq=41, messages=0), ("trimmed", "events 1..40 are gone")),  # all gone
        (ident(messages=37), ("holes", "3 deleted", "(messages)")),
        (ident(lost_msgs=2), ("lost 2", "state.lost")),
        (ident(deny_delete=False), ("message deletes", "deny_delete is off")),
        (ident(deny_purge=False), ("purges", "deny_purge is off")),
        (ident(max_msgs=3), ("max_msgs=3", "discarded")),
        (ident(max_bytes=1 << 20), ("max_bytes=1048576",)),
        (ident(max_age=3600.0), ("max_age=3600", "older than 3600s")),
        (ident(max_msgs_per_subject=5), ("max_msgs_per_subject=5", "last 5 events")),
        (ident(retention="interest"), ("retention=interest",)),
        (ident(subjects=("gw.evt.task.>",)), ("subjects=", "not stored")),
        (ident(sealed=True), ("sealed",)),
        (ident(allow_atomic=False), ("allow_atomic off",)),
    ],
)
def test_damage_or_a_risky_setting_is_named(now: StreamIdentity, words: tuple[str, ...]) -> None:
    problem = stream_problem(now, seen=None, folded=0)
    assert problem is not None and "\n" not in problem
    assert problem.startswith(EVENTS_STREAM)
    for word in words:
        assert word in problem
    assert not stream_is_sound(now)


def test_a_recreated_stream_names_both_creation_times() -> None:
    fresh = ident(created=LATER, first_seq=1, last_seq=2, messages=2)
    problem = stream_problem(fresh, seen=WHOLE, folded=40)
    assert problem == (
        "GW_EVENTS was deleted and recreated at 2026-01-05T03:04:05.678901Z; this engine "
        "folded the stream created at 2026-01-02T03:04:05.678901Z (created)"
    )
    assert stream_is_sound(fresh)  # sound in itself: accepting it means folding it anew
    by = stream_problem(fresh, seen=WHOLE, folded=40, by="the read model")
    assert by is not None and "the read model folded" in by


def test_a_stream_behind_the_fold_is_named() -> None:
    problem = stream_problem(ident(last_seq=30, messages=30), seen=None, folded=40)
    assert problem is not None
    assert "ends at sequence 30" in problem and "up to sequence 40" in problem
    assert "(last_seq)" in problem


def test_the_identity_round_trips_and_an_older_record_still_decodes() -> None:
    odd = ident(max_age=1.5, subjects=("a.>", "b.>"), retention="interest")
    assert decode_identity(encode_identity(odd)) == odd
    old = decode_identity('{"created":"2026-01-02T03:04:05.678901Z"}')
    assert old.created == CREATED
    with pytest.raises(EventLogError, match="unreadable"):
        decode_identity("{}")


# --- against a real nats-server --------------------------------------------------------


async def fill(log: JetStreamEventLog, count: int = 10) -> None:
    for i in range(count):
        await log.js.publish(f"gw.evt.task.t{i}", b"{}")


async def test_a_fresh_stream_is_fine(event_log: JetStreamEventLog) -> None:
    empty = await event_log.stream_identity()
    assert (empty.first_seq, empty.last_seq, empty.messages) == (0, 0, 0)
    assert empty.deny_delete and empty.deny_purge and empty.allow_atomic
    assert stream_problem(empty, seen=None, folded=0) is None
    await fill(event_log)
    now = await read_identity(event_log.js)
    assert now.created == empty.created
    assert (now.first_seq, now.last_seq, now.messages) == (1, 10, 10)
    assert stream_problem(now, seen=empty, folded=10) is None
    assert await check_stream(event_log, seen=empty, folded=10) == now


async def test_max_msgs_trims_the_history_and_is_reported(event_log: JetStreamEventLog) -> None:
    await fill(event_log)
    seen = await event_log.stream_identity()
    info = await event_log.js.stream_info(EVENTS_STREAM)
    await event_log.js.update_stream(info.config, max_msgs=3)  # the server allows it
    now = await event_log.stream_identity()
    assert now.created == seen.created  # an update keeps the stream's identity
    assert (now.first_seq, now.last_seq, now.messages, now.max_msgs) == (8, 10, 3, 3)
    problem = stream_problem(now, seen=seen, folded=10)
    assert problem is not None and "trimmed" in problem and "(first_seq)" in problem
    with pytest.raises(StreamChangedError, match="trimmed"):
        await check_stream(event_log, seen=seen, folded=10)


async def test_the_deny_flags_stop_purges_but_cannot_be_turned_off(
    event_log: JetStreamEventLog,
) -> None:
    await fill(event_log, 3)
    with pytest.raises(nats.js.errors.APIError):
        await event_log.js.purge_stream(EVENTS_STREAM)
    with pytest.raises(nats.js.errors.APIError):
        await event_log.js.delete_msg(EVENTS_STREAM, 2)
    info = await event_log.js.stream_info(EVENTS_STREAM)
    for flag in ("deny_delete", "deny_purge"):
        with pytest.raises(nats.js.errors.APIError) as refused:
            await event_log.js.update_stream(info.config, **{flag: False})
        assert refused.value.err_code == 10052
    assert stream_problem(await event_log.stream_identity(), seen=None, folded=3) is None


async def test_a_deleted_and_recreated_stream_is_another_stream(
    event_log: JetStreamEventLog,
) -> None:
    await fill(event_log)
    seen = await event_log.stream_identity()
    # deny_delete denies deleting messages, not the stream: this succeeds.
    assert await event_log.js.delete_stream(EVENTS_STREAM) is True
    with pytest.raises(StreamMissingError, match="does not exist"):
        await event_log.stream_identity()
    with pytest.raises(StreamChangedError):  # what an engine catches covers it
        await check_stream(event_log, seen=seen, folded=10)
    await event_log.ensure_streams()  # what the next CLI call does
    await fill(event_log, 12)  # even past what was folded, it is another stream
    now = await event_log.stream_identity()
    assert now.created > seen.created
    problem = stream_problem(now, seen=seen, folded=10)
    assert problem is not None and "deleted and recreated" in problem
    assert problem.endswith("(created)")


async def test_a_server_restart_keeps_the_creation_time(
    nats_server: EmbeddedNats, event_log: JetStreamEventLog
) -> None:
    await fill(event_log)
    seen = await event_log.stream_identity()
    await nats_server.stop()
    await nats_server.start()
    nc = await connect(nats_server.url)
    try:
        now = await JetStreamEventLog(nc).stream_identity()
    finally:
        await nc.close()
    assert now == seen


async def test_an_unreachable_server_is_an_event_log_error(event_log: JetStreamEventLog) -> None:
    await event_log.nc.close()
    with pytest.raises(EventLogError) as failed:
        await event_log.stream_identity()
    assert not isinstance(failed.value, StreamChangedError)


# --- the read commands -----------------------------------------------------------------


def tasks_args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(data_dir=tmp_path, json=True)


async def tasks(log: JetStreamEventLog, tmp_path: Path) -> str:
    out = io.StringIO()
    path = cli.store_path(tasks_args(tmp_path))
    assert await cli.run_tasks(tasks_args(tmp_path), log, path, out) == 0
    return out.getvalue()


async def recorded(tmp_path: Path) -> StreamIdentity | None:
    async with ProjectionStore(tmp_path / "projections.sqlite3") as store:
        text = await store.meta(STREAM_META)
    return None if text is None else decode_identity(text)


async def test_a_read_records_the_stream_and_refuses_a_recreated_one(
    event_log: JetStreamEventLog, tmp_path: Path
) -> None:
    await publish(event_log, sample_log().stored)
    assert '"id":"t1"' in await tasks(event_log, tmp_path)
    first = await recorded(tmp_path)
    assert first is not None and first.created == (await event_log.stream_identity()).created
    await event_log.js.delete_stream(EVENTS_STREAM)
    await event_log.ensure_streams()
    with pytest.raises(StreamChangedError) as refused:
        await tasks(event_log, tmp_path)
    text = str(refused.value)
    assert "deleted and recreated" in text and "the read model folded" in text
    assert "refuses to decide" in text and "gpuwarden projections rebuild" in text
    # The operator accepts the new stream: a rebuild folds it and records it.
    rebuilt = io.StringIO()
    args = argparse.Namespace(data_dir=tmp_path)
    assert await cli.run_rebuild(args, event_log, cli.store_path(args), rebuilt) == 0
    assert "up to sequence 0" in rebuilt.getvalue()
    assert await tasks(event_log, tmp_path) == "[]\n"
    again = await recorded(tmp_path)
    assert again is not None and again.created > first.created


async def test_an_old_read_model_records_the_stream_now(
    event_log: JetStreamEventLog, tmp_path: Path
) -> None:
    await publish(event_log, sample_log().stored)
    async with ProjectionStore(tmp_path) as store:  # built before streams were recorded
        await store.catch_up(event_log)
    assert await recorded(tmp_path) is None
    assert '"id":"t3"' in await tasks(event_log, tmp_path)
    assert await recorded(tmp_path) is not None


async def test_a_trimmed_stream_is_refused_and_a_rebuild_cannot_accept_it(
    event_log: JetStreamEventLog, tmp_path: Path
) -> None:
    await publish(event_log, sample_log().stored)
    info = await event_log.js.stream_info(EVENTS_STREAM)
    await event_log.js.update_stream(info.config, max_msgs=3)
    with pytest.raises(StreamChangedError) as refused:  # a new read model: no history
        await tasks(event_log, tmp_path)
    assert "trimmed" in str(refused.value) and "cannot bring back" in str(refused.value)
    args = argparse.Namespace(data_dir=tmp_path)
    with pytest.raises(StreamChangedError, match="trimmed"):
        await cli.run_rebuild(args, event_log, cli.store_path(args), io.StringIO())


async def gw(*args: str) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(30):
        return await anyio.run_process([*CLI, *args], check=False)


async def test_the_tasks_command_exits_non_zero_on_a_recreated_stream(
    nats_server: EmbeddedNats, event_log: JetStreamEventLog, tmp_path: Path
) -> None:
    await publish(event_log, sample_log().stored)
    data = str(tmp_path / "data")
    ok = await gw("tasks", "--nats", nats_server.url, "--data-dir", data)
    assert ok.returncode == 0, ok.stderr.decode()
    assert b"t1" in ok.stdout
    assert await event_log.js.delete_stream(EVENTS_STREAM) is True
    # The command itself recreates the stream (ensure_streams), then notices.
    refused = await gw("tasks", "--nats", nats_server.url, "--data-dir", data)
    assert refused.returncode != 0
    err = refused.stderr.decode()
    assert "deleted and recreated" in err and "gpuwarden projections rebuild" in err
    assert refused.stdout == b""
