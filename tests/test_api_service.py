"""The task API over a real nats-server: answers, errors that store nothing, idempotency."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from gpuwarden.adapters.api_service import CANCEL, CREATE, GET, LIST, ApiService
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.jetstream import JetStreamEventLog
from gpuwarden.engine import cli
from gpuwarden.engine import events as ev
from gpuwarden.engine.clock import VirtualClock
from nats.aio.client import Client as NatsClient

T0 = datetime(2026, 3, 1, tzinfo=UTC)
TASK = {"image": "gpuwarden-test:latest", "command": ["sleep", "1"]}


async def start_service(service: ApiService) -> asyncio.Task[None]:
    """The service as a background task (fixtures cannot hold a task group open)."""
    started = asyncio.Event()

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(service.serve)
            started.set()

    task = asyncio.create_task(run())
    with anyio.fail_after(10):
        while not started.is_set():
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.fixture
async def api(nats_client: NatsClient, event_log: JetStreamEventLog) -> AsyncIterator[ApiService]:
    await register(event_log, "n1", 2)
    service = ApiService(nats_client, event_log, VirtualClock(T0))
    task = await start_service(service)
    yield service
    await stop(task)


async def register(log: JetStreamEventLog, node: str, gpus: int) -> None:
    infos = tuple(ev.GpuInfo(uuid=f"{node}-{i}", index=i, model="H100") for i in range(gpus))
    event = ev.NodeRegistered(
        id=f"reg-{node}", at=T0, actor="test", node=node, runtime="sim", gpus=infos
    )
    await log.append(ev.subject_of(event), [event])


async def ask(nc: NatsClient, subject: str, body: Any) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = await nc.request(subject, data, timeout=5)
    answer: dict[str, Any] = json.loads(reply.data)
    return answer


async def test_create_answers_with_the_task_id_once_submitted_is_stored(
    api: ApiService, nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    answer = await ask(nats_client, CREATE, {**TASK, "name": "job", "owner": "ada"})
    task_id = answer["task_id"]
    assert answer["created"] is True
    records = [r async for r in event_log.read(subject=ev.task_subject(task_id))]
    assert [r.seq for r in records] == [answer["seq"]]
    stored = records[0].event
    assert isinstance(stored, ev.TaskSubmitted)
    assert (stored.task_id, stored.name, stored.owner, stored.actor) == (
        task_id,
        "job",
        "ada",
        "api",
    )
    assert stored.command == ("sleep", "1")
    got = await ask(nats_client, GET, {"task_id": task_id})
    assert got["task"]["status"] == "pending" and got["task"]["name"] == "job"


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        ({**TASK, "command": "sleep 1"}, "command", "argv list"),
        ({**TASK, "gpus": 0}, "gpus", ">= 1"),
        ({**TASK, "gpus": 3}, "gpus", "largest node has 2"),
        ({**TASK, "gpu_model": "B200"}, "gpu_model", "known models: H100"),
        ({**TASK, "shell": True}, "shell", "unknown field"),
        # under the request limit, but its stored event would be over the engine's
        ({**TASK, "command": ["\x01" * 43677]}, None, "too large"),
    ],
)
async def test_a_bad_request_names_the_field_and_stores_nothing(
    api: ApiService,
    nats_client: NatsClient,
    event_log: JetStreamEventLog,
    body: Any,
    field: str | None,
    words: str,
) -> None:
    before = await event_log.last_seq()
    answer = await ask(nats_client, CREATE, body)
    assert answer["error"]["field"] == field
    assert words in answer["error"]["message"]
    assert await event_log.last_seq() == before
    assert "task_id" in await ask(nats_client, CREATE, TASK), "the service stopped serving"


async def test_the_same_request_id_gives_one_task_even_after_a_restart(
    api: ApiService, nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    body = {**TASK, "owner": "ada", "request_id": "ada-7"}
    first, second = await asyncio.gather(
        ask(nats_client, CREATE, body), ask(nats_client, CREATE, body)
    )
    assert first["task_id"] == second["task_id"]
    assert sorted([first["created"], second["created"]]) == [False, True]
    end = await event_log.last_seq()
    restarted = ApiService(nats_client, event_log, VirtualClock(T0))
    task = await start_service(restarted)  # two services now share the queue group
    try:
        for _ in range(4):
            again = await ask(nats_client, CREATE, body)
            assert (again["task_id"], again["created"]) == (first["task_id"], False)
        other = await ask(nats_client, CREATE, {**body, "owner": "bob"})
        assert other["created"] is True and other["task_id"] != first["task_id"]
        changed = await ask(nats_client, CREATE, {**body, "gpus": 2})
        assert changed["error"]["field"] == "request_id"
    finally:
        await stop(task)
    assert await event_log.last_seq() == end + 1  # only bob's task


async def test_the_fold_knows_request_ids_written_before_the_service_started(
    nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    await register(event_log, "n1", 1)
    old = ev.TaskSubmitted(
        id="s-old",
        at=T0,
        actor="api",
        task_id="legacy-task",
        name="x",
        image="img",
        command=("x",),
        request_id="r-1",
    )
    await event_log.append(ev.subject_of(old), [old], 0)
    service = ApiService(nats_client, event_log, VirtualClock(T0))
    task = await start_service(service)
    try:
        answer = await ask(
            nats_client, CREATE, {"image": "img", "command": ["x"], "request_id": "r-1"}
        )
    finally:
        await stop(task)
    assert (answer["task_id"], answer["created"]) == ("legacy-task", False)


async def test_cancel_appends_once_and_refuses_unknown_and_ended_tasks(
    api: ApiService, nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    task_id = (await ask(nats_client, CREATE, TASK))["task_id"]
    answer = await ask(nats_client, CANCEL, {"task_id": task_id})
    event = answer["event"]
    assert (event["type"], event["actor"], event["reason"]) == (
        "task.cancelled",
        "api",
        "cancelled by owner",
    )
    before = await event_log.last_seq()
    again = await ask(nats_client, CANCEL, {"task_id": task_id, "reason": "twice"})
    assert again["error"]["field"] == "task_id" and "already cancelled" in again["error"]["message"]
    unknown = await ask(nats_client, CANCEL, {"task_id": "nope"})
    assert unknown["error"]["code"] == "not_found"
    missing = await ask(nats_client, CANCEL, {})
    assert missing["error"]["field"] == "task_id"
    assert await event_log.last_seq() == before
    listed = await ask(nats_client, LIST, {"status": "cancelled"})
    assert [t["task_id"] for t in listed["tasks"]] == [task_id]


async def test_cancel_carries_the_given_reason(
    api: ApiService, nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    task_id = (await ask(nats_client, CREATE, TASK))["task_id"]
    await ask(nats_client, CANCEL, {"task_id": task_id, "reason": "wrong data"})
    records = [r async for r in event_log.read(subject=ev.task_subject(task_id))]
    last = records[-1].event
    assert isinstance(last, ev.TaskCancelled) and last.reason == "wrong data"


# --- the CLI ---------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    return cli.main(argv)


async def test_cli_submit_and_cancel_through_the_service(
    api: ApiService, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--nats", nats_server.url]
    argv = [*base, "submit", "--image", "img:1", "--gpus", "2", "--env", "A=b=c"]
    argv += ["--request-id", "cli-1", "--", "python", "-c", "print(1)"]
    assert await anyio.to_thread.run_sync(run_cli, argv) == 0
    task_id = capsys.readouterr().out.strip()
    await api.sync()
    spec = api.state.tasks[task_id].spec
    assert spec.command == ("python", "-c", "print(1)") and spec.env == {"A": "b=c"}
    assert spec.gpus == 2
    assert await anyio.to_thread.run_sync(run_cli, [*argv[:-4], "--json", *argv[-4:]]) == 0
    assert json.loads(capsys.readouterr().out)["task_id"] == task_id
    assert await anyio.to_thread.run_sync(run_cli, [*base, "cancel", task_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "task.cancelled"
    bad = [*base, "submit", "--image", "img", "--gpus", "0", "--", "x"]
    assert await anyio.to_thread.run_sync(run_cli, bad) == 1
    assert "gpus:" in capsys.readouterr().err


async def test_cli_says_plainly_when_no_service_answers(
    nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--nats", nats_server.url, "submit", "--image", "img", "--timeout", "1", "--", "x"]
    assert await anyio.to_thread.run_sync(run_cli, argv) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "no gpuwarden engine is answering on gw.api.task.create" in err
    assert "gpuwarden up" in err


async def test_in_the_engine_process_the_api_folds_the_engines_own_read(
    nats_client: NatsClient, event_log: JetStreamEventLog, command_bus: Any
) -> None:
    """`gpuwarden engine` runs the API on the engine's read of the log (one consumer on
    GW_EVENTS, not two): a task created through it is placed by the engine, and the API
    reads its own write and the engine's decision back."""
    from gpuwarden.engine.runtime import Engine

    await register(event_log, "n1", 1)
    engine = Engine(event_log, command_bus, VirtualClock(T0))
    service = ApiService(nats_client, event_log, VirtualClock(T0), shared=True)
    engine.taps.append(service.follow)
    engine_task = asyncio.create_task(engine.run())
    with anyio.fail_after(10):
        await engine.caught_up.wait()
    service.ready.set()
    api_task = await start_service(service)
    try:
        created = await ask(nats_client, CREATE, {**TASK, "name": "job", "owner": "ada"})
        task_id = created["task_id"]
        await engine.wait_idle(timeout_s=10)  # placed: the API folded that read first
        got = (await ask(nats_client, GET, {"task_id": task_id}))["task"]
        assert (got["status"], got["gpu_uuids"]) == ("running", ["n1-0"])
        last = (await event_log.js.stream_info(ev.EVENTS_STREAM)).state.last_seq
        consumers = await event_log.js.consumers_info(ev.EVENTS_STREAM)
        live = [c for c in consumers if c.delivered.stream_seq == last]  # not catch-up's
        assert len(live) == 1, "the API opened a read of its own"
    finally:
        await stop(api_task)
        await stop(engine_task)
