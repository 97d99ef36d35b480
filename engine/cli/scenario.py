"""`gpuwarden scenario run` and `gpuwarden demo`: fault drills from a shell.

A drill is only worth something if its verdict is unambiguous, so the exit status
says it: 0 when every expectation of every file holds, 1 when one fails (each failed
expectation printed as expected vs seen), 2 when a file is malformed (the file, the
step or key, and the problem) or a drill could not be played at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from gpuwarden.engine.clock import SystemClock
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.errors import GpuwardenError
from gpuwarden.engine.core.events import type_of
from gpuwarden.engine.core.liveness import Liveness
from gpuwarden.engine.core.policy import Policy
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.runtime import Engine
from gpuwarden.projections.explain import explain_events, render_text, summary

EXIT_FAILED = 1
EXIT_ERROR = 2


def register(subparsers: Any) -> None:
    scenario = subparsers.add_parser("scenario", help="fault drills (scenario files)")
    commands = scenario.add_subparsers(dest="scenario_command", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="play drills through the real engine and log with simulated nodes",
        description="Play scenario files (format: SCENARIOS.md) through the real engine and "
        "a real JetStream log, on a virtual clock. Exit 0 only if every expectation holds.",
    )
    run.add_argument("files", nargs="+", metavar="FILE", help="scenario files or folders")
    run.add_argument("--json", action="store_true", help="one JSON object per scenario")
    run.add_argument(
        "--export",
        metavar="FILE",
        help="write the drill's whole log as JSON lines (with several drills: "
        "FILE's name gets each drill's file name inserted)",
    )
    run.add_argument(
        "--nats",
        default=argparse.SUPPRESS,
        metavar="URL",
        help="use this server (names get a run-unique prefix) instead of a fresh "
        "embedded one per drill",
    )
    run.set_defaults(handler=run_scenarios)
    scenario.set_defaults(handler=_scenario_help(scenario))

    demo = subparsers.add_parser(
        "demo", help="watch gpuwarden rebuild what a rebuild cures and fail what it cannot"
    )
    demo.add_argument("--no-docker", action="store_true", help="skip the real-container part")
    demo.set_defaults(handler=run_demo)


def _scenario_help(parser: argparse.ArgumentParser) -> Any:
    async def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_ERROR

    return show


def export_path(base: str, source: str, several: bool) -> Path:
    path = Path(base)
    if not several:
        return path
    return path.with_name(f"{path.stem}.{Path(source).stem}{path.suffix or '.jsonl'}")


async def run_scenarios(args: argparse.Namespace) -> int:
    from gpuwarden.adapters.scenario_file import load_scenario, scenario_paths
    from gpuwarden.adapters.scenario_runner import run_scenario

    paths = scenario_paths(args.files)
    scenarios = []
    problems = []
    for path in paths:
        try:
            scenarios.append(load_scenario(path))
        except GpuwardenError as exc:
            problems.append(str(exc))
    if not paths:
        problems.append("no scenario files found in " + ", ".join(args.files))
    if problems:
        for problem in problems:
            print(f"gpuwarden: error: {problem}", file=sys.stderr)
        return EXIT_ERROR
    status = 0
    passed = 0
    for scenario in scenarios:
        export = (
            export_path(args.export, scenario.source, len(scenarios) > 1) if args.export else None
        )
        try:
            result = await run_scenario(
                scenario,
                nats_url=args.nats,
                export=export,
                connect_options={
                    "creds": getattr(args, "creds", None),
                    "tls_ca": getattr(args, "tls_ca", None),
                    "tls_cert": getattr(args, "tls_cert", None),
                    "tls_key": getattr(args, "tls_key", None),
                },
            )
        except GpuwardenError as exc:
            print(f"gpuwarden: error: {scenario.source}: {exc}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        passed += result.passed
        if not result.passed and status == 0:
            status = EXIT_FAILED
        if args.json:
            print(json.dumps(result.to_json(), default=str), flush=True)
        else:
            print(_text(result), flush=True)
    if not args.json:
        failed = len(scenarios) - passed
        print(f"{len(scenarios)} drill(s): {passed} passed, {failed} failed")
    return status


def _text(result: Any) -> str:
    verdict = "PASS" if result.passed else "FAIL"
    lines = [
        f"{verdict}  {result.name}  ({result.source}; {result.wall_s:.2f}s wall, "
        f"{result.virtual_s:g}s virtual, {result.events} events)"
    ]
    for expectation in result.expectations:
        if not expectation.passed:
            lines.append(f"      expect[{expectation.index}] {expectation.message}")
    for note in result.notes:
        lines.append(f"      note: {note}")
    return "\n".join(lines)


# --- gpuwarden demo ------------------------------------------------------------------

_DEMO_NODES = """
[[nodes]]
name = "node-a"
gpus = 2
model = "H100"

[[nodes]]
name = "node-b"
gpus = 2
model = "H100"
"""

# (title, what to watch for, the drill's steps and expectations in scenario TOML)
DEMO_STORIES: tuple[tuple[str, str, str], ...] = (
    (
        "a preemption is rebuilt",
        "train-llm is evicted by the system (SIGTERM it did not send itself): a fault a "
        "rebuild cures, so after a 10 s backoff it runs again.",
        """
[[steps]]
at = 0
submit = { task = "train-llm", gpus = 1, image = "train:1", command = ["python", "train.py"] }
[[steps]]
at = 120
preempt = { task = "train-llm" }
[[expect]]
task = "train-llm"
state = "running"
attempts = 2
faults = ["preempted"]
""",
    ),
    (
        "an Xid 48 (double-bit ECC) is rebuilt on another GPU",
        "the GPU under finetune reports Xid 48 and the process dies: gpu_hardware, so the "
        "GPU is quarantined and the task rebuilt on a healthy one.",
        """
[[steps]]
at = 0
submit = { task = "finetune", gpus = 1, image = "train:1", command = ["python", "ft.py"] }
[[steps]]
at = 60
xid = { task = "finetune", code = 48 }
[[steps]]
at = 60.2
exit = { task = "finetune", code = 1 }
[[expect]]
task = "finetune"
state = "running"
attempts = 2
faults = ["gpu_hardware"]
not_on_gpus_of_attempt = 1
[[expect]]
gpu = "node-a/0"
quarantined = true
""",
    ),
    (
        "a user error fails at once",
        "notebook exits 1 on healthy hardware: a bug no rebuild cures, so it fails after "
        "the 1 s evidence window and its GPU is free again.",
        """
[[steps]]
at = 0
submit = { task = "notebook", gpus = 1, image = "lab:1", command = ["python", "nb.py"] }
[[steps]]
at = 30
exit = { task = "notebook", code = 1 }
[[expect]]
task = "notebook"
state = "failed"
attempts = 1
faults = ["user_error"]
reason = "not_target_fault"
""",
    ),
    (
        "a lost node fails over",
        "node-a stops sending heartbeats at 60 s; 3 s later it is declared lost and eval is "
        "rebuilt on node-b.",
        """
[[steps]]
at = 0
submit = { task = "eval", gpus = 2, image = "eval:1", command = ["python", "eval.py"] }
[[steps]]
at = 60
node_down = { node = "node-a" }
[[expect]]
task = "eval"
state = "running"
attempts = 2
faults = ["node_lost"]
not_on_node_of_attempt = 1
""",
    ),
)
DEMO_EXPLAIN = (("an Xid 48 (double-bit ECC) is rebuilt on another GPU", "finetune"),
                ("a user error fails at once", "notebook"))  # fmt: skip
_QUIET = frozenset({"node.registered"})


async def run_demo(args: argparse.Namespace) -> int:
    from gpuwarden.adapters.scenario_file import parse_scenario
    from gpuwarden.adapters.scenario_runner import run_scenario

    print("gpuwarden demo: fault drills on a simulated 2-node cluster (4 GPUs), through the")
    print("real engine and a real JetStream log (embedded nats-server), on a virtual clock.\n")
    status = 0
    logs = {}
    for number, (title, blurb, body) in enumerate(DEMO_STORIES, 1):
        text = f'name = "{title}"\n{_DEMO_NODES}{body}'
        scenario = parse_scenario(text, f"demo:{number}")
        result = await run_scenario(scenario)
        logs[title] = result.records
        print(f"{number}. {title}")
        print(f"   {blurb}")
        for line in timeline(result.records):
            print("   " + line)
        verdict = "as expected" if result.passed else "NOT as expected"
        print(f"   -> {verdict} ({result.virtual_s:g} s of virtual time in "
              f"{result.wall_s:.2f} s)\n")  # fmt: skip
        for expectation in result.expectations:
            if not expectation.passed:
                print(f"   !! {expectation.message}")
                status = EXIT_FAILED
    for title, task in DEMO_EXPLAIN:
        print(f"--- gpuwarden explain {task} " + "-" * 40)
        print(render_text(explain_events(logs[title], task)))
    if args.no_docker:
        print("Real container part skipped: --no-docker was given.")
    else:
        reason = await _docker_demo()
        if reason is not None:
            print(f"Real container part skipped: {reason}.")
    return status


def timeline(records: Any) -> list[str]:
    """One readable line per event: virtual time, type, task, what it says."""
    from gpuwarden.adapters.scenario_runner import T0

    lines = []
    for record in records:
        event = record.event
        if event is None or type_of(event) in _QUIET:
            continue
        offset = (event.at - T0).total_seconds()
        task = getattr(event, "task_id", None) or "-"
        lines.append(f"{offset:>7.1f}s  {type_of(event):<18} {task:<10} {_summary(event)}")
    return lines


DOCKER_PING_S = 2.0
DOCKER_PART_S = 60.0
DEMO_IMAGES = ("busybox:latest", "gpuwarden-test:latest", "alpine:latest")


async def _docker_demo() -> str | None:
    """One real container killed and rebuilt; returns why it was skipped, or None."""

    try:
        import docker  # noqa: F401
        from gpuwarden.adapters.agent import Agent  # noqa: F401
        from gpuwarden.adapters.heartbeats import NatsHeartbeats  # noqa: F401
    except ImportError as exc:
        return f"the Docker node agent is not available in this install ({exc})"
    client = await _docker_client()
    if isinstance(client, str):
        return client
    try:
        image = await anyio.to_thread.run_sync(_local_image, client)
        if image is None:
            return (
                "no small image is present locally (tried "
                + ", ".join(DEMO_IMAGES)
                + "; set GPUWARDEN_DEMO_IMAGE to one that has `sleep`)"
            )
        with anyio.fail_after(DOCKER_PART_S):
            await _kill_and_rebuild(client, image)
    except TimeoutError:
        return f"the real container did not go through its rebuild within {DOCKER_PART_S:g}s"
    finally:
        client.close()
    return None


async def _docker_client() -> Any:
    """A Docker client that answered a ping within 2 s, or why there is none."""
    import docker

    def ping() -> Any:
        client = docker.from_env(timeout=int(DOCKER_PING_S))
        client.ping()
        return client

    try:
        with anyio.fail_after(DOCKER_PING_S + 0.5):
            return await anyio.to_thread.run_sync(ping, abandon_on_cancel=True)
    except TimeoutError:
        return f"no Docker engine answered within {DOCKER_PING_S:g}s"
    except Exception as exc:
        return f"no Docker engine is reachable ({type(exc).__name__}: {exc})"


def _local_image(client: Any) -> str | None:
    import os

    import docker.errors

    wanted = os.environ.get("GPUWARDEN_DEMO_IMAGE")
    for name in (wanted,) if wanted else DEMO_IMAGES:
        try:
            client.images.get(name)
            return name
        except docker.errors.DockerException:
            continue
    return None


async def _kill_and_rebuild(client: Any, image: str) -> None:
    """The real path: engine, node agent and Docker; kill the container, watch the rebuild."""
    import tempfile

    from gpuwarden.adapters.agent import Agent
    from gpuwarden.adapters.command_bus import JetStreamCommandBus
    from gpuwarden.adapters.docker_runtime import DockerRuntime
    from gpuwarden.adapters.embedded_nats import EmbeddedNats
    from gpuwarden.adapters.event_log import JetStreamEventLog
    from gpuwarden.adapters.heartbeats import NatsHeartbeats, feed_liveness
    from gpuwarden.adapters.nats_connection import connect
    from gpuwarden.adapters.nvml_probe import declared_inventory

    run = new_id()[-8:].lower()
    node, task = f"demo-{run}", f"demo-{run}"
    label = {"gpuwarden.demo": run}
    print(f"Real container: task {task} ({image}, `sleep 600`) on node {node} via Docker.")
    with tempfile.TemporaryDirectory(prefix="gw-demo-") as home:
        async with EmbeddedNats(__import__("pathlib").Path(home)) as server:
            nc = await connect(server.url, name="gpuwarden-demo")
            try:
                log = JetStreamEventLog(nc)
                await log.ensure_streams()
                bus = JetStreamCommandBus(nc, poll_s=0.5)
                clock = SystemClock()
                policy = Policy(backoff_initial_s=1.0, node_lost_after_s=10.0)
                liveness = Liveness(policy.node_lost_after_s)
                engine = Engine(log, bus, clock, policy, liveness=liveness)
                runtime = DockerRuntime(client, node, gpu_mode="declared", labels=label)
                agent = Agent(
                    node, log, bus, runtime, declared_inventory(node, 1, "demo"),
                    heartbeats=NatsHeartbeats(nc), clock=clock, heartbeat_s=0.5,
                    inventory_source="declared", stop_timeout_s=2,
                )  # fmt: skip
                started = datetime.now(UTC)
                async with anyio.create_task_group() as tg:
                    await tg.start(engine.run)
                    tg.start_soon(feed_liveness, NatsHeartbeats(nc), liveness, clock)
                    tg.start_soon(agent.run)
                    with anyio.fail_after(20):
                        await agent.ready.wait()
                    submitted = ev.TaskSubmitted(
                        id=new_id(), at=datetime.now(UTC), actor="api", correlation_id=task,
                        task_id=task, name="demo", image=image, command=("sleep", "600"),
                        owner="demo",
                    )  # fmt: skip
                    await log.append(ev.subject_of(submitted), [submitted])
                    first = await _wait_event(log, task, "container.started", 1)
                    assert isinstance(first, ev.ContainerStarted)
                    print(f"   attempt 1 running in container {first.container_id[:12]}; "
                          "killing it with SIGKILL (docker kill)")  # fmt: skip
                    await anyio.to_thread.run_sync(
                        lambda: client.containers.get(first.container_id).kill()
                    )
                    await _wait_event(log, task, "container.started", 2)
                    cancel = ev.TaskCancelled(
                        id=new_id(), at=datetime.now(UTC), actor="api", correlation_id=task,
                        task_id=task, reason="demo over",
                    )  # fmt: skip
                    await log.append(ev.subject_of(cancel), [cancel])
                    await _wait_event(log, task, "container.exited", 2)
                    tg.cancel_scope.cancel()
                records = [r async for r in log.read()]
                for record in records:
                    event = record.event
                    if event is None or getattr(event, "task_id", None) != task:
                        continue
                    offset = (event.at - started).total_seconds()
                    line = f"{offset:>7.2f}s  {ev.type_of(event):<18} {_summary(event)}"
                    print("   " + line)
                print("   -> the kill was classified preempted and rebuilt in a new container.\n")
            finally:
                await nc.close()
                await anyio.to_thread.run_sync(_remove_demo_containers, client, label)


def _summary(event: Any) -> str:
    """explain's one-line summary, with the GPU bookkeeping spelled out too."""

    match event:
        case ev.GpuAllocated():
            return f"GPU {event.gpu_uuid} given to attempt {event.attempt}"
        case ev.GpuReleased():
            return f"GPU {event.gpu_uuid} freed by attempt {event.attempt}"
        case ev.GpuQuarantined():
            return f"GPU {event.gpu_uuid} quarantined ({event.reason})"
        case ev.TaskCompleted():
            return f"attempt {event.attempt} completed"
        case ev.TaskCancelled():
            return f"cancelled: {event.reason}"
        case ev.ContainerStarted() | ev.ContainerExited():
            text: str = summary(msgspec_replace(event, container_id=event.container_id[:12]))
            return text
    text = summary(event)
    return text


def msgspec_replace(event: Any, **changes: Any) -> Any:
    import msgspec

    return msgspec.structs.replace(event, **changes)


async def _wait_event(log: Any, task: str, kind: str, attempt: int) -> Any:
    """The first event of `kind` for the task's `attempt` (callers hold a deadline)."""

    async for record in log.subscribe(1):
        event = record.event
        if (
            event is not None
            and type_of(event) == kind
            and getattr(event, "task_id", None) == task
            and getattr(event, "attempt", None) == attempt
        ):
            return event
    raise AssertionError("the log ended")


def _remove_demo_containers(client: Any, label: dict[str, str]) -> None:
    key, value = next(iter(label.items()))
    for container in client.containers.list(all=True, filters={"label": f"{key}={value}"}):
        try:
            container.remove(force=True)
        except Exception:  # already gone
            pass
