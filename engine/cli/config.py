"""The processes' settings: frozen, validated when made, built from options at the edge.

`gpuwarden engine`, `up` and `agent` turn their parsed options into these objects once
(`from_args`); the service functions (`serve_engine`, `serve_docker`, `serve_sim`)
take only these. A value that cannot work is refused when the object is made, with a
ConfigError that names the option, so a service never meets it half-way through its
start. Defaults are the command line's defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Literal

from gpuwarden.engine.core.errors import GpuwardenError, PolicyError
from gpuwarden.engine.core.policy import DEFAULT_POLICY, Policy, parse_policy

DEFAULT_DATA_DIR: Final = Path(".gpuwarden")
DEFAULT_METRICS_HOST: Final = "127.0.0.1"
DEFAULT_NETWORK: Final = "none"  # task containers get no network unless asked
DEFAULT_GPU_MODEL: Final = "declared"
DEFAULT_HEARTBEAT_S: Final = 1.0
DEFAULT_STOP_TIMEOUT_S: Final = 10.0
# A stopping agent's last heartbeat says "back within this long": the engine holds off
# failing its node over for that long (an upgrade, a restart). At most MAX_RESTART_WINDOW_S.
DEFAULT_RESTART_WINDOW_S: Final = 300.0
MAX_RESTART_WINDOW_S: Final = 3600.0  # what the engine accepts (heartbeats.MAX_AWAY_S)
DEFAULT_UP_GPUS: Final = 2  # what `up` declares where NVML finds none
MAX_PORT: Final = 65_535
_UNSAFE_IN_PATH: Final = re.compile(r"[^A-Za-z0-9_.-]+")

AgentRuntime = Literal["docker", "sim"]
UpRuntime = Literal["auto", "docker", "sim", "none"]


class ConfigError(GpuwardenError):
    """An option's value cannot work; the message names the option."""


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


@dataclass(frozen=True, kw_only=True)
class ConnectionConfig:
    """How a process reaches NATS: the global --nats, --creds, --tls-* and --data-dir.

    Its attribute names are the options' own, so the adapters' credential helpers
    (`resolve_creds`, `embedded_server_auth`, `refused_hint`) read it as they read
    parsed options.
    """

    nats: str | None = None  # server URL(s), comma-separated; None: the embedded server
    creds: str | None = None  # credentials file; None: the data directory's, if any
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    data_dir: Path = DEFAULT_DATA_DIR  # embedded server's store, `up`'s credentials
    insecure: bool = False  # an embedded server started for it runs without authorization

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConnectionConfig:
        return cls(
            nats=args.nats,
            creds=args.creds,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            data_dir=Path(args.data_dir),
            insecure=getattr(args, "insecure", False),  # only `up` has --insecure
        )

    def at(self, url: str, creds: str | None) -> ConnectionConfig:
        """The same options, connecting to `url` as the principal in `creds` (with no
        creds, as nobody: the URL is set, so no data directory's credentials are used)."""
        return replace(self, nats=url, creds=creds)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """`gpuwarden engine` (and the engine `up` runs): the engine and its companions."""

    connection: ConnectionConfig = field(default_factory=ConnectionConfig)
    policy: Policy = DEFAULT_POLICY  # --policy FILE, loaded and checked
    replicas: int = 1  # of the streams it creates (3 on a JetStream cluster)
    serve_api: bool = True  # the task API in this process (--no-api: elsewhere)
    api_creds: str | None = None  # the API's own principal; None: the engine's connection
    env_key: Path | None = None  # seals task env at the API, opens it for its node
    metrics_port: int | None = None  # Prometheus endpoint; None: none, 0: any free port
    metrics_host: str = DEFAULT_METRICS_HOST
    verbose: bool = False  # log decisions

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, not {self.replicas}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= MAX_PORT:
            raise ConfigError(f"--metrics-port must be 0 to {MAX_PORT}, not {self.metrics_port}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineConfig:
        """From `engine`'s or `up`'s options; `up` has no --api-creds or --env-key."""
        env_key = getattr(args, "env_key", None)
        return cls(
            connection=ConnectionConfig.from_args(args),
            policy=load_policy_file(args.policy),
            replicas=args.replicas,
            serve_api=not args.no_api,
            api_creds=getattr(args, "api_creds", None),
            env_key=Path(env_key) if env_key else None,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            verbose=args.verbose,
        )


def _check_node(gpus: int, gpu_memory_mb: int) -> None:
    if gpus < 0:
        raise ConfigError(f"--gpus must be >= 0, not {gpus}")
    if gpu_memory_mb < 0:
        raise ConfigError(f"--gpu-memory-mb must be >= 0, not {gpu_memory_mb}")


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """`gpuwarden agent` (and the local agent `up` runs): one node's agent."""

    node: str
    connection: ConnectionConfig = field(default_factory=ConnectionConfig)
    runtime: AgentRuntime = "docker"  # Docker containers, or a simulated node
    gpus: int = 0  # declared GPU count, where NVML finds no driver
    gpu_model: str = DEFAULT_GPU_MODEL  # declared model
    gpu_memory_mb: int = 0  # declared memory per GPU; 0: not said
    network: str = DEFAULT_NETWORK  # Docker network mode of task containers
    heartbeat_s: float = DEFAULT_HEARTBEAT_S  # between heartbeats
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S  # SIGTERM grace on stop
    verbose: bool = False  # log every command
    # Where the agent keeps what the log has not taken yet (its outbox); None: the
    # default, `<data-dir>/agent-<node>/` (`state_path`).
    state_dir: Path | None = None
    # Announced in the last heartbeat of a graceful stop; 0: announce nothing.
    restart_window_s: float = DEFAULT_RESTART_WINDOW_S

    def __post_init__(self) -> None:
        if not self.node:
            raise ConfigError("--node must name the node")
        if self.runtime not in ("docker", "sim"):
            raise ConfigError(f"--runtime must be docker or sim, not {self.runtime!r}")
        _check_node(self.gpus, self.gpu_memory_mb)
        if not self.heartbeat_s > 0:
            raise ConfigError(f"--heartbeat-s must be > 0, not {self.heartbeat_s}")
        if not self.stop_timeout_s >= 0:
            raise ConfigError(f"--stop-timeout-s must be >= 0, not {self.stop_timeout_s}")
        if not 0 <= self.restart_window_s <= MAX_RESTART_WINDOW_S:
            raise ConfigError(
                f"--restart-window-s must be 0 to {MAX_RESTART_WINDOW_S:g}, "
                f"not {self.restart_window_s}"
            )

    @property
    def state_path(self) -> Path:
        """The agent's state directory: --state-dir, else one per node in the data dir."""
        if self.state_dir is not None:
            return self.state_dir
        return self.connection.data_dir / f"agent-{_file_safe(self.node)}"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AgentConfig:
        return cls(
            node=args.node,
            connection=ConnectionConfig.from_args(args),
            runtime=args.runtime,
            gpus=args.gpus,
            gpu_model=args.gpu_model,
            gpu_memory_mb=args.gpu_memory_mb,
            network=args.network,
            heartbeat_s=args.heartbeat_s,
            stop_timeout_s=args.stop_timeout_s,
            verbose=args.verbose,
            state_dir=Path(args.state_dir) if args.state_dir else None,
            restart_window_s=args.restart_window_s,
        )


def _file_safe(name: str) -> str:
    """A node name as one path component: unchanged when it is one already, else
    cleaned, with a digest of the name so two names never share a directory."""
    cleaned = _UNSAFE_IN_PATH.sub("_", name).strip(".") or "node"
    if cleaned == name:
        return name
    return f"{cleaned}-{hashlib.blake2b(name.encode(), digest_size=4).hexdigest()}"


@dataclass(frozen=True, kw_only=True)
class UpConfig:
    """`gpuwarden up`: an engine and, unless the runtime is "none", a local agent."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    node: str = "local"  # the local agent's node name
    runtime: UpRuntime = "auto"  # auto: Docker if an engine answers, else simulated
    gpus: int = DEFAULT_UP_GPUS  # declared where NVML finds none
    gpu_model: str = DEFAULT_GPU_MODEL
    gpu_memory_mb: int = 0
    network: str = DEFAULT_NETWORK

    def __post_init__(self) -> None:
        if not self.node:
            raise ConfigError("--node must name the node")
        if self.runtime not in ("auto", "docker", "sim", "none"):
            raise ConfigError(f"--runtime must be auto, docker, sim or none, not {self.runtime!r}")
        _check_node(self.gpus, self.gpu_memory_mb)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> UpConfig:
        return cls(
            engine=EngineConfig.from_args(args),
            node=args.node,
            runtime=args.runtime,
            gpus=args.gpus,
            gpu_model=args.gpu_model,
            gpu_memory_mb=args.gpu_memory_mb,
            network=args.network,
        )

    def agent(self, runtime: AgentRuntime, connection: ConnectionConfig) -> AgentConfig:
        """The local agent's settings, once its runtime and connection are known
        (heartbeat and stop grace: the agent's defaults)."""
        return AgentConfig(
            node=self.node,
            connection=connection,
            runtime=runtime,
            gpus=self.gpus,
            gpu_model=self.gpu_model,
            gpu_memory_mb=self.gpu_memory_mb,
            network=self.network,
            verbose=self.engine.verbose,
        )
