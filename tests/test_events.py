from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.admission import check_event
from gpuwarden.engine.core.errors import EventDecodeError

AT = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def sample_events() -> list[ev.Event]:
    common = {"at": AT, "actor": "engine", "correlation_id": "t1"}
    gpu = ev.GpuInfo(uuid="GPU-1", index=0, model="H100", memory_mb=81920)
    return [
        ev.NodeRegistered(id="e01", node="n1", runtime="docker", gpus=(gpu,), **common),
        ev.NodeLost(id="e02", node="n1", last_heartbeat_at=AT, **common),
        ev.NodeRecovered(id="e03", node="n1", last_heartbeat_at=AT, **common),
        ev.GpuFault(id="e04", gpu_uuid="GPU-1", node="n1", kind="xid", xid=48, **common),
        ev.GpuQuarantined(id="e05", gpu_uuid="GPU-1", node="n1", reason="xid 48", **common),
        ev.GpuRestored(id="e06", gpu_uuid="GPU-1", node="n1", reason="reset", **common),
        ev.TaskSubmitted(
            id="e07",
            task_id="t1",
            name="n",
            image="img",
            command=("python", "x.py"),
            env={"A": "1"},
            owner="ann",
            **common,
        ),
        ev.TaskPending(id="e08", task_id="t1", reason="no free GPU", **common),
        ev.GpuAllocated(id="e09", gpu_uuid="GPU-1", node="n1", task_id="t1", attempt=1, **common),
        ev.TaskScheduled(
            id="e10", task_id="t1", attempt=1, node="n1", gpu_uuids=("GPU-1",), **common
        ),
        ev.ContainerStarted(
            id="e11", task_id="t1", attempt=1, node="n1", container_id="c", **common
        ),
        ev.ContainerStartFailed(id="e12", task_id="t1", attempt=1, node="n1", error="x", **common),
        ev.ContainerExited(
            id="e13",
            task_id="t1",
            attempt=1,
            node="n1",
            container_id="c",
            exit_code=137,
            signal=9,
            finished_at=AT,
            **common,
        ),
        ev.FaultClassified(
            id="e14",
            task_id="t1",
            attempt=1,
            fault="preempted",
            rule="signal",
            evidence=("e13",),
            **common,
        ),
        ev.RebuildDecided(
            id="e15",
            task_id="t1",
            attempt=2,
            previous_attempt=1,
            fault="preempted",
            counted=True,
            rule=None,
            not_before=AT,
            **common,
        ),
        ev.GpuReleased(id="e16", gpu_uuid="GPU-1", node="n1", task_id="t1", attempt=1, **common),
        ev.TaskCompleted(id="e17", task_id="t1", attempt=2, **common),
        ev.TaskFailed(
            id="e18", task_id="t1", attempt=2, fault="user_error", reason="policy_rule", **common
        ),
        ev.TaskCancelled(id="e19", task_id="t1", reason="owner", **common),
    ]


def test_catalog_covers_every_type_of_the_design() -> None:
    assert set(ev.EVENT_TYPES) == {
        "node.registered",
        "node.lost",
        "node.recovered",
        "gpu.fault",
        "gpu.quarantined",
        "gpu.restored",
        "task.submitted",
        "task.pending",
        "gpu.allocated",
        "gpu.released",
        "task.scheduled",
        "container.started",
        "container.start_failed",
        "container.exited",
        "fault.classified",
        "rebuild.decided",
        "task.completed",
        "task.failed",
        "task.cancelled",
    }
    assert {ev.type_of(e) for e in sample_events()} == set(ev.EVENT_TYPES)


@pytest.mark.parametrize("event", sample_events(), ids=lambda e: ev.type_of(e))
def test_round_trip(event: ev.Event) -> None:
    data = ev.encode(event)
    assert msgspec.json.decode(data)["type"] == ev.type_of(event)
    assert ev.decode(data) == event


def test_events_are_frozen() -> None:
    event = sample_events()[0]
    with pytest.raises(AttributeError):
        event.node = "other"  # type: ignore[misc]


def test_unknown_type_is_named() -> None:
    with pytest.raises(EventDecodeError) as info:
        ev.decode(b'{"type": "task.exploded", "id": "x"}')
    assert info.value.path == "$.type"
    assert "task.exploded" in str(info.value)


def test_missing_field_is_named() -> None:
    with pytest.raises(EventDecodeError) as info:
        ev.decode(b'{"type":"task.pending","id":"x","at":"2026-01-01T00:00:00Z","actor":"a"}')
    assert info.value.path == "$.task_id"


def test_wrong_field_type_is_named() -> None:
    data = b'{"type":"task.pending","id":"x","at":"2026-01-01T00:00:00Z","actor":"a",'
    data += b'"task_id":7,"reason":"r"}'
    with pytest.raises(EventDecodeError) as info:
        ev.decode(data)
    assert info.value.path == "$.task_id"


def test_malformed_json_is_a_decode_error() -> None:
    with pytest.raises(EventDecodeError):
        ev.decode(b"{not json")


def test_event_written_before_a_field_was_added_still_decodes() -> None:
    # task.submitted as an early writer stored it: no env, owner, memory_mb, request_id.
    old = (
        b'{"type":"task.submitted","id":"x","at":"2026-01-01T00:00:00Z","actor":"api",'
        b'"task_id":"t","name":"n","image":"i","command":["a"]}'
    )
    event = ev.decode(old)
    assert isinstance(event, ev.TaskSubmitted)
    assert event.env == {} and event.memory_mb is None and event.request_id is None


def test_event_from_a_newer_writer_with_unknown_fields_decodes() -> None:
    data = (
        b'{"type":"task.pending","id":"x","at":"2026-01-01T00:00:00Z","actor":"a",'
        b'"task_id":"t","reason":"r","added_in_2030":true}'
    )
    assert isinstance(ev.decode(data), ev.TaskPending)


def test_ids_are_unique_and_sort_by_time() -> None:
    from gpuwarden.engine.ids import new_id

    ids = [new_id(datetime(2026, 1, 1, 0, 0, second, tzinfo=UTC)) for second in range(50)]
    assert ids == sorted(ids)
    assert len({new_id() for _ in range(10_000)}) == 10_000


def test_derived_ids_are_stable_and_distinct() -> None:
    parent = ev.make_id(1_700_000_000_000, 12345)
    assert ev.derive_id(parent, "a") == ev.derive_id(parent, "a")
    assert ev.derive_id(parent, "a") != ev.derive_id(parent, "b")
    assert ev.derive_id(parent, "a")[:10] == parent[:10]


def test_derived_ids_match_those_already_in_logs() -> None:
    """Replay re-derives the ids a log holds: the encoding may get faster, never change.
    These two were made by the first implementation (blake2b, then base32hex mapped onto
    Crockford's alphabet)."""
    parent = "01JABCDEFGHJKMNPQRSTVWXYZ0"
    assert ev.derive_id(parent, "scheduled/3") == "01JABCDEFG4W6Z1Q0FNVXVJ36X"
    assert ev.derive_id(parent, "allocated/1/GPU-0") == "01JABCDEFGWTBDC61E53H532AK"


def test_subjects_per_aggregate_and_writer() -> None:
    """Scheme 2: the aggregate, then the writer its type calls for (a node's facts under
    its own name), so NATS permissions can say who speaks."""
    by_type = {ev.type_of(e): ev.subject_of(e) for e in sample_events()}
    assert by_type["node.lost"] == "gw.evt.node.n1.engine"
    assert by_type["node.registered"] == "gw.evt.node.n1.node.n1"
    assert by_type["gpu.allocated"] == "gw.evt.gpu.GPU-1.engine"
    assert by_type["gpu.fault"].startswith("gw.evt.gpu.GPU-1.node.")
    assert by_type["gpu.restored"] == "gw.evt.gpu.GPU-1.op"
    assert by_type["container.exited"] == "gw.evt.task.t1.node.n1"
    assert by_type["task.submitted"] == "gw.evt.task.t1.api"
    assert by_type["rebuild.decided"] == "gw.evt.task.t1.engine"
    legacy = {ev.type_of(e): ev.legacy_subject_of(e) for e in sample_events()}
    assert legacy["node.lost"] == "gw.evt.node.n1"
    assert legacy["container.exited"] == "gw.evt.task.t1"
    for e in sample_events():
        subject = ev.subject_of(e)
        assert ev.aggregate_of_subject(subject) == ev.legacy_subject_of(e)
        assert ev.is_legacy_subject(ev.legacy_subject_of(e)) and not ev.is_legacy_subject(subject)
    assert ev.subject_token("node-a/0") != ev.subject_token("node-a_0")
    assert "." not in ev.subject_token("a.b") and "*" not in ev.subject_token("a*")


def _sample(tag: str) -> ev.Event:
    return next(e for e in sample_events() if ev.type_of(e) == tag)


# (type, field, its closed vocabulary): refused when an event decodes with any other word.
CLOSED = [
    ("gpu.fault", "kind", ev.GPU_FAULT_KINDS),
    ("fault.classified", "fault", ev.FAULT_TYPES),
    ("rebuild.decided", "fault", ev.FAULT_TYPES),
    ("task.failed", "fault", ev.FAULT_TYPES),
    ("task.failed", "reason", ev.FAILURE_REASONS),
]


@pytest.mark.parametrize(("tag", "field", "words"), CLOSED, ids=lambda v: str(v)[:20])
def test_closed_fields_decode_their_words_and_refuse_others(
    tag: str, field: str, words: tuple[str, ...]
) -> None:
    """Closing a field must not turn a stored event that was folded into a dead letter:
    every word admission refused is refused at decode, and only those."""
    event = _sample(tag)
    data = msgspec.json.decode(ev.encode(event))
    for word in words:
        decoded = ev.decode(msgspec.json.encode({**data, field: word}))
        assert getattr(decoded, field) == word
        assert check_event(decoded) is None
    for word in ("", "XID", "completed ", "not_a_fault", "User_Error"):
        assert check_event(msgspec.structs.replace(event, **{field: word})) is not None
        with pytest.raises(EventDecodeError) as info:
            ev.decode(msgspec.json.encode({**data, field: word}))
        assert info.value.path == f"$.{field}"


def test_free_text_fields_stay_open() -> None:
    """Reasons, rules and runtimes are free text: any word still decodes."""
    for tag, field in [
        ("task.pending", "reason"),
        ("gpu.quarantined", "reason"),
        ("gpu.restored", "reason"),
        ("task.cancelled", "reason"),
        ("fault.classified", "rule"),
        ("node.registered", "runtime"),
    ]:
        data = msgspec.json.decode(ev.encode(_sample(tag)))
        decoded = ev.decode(msgspec.json.encode({**data, field: "anything at all"}))
        assert getattr(decoded, field) == "anything at all"


def test_task_states_are_one_vocabulary() -> None:
    """The supervisor, the read model and scenario files share `events.TaskStatus`."""
    from gpuwarden.adapters import scenario_file
    from gpuwarden.engine.core import state
    from gpuwarden.projections import model

    assert ev.TASK_STATUSES == (
        "pending", "scheduled", "running", "completed", "failed", "cancelled"
    )  # fmt: skip
    assert model.TASK_STATES == ev.TASK_STATUSES
    assert set(scenario_file.TASK_STATES) == set(ev.TASK_STATUSES) - {"scheduled"}
    assert state.TERMINAL == ev.TERMINAL_STATUSES == {"completed", "failed", "cancelled"}
