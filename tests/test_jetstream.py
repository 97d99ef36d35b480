"""The JetStream event log and command bus against a real nats-server."""

from __future__ import annotations

from contextlib import aclosing
from datetime import UTC, datetime

import anyio
import pytest
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core import wire
from gpuwarden.engine.core.commands import RunCommand
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.ports import ConcurrencyError, EventLogError, StreamConfigError
from nats.js import api

AT = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def pending(task: str, reason: str = "waiting") -> ev.TaskPending:
    return ev.TaskPending(id=new_id(), at=AT, actor="engine", task_id=task, reason=reason)


def allocated(gpu: str, task: str) -> ev.GpuAllocated:
    return ev.GpuAllocated(
        id=new_id(), at=AT, actor="engine", gpu_uuid=gpu, node="n1", task_id=task, attempt=1
    )


async def collect(log: JetStreamEventLog, **kwargs: object) -> list[tuple[int, str | None]]:
    with anyio.fail_after(5):
        return [
            (s.seq, s.event.id if s.event else None)
            async for s in log.read(**kwargs)  # type: ignore[arg-type]
        ]


# --- streams -------------------------------------------------------------------------


async def test_ensure_streams_is_idempotent_and_sets_the_log_guarantees(
    event_log: JetStreamEventLog,
) -> None:
    await event_log.ensure_streams()
    config = (await event_log.js.stream_info(wire.EVENTS_STREAM)).config
    assert config.subjects == [wire.EVENT_SUBJECTS]
    assert (config.deny_delete, config.deny_purge, config.allow_atomic) == (True, True, True)
    assert config.duplicate_window and config.duplicate_window >= 60
    cmds = (await event_log.js.stream_info(wire.COMMANDS_STREAM)).config
    assert cmds.retention == api.RetentionPolicy.WORK_QUEUE


@pytest.mark.parametrize(
    ("stream", "override", "field"),
    [
        (wire.EVENTS_STREAM, {"retention": api.RetentionPolicy.INTEREST}, "retention"),
        (wire.EVENTS_STREAM, {"deny_delete": False}, "deny_delete"),
        (wire.EVENTS_STREAM, {"subjects": ["gw.evt.task.>"]}, "subjects"),
        (wire.COMMANDS_STREAM, {"storage": api.StorageType.MEMORY}, "storage"),
    ],
)
async def test_incompatible_existing_stream_is_a_clear_error_and_left_alone(
    nats_server: EmbeddedNats, stream: str, override: dict[str, object], field: str
) -> None:
    nc = await connect(nats_server.url)
    try:
        log = JetStreamEventLog(nc)
        from gpuwarden.adapters import stream_config

        make = (
            stream_config.events_stream_config
            if stream == wire.EVENTS_STREAM
            else stream_config.commands_stream_config
        )
        config = make(1, 60.0)
        for key, value in override.items():
            setattr(config, key, value)
        await log.js.add_stream(config)
        with pytest.raises(StreamConfigError, match=rf"{stream}.*{field}"):
            await log.ensure_streams()
        after = (await log.js.stream_info(stream)).config
        assert getattr(after, field) == override[field]
    finally:
        await nc.close()


# --- appends -------------------------------------------------------------------------


async def test_concurrent_appends_with_one_expectation_exactly_one_wins(
    event_log: JetStreamEventLog,
) -> None:
    subject = ev.task_subject("t1")
    [first] = await event_log.append(subject, [pending("t1")], expected_last_subject_seq=0)
    outcomes: list[object] = []

    async def attempt() -> None:
        try:
            outcomes.append(await event_log.append(subject, [pending("t1")], first))
        except ConcurrencyError as exc:
            outcomes.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(attempt)
    wins = [o for o in outcomes if isinstance(o, list)]
    losses = [o for o in outcomes if isinstance(o, ConcurrencyError)]
    assert len(wins) == 1 and len(losses) == 3
    assert all(e.subject == subject and e.expected == first for e in losses)
    assert all(e.actual == wins[0][0] for e in losses)
    assert await event_log.last_seq(subject) == wins[0][0]


async def test_many_events_with_a_stale_expectation_store_none(
    event_log: JetStreamEventLog,
) -> None:
    subject = ev.task_subject("t1")
    await event_log.append(subject, [pending("t1")])
    with pytest.raises(ConcurrencyError) as info:
        await event_log.append(subject, [pending("t1") for _ in range(3)], 0)
    assert info.value.actual == 1
    assert await event_log.last_seq() == 1


async def test_retried_appends_store_nothing_twice(event_log: JetStreamEventLog) -> None:
    subject = ev.task_subject("t1")
    one = [pending("t1")]
    guarded = [pending("t1") for _ in range(3)]
    loose = [pending("t1") for _ in range(5)]
    seqs = [
        await event_log.append(subject, one, 0),
        await event_log.append(subject, guarded, 1),
        await event_log.append(subject, loose),
    ]
    assert seqs == [[1], [2, 3, 4], [5, 6, 7, 8, 9]]
    # The retries carry their original (now stale) expectations, as a crashed caller would.
    assert await event_log.append(subject, one, 0) == [1]
    assert await event_log.append(subject, guarded, 1) == [2, 3, 4]
    assert await event_log.append(subject, loose) == [5, 6, 7, 8, 9]
    assert await event_log.last_seq() == 9


async def test_headers_are_stored_and_read_back(event_log: JetStreamEventLog) -> None:
    subject = ev.task_subject("t1")
    await event_log.append(subject, [pending("t1")], headers={"Gw-Basis": "7"})
    async with aclosing(event_log.read()) as stream:
        stored = [s async for s in stream]
    assert stored[0].headers["Gw-Basis"] == "7"
    assert stored[0].headers["Nats-Msg-Id"] == stored[0].event.id  # type: ignore[union-attr]


# --- atomic batches ------------------------------------------------------------------


async def test_atomic_batch_commits_across_subjects(event_log: JetStreamEventLog) -> None:
    await event_log.append(ev.gpu_subject("G2"), [allocated("G2", "t0")])
    batch = [pending("t1"), allocated("G1", "t1"), pending("t1")]
    expected = {ev.task_subject("t1"): 0, ev.gpu_subject("G1"): 0}
    assert await event_log.append_batch(batch, expected) == [2, 3, 4]
    assert await event_log.last_seq(ev.task_subject("t1")) == 4
    # Re-sent after it was stored: refused by the server as a duplicate, reported as stored.
    assert await event_log.append_batch(batch, expected) == [2, 3, 4]
    assert await event_log.last_seq() == 4


async def test_atomic_batch_with_one_stale_expectation_stores_nothing(
    event_log: JetStreamEventLog,
) -> None:
    gpu = ev.gpu_subject("G1")
    [taken] = await event_log.append(gpu, [allocated("G1", "t0")])
    batch = [pending("t1"), allocated("G1", "t1")]
    with pytest.raises(ConcurrencyError) as info:
        await event_log.append_batch(batch, {ev.task_subject("t1"): 0, gpu: 0})
    assert (info.value.subject, info.value.expected, info.value.actual) == (gpu, 0, taken)
    assert await event_log.last_seq() == taken
    assert await event_log.last_seq(ev.task_subject("t1")) == 0


async def test_batch_reusing_an_id_stored_elsewhere_is_refused_whole(
    event_log: JetStreamEventLog,
) -> None:
    old = pending("t1")
    await event_log.append(ev.task_subject("t1"), [old])
    with pytest.raises(EventLogError, match="not stored whole"):
        await event_log.append_batch([allocated("G1", "t1"), old], {ev.gpu_subject("G1"): 0})
    assert await event_log.last_seq() == 1


# --- reads ---------------------------------------------------------------------------


async def test_read_returns_events_in_sequence_order(event_log: JetStreamEventLog) -> None:
    written = []
    for i in range(30):
        event = pending(f"t{i % 3}")
        written.append(event.id)
        await event_log.append(ev.subject_of(event), [event])
    assert await collect(event_log) == list(zip(range(1, 31), written, strict=True))
    assert await collect(event_log, from_seq=11, until_seq=13) == [
        (11, written[10]),
        (12, written[11]),
        (13, written[12]),
    ]
    t1 = await collect(event_log, subject=ev.task_subject("t1"))
    assert [seq for seq, _ in t1] == list(range(2, 31, 3))
    assert await collect(event_log, from_seq=31) == []


async def test_read_of_an_empty_log_ends_at_once(event_log: JetStreamEventLog) -> None:
    assert await collect(event_log) == []
    assert await event_log.last_seq(ev.task_subject("nobody")) == 0


async def test_malformed_payload_is_yielded_with_its_error(
    event_log: JetStreamEventLog,
) -> None:
    await event_log.append(ev.task_subject("t1"), [pending("t1")])
    await event_log.js.publish("gw.evt.task.t1", b'{"type":"task.bogus"}')
    await event_log.js.publish("gw.evt.task.t1", b"not json", headers={"X": "1"})
    await event_log.append(ev.task_subject("t1"), [pending("t1")])
    async with aclosing(event_log.read()) as stream:
        stored = [s async for s in stream]
    assert [s.seq for s in stored] == [1, 2, 3, 4]
    bad = stored[1:3]
    assert all(s.event is None and s.error for s in bad)
    assert bad[0].data == b'{"type":"task.bogus"}' and "type" in (bad[0].error or "")
    assert bad[1].data == b"not json" and bad[1].headers["X"] == "1"
    assert stored[3].event is not None


async def test_subscribe_follows_new_events(event_log: JetStreamEventLog) -> None:
    subject = ev.task_subject("t1")
    await event_log.append(subject, [pending("t1")])
    seen: list[int] = []
    with anyio.fail_after(5):
        async with aclosing(event_log.subscribe(from_seq=1)) as live:
            async for stored in live:
                seen.append(stored.seq)
                if stored.seq == 1:
                    await event_log.append(subject, [pending("t1"), pending("t1")])
                if stored.seq == 3:
                    break
    assert seen == [1, 2, 3]


# --- durability ----------------------------------------------------------------------


async def test_acknowledged_events_survive_a_restart_and_live_reads_continue(
    nats_server: EmbeddedNats,
) -> None:
    nc = await connect(nats_server.url, reconnect_time_wait=0.05)
    try:
        log = JetStreamEventLog(nc, heartbeat_s=0.3, timeout_s=3.0)
        await log.ensure_streams()
        subject = ev.task_subject("t1")
        acked = await log.append(subject, [pending("t1") for _ in range(20)])
        seen: list[int] = []
        with anyio.fail_after(15):
            async with aclosing(log.subscribe()) as live:
                async for stored in live:
                    seen.append(stored.seq)
                    if stored.seq == 20:
                        await nats_server.stop()
                        await nats_server.start()
                        await _append_when_back(log, subject)
                    if stored.seq == 21:
                        break
        assert seen == list(range(1, 22))
        assert [seq for seq, _ in await collect(log)] == [*acked, 21]
    finally:
        await nc.close()


async def _append_when_back(log: JetStreamEventLog, subject: str) -> None:
    event = pending("t1")
    while True:
        try:
            await log.append(subject, [event])
            return
        except EventLogError:
            await anyio.sleep(0.05)


# --- commands ------------------------------------------------------------------------


def run_command(node: str) -> RunCommand:
    return RunCommand(
        id=new_id(), node=node, task_id="t1", attempt=1, image="img", command=("true",)
    )


async def test_unacked_command_is_redelivered_and_acked_one_is_not(
    command_bus: JetStreamCommandBus,
) -> None:
    first, second = run_command("n1"), run_command("n1")
    await command_bus.send(first)
    await command_bus.send(first)  # a resend is dropped by the server
    await command_bus.send(second)
    await command_bus.send(run_command("n2"))  # another node's command is not ours
    got: list[tuple[str, int]] = []
    with anyio.fail_after(8):
        async with aclosing(command_bus.receive("n1")) as inbox:
            async for received in inbox:
                got.append((received.command.id, received.deliveries))
                if received.deliveries == 1 and received.command.id == first.id:
                    continue  # left unacked: must come back after the ack wait
                await received.ack()
                if received.command.id == first.id:
                    break
    assert got == [(first.id, 1), (second.id, 1), (first.id, 2)]
    info = await command_bus.js.stream_info(wire.COMMANDS_STREAM)
    assert info.state.messages == 1  # only n2's command is left in the work queue


async def test_a_keyed_log_cannot_be_squatted_by_a_foreseen_msg_id(
    event_log: JetStreamEventLog,
) -> None:
    """Msg-id de-duplication is stream-wide: junk stored first under an event's own id
    would make the server drop the event. A keyed log's msg ids cannot be foreseen."""
    keyed = JetStreamEventLog(event_log.nc, msg_id_key=b"k" * 16)
    event = ev.TaskPending(id="foreseen", at=AT, actor="engine", task_id="t", reason="r")
    await event_log.js.publish("gw.evt.task.t.node.n9", b"junk", headers={"Nats-Msg-Id": event.id})
    [seq] = await keyed.append(ev.task_subject("t"), [event])
    assert [r.event async for r in keyed.read(seq, seq)] == [event]
    assert keyed.msg_id(event.id) != event.id == event_log.msg_id(event.id)
    assert [await keyed.append(ev.task_subject("t"), [event])] == [[seq]]  # a retry: deduped
