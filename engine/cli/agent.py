"""`gpuwarden agent`: one node's agent as a process.

With `--runtime docker` (the default) containers run on the Docker Engine named by
DOCKER_HOST and the GPUs come from NVML; without a driver the inventory is declared by
`--gpus/--gpu-model/--gpu-memory-mb`, and the agent says plainly that nothing then
watches GPU health. `--runtime sim` runs a simulated node (containers in memory) that
still speaks only through the real log, command bus and heartbeats: a cluster on a
laptop, or a drill against a real engine.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import replace
from typing import Any, Literal

import anyio
from gpuwarden.engine.cli.common import open_event_log
from gpuwarden.engine.cli.config import (
    DEFAULT_GPU_MODEL,
    DEFAULT_HEARTBEAT_S,
    DEFAULT_NETWORK,
    DEFAULT_STOP_TIMEOUT_S,
    AgentConfig,
)
from gpuwarden.engine.clock import SystemClock
from gpuwarden.engine.core.errors import GpuwardenError
from gpuwarden.engine.ports import ContainerRuntimeError, GpuProbeError

DOCKER_TIMEOUT_S = 30  # the Docker client's per-request timeout


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
    except GpuwardenError as exc:
        print(f"gpuwarden: error: {exc}", file=sys.stderr)
        return 2
    return 0


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
    import docker
    from docker.errors import DockerException
    from gpuwarden.adapters.agent import Agent
    from gpuwarden.adapters.command_bus import JetStreamCommandBus
    from gpuwarden.adapters.docker_runtime import DockerRuntime
    from gpuwarden.adapters.heartbeats import NatsHeartbeats
    from gpuwarden.adapters.nvml_probe import NvmlProbe, probe_or_declare

    found = probe_or_declare(
        config.node, count=config.gpus, model=config.gpu_model, memory_mb=config.gpu_memory_mb
    )
    print(f"gpuwarden: {found.message}", file=sys.stderr)
    source: Literal["nvml", "declared"] = "nvml" if found.source == "nvml" else "declared"
    try:
        client = docker.from_env(timeout=DOCKER_TIMEOUT_S)
        client.ping()
    except DockerException as exc:
        host = os.environ.get("DOCKER_HOST", "the default socket")
        raise ContainerRuntimeError(f"no Docker engine at {host}: {exc}") from None
    probe = None
    if source == "nvml":
        try:
            probe = NvmlProbe(config.node).open()
        except GpuProbeError as exc:
            print(f"gpuwarden: GPU health not watched: {exc}", file=sys.stderr)
    try:
        async with open_event_log(config.connection) as event_log:
            runtime = DockerRuntime(
                client, config.node, network_mode=config.network, gpu_mode=source
            )
            agent = Agent(
                config.node,
                event_log,
                JetStreamCommandBus(event_log.nc),
                runtime,
                found.inventory,
                heartbeats=NatsHeartbeats(event_log.nc),
                clock=SystemClock(),
                heartbeat_s=config.heartbeat_s,
                inventory_source=source,
                stop_timeout_s=config.stop_timeout_s,
                gpu_health=probe,
            )
            async with anyio.create_task_group() as tg:
                await tg.start(agent.run)
                print(f"gpuwarden: agent of {config.node} running", file=sys.stderr, flush=True)
    finally:
        if probe is not None:
            probe.close()
        client.close()


async def serve_sim(config: AgentConfig) -> None:
    """The real agent over in-memory containers (`FakeRuntime`): a node for trying the
    engine out, or for load, with no Docker and no GPU."""
    from gpuwarden.adapters.agent import Agent
    from gpuwarden.adapters.command_bus import JetStreamCommandBus
    from gpuwarden.adapters.fake_runtime import FakeRuntime
    from gpuwarden.adapters.heartbeats import NatsHeartbeats
    from gpuwarden.adapters.sim_runtime import SimNodeSpec, simulated_gpus

    spec = SimNodeSpec(config.node, config.gpus, config.gpu_model, config.gpu_memory_mb or None)
    inventory = simulated_gpus(spec)
    print(
        f"gpuwarden: simulated node {config.node}: {config.gpus} declared GPU(s), "
        "containers in memory, GPU health not watched",
        file=sys.stderr,
    )
    clock = SystemClock()
    async with open_event_log(config.connection) as event_log:
        agent = Agent(
            config.node,
            event_log,
            JetStreamCommandBus(event_log.nc),
            FakeRuntime(config.node, clock),
            inventory,
            heartbeats=NatsHeartbeats(event_log.nc),
            clock=clock,
            heartbeat_s=config.heartbeat_s,
            inventory_source="simulated",
            stop_timeout_s=config.stop_timeout_s,
        )
        async with anyio.create_task_group() as tg:
            await tg.start(agent.run)
            print(f"gpuwarden: agent of {config.node} running", file=sys.stderr, flush=True)
