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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from gpuwarden.engine.core.errors import GpuwardenError, PolicyError
from gpuwarden.engine.core.policy import DEFAULT_POLICY, Policy, parse_policy

log = logging.getLogger("gpuwarden.service")


def load_policy_file(path: str | Path | None) -> Policy:
    """A policy from a TOML file, or the defaults; errors name the file and the key."""
    if path is None:
        return DEFAULT_POLICY
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise PolicyError(f"{file}: cannot read policy file: {exc.strerror}") from None
    return parse_policy(text, str(file))


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", metavar="FILE", help="policy TOML (defaults otherwise)")
    parser.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on PORT"
    )
    parser.add_argument(
        "--metrics-host", default="127.0.0.1", metavar="HOST", help="metrics bind address"
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
    from gpuwarden.engine.cli.common import nats_url

    _configure_logging(args.verbose)
    policy = load_policy_file(args.policy)
    _local_engine_creds(args)
    async with nats_url(args) as url:
        return await _until_signal(lambda ready: serve_engine(args, url, policy, ready))


def _local_engine_creds(args: argparse.Namespace) -> None:
    """In a data directory where `up` made credentials (no --nats, no --creds), the
    engine and its API act as the principals `up` gives them."""
    from gpuwarden.adapters.auth import ENV_KEY, ROLE_API, ROLE_ENGINE, local_auth_dir, local_creds

    if args.nats or args.creds:
        return
    engine = local_creds(args.data_dir, ROLE_ENGINE)
    if engine is None:
        return
    args.creds = str(engine)
    key = local_auth_dir(args.data_dir) / ENV_KEY
    if getattr(args, "env_key", None) is None and key.exists():
        args.env_key = str(key)
    api = local_creds(args.data_dir, ROLE_API)
    if getattr(args, "api_creds", None) is None and api is not None:
        args.api_creds = str(api)


def _with_creds(args: argparse.Namespace, creds: str | None, url: str) -> argparse.Namespace:
    """A copy of args that connects to `url` as the principal in `creds` (and, with no
    creds, as nobody: --nats is set, so no data directory's credentials are picked)."""
    return argparse.Namespace(**{**vars(args), "creds": creds, "nats": url})


def _check_api_creds(args: argparse.Namespace) -> None:
    """Refuse at once to serve the API over credentials that may not (the engine's)."""
    from gpuwarden.adapters.auth import (
        ROLE_ADMIN,
        ROLE_API,
        ROLE_JWT,
        AuthError,
        load_credentials,
        resolve_creds,
    )

    if getattr(args, "no_api", False) or getattr(args, "api_creds", None):
        return
    path = resolve_creds(args)
    if path is None:
        return
    role = load_credentials(path).role
    if role not in (ROLE_API, ROLE_JWT, ROLE_ADMIN):
        raise AuthError(
            f"the task API cannot be served with {path} (role {role}): pass --api-creds FILE "
            "(the api principal's credentials) or --no-api"
        )


async def serve_engine(
    args: argparse.Namespace,
    url: str,
    policy: Policy,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run the engine and its companions until cancelled."""
    from gpuwarden.adapters.dead_letters import JetStreamDeadLetters
    from gpuwarden.adapters.env_seal import EnvKey, command_opener
    from gpuwarden.adapters.heartbeats import NatsHeartbeats, feed_liveness
    from gpuwarden.adapters.jetstream import JetStreamCommandBus, JetStreamEventLog
    from gpuwarden.adapters.stream_guard import EngineStreamCheck
    from gpuwarden.engine.cli.common import connect_with
    from gpuwarden.engine.clock import SystemClock
    from gpuwarden.engine.core.liveness import Liveness
    from gpuwarden.engine.metrics import EngineMetrics, serve_metrics
    from gpuwarden.engine.runtime import Engine

    _check_api_creds(args)
    key_file = getattr(args, "env_key", None)
    env_key = EnvKey.load(Path(key_file)) if key_file else None
    nc = await connect_with(args, url, "gpuwarden-engine")
    api_nc = None
    try:
        # Its appends' msg ids keyed by a secret of this process: nobody can foresee and
        # squat the msg id of a decision (see JetStreamEventLog).
        event_log = JetStreamEventLog(
            nc, replicas=getattr(args, "replicas", 1), msg_id_key=os.urandom(16)
        )
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
            dead_letters=JetStreamDeadLetters(nc, replicas=getattr(args, "replicas", 1)),
            metrics=metrics,
            liveness=liveness,
            open_command=command_opener(env_key),
            stream_check=EngineStreamCheck(event_log),
        )
        api = None
        if not getattr(args, "no_api", False):
            from gpuwarden.adapters.api_service import ApiService
            from gpuwarden.adapters.auth import msg_id_key, resolve_creds

            api_conn, api_log = nc, event_log
            api_creds = getattr(args, "api_creds", None)
            if api_creds:  # its own principal: it may write only what a user asks
                api_nc = await connect_with(_with_creds(args, api_creds, url), url, "gpuwarden-api")
                api_conn = api_nc
                api_log = JetStreamEventLog(
                    api_nc,
                    replicas=getattr(args, "replicas", 1),
                    msg_id_key=msg_id_key(api_creds),
                )
            # The API folds the engine's own read of the log: one subscription, not two.
            api = ApiService(
                api_conn,
                api_log,
                clock,
                shared=True,
                # No credentials: nobody is authenticated, so the owner a request names
                # is as good as any (the insecure mode).
                trust_owner_field=(api_creds or resolve_creds(args)) is None,
                env_key=env_key,  # seals task env at create; opens it for owners' reads
            )
            engine.taps.append(api.follow)
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            tg.start_soon(feed_liveness, NatsHeartbeats(nc), liveness, clock)
            if api is not None:
                api.ready.set()  # the engine has caught up, and the API with it
                await tg.start(api.serve)  # listening before anyone is told the URL
            if getattr(args, "metrics_port", None) is not None:
                port = await tg.start(serve_metrics, metrics, args.metrics_port, args.metrics_host)
                print(
                    f"gpuwarden: metrics on http://{args.metrics_host}:{port}/metrics",
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
        default=2,
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


def docker_reachable(timeout_s: float = 2.0) -> str | None:
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
    from gpuwarden.engine.cli.common import nats_url

    _configure_logging(args.verbose)
    policy = load_policy_file(args.policy)
    runtime = args.runtime
    if runtime == "auto":
        why_not = await anyio.to_thread.run_sync(docker_reachable)
        runtime = "docker" if why_not is None else "sim"
        if why_not is not None:
            print(
                f"gpuwarden: no Docker engine answers ({why_not}); "
                f"running a simulated node instead (--runtime sim)",
                file=sys.stderr,
            )
    parts = await _up_credentials(args)
    async with nats_url(args) as url:
        engine_args = _with_creds(args, parts.engine, url)
        engine_args.api_creds = parts.api
        engine_args.env_key = parts.env_key

        async def everything(ready: Callable[[str], None]) -> None:
            async with anyio.create_task_group() as tg:
                engine_up = anyio.Event()
                tg.start_soon(serve_engine, engine_args, url, policy, lambda _: engine_up.set())
                await engine_up.wait()
                print(url, flush=True)  # streams exist and the engine listens from here on
                if runtime != "none":
                    tg.start_soon(_serve_local_agent, args, url, runtime, parts.node)

        return await _until_signal(everything)


@dataclass(frozen=True)
class _UpCredentials:
    """Who each part of `up` connects as (None: no credentials)."""

    engine: str | None
    api: str | None
    node: str | None
    env_key: str | None = None


async def _up_credentials(args: argparse.Namespace) -> _UpCredentials:
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

    if args.nats:
        if args.insecure:
            print(
                "gpuwarden: --insecure has no effect with --nats: the server's own "
                "configuration decides",
                file=sys.stderr,
            )
        return _UpCredentials(args.creds, None, args.creds)
    if args.insecure:
        print(
            "gpuwarden: WARNING: --insecure: the embedded NATS server runs WITHOUT "
            "authorization; any local process that reaches its port can write the log, "
            "forge any node's facts and run containers. Do not use it on a shared machine.",
            file=sys.stderr,
            flush=True,
        )
        return _UpCredentials(args.creds, None, args.creds)
    await anyio.to_thread.run_sync(prepare_local, args.data_dir, args.node)
    auth_dir = local_auth_dir(args.data_dir)
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
        path(node_principal(args.node).name),
        str(auth_dir / ENV_KEY),
    )


async def _serve_local_agent(
    args: argparse.Namespace, url: str, runtime: str, creds: str | None
) -> None:
    from gpuwarden.engine.cli import agent as agent_cli

    agent_args = argparse.Namespace(**vars(args))
    agent_args.nats = url
    agent_args.creds = creds
    agent_args.runtime = runtime
    agent_args.heartbeat_s = getattr(args, "heartbeat_s", 1.0)
    agent_args.stop_timeout_s = getattr(args, "stop_timeout_s", 10.0)
    if runtime == "docker":
        await agent_cli.serve_docker(agent_args)
    else:
        await agent_cli.serve_sim(agent_args)
