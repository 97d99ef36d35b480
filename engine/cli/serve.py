"""The processes: `gpuwarden engine` and `gpuwarden up` (the composition root).

`engine` runs the supervisor service against a NATS server: the Engine (log →
decisions → log and commands), heartbeat liveness, the task API, dead letters and,
with --metrics-port, a Prometheus endpoint. `up` adds an embedded nats-server (unless
--nats) and a local node agent: Docker when an engine answers, otherwise a simulated
node with declared GPUs, said plainly. Both stop cleanly on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from gpuwarden.engine.cli.agent import serve_docker, serve_sim
from gpuwarden.engine.cli.common import connect_with, nats_url
from gpuwarden.engine.cli.config import (
    DEFAULT_METRICS_HOST,
    DEFAULT_UP_GPUS,
    AgentRuntime,
    EngineConfig,
    UpConfig,
)
from gpuwarden.engine.clock import SystemClock
from gpuwarden.engine.core.errors import GpuwardenError
from gpuwarden.engine.core.liveness import Liveness
from gpuwarden.engine.metrics import EngineMetrics, serve_metrics
from gpuwarden.engine.runtime import Engine

log = logging.getLogger("gpuwarden.service")

DOCKER_PING_TIMEOUT_S = 2.0  # `up --runtime auto`: how long Docker has to answer


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", metavar="FILE", help="policy TOML (defaults otherwise)")
    parser.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on PORT"
    )
    parser.add_argument(
        "--metrics-host", default=DEFAULT_METRICS_HOST, metavar="HOST", help="metrics bind address"
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="stream replicas (3 on a JetStream cluster)"
    )
    parser.add_argument(
        "--no-api",
        action="store_true",
        help="do not serve the task API here (run it in another engine process)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log decisions")


def register(subparsers: Any) -> None:
    _register_up(subparsers)
    parser = subparsers.add_parser(
        "engine",
        help="run the supervisor engine against a NATS server",
        description="Fold the event log, decide (classify, rebuild or fail, place), append "
        "the decisions and send commands to node agents. Several engines may run against "
        "one log: every decision is a compare-and-set on the subjects it writes.",
    )
    add_engine_options(parser)
    parser.add_argument(
        "--env-key",
        metavar="FILE",
        help="the cluster's env key (made by `gpuwarden auth`, env.key beside the "
        "credentials): the API seals task env with it, the engine opens it for the one "
        "node that runs the task. Without it, env travels in clear",
    )
    parser.add_argument(
        "--api-creds",
        metavar="FILE",
        help="credentials of the api principal: the task API gets its own connection "
        "(without it, it shares the engine's, which must then be allowed to serve it)",
    )
    parser.set_defaults(handler=run_engine_command)


async def run_engine_command(args: argparse.Namespace) -> int:
    config = _local_engine_creds(EngineConfig.from_args(args))
    _configure_logging(config.verbose)
    async with nats_url(config.connection) as url:
        return await _until_signal(lambda ready: serve_engine(config, url, ready))


def _local_engine_creds(config: EngineConfig) -> EngineConfig:
    """In a data directory where `up` made credentials (no --nats, no --creds), the
    engine and its API act as the principals `up` gives them."""
    from gpuwarden.adapters.auth import ENV_KEY, ROLE_API, ROLE_ENGINE, local_auth_dir, local_creds

    conn = config.connection
    if conn.nats or conn.creds:
        return config
    engine = local_creds(conn.data_dir, ROLE_ENGINE)
    if engine is None:
        return config
    key = local_auth_dir(conn.data_dir) / ENV_KEY
    api = local_creds(conn.data_dir, ROLE_API)
    return replace(
        config,
        connection=replace(conn, creds=str(engine)),
        env_key=config.env_key if config.env_key is not None or not key.exists() else key,
        api_creds=config.api_creds if config.api_creds is not None or api is None else str(api),
    )


def _check_api_creds(config: EngineConfig) -> None:
    """Refuse at once to serve the API over credentials that may not (the engine's)."""
    from gpuwarden.adapters.auth import (
        ROLE_ADMIN,
        ROLE_API,
        ROLE_JWT,
        AuthError,
        load_credentials,
        resolve_creds,
    )

    if not config.serve_api or config.api_creds:
        return
    path = resolve_creds(config.connection)
    if path is None:
        return
    role = load_credentials(path).role
    if role not in (ROLE_API, ROLE_JWT, ROLE_ADMIN):
        raise AuthError(
            f"the task API cannot be served with {path} (role {role}): pass --api-creds FILE "
            "(the api principal's credentials) or --no-api"
        )


async def serve_engine(
    config: EngineConfig,
    url: str,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run the engine and its companions until cancelled."""
    from gpuwarden.adapters.command_bus import JetStreamCommandBus
    from gpuwarden.adapters.dead_letters import JetStreamDeadLetters
    from gpuwarden.adapters.env_seal import EnvKey, command_opener
    from gpuwarden.adapters.event_log import JetStreamEventLog
    from gpuwarden.adapters.heartbeats import NatsHeartbeats, feed_liveness
    from gpuwarden.adapters.stream_guard import EngineStreamCheck

    _check_api_creds(config)
    policy = config.policy
    env_key = EnvKey.load(config.env_key) if config.env_key else None
    nc = await connect_with(config.connection, url, "gpuwarden-engine")
    api_nc = None
    try:
        # Its appends' msg ids keyed by a secret of this process: nobody can foresee and
        # squat the msg id of a decision (see JetStreamEventLog).
        event_log = JetStreamEventLog(nc, replicas=config.replicas, msg_id_key=os.urandom(16))
        await event_log.ensure_streams()
        bus = JetStreamCommandBus(nc)
        clock = SystemClock()
        metrics = EngineMetrics()
        liveness = Liveness(policy.node_lost_after_s)
        engine = Engine(
            event_log,
            bus,
            clock,
            policy,
            dead_letters=JetStreamDeadLetters(nc, replicas=config.replicas),
            metrics=metrics,
            liveness=liveness,
            open_command=command_opener(env_key),
            stream_check=EngineStreamCheck(event_log),
        )
        api = None
        if config.serve_api:
            from gpuwarden.adapters.api_service import ApiService
            from gpuwarden.adapters.auth import msg_id_key, resolve_creds

            api_conn, api_log = nc, event_log
            api_creds = config.api_creds
            if api_creds:  # its own principal: it may write only what a user asks
                api_nc = await connect_with(
                    config.connection.at(url, api_creds), url, "gpuwarden-api"
                )
                api_conn = api_nc
                api_log = JetStreamEventLog(
                    api_nc, replicas=config.replicas, msg_id_key=msg_id_key(api_creds)
                )
            # The API folds the engine's own read of the log: one subscription, not two.
            api = ApiService(
                api_conn,
                api_log,
                clock,
                shared=True,
                # No credentials: nobody is authenticated, so the owner a request names
                # is as good as any (the insecure mode).
                trust_owner_field=(api_creds or resolve_creds(config.connection)) is None,
                env_key=env_key,  # seals task env at create; opens it for owners' reads
            )
            engine.taps.append(api.follow)
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            tg.start_soon(feed_liveness, NatsHeartbeats(nc), liveness, clock)
            if api is not None:
                api.ready.set()  # the engine has caught up, and the API with it
                await tg.start(api.serve)  # listening before anyone is told the URL
            if config.metrics_port is not None:
                port = await tg.start(
                    serve_metrics, metrics, config.metrics_port, config.metrics_host
                )
                print(
                    f"gpuwarden: metrics on http://{config.metrics_host}:{port}/metrics",
                    file=sys.stderr,
                )
            print(
                f"gpuwarden: engine running on {url} "
                f"({len(engine.state.tasks)} tasks, {len(engine.state.nodes)} nodes in the log)",
                file=sys.stderr,
                flush=True,
            )
            if ready is not None:
                ready(url)
    finally:
        if api_nc is not None:
            await api_nc.close()
        await nc.close()


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


async def _until_signal(body: Callable[[Callable[[str], None]], Awaitable[None]]) -> int:
    """Run `body` until it ends, SIGTERM or Ctrl-C; then cancel it and return cleanly."""
    status = 0
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    print(f"gpuwarden: {name} received, stopping", file=sys.stderr)
                    tg.cancel_scope.cancel()
                    return

        async def main() -> None:
            nonlocal status
            try:
                await body(lambda url: None)
            except GpuwardenError as exc:
                print(f"gpuwarden: error: {exc}", file=sys.stderr)
                status = 2
            tg.cancel_scope.cancel()

        tg.start_soon(watch_signals)
        tg.start_soon(main)
    return status


# --- gpuwarden up ---------------------------------------------------------------------


def _register_up(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run everything on this machine: embedded NATS, the engine and a local agent",
        description="Start an embedded nats-server in the data directory (unless --nats), "
        "the engine with its task API, and a node agent for this machine: Docker when an "
        "engine answers (GPUs from NVML, or declared when there is no driver), otherwise a "
        "simulated node. Prints the NATS URL on stdout; Ctrl-C or SIGTERM stops it all.",
    )
    add_engine_options(parser)
    parser.add_argument("--node", default="local", help="this machine's node name")
    parser.add_argument(
        "--runtime",
        choices=("auto", "docker", "sim", "none"),
        default="auto",
        help="local agent: Docker if reachable (auto), Docker, simulated, or no agent",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=DEFAULT_UP_GPUS,
        metavar="N",
        help="GPUs to declare when NVML finds none (default 2; ignored where NVML works)",
    )
    parser.add_argument("--gpu-model", default="declared", metavar="M", help="declared model")
    parser.add_argument(
        "--gpu-memory-mb", type=int, default=0, metavar="X", help="declared memory per GPU"
    )
    parser.add_argument("--network", default="none", help="Docker network for containers")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="run the embedded server without authorization: anyone who reaches its port "
        "may write the log (a warning is printed on every start)",
    )
    parser.set_defaults(handler=run_up_command)


def docker_reachable(timeout_s: float = DOCKER_PING_TIMEOUT_S) -> str | None:
    """None when a Docker engine answers a ping, else why not (said to the user)."""
    try:
        import docker

        client = docker.from_env(timeout=timeout_s)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return str(exc).splitlines()[0][:200] or type(exc).__name__
    return None


async def run_up_command(args: argparse.Namespace) -> int:
    config = UpConfig.from_args(args)
    _configure_logging(config.engine.verbose)
    runtime = config.runtime
    if runtime == "auto":
        why_not = await anyio.to_thread.run_sync(docker_reachable)
        runtime = "docker" if why_not is None else "sim"
        if why_not is not None:
            print(
                f"gpuwarden: no Docker engine answers ({why_not}); "
                f"running a simulated node instead (--runtime sim)",
                file=sys.stderr,
            )
    parts = await _up_credentials(config)
    async with nats_url(config.engine.connection) as url:
        if not config.engine.connection.nats:
            from gpuwarden.adapters.embedded_nats import port_file

            print(
                f"gpuwarden: embedded NATS on {url}; its port is kept in "
                f"{port_file(config.engine.connection.data_dir)}, so a restart comes back "
                "on the same URL",
                file=sys.stderr,
                flush=True,
            )
        engine = replace(
            config.engine,
            connection=config.engine.connection.at(url, parts.engine),
            api_creds=parts.api,
            env_key=Path(parts.env_key) if parts.env_key else None,
        )

        async def everything(ready: Callable[[str], None]) -> None:
            async with anyio.create_task_group() as tg:
                engine_up = anyio.Event()
                tg.start_soon(serve_engine, engine, url, lambda _: engine_up.set())
                await engine_up.wait()
                print(url, flush=True)  # streams exist and the engine listens from here on
                if runtime != "none":
                    tg.start_soon(_serve_local_agent, config, url, runtime, parts.node)

        return await _until_signal(everything)


@dataclass(frozen=True)
class _UpCredentials:
    """Who each part of `up` connects as (None: no credentials)."""

    engine: str | None
    api: str | None
    node: str | None
    env_key: str | None = None


async def _up_credentials(config: UpConfig) -> _UpCredentials:
    """Secure by default: the embedded server runs with the data directory's
    authorization, made or refreshed here, and every part gets its own principal.
    With --nats the operator deployed the server's configuration: every part uses
    --creds, as `gpuwarden engine` and `gpuwarden agent` would."""
    from gpuwarden.adapters.auth import (
        ENV_KEY,
        ROLE_API,
        ROLE_ENGINE,
        local_auth_dir,
        node_principal,
        prepare_local,
    )

    conn = config.engine.connection
    if conn.nats:
        if conn.insecure:
            print(
                "gpuwarden: --insecure has no effect with --nats: the server's own "
                "configuration decides",
                file=sys.stderr,
            )
        return _UpCredentials(conn.creds, None, conn.creds)
    if conn.insecure:
        print(
            "gpuwarden: WARNING: --insecure: the embedded NATS server runs WITHOUT "
            "authorization; any local process that reaches its port can write the log, "
            "forge any node's facts and run containers. Do not use it on a shared machine.",
            file=sys.stderr,
            flush=True,
        )
        return _UpCredentials(conn.creds, None, conn.creds)
    await anyio.to_thread.run_sync(prepare_local, conn.data_dir, config.node)
    auth_dir = local_auth_dir(conn.data_dir)
    print(
        f"gpuwarden: authorization on; credentials in {auth_dir}/ (commands run in this "
        "data directory act as operator; admin.creds may change streams)",
        file=sys.stderr,
        flush=True,
    )

    def path(principal: str) -> str:
        return str(auth_dir / f"{principal}.creds")

    return _UpCredentials(
        path(ROLE_ENGINE),
        path(ROLE_API),
        path(node_principal(config.node).name),
        str(auth_dir / ENV_KEY),
    )


async def _serve_local_agent(
    config: UpConfig, url: str, runtime: AgentRuntime, creds: str | None
) -> None:
    agent = config.agent(runtime, config.engine.connection.at(url, creds))
    if runtime == "docker":
        await serve_docker(agent)
    else:
        await serve_sim(agent)
