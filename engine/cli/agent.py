"""`gpuwarden agent`: one node's agent as a process.

With `--runtime docker` (the default) containers run on the Docker Engine named by
DOCKER_HOST and the GPUs come from NVML; without a driver the inventory is declared by
`--gpus/--gpu-model/--gpu-memory-mb`, and the agent says plainly that nothing then
watches GPU health. `--runtime sim` runs a simulated node (containers in memory) that
still speaks only through the real log, command bus and heartbeats: a cluster on a
laptop, or a drill against a real engine.

The process outlives NATS, JetStream and Docker: it waits for each to answer (saying so
once), reconnects, and keeps what the log cannot take yet in its state directory
(`--state-dir`, default `<data-dir>/agent-<node>/`; see adapters/agent_outbox.py). It
ends on SIGTERM or SIGINT, after a last heartbeat that tells the engine it is back
within `--restart-window-s` (default 300 s; the engine holds off failover that long),
or on a configuration error (exit 2). Its containers keep running across a restart.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.to_thread
from gpuwarden.engine.cli.common import open_event_log
from gpuwarden.engine.cli.config import (
    DEFAULT_GPU_MODEL,
    DEFAULT_HEARTBEAT_S,
    DEFAULT_NETWORK,
    DEFAULT_RESTART_WINDOW_S,
    DEFAULT_STOP_TIMEOUT_S,
    AgentConfig,
    ConfigError,
)
from gpuwarden.engine.clock import SystemClock
from gpuwarden.engine.core.errors import GpuwardenError
from gpuwarden.engine.core.events import GpuInfo
from gpuwarden.engine.ports import (
    ContainerRuntime,
    EventLogError,
    GpuHealth,
    GpuProbeError,
    StreamConfigError,
)

if TYPE_CHECKING:
    from gpuwarden.adapters.agent import InventorySource

log = logging.getLogger("gpuwarden.agent")

DOCKER_TIMEOUT_S = 30  # the Docker client's per-request timeout
DOCKER_CHECK_API = "1.41"  # any version: a client made with it checks DOCKER_HOST only
CONNECTION_CHECK_S = 1.0  # how often the agent looks whether its connection closed


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="run a node agent: carry out the engine's commands on this node",
        description="Consume gw.cmd.<node>, run containers, report their starts and exits "
        "to the event log, send heartbeats, and reconcile with Docker on start.",
    )
    parser.add_argument("--node", required=True, help="this node's name")
    parser.add_argument(
        "--runtime", choices=("docker", "sim"), default="docker", help="container runtime"
    )
    parser.add_argument(
        "--gpus", type=int, default=0, metavar="N", help="declared GPU count (no NVML driver)"
    )
    parser.add_argument(
        "--gpu-model", default=DEFAULT_GPU_MODEL, metavar="M", help="declared model"
    )
    parser.add_argument(
        "--gpu-memory-mb", type=int, default=0, metavar="X", help="declared memory per GPU"
    )
    parser.add_argument(
        "--network",
        default=DEFAULT_NETWORK,
        metavar="MODE",
        help=f"Docker network mode for task containers (default {DEFAULT_NETWORK})",
    )
    parser.add_argument(
        "--heartbeat-s",
        type=float,
        default=DEFAULT_HEARTBEAT_S,
        metavar="S",
        help="seconds between beats",
    )
    parser.add_argument(
        "--stop-timeout-s",
        type=float,
        default=DEFAULT_STOP_TIMEOUT_S,
        metavar="S",
        help="SIGTERM grace on stop",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where observations the log cannot take yet are kept across restarts "
        "(default: <data-dir>/agent-<node>/)",
    )
    parser.add_argument(
        "--restart-window-s",
        type=float,
        default=DEFAULT_RESTART_WINDOW_S,
        metavar="S",
        help="on SIGTERM/SIGINT, tell the engine this node is back within S seconds, so "
        f"it does not fail the node over meanwhile (default {DEFAULT_RESTART_WINDOW_S:g}; "
        "0: say nothing)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command")
    parser.set_defaults(handler=run_agent_command)


async def run_agent_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        config = AgentConfig.from_args(args)
        serve = serve_docker if config.runtime == "docker" else serve_sim
        config = _local_node_creds(config)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, tg.cancel_scope)
            await serve(config)
            tg.cancel_scope.cancel()
    except (GpuwardenError, ExceptionGroup) as exc:
        error = _configuration_error(exc)
        if error is None:
            raise
        print(f"gpuwarden: error: {error}", file=sys.stderr)
        return 2
    return 0


def _configuration_error(exc: BaseException) -> GpuwardenError | None:
    """The error the agent stops for (only ever a configuration error: everything else
    it waits out), also when it comes wrapped in a task group's ExceptionGroup."""
    if isinstance(exc, GpuwardenError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [_configuration_error(inner) for inner in exc.exceptions]
        if found and all(error is not None for error in found):
            return found[0]
    return None


def _local_node_creds(config: AgentConfig) -> AgentConfig:
    """In a data directory where `up` made this node's credentials (no --nats, no
    --creds), the agent acts as that node: the only principal whose facts it may state."""
    from gpuwarden.adapters.auth import local_auth_dir, local_creds, node_principal

    conn = config.connection
    if conn.nats or conn.creds or not local_auth_dir(conn.data_dir).is_dir():
        return config
    found = local_creds(conn.data_dir, node_principal(config.node).name)
    if found is None:
        return config
    return replace(config, connection=replace(conn, creds=str(found)))


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            print(f"gpuwarden: {signal.Signals(signum).name} received, stopping", file=sys.stderr)
            scope.cancel()
            return


async def serve_docker(config: AgentConfig) -> None:
    from gpuwarden.adapters.docker_runtime import DockerRuntime
    from gpuwarden.adapters.nvml_probe import NvmlProbe, probe_or_declare

    found = probe_or_declare(
        config.node, count=config.gpus, model=config.gpu_model, memory_mb=config.gpu_memory_mb
    )
    print(f"gpuwarden: {found.message}", file=sys.stderr)
    source: Literal["nvml", "declared"] = "nvml" if found.source == "nvml" else "declared"
    client = await _docker_client()
    probe = None
    if source == "nvml":
        try:
            probe = NvmlProbe(config.node).open()
        except GpuProbeError as exc:
            print(f"gpuwarden: GPU health not watched: {exc}", file=sys.stderr)
    try:
        runtime = DockerRuntime(client, config.node, network_mode=config.network, gpu_mode=source)
        await _serve(config, runtime, found.inventory, source, probe)
    finally:
        if probe is not None:
            probe.close()
        client.close()


async def serve_sim(config: AgentConfig) -> None:
    """The real agent over in-memory containers (`FakeRuntime`): a node for trying the
    engine out, or for load, with no Docker and no GPU."""
    from gpuwarden.adapters.fake_runtime import FakeRuntime
    from gpuwarden.adapters.sim_runtime import SimNodeSpec, simulated_gpus

    spec = SimNodeSpec(config.node, config.gpus, config.gpu_model, config.gpu_memory_mb or None)
    inventory = simulated_gpus(spec)
    print(
        f"gpuwarden: simulated node {config.node}: {config.gpus} declared GPU(s), "
        "containers in memory, GPU health not watched",
        file=sys.stderr,
    )
    runtime = FakeRuntime(config.node, SystemClock())
    await _serve(config, runtime, inventory, "simulated", None)


async def _docker_client() -> Any:
    """A client of the Docker engine named by DOCKER_HOST, once it answers: one that
    does not (down, restarting) is waited for, said once. A DOCKER_HOST that cannot
    be used at all is a configuration error."""
    import docker
    from docker.errors import DockerException
    from gpuwarden.adapters.agent_outbox import next_backoff
    from gpuwarden.adapters.docker_runtime import ENGINE_ERRORS

    host = os.environ.get("DOCKER_HOST", "the default socket")
    try:  # with a fixed API version this asks the daemon nothing: only the settings
        docker.from_env(version=DOCKER_CHECK_API, timeout=DOCKER_TIMEOUT_S).close()
    except DockerException as exc:
        raise ConfigError(f"no usable Docker engine at {host}: {exc}") from None
    backoff, said = 0.0, False
    while True:
        try:
            client = await anyio.to_thread.run_sync(_docker_answering)
        except ENGINE_ERRORS as exc:
            if not said:
                print(
                    f"gpuwarden: no Docker engine answers at {host} ({exc}); waiting for it",
                    file=sys.stderr,
                    flush=True,
                )
            said = True
            backoff = next_backoff(backoff)
            await anyio.sleep(backoff)
            continue
        if said:
            print(f"gpuwarden: Docker engine at {host} answers", file=sys.stderr, flush=True)
        return client


def _docker_answering() -> Any:
    """A client of DOCKER_HOST's engine (its API version negotiated), once it pings."""
    import docker

    client = docker.from_env(timeout=DOCKER_TIMEOUT_S)
    try:
        client.ping()
    except BaseException:
        client.close()
        raise
    return client


async def _serve(
    config: AgentConfig,
    runtime: ContainerRuntime,
    inventory: Sequence[GpuInfo],
    source: InventorySource,
    probe: GpuHealth | None,
) -> None:
    """The agent over `runtime` until cancelled: connected to NATS whenever it can be,
    its outbox kept in the state directory across connections and restarts."""
    from gpuwarden.adapters.agent import Agent
    from gpuwarden.adapters.agent_outbox import Outbox, OutboxError, next_backoff, why
    from gpuwarden.adapters.auth import AuthError, ConnectRefusedError
    from gpuwarden.adapters.command_bus import JetStreamCommandBus
    from gpuwarden.adapters.heartbeats import NatsHeartbeats

    # What no retry can mend: the operator must change something.
    fatal = (ConfigError, AuthError, ConnectRefusedError, StreamConfigError, OutboxError)

    outbox = await anyio.to_thread.run_sync(Outbox.open, config.state_path)
    backoff, said, running = 0.0, False, False
    clock = SystemClock()
    try:
        while True:
            try:
                async with open_event_log(config.connection) as event_log:
                    if said:
                        print("gpuwarden: NATS answers again", file=sys.stderr, flush=True)
                    backoff, said = 0.0, False
                    agent = Agent(
                        config.node,
                        event_log,
                        JetStreamCommandBus(event_log.nc),
                        runtime,
                        inventory,
                        heartbeats=NatsHeartbeats(event_log.nc),
                        clock=clock,
                        heartbeat_s=config.heartbeat_s,
                        inventory_source=source,
                        stop_timeout_s=config.stop_timeout_s,
                        gpu_health=probe,
                        outbox=outbox,
                        restart_window_s=config.restart_window_s,
                    )
                    async with anyio.create_task_group() as tg:
                        await tg.start(agent.run)
                        if not running:
                            print(
                                f"gpuwarden: agent of {config.node} running",
                                file=sys.stderr,
                                flush=True,
                            )
                        running = True
                        await _closed(event_log.nc)
                        tg.cancel_scope.cancel()
                    print(
                        "gpuwarden: the NATS connection closed; connecting again",
                        file=sys.stderr,
                        flush=True,
                    )
            except fatal:
                raise
            except EventLogError as exc:  # NATS away, or JetStream not ready yet
                if not said:
                    print(
                        f"gpuwarden: NATS unreachable: {why(exc)}; trying again until it answers",
                        file=sys.stderr,
                        flush=True,
                    )
                said = True
            except Exception as exc:  # a fault of the agent's own: said in full, started again
                log.error("agent of %s stopped; starting it again", config.node, exc_info=exc)
            backoff = next_backoff(backoff)
            await anyio.sleep(backoff)
    finally:
        outbox.close()


async def _closed(nc: Any) -> None:
    """Until the connection is closed for good (it reconnects by itself otherwise, so
    this is rare: a server that refuses it on a reconnect). nats-py tells of a close
    only through a callback given when connecting, so this looks now and then."""
    while not nc.is_closed:  # noqa: ASYNC110 (no event to wait on)
        await anyio.sleep(CONNECTION_CHECK_S)
