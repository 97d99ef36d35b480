"""`gpuwarden up` killed with SIGKILL and started again: same URL, same task, one exit.

Real processes and real Docker: `up --runtime docker` (declared GPUs) runs a task
whose container waits for a file the test creates in it. The whole `up` process group
(the engine, its task API, the local agent and the embedded nats-server) is killed with
SIGKILL while the container runs, and `up` is started again at once on the same data
directory. It must come back on the same URL (the port kept in the data directory), and
the running container must stay attempt 1: no new placement, no lost node. Once the
test lets the container finish, its exit is recorded exactly once and the task completes.
Every wait is on the log or the heartbeats, with a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from gpuwarden.adapters.docker_runtime import TASK_LABEL
from gpuwarden.adapters.embedded_nats import STATE_FILE, port_file
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.adapters.heartbeats import heartbeat_subject
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.ports import StoredEvent
from nats.aio.client import Client as NatsClient

from tests.fixtures.docker import DockerJanitor

pytestmark = pytest.mark.docker

CLI = [sys.executable, "-m", "gpuwarden.engine.cli"]
DEADLINE_S = 60.0
RESTART_WITHIN_S = 5.0
RELEASE = "/gw-release"  # the container ends (exit 0) once this file exists in it
WAITER = ["sh", "-c", f"while [ ! -e {RELEASE} ]; do sleep 0.1; done; exit 0"]


@dataclass
class Up:
    """One `gpuwarden up --runtime docker` in its own process group."""

    data: Path
    node: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    spawned_at: float = 0.0

    def start(self) -> None:
        with self.log_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [
                    *CLI,
                    "--data-dir",
                    str(self.data),
                    "up",
                    "--runtime",
                    "docker",
                    "--node",
                    self.node,
                    "--gpus",
                    "1",
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,  # its own group: up and its nats-server
            )
        self.spawned_at = time.monotonic()
        lines: queue.Queue[bytes] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None

        def pump() -> None:  # reads the URL, then keeps the pipe drained
            for line in stdout:
                lines.put(line)
            lines.put(b"")

        threading.Thread(target=pump, daemon=True).start()
        try:
            line = lines.get(timeout=DEADLINE_S)
        except queue.Empty:
            pytest.fail(f"gpuwarden up printed no URL within {DEADLINE_S} s\n{self.log_tail()}")
        self.url = line.decode().strip()
        assert self.url.startswith("nats://127.0.0.1:"), f"{line!r}\n{self.log_tail()}"

    def kill9(self) -> None:
        """SIGKILL to the whole group, as a crash or an OOM kill of the box would."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.cleanup()
            pytest.fail(f"gpuwarden up did not stop on SIGTERM within 30 s\n{self.log_tail()}")

    def cleanup(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def assert_alive(self, when: str) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            pytest.fail(f"gpuwarden up exited with {code} {when}\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        text = self.log_path.read_text(errors="replace")
        return "--- gpuwarden up stderr (tail) ---\n" + text[-chars:]


async def gw(*args: str) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(30):
        return await anyio.run_process([*CLI, *args], check=False)


@asynccontextmanager
async def admin(up: Up) -> AsyncIterator[NatsClient]:
    nc = await connect(up.url, creds=str(up.data / "auth" / "admin.creds"), name="restart-test")
    try:
        yield nc
    finally:
        await nc.close()


async def wait_event(
    nc: NatsClient, predicate: Callable[[ev.Event], bool], what: str, up: Up
) -> StoredEvent:
    """The first event in the log (already there or still to come) that matches."""
    with anyio.move_on_after(DEADLINE_S):
        async with aclosing(JetStreamEventLog(nc).subscribe(1)) as records:  # type: ignore[type-var]
            async for record in records:
                if record.event is not None and predicate(record.event):
                    return record
    pytest.fail(f"no {what} in the log within {DEADLINE_S} s\n{up.log_tail()}")


async def next_beat(nc: NatsClient, node: str, up: Up, *, not_from: str | None = None) -> str:
    """The agent instance id of the next heartbeat of `node` (from another instance than
    `not_from`, when given)."""
    sub = await nc.subscribe(heartbeat_subject(node))
    try:
        with anyio.move_on_after(DEADLINE_S):
            async for msg in sub.messages:
                agent: str = json.loads(msg.data)["agent"]
                if agent != not_from:
                    return agent
    finally:
        await sub.unsubscribe()
    pytest.fail(f"no heartbeat of node {node} within {DEADLINE_S} s\n{up.log_tail()}")


def about(task_id: str, kind: type[Any]) -> Callable[[ev.Event], bool]:
    return lambda e: isinstance(e, kind) and getattr(e, "task_id", None) == task_id


async def test_up_killed_and_restarted_keeps_its_url_and_its_task(
    tmp_path: Path,
    docker_client: docker.DockerClient,
    docker_janitor: DockerJanitor,
    test_image: str,
) -> None:
    data = tmp_path / "data"
    node = docker_janitor.node  # its containers carry this node's label: the janitor's
    first = Up(data, node, tmp_path / "up-1.log")
    second = Up(data, node, tmp_path / "up-2.log")
    try:
        first.start()
        submitted = await gw(
            "--data-dir", str(data), "submit", "--image", test_image, "--gpus", "1", "--", *WAITER
        )
        assert submitted.returncode == 0, submitted.stderr.decode() + first.log_tail()
        task = submitted.stdout.decode().strip()
        async with admin(first) as nc:
            started = await wait_event(
                nc, about(task, ev.ContainerStarted), "container.started", first
            )
            assert isinstance(started.event, ev.ContainerStarted) and started.event.attempt == 1
            old_agent = await next_beat(nc, node, first)
        (container,) = docker_client.containers.list(filters={"label": f"{TASK_LABEL}={task}"})
        assert container.status == "running"

        first.kill9()
        killed_at = time.monotonic()
        second.start()  # the same data directory, at once
        assert second.spawned_at - killed_at < RESTART_WITHIN_S
        second.assert_alive("after restart")

        # The same address: the URL it prints, the port file, the state file.
        assert second.url == first.url
        port = int(first.url.rpartition(":")[2])
        assert json.loads(port_file(data).read_text()) == {"client": port}
        assert json.loads((data / "nats" / STATE_FILE).read_text())["url"] == first.url

        async with admin(second) as nc:
            # The restarted agent is alive (a new instance beats) and the container ran on.
            await next_beat(nc, node, second, not_from=old_agent)
            container.reload()
            assert container.status == "running", container.status
            # A read command in the data directory finds the running server (no server
            # of its own) and sees attempt 1 still running.
            shown = await gw("--data-dir", str(data), "tasks", "--json")
            assert shown.returncode == 0, shown.stderr
            (row,) = [r for r in json.loads(shown.stdout) if r["id"] == task]
            assert (row["state"], row["attempts"], row["current_attempt"]) == ("running", 1, 1)

            container.exec_run(["touch", RELEASE])  # now let it finish
            await wait_event(nc, about(task, ev.TaskCompleted), "task.completed", second)
            log = JetStreamEventLog(nc)
            everything = [r.event async for r in log.read() if r.event is not None]
        second.assert_alive("after the task completed")

        mine = [e for e in everything if getattr(e, "task_id", None) == task]
        kinds = [ev.type_of(e) for e in mine]
        scheduled = [e.attempt for e in mine if isinstance(e, ev.TaskScheduled)]
        assert scheduled == [1], f"placed again after the restart: {kinds}"
        assert [(e.attempt, e.exit_code) for e in mine if isinstance(e, ev.ContainerExited)] == [
            (1, 0)
        ], kinds
        assert [e.attempt for e in mine if isinstance(e, ev.ContainerStarted)] == [1], kinds
        assert kinds.count("task.completed") == 1 and "task.failed" not in kinds, kinds
        lost = [e for e in everything if isinstance(e, ev.NodeLost) and e.node == node]
        assert lost == [], f"node {node} declared lost across a {RESTART_WITHIN_S} s restart"

        # The CLI tells the same story from the running server.
        listed = await gw("--data-dir", str(data), "events", "--task", task, "--json")
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [r["type"] for r in rows].count("container.exited") == 1
        assert second.stop() == 0, second.log_tail()
    finally:
        first.cleanup()
        second.cleanup()
