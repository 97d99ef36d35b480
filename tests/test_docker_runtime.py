"""DockerRuntime against the real Docker Engine at DOCKER_HOST, plus its pure helpers.

What the node agent relies on: exit codes, kills and OOM kills read back right; start
failures carry the daemon's words; one container per attempt however often run() is
called; deaths show up on the watched event stream with ids that repeat on replay.
"""

from __future__ import annotations

import threading
import uuid
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import docker
import pytest
from gpuwarden.adapters.agent_events import observation_event
from gpuwarden.adapters.docker_runtime import (
    DockerRuntime,
    container_name,
    exit_info_from_inspect,
    parse_docker_time,
)
from gpuwarden.engine.core.commands import RunCommand
from gpuwarden.engine.core.events import ContainerExited, ContainerStarted
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.ports import (
    ContainerObservation,
    ContainerRuntimeError,
    ContainerStartError,
    ExitInfo,
)

from tests.fixtures.docker import DockerJanitor

DEADLINE_S = 20


def make_cmd(
    image: str, command: list[str], *, attempt: int = 1, task_id: str | None = None, **kw: Any
) -> RunCommand:
    return RunCommand(
        id=new_id(),
        node="n",
        task_id=task_id or f"t-{uuid.uuid4().hex[:10]}",
        attempt=attempt,
        image=image,
        command=tuple(command),
        **kw,
    )


@pytest.fixture
def runtime(docker_client: docker.DockerClient, docker_janitor: DockerJanitor) -> DockerRuntime:
    return DockerRuntime(docker_client, docker_janitor.node, gpu_mode="declared")


# --- pure helpers ------------------------------------------------------------------


def test_container_names_are_legal_and_keep_sanitised_ids_apart() -> None:
    a, b = container_name("job/1 x", 2), container_name("job_1_x", 2)
    assert a != b
    assert a.startswith("gw-job_1_x-") and a.endswith("-a2")
    assert container_name("job/1 x", 2) == a
    assert container_name("job/1 x", 3) != a
    assert all(ch.isalnum() or ch in "_.-" for ch in container_name("ü/../é" * 40, 1))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2026-11-29T03:27:50.026254664Z", datetime(2026, 11, 29, 3, 27, 50, 26254, UTC)),
        ("2026-11-29T03:27:50Z", datetime(2026, 11, 29, 3, 27, 50, tzinfo=UTC)),
        ("2026-11-29T03:27:50.5+02:00", datetime(2026, 11, 29, 1, 27, 50, 500000, UTC)),
        ("0001-01-01T00:00:00Z", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_docker_time(raw: str | None, expected: datetime | None) -> None:
    assert parse_docker_time(raw) == expected


def _inspect(code: int, *, oom: bool = False, running: bool = False) -> dict[str, Any]:
    return {
        "Id": "c" * 64,
        "State": {
            "Status": "running" if running else "exited",
            "Running": running,
            "OOMKilled": oom,
            "ExitCode": code,
            "Error": "",
            "StartedAt": "2026-01-01T00:00:00.1Z",
            "FinishedAt": "0001-01-01T00:00:00Z" if running else "2026-01-01T00:00:01.25Z",
        },
        "Config": {"Labels": {"gpuwarden.task": "t1", "gpuwarden.attempt": "2"}},
    }


def test_exit_info_reads_signal_and_labels_from_inspect() -> None:
    info = exit_info_from_inspect(_inspect(137, oom=True))
    assert (info.exit_code, info.signal, info.oom_killed) == (137, 9, True)
    assert (info.task_id, info.attempt) == ("t1", 2)
    assert info.finished_at == datetime(2026, 1, 1, 0, 0, 1, 250000, UTC)
    assert exit_info_from_inspect(_inspect(3)).signal is None
    running = exit_info_from_inspect(_inspect(0, running=True))
    assert running.running and running.exit_code is None and running.finished_at is None


def test_declared_mode_requires_a_known_gpu_mode(docker_client: docker.DockerClient) -> None:
    with pytest.raises(ValueError, match="gpu_mode"):
        DockerRuntime(docker_client, "n", gpu_mode="cuda")  # type: ignore[arg-type]


async def test_unreachable_engine_is_a_start_error_not_a_crash(tmp_path: Any) -> None:
    client = docker.DockerClient(base_url=f"unix://{tmp_path}/no.sock", version="1.41")
    runtime = DockerRuntime(client, "n", gpu_mode="declared")
    with pytest.raises(ContainerStartError):
        await runtime.run(make_cmd("gpuwarden-test:latest", ["true"]))
    with pytest.raises(ContainerRuntimeError):
        await runtime.list_managed()
    with pytest.raises(ContainerRuntimeError, match="cannot watch"):
        async with aclosing(runtime.watch()) as observations:
            async for _ in observations:
                pass
    client.close()


# --- real engine -------------------------------------------------------------------

docker_test = pytest.mark.docker


async def _run_to_exit(runtime: DockerRuntime, cmd: RunCommand) -> ExitInfo:
    container_id = await runtime.run(cmd)
    return await runtime.wait_exit(container_id, timeout_s=DEADLINE_S)


@docker_test
@pytest.mark.parametrize("code", [0, 3])
async def test_exit_code_reaches_inspect(
    runtime: DockerRuntime, test_image: str, code: int
) -> None:
    info = await _run_to_exit(runtime, make_cmd(test_image, ["sh", "-c", f"exit {code}"]))
    assert (info.exit_code, info.signal, info.oom_killed, info.running) == (
        code,
        None,
        False,
        False,
    )
    assert info.finished_at is not None


@docker_test
async def test_kill_reads_as_signal_9(
    runtime: DockerRuntime, docker_client: docker.DockerClient, test_image: str
) -> None:
    container_id = await runtime.run(make_cmd(test_image, ["sleep", "30"]))
    await anyio.to_thread.run_sync(docker_client.api.kill, container_id)
    info = await runtime.wait_exit(container_id, timeout_s=DEADLINE_S)
    assert (info.exit_code, info.signal, info.oom_killed) == (137, 9, False)


@docker_test
async def test_memory_limit_breach_reads_as_oom_kill(
    runtime: DockerRuntime, test_image: str
) -> None:
    hog = ["sh", "-c", "x=a; while true; do x=$x$x; done"]
    info = await _run_to_exit(runtime, make_cmd(test_image, hog, memory_mb=16))
    assert info.oom_killed is True
    assert (info.exit_code, info.signal) == (137, 9)


@docker_test
async def test_missing_image_is_a_start_error_with_the_daemons_text(
    runtime: DockerRuntime, test_image: str
) -> None:
    cmd = make_cmd(f"gpuwarden-missing-{uuid.uuid4().hex[:8]}:latest", ["true"])
    with pytest.raises(ContainerStartError, match="No such image"):
        await runtime.run(cmd)


@docker_test
async def test_missing_executable_is_a_start_error_and_leaves_nothing(
    runtime: DockerRuntime, test_image: str
) -> None:
    cmd = make_cmd(test_image, ["no-such-program"])
    with pytest.raises(ContainerStartError, match="executable file not found") as caught:
        await runtime.run(cmd)
    assert "no-such-program" in str(caught.value)
    assert await runtime.list_managed() == []


@docker_test
async def test_gpus_go_to_the_daemon_as_a_device_request(
    docker_client: docker.DockerClient, docker_janitor: DockerJanitor, test_image: str
) -> None:
    nvml = DockerRuntime(docker_client, docker_janitor.node, gpu_mode="nvml")
    cmd = make_cmd(test_image, ["true"], gpu_uuids=("GPU-00000000-fake",))
    # Without the NVIDIA runtime the daemon refuses the request; with it, the UUID is
    # unknown. Either way the refusal names the GPU request, so it got there.
    with pytest.raises(ContainerStartError, match=r"(?i)gpu|device|nvidia"):
        await nvml.run(cmd)


@docker_test
async def test_container_is_confined_as_declared(
    runtime: DockerRuntime, docker_client: docker.DockerClient, test_image: str
) -> None:
    argv = ["echo", "a; touch /pwned", "$HOME"]
    cmd = make_cmd(test_image, argv, memory_mb=32, env={"A": "1"}, gpu_uuids=("GPU-declared-n-0",))
    container_id = await runtime.run(cmd)
    attrs = await anyio.to_thread.run_sync(docker_client.api.inspect_container, container_id)
    host, config = attrs["HostConfig"], attrs["Config"]
    assert config["Cmd"] == argv
    assert host["Privileged"] is False and not host["CapAdd"]
    assert host["NetworkMode"] == "none"
    assert host["Memory"] == host["MemorySwap"] == 32 * 1024 * 1024
    assert {"A=1", "NVIDIA_VISIBLE_DEVICES=GPU-declared-n-0"} <= set(config["Env"])
    assert config["Labels"]["gpuwarden.command"] == cmd.id
    assert config["Labels"]["gpuwarden.attempt"] == "1"
    info = await runtime.wait_exit(container_id, timeout_s=DEADLINE_S)
    assert info.exit_code == 0


@docker_test
async def test_run_twice_for_one_attempt_starts_one_container(
    runtime: DockerRuntime,
    docker_client: docker.DockerClient,
    docker_janitor: DockerJanitor,
    test_image: str,
) -> None:
    cmd = make_cmd(test_image, ["sleep", "30"])
    results: list[str] = []
    # A second runtime shares no locks with the first, as if it were another process.
    other = DockerRuntime(docker_client, docker_janitor.node, gpu_mode="declared")

    async def run_once(on: DockerRuntime) -> None:
        results.append(await on.run(cmd))

    async with anyio.create_task_group() as tg:  # concurrent deliveries race on create
        for on in (runtime, other, runtime, other):
            tg.start_soon(run_once, on)
    again = await runtime.run(cmd)  # a redelivery after the fact
    managed = await runtime.list_managed()
    assert len(results) == 4 and set(results) == {again}
    assert [m.container_id for m in managed] == [again]
    assert managed[0].state == "running"
    next_attempt = await runtime.run(make_cmd(test_image, ["true"], task_id=cmd.task_id, attempt=2))
    assert next_attempt != again


@docker_test
async def test_stop_list_remove(runtime: DockerRuntime, test_image: str) -> None:
    cmd = make_cmd(test_image, ["sleep", "30"])
    container_id = await runtime.run(cmd)
    assert await runtime.stop(cmd.task_id, cmd.attempt, timeout_s=0) == [container_id]
    (info,) = await runtime.list_managed()
    assert (info.task_id, info.attempt, info.command_id) == (cmd.task_id, 1, cmd.id)
    assert info.state == "exited" and info.exit_code == 137
    assert await runtime.remove(cmd.task_id, cmd.attempt) == [container_id]
    assert await runtime.list_managed() == []
    assert await runtime.stop(cmd.task_id, cmd.attempt) == []


async def _collect(
    runtime: DockerRuntime, since: datetime | None, container_id: str, want: set[str]
) -> dict[str, ContainerObservation]:
    seen: dict[str, ContainerObservation] = {}
    with anyio.fail_after(DEADLINE_S):
        async with aclosing(runtime.watch(since=since)) as observations:
            async for observation in observations:
                if observation.container_id == container_id:
                    seen[observation.kind] = observation
                if want <= set(seen):
                    break
    return seen


@docker_test
async def test_watch_yields_start_and_die_with_ids_that_repeat_on_replay(
    runtime: DockerRuntime, test_image: str
) -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    cmd = make_cmd(test_image, ["sh", "-c", "exit 5"])
    found: dict[str, ContainerObservation] = {}
    subscribed = anyio.Event()

    async def watcher(scope: anyio.CancelScope) -> None:
        async with aclosing(runtime.watch(ready=subscribed)) as observations:
            async for observation in observations:
                found[observation.kind] = observation
                if "exited" in found:
                    scope.cancel()

    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher, tg.cancel_scope)
            await subscribed.wait()
            await runtime.run(cmd)

    died = found["exited"]
    assert died.exit is not None
    assert (died.task_id, died.attempt, died.command_id) == (cmd.task_id, 1, cmd.id)
    assert (died.exit.exit_code, died.exit.oom_killed) == (5, False)
    event = observation_event(died)
    assert isinstance(event, ContainerExited) and event.exit_code == 5
    replayed = await _collect(runtime, since, died.container_id, {"started", "exited"})
    readers = [t for t in threading.enumerate() if t.name == f"docker-events-{runtime.node}"]
    assert readers == [], "closing watch() must stop its reader thread"
    assert observation_event(replayed["exited"]).id == event.id, "a replay de-duplicates"
    started = observation_event(replayed["started"])
    assert isinstance(started, ContainerStarted) and started.container_id == died.container_id
