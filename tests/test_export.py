"""Export then read back gives the very StoredEvents that were exported."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.ports import StoredEvent
from gpuwarden.projections.errors import ExportFormatError
from gpuwarden.projections.export import export, read_jsonl, write_jsonl

from tests.test_projections_log import T0, ListLog, sample_log


async def lines_of(log: ListLog, **kwargs: object) -> list[str]:
    return [line async for line in export(log, **kwargs)]  # type: ignore[arg-type]


async def test_round_trip_gives_identical_stored_events(tmp_path: Path) -> None:
    stored = sample_log().stored
    stored[3] = StoredEvent(
        seq=stored[3].seq,
        subject=stored[3].subject,
        event=stored[3].event,
        data=stored[3].data,
        headers={"Nats-Msg-Id": "e004", "Gw-Basis": "3"},
    )
    path = tmp_path / "log.jsonl"
    with path.open("w") as out:
        assert await write_jsonl(ListLog(stored), out) == len(stored)
    assert list(read_jsonl(path)) == stored


async def test_each_line_has_seq_subject_headers_event() -> None:
    [first, *_] = await lines_of(ListLog(sample_log().stored))
    obj = json.loads(first)
    assert set(obj) == {"seq", "subject", "headers", "event"}
    assert obj["event"]["type"] == "node.registered" and obj["subject"] == "gw.evt.node.n1.node.n1"


async def test_odd_payloads_survive_the_round_trip(tmp_path: Path) -> None:
    event = sample_log().stored[2].event
    assert event is not None
    odd = [
        StoredEvent(seq=1, subject="gw.evt.task.t1", event=event),  # no raw bytes kept
        StoredEvent(seq=2, subject="gw.evt.task.t1", event=event,
                    data=ev.encode(event).replace(b",", b",\n")),  # multi-line JSON
        StoredEvent(seq=3, subject="gw.evt.task.x", event=None, data=b"\xff\xfe{",
                    error="malformed JSON"),  # not even UTF-8
    ]  # fmt: skip
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(line + "\n" for line in await lines_of(ListLog(odd))))
    assert list(read_jsonl(path)) == odd


async def test_export_one_task_and_since() -> None:
    log = ListLog(sample_log().stored)
    t2 = [json.loads(line)["seq"] for line in await lines_of(log, task="t2")]
    assert t2 == [16, 17, 19, 20, 21]  # the task's subject only (GPU events live elsewhere)
    since = [json.loads(line)["seq"] for line in await lines_of(log, since=T0 + timedelta(35))]
    assert since == []
    late = await lines_of(log, since=T0 + timedelta(seconds=35))
    # the undecodable event at the end has no time; it follows dated ones, so it is kept
    assert [json.loads(line)["seq"] for line in late] == [35, 36, 37, 38]


def test_a_bad_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = '{"seq":1,"subject":"s","headers":{},"event":null,"data":"x","error":"e"}'
    path.write_text(good + "\n\n" + '{"seq": "two"}\n')
    reader = read_jsonl(path)
    assert next(reader).seq == 1
    with pytest.raises(ExportFormatError, match=r"bad\.jsonl:3"):
        next(reader)


def test_an_unknown_event_type_reads_back_as_undecodable(tmp_path: Path) -> None:
    path = tmp_path / "new.jsonl"
    path.write_text('{"seq":7,"subject":"s","headers":{},"event":{"type":"task.future"}}\n')
    [stored] = list(read_jsonl(path))
    assert stored.event is None and stored.error and "type" in stored.error
    assert stored.data == b'{"type":"task.future"}'


async def test_write_jsonl_to_a_text_stream() -> None:
    out = io.StringIO()
    await write_jsonl(ListLog(sample_log().stored), out, task="t1")
    assert out.getvalue().count("\n") == 11
