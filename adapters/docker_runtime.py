"""DockerRuntime: runs a task attempt's container on a real Docker Engine.

The node agent needs three things from Docker: start a container exactly once per
attempt (commands are redelivered, agents restart), learn how it ended (exit code,
OOM kill, signal, the daemon's error), and hear about it promptly. Docker's SDK is
blocking, so every call runs in a worker thread; its event stream runs in a thread of
its own and is bridged into async code through a memory object stream.

Labels on the container are the source of truth linking it to the log
(`gpuwarden.task`, `.attempt`, `.node`, `.command`): after a restart the agent finds its
containers by label, and an attempt that already has a container gets that one back.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import docker
from anyio.streams.memory import MemoryObjectSendStream
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest
from gpuwarden.engine.core.commands import RunCommand
from gpuwarden.engine.ports import (
    ContainerInfo,
    ContainerObservation,
    ContainerRuntimeError,
    ContainerStartError,
    ExitInfo,
)
from requests.exceptions import RequestException

TASK_LABEL: Final = "gpuwarden.task"
ATTEMPT_LABEL: Final = "gpuwarden.attempt"
NODE_LABEL: Final = "gpuwarden.node"
COMMAND_LABEL: Final = "gpuwarden.command"
GPUS_LABEL: Final = "gpuwarden.gpus"

# The SDK raises its own errors for answers, and requests' for a daemon it cannot reach.
ENGINE_ERRORS: Final = (DockerException, RequestException)
GpuMode = Literal["nvml", "declared"]
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")
_DOCKER_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$")


# --- pure helpers ------------------------------------------------------------------


def container_name(task_id: str, attempt: int) -> str:
    """A Docker-legal name per attempt; the digest keeps sanitised ids apart."""
    digest = hashlib.blake2b(task_id.encode(), digest_size=4).hexdigest()
    cleaned = _NAME_UNSAFE.sub("_", task_id).strip("_.-")[:80] or "task"
    return f"gw-{cleaned}-{digest}-a{attempt}"


def parse_docker_time(value: str | None) -> datetime | None:
    """Docker's RFC 3339 time (nanoseconds), as a UTC datetime; None for the zero time."""
    match = _DOCKER_TIME.match(value or "")
    if match is None or match.group(1).startswith("0001-01-01"):
        return None
    whole, fraction, zone = match.groups()
    micros = (fraction or "")[:6].ljust(6, "0")
    offset = "+00:00" if zone in (None, "Z") else zone
    return datetime.fromisoformat(f"{whole}.{micros}{offset}").astimezone(UTC)


def signal_of(exit_code: int | None) -> int | None:
    if exit_code is None or exit_code <= 128:
        return None
    return exit_code - 128


def exit_info_from_inspect(attrs: Mapping[str, Any]) -> ExitInfo:
    """ExitInfo from the JSON `docker inspect` returns for a container."""
    state = attrs.get("State") or {}
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    running = bool(state.get("Running")) or state.get("Status") in ("running", "restarting")
    finished = None if running else parse_docker_time(state.get("FinishedAt"))
    exit_code = None if running or finished is None else state.get("ExitCode")
    return ExitInfo(
        container_id=str(attrs.get("Id", "")),
        running=running,
        exit_code=exit_code,
        oom_killed=bool(state.get("OOMKilled")),
        signal=signal_of(exit_code),
        error=str(state.get("Error") or ""),
        started_at=parse_docker_time(state.get("StartedAt")),
        finished_at=finished,
        task_id=labels.get(TASK_LABEL),
        attempt=_int_or_none(labels.get(ATTEMPT_LABEL)),
        node=labels.get(NODE_LABEL),
    )


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _daemon_text(exc: Exception) -> str:
    if isinstance(exc, APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc)


# --- the adapter -------------------------------------------------------------------


class DockerRuntime:
    """Containers for one node on one Docker Engine: the `ContainerRuntime` port.

    gpu_mode "nvml": GPUs go to the container as a DeviceRequest (NVIDIA runtime
    required). gpu_mode "declared": no driver on the host; the ids are only passed in
    the environment, so the container sees which GPUs it was given.
    """

    name = "docker"

    def __init__(
        self,
        client: docker.DockerClient,
        node: str,
        *,
        network_mode: str = "none",
        gpu_mode: GpuMode = "nvml",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        if gpu_mode not in ("nvml", "declared"):
            raise ValueError(f"gpu_mode must be 'nvml' or 'declared', not {gpu_mode!r}")
        self.client = client
        self.node = node
        self.network_mode = network_mode
        self.gpu_mode = gpu_mode
        self.extra_labels = dict(labels or {})
        self._locks = tuple(threading.Lock() for _ in range(64))

    # --- start -----------------------------------------------------------------------

    async def run(self, cmd: RunCommand) -> str:
        """Start the attempt's container, or return the one it already has; its id."""
        return await anyio.to_thread.run_sync(self._run_blocking, cmd)

    def _run_blocking(self, cmd: RunCommand) -> str:
        with self._attempt_lock(cmd.task_id, cmd.attempt):
            try:
                return self._run_locked(cmd)
            except ENGINE_ERRORS as exc:  # the engine failed outside create/start
                raise ContainerStartError(_start_message(cmd, exc)) from None

    def _attempt_lock(self, task_id: str, attempt: int) -> threading.Lock:
        """Runs of one attempt in this process go one at a time (striped: bounded memory)."""
        return self._locks[hash((task_id, attempt)) % len(self._locks)]

    def _run_locked(self, cmd: RunCommand) -> str:
        existing = self._find(cmd.task_id, cmd.attempt)
        if existing is not None:
            return self._ensure_started(existing)
        try:
            container = self.client.containers.create(**self._create_args(cmd))
        except APIError as exc:
            if exc.status_code == 409:  # another process created this attempt's container
                raced = self._find_soon(cmd.task_id, cmd.attempt)
                if raced is not None:
                    return self._ensure_started(raced)
            raise ContainerStartError(_start_message(cmd, exc)) from None
        except ENGINE_ERRORS as exc:
            raise ContainerStartError(_start_message(cmd, exc)) from None
        return self._start_or_discard(container, cmd)

    def _create_args(self, cmd: RunCommand) -> dict[str, Any]:
        gpus = ",".join(cmd.gpu_uuids)
        env = dict(cmd.env)
        labels = {
            **self.extra_labels,
            TASK_LABEL: cmd.task_id,
            ATTEMPT_LABEL: str(cmd.attempt),
            NODE_LABEL: self.node,
            COMMAND_LABEL: cmd.id,
            GPUS_LABEL: gpus,
        }
        args: dict[str, Any] = {
            "image": cmd.image,
            "command": list(cmd.command),
            "name": container_name(cmd.task_id, cmd.attempt),
            "labels": labels,
            "network_mode": self.network_mode,
            "privileged": False,
            "security_opt": ["no-new-privileges"],
            "detach": True,
        }
        if cmd.gpu_uuids:
            env["GPUWARDEN_GPU_UUIDS"] = gpus
            if self.gpu_mode == "nvml":
                args["device_requests"] = [
                    DeviceRequest(device_ids=list(cmd.gpu_uuids), capabilities=[["gpu"]])
                ]
            else:
                env["NVIDIA_VISIBLE_DEVICES"] = gpus
        if cmd.memory_mb is not None:
            args["mem_limit"] = f"{cmd.memory_mb}m"
            args["memswap_limit"] = f"{cmd.memory_mb}m"
        args["environment"] = env
        return args

    def _start_or_discard(self, container: Any, cmd: RunCommand) -> str:
        """Start it; a container that cannot start is removed, so a retry starts afresh."""
        try:
            container.start()
        except ENGINE_ERRORS as exc:
            message = _start_message(cmd, exc)
            try:
                container.remove(force=True)
            except ENGINE_ERRORS:
                pass
            raise ContainerStartError(message) from None
        return str(container.id)

    def _ensure_started(self, container: Any) -> str:
        if container.status == "created":  # created by a run() that died before start
            try:
                container.start()
            except ENGINE_ERRORS as exc:
                raise ContainerStartError(_daemon_text(exc)) from None
        return str(container.id)

    def _find_soon(self, task_id: str, attempt: int, within_s: float = 5.0) -> Any | None:
        """The daemon reserves a name before it lists the container: look a few times."""
        deadline = time.monotonic() + within_s
        while True:
            found = self._find(task_id, attempt)
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def _find(self, task_id: str, attempt: int) -> Any | None:
        found = self.client.containers.list(
            all=True,
            sparse=True,
            filters={"label": [f"{TASK_LABEL}={task_id}", f"{ATTEMPT_LABEL}={attempt}"]},
        )
        if not found:
            return None
        return min(found, key=lambda c: str(c.attrs.get("Created", "")))

    # --- stop, remove, list ----------------------------------------------------------

    async def stop(self, task_id: str, attempt: int, timeout_s: float = 10.0) -> list[str]:
        """Stop the attempt's containers (SIGTERM, then SIGKILL after timeout_s)."""
        return await anyio.to_thread.run_sync(self._stop_blocking, task_id, attempt, timeout_s)

    def _stop_blocking(self, task_id: str, attempt: int, timeout_s: float) -> list[str]:
        stopped = []
        for container in self._labelled(task_id, attempt):
            try:
                container.stop(timeout=max(0, round(timeout_s)))
                stopped.append(str(container.id))
            except NotFound:
                pass
            except ENGINE_ERRORS as exc:
                raise ContainerRuntimeError(_daemon_text(exc)) from None
        return stopped

    async def remove(self, task_id: str, attempt: int, *, force: bool = True) -> list[str]:
        """Remove the attempt's containers (force: even if still running)."""
        return await anyio.to_thread.run_sync(self._remove_blocking, task_id, attempt, force)

    def _remove_blocking(self, task_id: str, attempt: int, force: bool) -> list[str]:
        removed = []
        for container in self._labelled(task_id, attempt):
            try:
                container.remove(force=force)
                removed.append(str(container.id))
            except NotFound:
                pass
            except ENGINE_ERRORS as exc:
                raise ContainerRuntimeError(_daemon_text(exc)) from None
        return removed

    def _labelled(self, task_id: str, attempt: int) -> list[Any]:
        filters = [f"{TASK_LABEL}={task_id}", f"{ATTEMPT_LABEL}={attempt}"]
        filters.append(f"{NODE_LABEL}={self.node}")
        try:
            containers: list[Any] = self.client.containers.list(
                all=True, sparse=True, filters={"label": filters}
            )
        except ENGINE_ERRORS as exc:
            raise ContainerRuntimeError(_daemon_text(exc)) from None
        return containers

    async def list_managed(self) -> list[ContainerInfo]:
        """Every container this node's agent started, for reconciliation after a restart."""
        return await anyio.to_thread.run_sync(self._list_blocking)

    def _list_blocking(self) -> list[ContainerInfo]:
        try:
            found = self.client.api.containers(
                all=True, filters={"label": [TASK_LABEL, f"{NODE_LABEL}={self.node}"]}
            )
        except ENGINE_ERRORS as exc:
            raise ContainerRuntimeError(_daemon_text(exc)) from None
        infos = []
        for summary in found:
            try:
                attrs = self.client.api.inspect_container(summary["Id"])
            except NotFound:
                continue  # removed between list and inspect
            infos.append(_container_info(attrs))
        return sorted(infos, key=lambda i: (i.task_id, i.attempt, i.container_id))

    # --- exits -----------------------------------------------------------------------

    async def discard(self, container_id: str) -> None:
        """Remove one container that never ran; Docker refuses (an error) if it runs."""
        await anyio.to_thread.run_sync(self._discard_blocking, container_id)

    def _discard_blocking(self, container_id: str) -> None:
        try:
            self.client.api.remove_container(container_id, force=False)
        except NotFound:
            pass
        except ENGINE_ERRORS as exc:
            raise ContainerRuntimeError(_daemon_text(exc)) from None

    async def inspect(self, container_id: str) -> ExitInfo:
        return await anyio.to_thread.run_sync(self._inspect_blocking, container_id)

    def _inspect_blocking(self, container_id: str) -> ExitInfo:
        try:
            return exit_info_from_inspect(self.client.api.inspect_container(container_id))
        except ENGINE_ERRORS as exc:
            raise ContainerRuntimeError(_daemon_text(exc)) from None

    async def wait_exit(self, container_id: str, timeout_s: float) -> ExitInfo:
        """Block (in a thread) until the container ends, then inspect it."""

        def wait() -> ExitInfo:
            try:
                self.client.api.wait(container_id, timeout=timeout_s)
            except ENGINE_ERRORS as exc:
                raise ContainerRuntimeError(_daemon_text(exc)) from None
            return self._inspect_blocking(container_id)

        with anyio.fail_after(timeout_s + 5):
            return await anyio.to_thread.run_sync(wait)

    # --- events ----------------------------------------------------------------------

    async def watch(
        self, since: datetime | None = None, *, ready: anyio.Event | None = None
    ) -> AsyncIterator[ContainerObservation]:
        """Starts and deaths of this node's containers, as Docker reports them.

        Docker replays events from `since` (use the last one seen before a disconnect),
        and the observations' ids are stable, so a replayed one de-duplicates. `ready`
        is set once the daemon has the subscription: reconcile (list_managed) after
        that, and nothing falls between the list and the stream. Ends with
        ContainerRuntimeError when the engine's stream breaks. Close the iterator
        (`contextlib.aclosing`) to stop the reader thread; a bare `break` leaves it
        until the generator is garbage-collected.
        """
        filters = {
            "type": "container",
            "event": ["start", "die"],
            "label": [TASK_LABEL, f"{NODE_LABEL}={self.node}"],
        }
        try:
            stream = await anyio.to_thread.run_sync(
                lambda: self.client.events(
                    decode=True, filters=filters, since=since.timestamp() if since else None
                )
            )
        except ENGINE_ERRORS as exc:
            raise ContainerRuntimeError(f"cannot watch Docker events: {exc}") from None
        if ready is not None:
            ready.set()
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](256)
        stopping = threading.Event()
        failure: list[BaseException] = []
        reader = threading.Thread(
            target=_pump_events,
            args=(stream, send, anyio.lowlevel.current_token(), stopping, failure),
            name=f"docker-events-{self.node}",
            daemon=True,
        )
        reader.start()
        try:
            async with receive:
                async for raw in receive:
                    observation = await self._observe(raw)
                    if observation is not None:
                        yield observation
            if failure:
                raise ContainerRuntimeError(f"Docker event stream broke: {failure[0]}")
        finally:
            stopping.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_close_quietly, stream)
                await anyio.to_thread.run_sync(reader.join, 5.0)

    async def _observe(self, raw: Mapping[str, Any]) -> ContainerObservation | None:
        action = raw.get("Action") or raw.get("status")
        actor = raw.get("Actor") or {}
        container_id = str(actor.get("ID") or raw.get("id") or "")
        attributes = actor.get("Attributes") or {}
        attempt = _int_or_none(attributes.get(ATTEMPT_LABEL))
        task_id = attributes.get(TASK_LABEL)
        if action not in ("start", "die") or not container_id or task_id is None:
            return None
        if attempt is None:
            return None
        try:
            info = await self.inspect(container_id)
        except ContainerRuntimeError:
            info = _exit_from_event(container_id, raw)  # removed already: trust the event
        base = {
            "container_id": container_id,
            "task_id": task_id,
            "attempt": attempt,
            "node": attributes.get(NODE_LABEL, self.node),
            "command_id": attributes.get(COMMAND_LABEL),
        }
        if action == "start":
            at = info.started_at or _event_time(raw)
            return ContainerObservation(kind="started", at=at, **base)
        if info.running:  # restarted since it died; its death is still this event
            info = _exit_from_event(container_id, raw)
        at = info.finished_at or _event_time(raw)
        return ContainerObservation(
            kind="exited",
            at=at,
            exit=info,
            **base,
        )


def _container_info(attrs: Mapping[str, Any]) -> ContainerInfo:
    labels = dict((attrs.get("Config") or {}).get("Labels") or {})
    state = attrs.get("State") or {}
    status = str(state.get("Status", "unknown"))
    return ContainerInfo(
        container_id=str(attrs["Id"]),
        name=str(attrs.get("Name", "")).lstrip("/"),
        task_id=labels.get(TASK_LABEL, ""),
        attempt=_int_or_none(labels.get(ATTEMPT_LABEL)) or 0,
        node=labels.get(NODE_LABEL, ""),
        command_id=labels.get(COMMAND_LABEL),
        state=status,
        exit_code=None if status in ("created", "running") else state.get("ExitCode"),
        labels=labels,
    )


def _event_time(raw: Mapping[str, Any]) -> datetime:
    nanos = raw.get("timeNano")
    seconds = nanos / 1e9 if nanos else float(raw.get("time", 0))
    return datetime.fromtimestamp(seconds, UTC)


def _exit_from_event(container_id: str, raw: Mapping[str, Any]) -> ExitInfo:
    attributes = (raw.get("Actor") or {}).get("Attributes") or {}
    code = _int_or_none(attributes.get("exitCode"))
    at = _event_time(raw)
    return ExitInfo(
        container_id=container_id,
        running=False,
        exit_code=code,
        oom_killed=False,
        signal=signal_of(code),
        error="",
        started_at=None,
        finished_at=at if raw.get("Action") == "die" else None,
        task_id=attributes.get(TASK_LABEL),
        attempt=_int_or_none(attributes.get(ATTEMPT_LABEL)),
        node=attributes.get(NODE_LABEL),
    )


def _start_message(cmd: RunCommand, exc: Exception) -> str:
    if isinstance(exc, ImageNotFound):
        return f"image {cmd.image!r} not found: {_daemon_text(exc)}"
    return _daemon_text(exc)


def _pump_events(
    stream: Any,
    send: MemoryObjectSendStream[dict[str, Any]],
    token: anyio.lowlevel.EventLoopToken,
    stopping: threading.Event,
    failure: list[BaseException],
) -> None:
    """Reader thread: Docker's blocking event stream into the async side."""
    try:
        for raw in stream:
            anyio.from_thread.run(send.send, raw, token=token)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, RuntimeError):
        pass  # the consumer went away (or its loop did)
    except Exception as exc:
        if not stopping.is_set():
            failure.append(exc)
    else:
        if not stopping.is_set():
            failure.append(ConnectionError("the engine closed the event stream"))
    finally:
        try:
            anyio.from_thread.run_sync(send.close, token=token)
        except RuntimeError:
            pass


def _close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception:
        pass
