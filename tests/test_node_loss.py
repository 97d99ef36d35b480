"""Node loss with real processes: a `gpuwarden engine`, `gpuwarden agent --runtime docker`
processes with declared GPUs, real containers, a real nats-server, default liveness.

The engine runs with the default `node_lost_after_s` (30 s) and heartbeats at their
default (1 s); only the backoff is shortened so rebuilds start at once. The tests kill,
stop and restart agents the way production does (SIGKILL, SIGTERM, SIGSTOP), make
containers end while nobody watches them (signals sent through the Docker API), and
read every verdict back from the log: what was lost, what was rebuilt, what was
classified from which evidence, and which decision stopped which container.

Every container runs PROGRAM: USR1 makes it exit 0, USR2 exit 3, SIGTERM (a stop)
exit 143, SIGKILL 137 -- so a test decides how and when a container ends.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import anyio
import docker
import pytest
from gpuwarden.adapters.docker_runtime import ATTEMPT_LABEL, NODE_LABEL, TASK_LABEL
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.policy import Policy
from gpuwarden.engine.ids import new_id

from tests.fixtures.docker import DockerJanitor, remove_labelled
from tests.fixtures.processes import BeatWatch, GwProcess, LogTail

pytestmark = [pytest.mark.docker, pytest.mark.slow]

GRACE_S = 30.0  # the default node_lost_after_s these tests stand on
DETECT_SLACK_S = 5.0  # node.lost within GRACE_S .. GRACE_S + this after the last beat
STEP_S = 30.0  # deadline for anything that should follow promptly
PROGRAM = (
    "sh",
    "-c",
    "trap 'exit 0' USR1; trap 'exit 3' USR2; trap 'exit 143' TERM; sleep 600 & wait",
)
# Everything default but the backoff: a rebuild starts at once, not after 10 s.
POLICY = "backoff_initial_s = 0.2\nbackoff_max_s = 1.0\n"


class Cluster:
    """One engine process, agent processes for up to two nodes, the log and Docker."""

    def __init__(
        self,
        tmp_path: Path,
        server: EmbeddedNats,
        log: JetStreamEventLog,
        client: docker.DockerClient,
        janitor: DockerJanitor,
        image: str,
    ) -> None:
        self.tmp_path = tmp_path
        self.url = server.url
        self.log = log
        self.client = client
        self.image = image
        self.names = [janitor.node, f"{janitor.node}-b"]
        self.tail = LogTail(log)
        self.beats = BeatWatch(log.nc)
        self.agents: dict[str, GwProcess] = {}
        policy = tmp_path / "policy.toml"
        policy.write_text(POLICY)
        self.engine = GwProcess.engine(self.url, tmp_path, policy)

    async def start(self, nodes: int, gpus: int = 1) -> None:
        await self.tail.start()
        await self.engine.start()
        for name in self.names[:nodes]:
            await self.beats.watch(name)
            agent = GwProcess.agent(self.url, self.tmp_path, name, gpus=gpus)
            self.agents[name] = agent
            await agent.start()
            await self.tail.wait_for(ev.NodeRegistered, STEP_S, node=name)

    async def close(self) -> None:
        for process in [*self.agents.values(), self.engine]:
            await process.kill()
            print(f"===== {process.name} =====\n{process.output()}")
        print("===== the log =====")
        for record in self.tail.records:
            print(record.seq, describe(record.event))
        await self.beats.close()
        await self.tail.stop()
        for name in self.names:
            await anyio.to_thread.run_sync(remove_labelled, self.client, f"{NODE_LABEL}={name}")

    # --- tasks ---------------------------------------------------------------------

    async def submit(self, argv: tuple[str, ...] = PROGRAM) -> str:
        task_id = f"nl-{uuid.uuid4().hex[:10]}"
        submitted = ev.TaskSubmitted(
            id=new_id(),
            at=datetime.now(UTC),
            actor="api",
            correlation_id=task_id,
            task_id=task_id,
            name=task_id,
            image=self.image,
            command=argv,
            gpus=1,
        )
        await self.log.append(ev.task_subject(task_id), [submitted], 0)
        return task_id

    async def started(self, task_id: str, attempt: int) -> ev.ContainerStarted:
        return await self.tail.wait_for(
            ev.ContainerStarted, STEP_S, task_id=task_id, attempt=attempt
        )

    def other(self, node: str) -> str:
        [spare] = [n for n in self.agents if n != node]
        return spare

    # --- Docker, past the agents ---------------------------------------------------

    async def signal_container(self, container_id: str, signum: str) -> int:
        """Send a signal through the Docker API; the container's exit code once it ended."""
        kill = partial(self.client.api.kill, container_id, signal=signum)
        await anyio.to_thread.run_sync(kill)
        wait = partial(self.client.api.wait, container_id, timeout=STEP_S)
        return int((await anyio.to_thread.run_sync(wait))["StatusCode"])

    async def running(self, container_id: str) -> bool:
        inspect = partial(self.client.api.inspect_container, container_id)
        return bool((await anyio.to_thread.run_sync(inspect))["State"]["Running"])

    async def containers(self) -> Counter[tuple[str, str]]:
        """How many containers Docker holds per (task, attempt), on every node of ours."""
        found: Counter[tuple[str, str]] = Counter()
        for name in self.names:
            listed = partial(
                self.client.containers.list, all=True, filters={"label": f"{NODE_LABEL}={name}"}
            )
            for container in await anyio.to_thread.run_sync(listed):
                labels = container.labels
                found[labels.get(TASK_LABEL, "?"), labels.get(ATTEMPT_LABEL, "?")] += 1
        return found

    # --- the log, read back --------------------------------------------------------

    def attempts(self, task_id: str) -> list[int]:
        return sorted(e.attempt for e in self.tail.of(ev.TaskScheduled, task_id=task_id))

    async def assert_once_per_attempt(self) -> Counter[tuple[str, str]]:
        """Every exit in the log is stored once and classified at most once, and Docker
        holds at most one container per attempt; returns Docker's count per attempt."""
        exits = Counter((e.task_id, e.attempt) for e in self.tail.of(ev.ContainerExited))
        classified = Counter((e.task_id, e.attempt) for e in self.tail.of(ev.FaultClassified))
        starts = Counter((e.task_id, e.attempt) for e in self.tail.of(ev.ContainerStarted))
        assert max(exits.values(), default=0) <= 1, f"an exit logged twice: {exits}"
        assert max(classified.values(), default=0) <= 1, f"classified twice: {classified}"
        assert max(starts.values(), default=0) <= 1, f"a start logged twice: {starts}"
        held = await self.containers()
        doubled = [(key, n) for key, n in held.items() if n > 1]
        assert not doubled, f"an attempt has several containers: {doubled}"
        return held


def describe(e: ev.Event | None) -> str:
    """One line per event for a failure's report: type, whom it is about, its cause."""
    if e is None:
        return "(not admitted)"
    fields = ("task_id", "attempt", "previous_attempt", "node", "fault", "exit_code", "gpu_uuid")
    about = " ".join(f"{k}={getattr(e, k)}" for k in fields if getattr(e, k, None) is not None)
    return f"{ev.type_of(e)} {e.id} {about} cause={e.causation_id}"


@pytest.fixture
async def cluster(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    event_log: JetStreamEventLog,
    docker_client: docker.DockerClient,
    docker_janitor: DockerJanitor,
    test_image: str,
) -> AsyncIterator[Cluster]:
    assert Policy().node_lost_after_s == GRACE_S, "these tests stand on the default grace"
    c = Cluster(tmp_path, nats_server, event_log, docker_client, docker_janitor, test_image)
    try:
        yield c
    finally:
        await c.close()


async def test_agent_killed_and_back_within_the_grace_reruns_nothing(cluster: Cluster) -> None:
    """SIGKILL, a few seconds down while three of its four containers end (exit 0, exit 3,
    SIGKILL), then started again: each of those exits is logged and classified once,
    from its own evidence; nothing else is rerun, and no node is lost."""
    await cluster.start(nodes=1, gpus=5)
    [node] = cluster.agents
    agent = cluster.agents[node]
    tasks = {name: await cluster.submit() for name in ("done", "bug", "killed", "steady")}
    started = {name: await cluster.started(task, 1) for name, task in tasks.items()}

    await agent.kill()
    killed_at = time.monotonic()
    last_beat = cluster.beats.last(node)
    codes = {
        "done": await cluster.signal_container(started["done"].container_id, "SIGUSR1"),
        "bug": await cluster.signal_container(started["bug"].container_id, "SIGUSR2"),
        "killed": await cluster.signal_container(started["killed"].container_id, "SIGKILL"),
    }
    assert codes == {"done": 0, "bug": 3, "killed": 137}
    await anyio.sleep(max(0.0, killed_at + 5 - time.monotonic()))  # the scenario: 5 s down
    await agent.start()
    assert time.monotonic() - last_beat.monotonic < GRACE_S - 5, "restarted within the grace"

    expected = {"done": "completed", "bug": "user_error", "killed": "preempted"}
    for name, fault in expected.items():
        task = tasks[name]
        exited = await cluster.tail.wait_for(ev.ContainerExited, STEP_S, task_id=task, attempt=1)
        assert exited.exit_code == codes[name], (name, exited)
        assert exited.container_id == started[name].container_id
        classified = await cluster.tail.wait_for(
            ev.FaultClassified, STEP_S, task_id=task, attempt=1
        )
        assert classified.fault == fault, (name, classified)
        assert exited.id in cluster.tail.causes(classified), "classified from its real exit"
    await cluster.tail.wait_for(ev.TaskCompleted, STEP_S, task_id=tasks["done"])
    failed = await cluster.tail.wait_for(ev.TaskFailed, STEP_S, task_id=tasks["bug"])
    assert failed.fault == "user_error"
    rebuilt = await cluster.started(tasks["killed"], 2)  # a preemption is rebuilt, once
    await cluster.beats.wait_new_agent(node, last_beat.agent, count=3, timeout_s=STEP_S)

    assert not cluster.tail.of(ev.NodeLost), "a node back within the grace is not lost"
    assert not cluster.tail.of(ev.NodeRecovered)
    rebuilds = cluster.tail.of(ev.RebuildDecided)
    assert [(r.task_id, r.previous_attempt, r.fault) for r in rebuilds] == [
        (tasks["killed"], 1, "preempted")
    ]
    for name in ("done", "bug", "steady"):
        assert cluster.attempts(tasks[name]) == [1], f"{name} was rerun"
    assert cluster.attempts(tasks["killed"]) == [1, 2]
    assert not cluster.tail.of(ev.ContainerExited, task_id=tasks["steady"])
    assert await cluster.running(started["steady"].container_id), "the steady one runs on"
    assert await cluster.running(rebuilt.container_id)
    held = await cluster.assert_once_per_attempt()
    assert held == Counter({(tasks[n], "1"): 1 for n in tasks} | {(tasks["killed"], "2"): 1})


async def test_graceful_restart_past_the_grace_loses_nothing(cluster: Cluster) -> None:
    """SIGTERM: the agent announces its absence (`--restart-window-s`, default 300 s) in
    a last beat; 38 s later -- past the 30 s grace -- it is started again. The node was
    never lost and nothing was rerun or stopped."""
    await cluster.start(nodes=1, gpus=2)
    [node] = cluster.agents
    agent = cluster.agents[node]
    tasks = [await cluster.submit() for _ in range(2)]
    started = [await cluster.started(task, 1) for task in tasks]

    assert await agent.terminate() == 0, agent.output()
    stopped_at = time.monotonic()
    last = cluster.beats.last(node)
    try:
        # The point of this test is the time: longer than the grace, watched for node.lost.
        await cluster.tail.absent_for(stopped_at + GRACE_S + 8 - time.monotonic(), ev.NodeLost)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n{time.monotonic() - stopped_at:.1f} s after SIGTERM; the agent's last "
            f"beat announced away_s={last.away_s} (None: no absence announced)"
        ) from None
    await agent.start()
    await cluster.beats.wait_new_agent(node, last.agent, count=3, timeout_s=STEP_S)

    assert not cluster.tail.of(ev.NodeLost) and not cluster.tail.of(ev.NodeRecovered)
    assert not cluster.tail.of(ev.RebuildDecided) and not cluster.tail.of(ev.FaultClassified)
    assert not cluster.tail.of(ev.ContainerExited), "nothing was stopped"
    for task, start in zip(tasks, started, strict=True):
        assert cluster.attempts(task) == [1]
        assert await cluster.running(start.container_id)
    assert await cluster.assert_once_per_attempt() == Counter({(t, "1"): 1 for t in tasks})


async def test_a_node_really_gone_is_failed_over_within_the_default_detection_time(
    cluster: Cluster,
) -> None:
    """Agent SIGKILLed and its container killed: no heartbeat, no exit report. node.lost
    comes 30-35 s after the last heartbeat, and the task is rebuilt on the other node."""
    await cluster.start(nodes=2, gpus=1)
    task = await cluster.submit()
    first = await cluster.started(task, 1)
    gone, spare = first.node, cluster.other(first.node)

    await cluster.agents[gone].kill()
    last = cluster.beats.last(gone)
    assert await cluster.signal_container(first.container_id, "SIGKILL") == 137
    lost = await cluster.tail.wait_for(ev.NodeLost, GRACE_S + 15, node=gone)
    silence = time.monotonic() - last.monotonic
    assert GRACE_S - 0.5 <= silence <= GRACE_S + DETECT_SLACK_S, f"lost after {silence:.1f} s"
    assert lost.last_heartbeat_at is not None
    recorded = (lost.at - lost.last_heartbeat_at).total_seconds()
    assert GRACE_S <= recorded <= GRACE_S + DETECT_SLACK_S, recorded

    classified = await cluster.tail.wait_for(ev.FaultClassified, STEP_S, task_id=task, attempt=1)
    assert classified.fault == "node_lost"
    assert lost.id in cluster.tail.causes(classified)
    rebuild = await cluster.tail.wait_for(ev.RebuildDecided, STEP_S, task_id=task)
    assert (rebuild.previous_attempt, rebuild.fault) == (1, "node_lost")
    second = await cluster.started(task, 2)
    assert second.node == spare
    assert await cluster.running(second.container_id)
    assert [e.node for e in cluster.tail.of(ev.NodeLost)] == [gone]
    await cluster.assert_once_per_attempt()


async def _lose_and_rebuild(
    cluster: Cluster, task: str
) -> tuple[ev.ContainerStarted, ev.ContainerStarted]:
    """The task's node goes silent (its agent already stopped or killed by the caller):
    wait for its loss, the node_lost verdict and the rebuild's start on the other node."""
    first = await cluster.started(task, 1)
    await cluster.tail.wait_for(ev.NodeLost, GRACE_S + 15, node=first.node)
    classified = await cluster.tail.wait_for(ev.FaultClassified, STEP_S, task_id=task, attempt=1)
    assert classified.fault == "node_lost"
    second = await cluster.started(task, 2)
    assert second.node != first.node
    assert await cluster.running(first.container_id), "a lost node's container is not killed"
    return first, second


async def _late_evidence_wins(
    cluster: Cluster, task: str, first: ev.ContainerStarted, second: ev.ContainerStarted,
    code: int, fault: str,
) -> ev.ContainerExited:  # fmt: skip
    """The late exit is logged once and classified once, as what it is; the replacement
    is stopped and its GPU released, each citing (through its causes) that exit."""
    late = await cluster.tail.wait_for(ev.ContainerExited, STEP_S, task_id=task, attempt=1)
    assert (late.container_id, late.exit_code) == (first.container_id, code)
    verdict = await cluster.tail.wait_for(
        ev.FaultClassified, STEP_S, task_id=task, attempt=1, where=lambda e: e.fault != "node_lost"
    )
    assert verdict.fault == fault and late.id in cluster.tail.causes(verdict)
    verdicts = [e.fault for e in cluster.tail.of(ev.FaultClassified, task_id=task, attempt=1)]
    assert verdicts == ["node_lost", fault], "the node loss, then the real exit, once each"
    stopped = await cluster.tail.wait_for(ev.ContainerExited, STEP_S, task_id=task, attempt=2)
    assert stopped.container_id == second.container_id
    assert late.id in cluster.tail.causes(stopped), "the replacement's stop cites the late exit"
    released = await cluster.tail.wait_for(ev.GpuReleased, STEP_S, task_id=task, attempt=2)
    assert late.id in cluster.tail.causes(released), "its GPU's release cites the late exit"
    assert not await cluster.running(second.container_id)
    assert cluster.attempts(task) == [1, 2], "nothing further is rebuilt"
    exits = Counter((e.task_id, e.attempt) for e in cluster.tail.of(ev.ContainerExited))
    assert set(exits.values()) == {1}, f"an exit logged twice: {exits}"
    return late


async def test_late_exit_0_of_a_lost_node_completes_the_task_and_stops_the_replacement(
    cluster: Cluster,
) -> None:
    """The agent is SIGSTOPped past the grace: its node is lost and the task rebuilt on
    the other node. Meanwhile the original container exits 0; the agent is SIGCONTed and
    reports it: the task is completed, the replacement stopped and its GPU released."""
    await cluster.start(nodes=2, gpus=1)
    task = await cluster.submit()
    first = await cluster.started(task, 1)
    frozen = cluster.agents[first.node]
    frozen.send(signal.SIGSTOP)
    first, second = await _lose_and_rebuild(cluster, task)
    assert await cluster.signal_container(first.container_id, "SIGUSR1") == 0
    frozen.send(signal.SIGCONT)

    late = await _late_evidence_wins(cluster, task, first, second, code=0, fault="completed")
    completed = await cluster.tail.wait_for(ev.TaskCompleted, STEP_S, task_id=task)
    assert late.id in cluster.tail.causes(completed), "completed on the late exit"
    assert not cluster.tail.of(ev.TaskFailed, task_id=task)
    assert await cluster.containers() == Counter({(task, "1"): 1, (task, "2"): 1})


async def test_late_user_error_of_a_lost_node_fails_the_task_and_stops_the_replacement(
    cluster: Cluster,
) -> None:
    """As above with the agent SIGKILLed and restarted, and the original exiting 3: the
    task fails as user_error, the replacement is stopped and its GPU released."""
    await cluster.start(nodes=2, gpus=1)
    task = await cluster.submit()
    first = await cluster.started(task, 1)
    dead = cluster.agents[first.node]
    await dead.kill()
    first, second = await _lose_and_rebuild(cluster, task)
    assert await cluster.signal_container(first.container_id, "SIGUSR2") == 3
    await dead.start()

    late = await _late_evidence_wins(cluster, task, first, second, code=3, fault="user_error")
    failed = await cluster.tail.wait_for(ev.TaskFailed, STEP_S, task_id=task)
    assert failed.fault == "user_error", failed
    assert late.id in cluster.tail.causes(failed), "failed on the late exit"
    assert not cluster.tail.of(ev.TaskCompleted, task_id=task)
    assert await cluster.containers() == Counter({(task, "1"): 1, (task, "2"): 1})


async def test_a_failed_over_node_coming_back_has_its_stale_container_stopped_at_once(
    cluster: Cluster,
) -> None:
    """The agent is SIGKILLed, its node lost and the task rebuilt elsewhere; the agent
    comes back while the replacement runs. The stale container is stopped at once, and
    its exit cites the decision that superseded it; the replacement runs on."""
    await cluster.start(nodes=2, gpus=1)
    task = await cluster.submit()
    first = await cluster.started(task, 1)
    dead = cluster.agents[first.node]
    await dead.kill()
    before = cluster.beats.last(first.node).agent
    first, second = await _lose_and_rebuild(cluster, task)
    classified = cluster.tail.of(ev.FaultClassified, task_id=task, attempt=1)[0]
    rebuild = cluster.tail.of(ev.RebuildDecided, task_id=task, previous_attempt=1)[0]

    await dead.start()
    back = time.monotonic()
    stale = await cluster.tail.wait_for(ev.ContainerExited, STEP_S, task_id=task, attempt=1)
    took = time.monotonic() - back
    assert took < 10, f"the stale container was stopped {took:.1f} s after its agent was back"
    assert stale.container_id == first.container_id
    assert stale.exit_code in (137, 143), "stopped (SIGKILL or SIGTERM), not ended by itself"
    cited = cluster.tail.by_id().get(stale.causation_id or "")
    assert stale.causation_id in {classified.id, rebuild.id}, (
        f"the stale exit cites {cited}, not the decision that superseded it "
        f"({classified.id} fault.classified, {rebuild.id} rebuild.decided)"
    )
    assert not await cluster.running(first.container_id)
    await cluster.beats.wait_new_agent(first.node, before, count=3, timeout_s=STEP_S)
    assert await cluster.running(second.container_id), "the replacement runs on"
    assert not cluster.tail.of(ev.ContainerExited, task_id=task, attempt=2)
    assert not cluster.tail.of(ev.TaskCompleted) and not cluster.tail.of(ev.TaskFailed)
    assert cluster.attempts(task) == [1, 2]
    await cluster.assert_once_per_attempt()
