"""The task API over a real nats-server: answers, errors that store nothing, idempotency,
the caller's identity from the subject, owner-only rights and sealed env."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import anyio
import nats.errors
import pytest
from gpuwarden.adapters import api_service
from gpuwarden.adapters.api_service import CREATE, GET, ApiService, api_subject, route
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.env_seal import EnvKey, is_sealed, open_env, seal_env
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.engine import cli
from gpuwarden.engine.cli import api as api_cli
from gpuwarden.engine.clock import VirtualClock
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core import wire
from gpuwarden.engine.ports import StoredEvent
from nats.aio.client import Client as NatsClient

T0 = datetime(2026, 3, 1, tzinfo=UTC)
TASK = {"image": "gpuwarden-test:latest", "command": ["sleep", "1"]}
SECRET = "hf_s3cr3t-token-value"


def ada(verb: str) -> str:
    return api_subject("ada", verb)


def bob(verb: str) -> str:
    return api_subject("bob", verb)


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
    assert (service.refused, service.fold_errors) == (0, 0)


async def register(log: JetStreamEventLog, node: str, gpus: int) -> None:
    infos = tuple(ev.GpuInfo(uuid=f"{node}-{i}", index=i, model="H100") for i in range(gpus))
    event = ev.NodeRegistered(
        id=f"reg-{node}", at=T0, actor="test", node=node, runtime="sim", gpus=infos
    )
    await log.append(ev.subject_of(event), [event])


async def request(nc: NatsClient, subject: str, data: bytes) -> Any:
    """As the subject's principal asks: the reply comes to its own inbox."""
    return await api_cli.request_as(nc, subject, data, 5)


async def ask(nc: NatsClient, subject: str, body: Any) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = await request(nc, subject, data)
    answer: dict[str, Any] = json.loads(reply.data)
    return answer


async def test_create_answers_with_the_task_id_once_submitted_is_stored(
    api: ApiService, nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    answer = await ask(nats_client, ada("create"), {**TASK, "name": "job", "owner": "ada"})
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
    got = await ask(nats_client, ada("get"), {"task_id": task_id})
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
    answer = await ask(nats_client, ada("create"), body)
    assert answer["error"]["field"] == field
    assert words in answer["error"]["message"]
    assert await event_log.last_seq() == before
    assert "task_id" in await ask(nats_client, ada("create"), TASK), "the service stopped serving"


async def test_the_same_request_id_gives_one_task_even_after_a_restart(
    api: ApiService, nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    body = {**TASK, "owner": "ada", "request_id": "ada-7"}
    first, second = await asyncio.gather(
        ask(nats_client, ada("create"), body), ask(nats_client, ada("create"), body)
    )
    assert first["task_id"] == second["task_id"]
    assert sorted([first["created"], second["created"]]) == [False, True]
    end = await event_log.last_seq()
    restarted = ApiService(nats_client, event_log, VirtualClock(T0))
    task = await start_service(restarted)  # two services now share the queue group
    try:
        for _ in range(4):
            again = await ask(nats_client, ada("create"), body)
            assert (again["task_id"], again["created"]) == (first["task_id"], False)
        other = await ask(nats_client, bob("create"), {**body, "owner": "bob"})
        assert other["created"] is True and other["task_id"] != first["task_id"]
        changed = await ask(nats_client, ada("create"), {**body, "gpus": 2})
        assert changed["error"]["field"] == "request_id"
    finally:
        await stop(task)
    assert await event_log.last_seq() == end + 1  # only bob's task


async def test_the_fold_knows_request_ids_written_before_the_service_started(
    nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    """An old log: a submission without an owner, on its scheme-1 subject, answered to an
    old client of an insecure service."""
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
    await event_log.js.publish(
        ev.legacy_subject_of(old), ev.encode(old), headers={"Nats-Msg-Id": old.id}
    )
    service = ApiService(nats_client, event_log, VirtualClock(T0), trust_owner_field=True)
    task = await start_service(service)
    try:
        answer = await ask(
            nats_client, CREATE, {"image": "img", "command": ["x"], "request_id": "r-1"}
        )
        assert ev.task_subject("legacy-task") not in service.subject_seqs  # scheme 1 only
        cancelled = await ask(nats_client, api_service.CANCEL, {"task_id": "legacy-task"})
        await service.sync()
    finally:
        await stop(task)
    assert (answer["task_id"], answer["created"]) == ("legacy-task", False)
    assert (service.refused, service.fold_errors) == (0, 0)
    assert "seq" in cancelled, cancelled  # CAS over the aggregate's scheme-2 subjects: none
    assert service.subject_seqs[ev.task_subject("legacy-task")] == cancelled["seq"]


async def test_cancel_appends_once_and_refuses_unknown_and_ended_tasks(
    api: ApiService, nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    task_id = (await ask(nats_client, ada("create"), TASK))["task_id"]
    answer = await ask(nats_client, ada("cancel"), {"task_id": task_id})
    event = answer["event"]
    assert (event["type"], event["actor"], event["reason"]) == (
        "task.cancelled",
        "api",
        "cancelled by owner",
    )
    before = await event_log.last_seq()
    again = await ask(nats_client, ada("cancel"), {"task_id": task_id, "reason": "twice"})
    assert again["error"]["field"] == "task_id" and "already cancelled" in again["error"]["message"]
    unknown = await ask(nats_client, ada("cancel"), {"task_id": "nope"})
    assert unknown["error"]["code"] == "not_found"
    missing = await ask(nats_client, ada("cancel"), {})
    assert missing["error"]["field"] == "task_id"
    assert await event_log.last_seq() == before
    listed = await ask(nats_client, bob("list"), {"status": "cancelled"})
    assert [t["task_id"] for t in listed["tasks"]] == [task_id]


async def test_cancel_carries_the_given_reason(
    api: ApiService, nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    task_id = (await ask(nats_client, ada("create"), TASK))["task_id"]
    await ask(nats_client, ada("cancel"), {"task_id": task_id, "reason": "wrong data"})
    records = [r async for r in event_log.read(subject=ev.task_subject(task_id))]
    last = records[-1].event
    assert isinstance(last, ev.TaskCancelled) and last.reason == "wrong data"


# --- identity and rights ---------------------------------------------------------------

KEY = EnvKey.generate()
SECRET_ENV = {"HF_TOKEN": SECRET, "SEED": "1"}


@pytest.fixture
async def keyed(nats_client: NatsClient, event_log: JetStreamEventLog) -> AsyncIterator[ApiService]:
    """A service that seals env with KEY."""
    await register(event_log, "n1", 2)
    service = ApiService(nats_client, event_log, VirtualClock(T0), env_key=KEY)
    task = await start_service(service)
    yield service
    await stop(task)
    assert (service.refused, service.fold_errors) == (0, 0)


def test_api_subjects_name_the_principal_and_the_verb() -> None:
    assert api_subject("ada", "create") == "gw.api.ada.task.create"
    assert route("gw.api.ada.task.create") == ("create", "ada")
    assert route("gw.api.task.get") == ("get", None)
    assert route("gw.api.ada.task.delete") is None
    assert route("gw.api.ada.node.get") is None
    assert api_cli.api_subject("user-ada", "cancel") == api_subject("user-ada", "cancel")
    assert route(api_subject("user-Ada_L~0a1b2c", "get")) == ("get", "user-Ada_L~0a1b2c")


async def test_the_owner_is_the_principal_from_the_subject(
    api: ApiService, nats_client: NatsClient
) -> None:
    answer = await ask(nats_client, ada("create"), TASK)
    assert answer["event"]["owner"] == "ada"
    named = await ask(nats_client, ada("create"), {**TASK, "owner": "ada"})
    assert named["event"]["owner"] == "ada"


async def test_a_forged_owner_field_is_refused_and_stores_nothing(
    api: ApiService, nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    before = await event_log.last_seq()
    answer = await ask(nats_client, ada("create"), {**TASK, "owner": "bob"})
    assert answer["error"] == {
        "code": "forbidden",
        "field": "owner",
        "message": "owner comes from your credentials (you are ada)",
    }
    assert await event_log.last_seq() == before


async def test_a_secure_service_does_not_serve_the_old_subjects(
    api: ApiService, nats_client: NatsClient
) -> None:
    with pytest.raises(nats.errors.NoRespondersError):
        await nats_client.request(CREATE, json.dumps(TASK).encode(), timeout=2)
    answer = await api.handle(CREATE, json.dumps(TASK).encode())
    assert answer["error"]["code"] == "invalid" and "no API on" in answer["error"]["message"]


async def test_an_insecure_service_lets_the_owner_field_win_and_serves_old_clients(
    nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    service = ApiService(nats_client, event_log, VirtualClock(T0), trust_owner_field=True)
    task = await start_service(service)
    try:
        mine = await ask(nats_client, ada("create"), {**TASK, "owner": "bob"})
        old = await ask(nats_client, CREATE, {**TASK, "owner": "carol"})
        anonymous = await ask(nats_client, CREATE, TASK)
        got = await ask(nats_client, GET, {"task_id": old["task_id"]})
    finally:
        await stop(task)
    assert mine["event"]["owner"] == "bob"
    assert old["event"]["owner"] == "carol"
    assert anonymous["event"]["owner"] == ""
    assert got["task"]["owner"] == "carol"


async def test_only_the_owner_or_an_operator_may_cancel(
    api: ApiService, nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    first = (await ask(nats_client, ada("create"), TASK))["task_id"]
    second = (await ask(nats_client, ada("create"), TASK))["task_id"]
    before = await event_log.last_seq()
    refused = await ask(nats_client, bob("cancel"), {"task_id": first})
    assert (refused["error"]["code"], refused["error"]["field"]) == ("forbidden", "task_id")
    assert "belongs to ada" in refused["error"]["message"]
    assert await event_log.last_seq() == before
    assert (await ask(nats_client, ada("cancel"), {"task_id": first}))["event"]["task_id"] == first
    by_operator = await ask(nats_client, api_subject("operator", "cancel"), {"task_id": second})
    assert by_operator["event"]["task_id"] == second


async def test_get_shows_the_env_to_its_owner_and_operators_only(
    keyed: ApiService, nats_client: NatsClient
) -> None:
    task_id = (await ask(nats_client, ada("create"), {**TASK, "env": SECRET_ENV}))["task_id"]
    reply = await request(nats_client, bob("get"), json.dumps({"task_id": task_id}).encode())
    assert SECRET.encode() not in reply.data
    other = json.loads(reply.data)["task"]
    assert "env" not in other and other["env_names"] == ["HF_TOKEN", "SEED"]
    own = (await ask(nats_client, ada("get"), {"task_id": task_id}))["task"]
    assert own["env"] == SECRET_ENV
    admin = (await ask(nats_client, api_subject("admin", "get"), {"task_id": task_id}))["task"]
    assert admin["env"] == SECRET_ENV


async def test_the_stored_submission_holds_only_ciphertext_of_the_env(
    keyed: ApiService, nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    answer = await ask(nats_client, ada("create"), {**TASK, "env": SECRET_ENV})
    assert SECRET not in json.dumps(answer)
    js = nats_client.jetstream()
    for seq in range(1, await event_log.last_seq() + 1):  # every stored message, raw
        msg = await js.get_msg(wire.EVENTS_STREAM, seq)
        assert SECRET.encode() not in (msg.data or b"")
        assert SECRET not in json.dumps(msg.headers or {})
    stored = ev.decode((await js.get_msg(wire.EVENTS_STREAM, answer["seq"])).data or b"")
    assert isinstance(stored, ev.TaskSubmitted) and sorted(stored.env) == ["HF_TOKEN", "SEED"]
    assert all(is_sealed(value) for value in stored.env.values())
    assert open_env(stored.env, KEY) == SECRET_ENV


@pytest.mark.parametrize("with_key", [True, False])
async def test_a_sealed_value_copied_from_the_log_is_refused(
    with_key: bool, nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    """Else a reader of GW_EVENTS with a user's credentials could have the engine open
    someone else's secret into its own container."""
    stolen = seal_env({"HF_TOKEN": SECRET}, KEY.public_bytes)
    service = ApiService(
        nats_client, event_log, VirtualClock(T0), env_key=KEY if with_key else None
    )
    answer = await service.handle(bob("create"), json.dumps({**TASK, "env": stolen}).encode())
    assert (answer["error"]["code"], answer["error"]["field"]) == ("invalid", "env.HF_TOKEN")
    assert await event_log.last_seq() == 0


async def test_a_repeated_request_with_sealed_env_is_the_same_task(
    keyed: ApiService, nats_client: NatsClient
) -> None:
    body = {**TASK, "env": SECRET_ENV, "request_id": "ada-sealed"}
    first = await ask(nats_client, ada("create"), body)
    again = await ask(nats_client, ada("create"), body)
    assert (again["task_id"], again["created"]) == (first["task_id"], False)
    changed = await ask(nats_client, ada("create"), {**body, "env": {"HF_TOKEN": "other"}})
    assert changed["error"]["field"] == "request_id"


async def test_list_with_owner_me_lists_the_callers_tasks(
    api: ApiService, nats_client: NatsClient
) -> None:
    mine = (await ask(nats_client, ada("create"), TASK))["task_id"]
    await ask(nats_client, bob("create"), TASK)
    listed = await ask(nats_client, ada("list"), {"owner": "me"})
    assert [t["task_id"] for t in listed["tasks"]] == [mine]
    by_name = await ask(nats_client, bob("list"), {"owner": "ada"})
    assert [t["task_id"] for t in by_name["tasks"]] == [mine]
    assert (await ask(nats_client, bob("list"), {}))["total"] == 2


# --- crash-only fold -------------------------------------------------------------------


def submitted(task_id: str, seq: int) -> StoredEvent:
    event = ev.TaskSubmitted(
        id=f"s-{task_id}",
        at=T0,
        actor="api",
        task_id=task_id,
        name=task_id,
        image="i",
        command=("x",),
    )
    return StoredEvent(seq=seq, subject=ev.subject_of(event), event=event)


async def test_a_record_whose_fold_raises_is_counted_and_the_next_one_folds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = api_service.evolve

    def poisoned(state: Any, event: ev.Event) -> Any:
        if isinstance(event, ev.TaskSubmitted) and event.task_id == "poison":
            raise ValueError("boom\nlast line of it")
        return real(state, event)

    monkeypatch.setattr(api_service, "evolve", poisoned)
    service = ApiService(cast(Any, None), cast(Any, None), VirtualClock(T0))
    service.admission = None  # the fold alone
    service.follow(submitted("poison", 1))
    service.follow(submitted("good", 2))
    assert (service.fold_errors, service.folded) == (1, 2)
    assert "good" in service.state.tasks
    assert service.subject_seqs[ev.task_subject("poison")] == 1  # the CAS still counts it
    assert any(
        "seq 1" in r.getMessage() and "last line of it" in r.getMessage() for r in caplog.records
    )


async def test_a_record_admission_refuses_is_counted_and_not_folded() -> None:
    class Refuse:
        def admit(self, subject: str, event: ev.Event) -> str | None:
            return "forged" if getattr(event, "task_id", None) == "forged" else None

    service = ApiService(cast(Any, None), cast(Any, None), VirtualClock(T0), admission=Refuse())
    service.follow(submitted("forged", 1))
    service.follow(submitted("good", 2))
    assert (service.refused, service.fold_errors, service.folded) == (1, 0, 2)
    assert sorted(service.state.tasks) == ["good"]


# --- the CLI ---------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    return cli.main(argv)


async def test_cli_submit_and_cancel_through_the_service(
    api: ApiService,
    nats_server: EmbeddedNats,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("USER", "ada")  # no --creds: the CLI speaks as $USER
    base = ["--nats", nats_server.url]
    argv = [*base, "submit", "--image", "img:1", "--gpus", "2", "--env", "A=b=c"]
    argv += ["--request-id", "cli-1", "--", "python", "-c", "print(1)"]
    assert await anyio.to_thread.run_sync(run_cli, argv) == 0
    task_id = capsys.readouterr().out.strip()
    await api.sync()
    spec = api.state.tasks[task_id].spec
    assert spec.command == ("python", "-c", "print(1)") and spec.env == {"A": "b=c"}
    assert (spec.gpus, spec.owner) == (2, "ada")
    assert await anyio.to_thread.run_sync(run_cli, [*argv[:-4], "--json", *argv[-4:]]) == 0
    assert json.loads(capsys.readouterr().out)["task_id"] == task_id
    as_bob = [*base, "cancel", task_id, "--owner", "bob"]
    assert await anyio.to_thread.run_sync(run_cli, as_bob) == 1
    assert "only its owner or an operator may cancel it" in capsys.readouterr().err
    assert await anyio.to_thread.run_sync(run_cli, [*base, "cancel", task_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "task.cancelled"
    bad = [*base, "submit", "--image", "img", "--gpus", "0", "--", "x"]
    assert await anyio.to_thread.run_sync(run_cli, bad) == 1
    assert "gpus:" in capsys.readouterr().err


async def test_cli_says_plainly_when_no_service_answers(
    nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USER", "ada")
    argv = ["--nats", nats_server.url, "submit", "--image", "img", "--timeout", "1", "--", "x"]
    assert await anyio.to_thread.run_sync(run_cli, argv) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "no gpuwarden engine is answering on gw.api.ada.task.create" in err
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
        created = await ask(nats_client, ada("create"), {**TASK, "name": "job", "owner": "ada"})
        task_id = created["task_id"]
        await engine.wait_idle(timeout_s=10)  # placed: the API folded that read first
        got = (await ask(nats_client, ada("get"), {"task_id": task_id}))["task"]
        assert (got["status"], got["gpu_uuids"]) == ("running", ["n1-0"])
        last = (await event_log.js.stream_info(wire.EVENTS_STREAM)).state.last_seq
        consumers = await event_log.js.consumers_info(wire.EVENTS_STREAM)
        live = [c for c in consumers if c.delivered.stream_seq == last]  # not catch-up's
        assert len(live) == 1, "the API opened a read of its own"
    finally:
        await stop(api_task)
        await stop(engine_task)


def test_the_cli_speaks_as_its_credentials_else_as_owner_or_user(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import argparse

    from gpuwarden.adapters.auth import generate

    generate(tmp_path / "auth", users=["carol"])
    creds = str(tmp_path / "auth" / "user-carol.creds")
    with_creds = argparse.Namespace(creds=creds, owner="bob", nats="nats://x")
    assert api_cli.principal_of(with_creds) == "user-carol"
    monkeypatch.setenv("USER", "dave")
    bare = argparse.Namespace(creds=None, owner=None, nats="nats://x")
    assert api_cli.principal_of(bare) == "dave"
    named = argparse.Namespace(creds=None, owner="Ada L", nats="nats://x")
    assert api_cli.principal_of(named) == ev.subject_token("Ada L")
    monkeypatch.delenv("USER")
    assert api_cli.principal_of(bare) == "anonymous"


async def test_a_name_that_is_no_subject_token_owns_through_its_token(
    api: ApiService, nats_client: NatsClient
) -> None:
    """`--owner "Ada L"` without credentials: the CLI speaks as the name's subject token,
    and the task keeps the name."""
    token = ev.subject_token("Ada L")
    answer = await ask(nats_client, api_subject(token, "create"), {**TASK, "owner": "Ada L"})
    assert answer["event"]["owner"] == "Ada L"
    cancelled = await ask(nats_client, api_subject(token, "cancel"), {"task_id": answer["task_id"]})
    assert cancelled["event"]["type"] == "task.cancelled"


async def test_the_largest_env_intake_allows_still_fits_once_sealed(
    keyed: ApiService, nats_client: NatsClient
) -> None:
    from gpuwarden.engine.core.intake import MAX_ENV_BYTES

    env = {"BIG": "x" * (MAX_ENV_BYTES - 3)}
    answer = await ask(nats_client, ada("create"), {**TASK, "env": env})
    assert answer["created"] is True, answer
    assert is_sealed(answer["event"]["env"]["BIG"])
    assert (await ask(nats_client, ada("get"), {"task_id": answer["task_id"]}))["task"][
        "env"
    ] == env


async def test_a_reply_goes_only_to_the_callers_own_inbox(
    api: ApiService, nats_client: NatsClient, event_log: JetStreamEventLog
) -> None:
    """The API may answer any request, so a reply subject of the caller's choosing would
    let a user write, as the API, onto a task's or a node's subject: it is ignored."""
    assert api.reply_allowed(ada("get"), "_INBOX.ada.x1")
    assert not api.reply_allowed(ada("get"), "_INBOX.bob.x1")
    assert not api.reply_allowed(ada("get"), "gw.evt.node.n1.node.n1")
    before = await event_log.last_seq()
    await nats_client.publish(ada("list"), b"{}", reply="gw.evt.task.forged.api")
    assert "tasks" in await ask(nats_client, ada("list"), {})  # handled after the forgery
    assert await event_log.last_seq() == before
