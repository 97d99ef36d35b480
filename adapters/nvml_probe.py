"""NvmlProbe: the GPUs of one node and their health, from NVIDIA's NVML (pynvml).

Fault classification needs hardware evidence next to a container's exit: Xid critical
errors and double-bit ECC events (pushed by NVML through `nvmlEventSetWait`), and
slowly moving state that is only polled (volatile uncorrectable ECC count, remapped
rows, the driver's own recovery verdict `NVML_FI_DEV_GET_GPU_RECOVERY_ACTION`).

The translation of raw NVML readings into `gpu.fault` events is pure (the functions
below, tested on recorded readings); the probe around them only reads NVML, in one
thread of its own, since every NVML call blocks. Without a driver, a node runs on a
declared inventory and says so plainly: nothing then watches its GPUs' health.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import anyio
import anyio.from_thread
import anyio.lowlevel
import msgspec
from anyio.streams.memory import MemoryObjectSendStream
from gpuwarden.engine.core.events import GpuFault, GpuFaultKind, GpuInfo
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.ports import GpuProbeError

# NVML's numbers (nvml.h); tests check each against pynvml's constant of that name.
EVENT_TYPE_DOUBLE_BIT_ECC: Final = 0x2  # nvmlEventTypeDoubleBitEccError
EVENT_TYPE_XID_CRITICAL: Final = 0x8  # nvmlEventTypeXidCriticalError
WATCHED_EVENT_TYPES: Final = EVENT_TYPE_XID_CRITICAL | EVENT_TYPE_DOUBLE_BIT_ECC
NVML_SUCCESS: Final = 0
NVML_ERROR_NOT_SUPPORTED: Final = 3
NVML_ERROR_TIMEOUT: Final = 10
NVML_ERROR_GPU_IS_LOST: Final = 15
NVML_MEMORY_ERROR_TYPE_UNCORRECTED: Final = 1
NVML_VOLATILE_ECC: Final = 0
NVML_FI_DEV_GET_GPU_RECOVERY_ACTION: Final = 230
XID_UNKNOWN: Final = 999  # NVML's eventData for an Xid it cannot name
XID_FALLEN_OFF_BUS: Final = 79
RECOVERY_ACTIONS: Final[dict[int, str]] = {
    0: "NVML_GPU_RECOVERY_ACTION_NONE",
    1: "NVML_GPU_RECOVERY_ACTION_GPU_RESET",
    2: "NVML_GPU_RECOVERY_ACTION_NODE_REBOOT",
    3: "NVML_GPU_RECOVERY_ACTION_DRAIN_P2P",
    4: "NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET",
    5: "NVML_GPU_RECOVERY_ACTION_RECOVER_IMEX_DOMAIN",
    6: "NVML_GPU_RECOVERY_ACTION_BUS_RESET",
    7: "NVML_GPU_RECOVERY_ACTION_SYSTEM_REBOOT",
}
_FIELD_VALUE_ATTRS: Final = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


# --- readings: what NVML said, as plain data (recorded in tests/data/nvml) -----------


class DeviceReading(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    uuid: str
    name: str
    memory_total_bytes: int


class XidReading(msgspec.Struct, frozen=True, kw_only=True):
    """One `nvmlEventData_t` from `nvmlEventSetWait`, with its device's UUID."""

    uuid: str
    event_type: int
    event_data: int
    gpu_instance_id: int = 0xFFFFFFFF
    compute_instance_id: int = 0xFFFFFFFF


class RemappedRows(msgspec.Struct, frozen=True, kw_only=True):
    """`nvmlDeviceGetRemappedRows`: (corrRows, uncRows, isPending, failureOccurred)."""

    corrected: int
    uncorrected: int
    pending: bool
    failure: bool


class HealthReading(msgspec.Struct, frozen=True, kw_only=True):
    """One poll of one GPU. None: NVML said NVML_ERROR_NOT_SUPPORTED (or failed)."""

    uuid: str
    ecc_volatile_dbe: int | None = None
    remapped_rows: RemappedRows | None = None
    recovery_action: int | None = None
    lost: bool = False  # some read returned NVML_ERROR_GPU_IS_LOST


# --- pure translation ----------------------------------------------------------------


def gpu_info_from_reading(reading: DeviceReading) -> GpuInfo:
    return GpuInfo(
        uuid=reading.uuid,
        index=reading.index,
        model=reading.name,
        memory_mb=reading.memory_total_bytes // (1024 * 1024),
    )


def _fault(
    uuid: str,
    node: str,
    kind: GpuFaultKind,
    event_id: str,
    at: datetime,
    *,
    xid: int | None,
    detail: str,
) -> GpuFault:
    return GpuFault(
        id=event_id,
        at=at,
        actor=f"agent:{node}",
        gpu_uuid=uuid,
        node=node,
        kind=kind,
        xid=xid,
        detail=detail,
    )


def xid_event_to_fault(
    reading: XidReading, *, node: str, event_id: str, at: datetime
) -> GpuFault | None:
    """An NVML event as a gpu.fault; None for event types gpuwarden does not watch.

    Xid 79 (GPU fallen off the bus) becomes `fallen_off_bus` and keeps its Xid; every
    other Xid stays `xid` and the classifier judges it; a double-bit ECC event is
    `ecc_dbe`. Informational Xids are recorded too: evidence is cheap, verdicts are not.
    """
    if reading.event_type & EVENT_TYPE_XID_CRITICAL:
        xid = reading.event_data
        detail = "unknown Xid (NVML eventData 999)" if xid == XID_UNKNOWN else f"Xid {xid}"
        if reading.gpu_instance_id != 0xFFFFFFFF:
            detail += f" (MIG GPU instance {reading.gpu_instance_id})"
        kind: GpuFaultKind = "fallen_off_bus" if xid == XID_FALLEN_OFF_BUS else "xid"
        return _fault(reading.uuid, node, kind, event_id, at, xid=xid, detail=detail)
    if reading.event_type & EVENT_TYPE_DOUBLE_BIT_ECC:
        detail = "double-bit ECC error event"
        return _fault(reading.uuid, node, "ecc_dbe", event_id, at, xid=None, detail=detail)
    return None


def ecc_delta_to_fault(
    previous: HealthReading | None,
    current: HealthReading,
    *,
    node: str,
    event_id: str,
    at: datetime,
) -> GpuFault | None:
    """`ecc_dbe` when uncorrectable memory errors grew since the last poll.

    With no previous poll the baseline is zero: a volatile count above zero means an
    uncorrectable error since the driver loaded, which a fresh agent must not ignore.
    Counters that NVML does not support on this GPU (None) say nothing.
    """
    reasons = []
    before_dbe = previous.ecc_volatile_dbe if previous else None
    if current.ecc_volatile_dbe is not None and current.ecc_volatile_dbe > (before_dbe or 0):
        reasons.append(f"volatile DBE count {before_dbe or 0} -> {current.ecc_volatile_dbe}")
    rows, before_rows = current.remapped_rows, previous.remapped_rows if previous else None
    if rows is not None:
        if rows.uncorrected > (before_rows.uncorrected if before_rows else 0):
            was = before_rows.uncorrected if before_rows else 0
            reasons.append(f"rows remapped for uncorrectable errors {was} -> {rows.uncorrected}")
        if rows.failure and not (before_rows and before_rows.failure):
            reasons.append("row remapping failed")
        if rows.pending and not (before_rows and before_rows.pending):
            reasons.append("row remap pending (GPU reset required)")
    if not reasons:
        return None
    return _fault(current.uuid, node, "ecc_dbe", event_id, at, xid=None, detail="; ".join(reasons))


def recovery_action_to_fault(
    previous: int | None, current: int | None, *, uuid: str, node: str, event_id: str, at: datetime
) -> GpuFault | None:
    """`recovery_action` when the driver's verdict turns to something other than NONE.

    `detail` is the action's NVML name exactly (the classifier reads it); a value NVML
    added after this table gets its number.
    """
    if current is None or current == 0 or current == previous:
        return None
    detail = RECOVERY_ACTIONS.get(current, str(current))
    return _fault(uuid, node, "recovery_action", event_id, at, xid=None, detail=detail)


def lost_gpu_fault(
    previous: HealthReading | None,
    current: HealthReading,
    *,
    node: str,
    event_id: str,
    at: datetime,
) -> GpuFault | None:
    """`fallen_off_bus` once, when reads start failing with NVML_ERROR_GPU_IS_LOST."""
    if not current.lost or (previous is not None and previous.lost):
        return None
    detail = "NVML_ERROR_GPU_IS_LOST: GPU has fallen off the bus or is otherwise inaccessible"
    return _fault(current.uuid, node, "fallen_off_bus", event_id, at, xid=None, detail=detail)


def health_faults(
    previous: HealthReading | None,
    current: HealthReading,
    *,
    node: str,
    at: datetime,
    ids: Callable[[], str],
) -> list[GpuFault]:
    """Every fault one poll shows against the poll before it."""
    if current.lost:
        lost = lost_gpu_fault(previous, current, node=node, event_id=ids(), at=at)
        return [lost] if lost else []
    found = [
        ecc_delta_to_fault(previous, current, node=node, event_id=ids(), at=at),
        recovery_action_to_fault(
            previous.recovery_action if previous else None,
            current.recovery_action,
            uuid=current.uuid,
            node=node,
            event_id=ids(),
            at=at,
        ),
    ]
    return [fault for fault in found if fault is not None]


def declared_inventory(
    node: str, count: int, model: str = "declared", memory_mb: int = 0
) -> tuple[GpuInfo, ...]:
    """GPUs a node says it has, for hosts without a driver (nothing probes them)."""
    return tuple(
        GpuInfo(uuid=f"GPU-declared-{node}-{i}", index=i, model=model, memory_mb=memory_mb)
        for i in range(count)
    )


# --- the probe ---------------------------------------------------------------------


def load_pynvml() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the `pynvml` shim's deprecation note
        import pynvml

    return pynvml


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlProbe:
    """Inventory and health of one node's GPUs through NVML.

    `nvml` is the pynvml module (another object with its functions can stand in for
    it where no GPU exists). Open it before use; close it when done.
    """

    def __init__(
        self,
        node: str,
        *,
        nvml: Any = None,
        poll_interval_s: float = 10.0,
        wait_timeout_ms: int = 500,
    ) -> None:
        self.node = node
        self.poll_interval_s = poll_interval_s
        self.wait_timeout_ms = wait_timeout_ms
        self._nvml = nvml
        self._open = False

    def open(self) -> NvmlProbe:
        """Initialise NVML; GpuProbeError (saying why) where there is no driver."""
        try:
            if self._nvml is None:
                self._nvml = load_pynvml()
            self._nvml.nvmlInit()
        except Exception as exc:  # NVMLError, OSError, ImportError: all mean "no NVML"
            raise GpuProbeError(f"NVML unavailable: {exc}") from None
        self._open = True
        return self

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass

    def __enter__(self) -> NvmlProbe:
        return self.open()

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- reads -------------------------------------------------------------------------

    def devices(self) -> list[DeviceReading]:
        nvml = self._nvml
        readings = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                readings.append(
                    DeviceReading(
                        index=index,
                        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                        name=_text(nvml.nvmlDeviceGetName(handle)),
                        memory_total_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                    )
                )
        except nvml.NVMLError as exc:
            raise GpuProbeError(f"NVML inventory failed: {exc}") from None
        return readings

    def inventory(self) -> tuple[GpuInfo, ...]:
        return tuple(gpu_info_from_reading(reading) for reading in self.devices())

    def _handles(self) -> dict[str, Any]:
        nvml = self._nvml
        handles = {}
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            handles[_text(nvml.nvmlDeviceGetUUID(handle))] = handle
        return handles

    def read_health(self, uuid: str, handle: Any) -> HealthReading:
        """One poll of one GPU; unsupported counters read as None."""
        lost = False

        def read(call: Callable[[], Any]) -> Any:
            nonlocal lost
            try:
                return call()
            except self._nvml.NVMLError as exc:
                lost = lost or exc.value == NVML_ERROR_GPU_IS_LOST
                return None

        nvml = self._nvml
        dbe = read(
            lambda: nvml.nvmlDeviceGetTotalEccErrors(
                handle, NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC
            )
        )
        rows = read(lambda: nvml.nvmlDeviceGetRemappedRows(handle))
        action = read(lambda: self._recovery_action(handle))
        return HealthReading(
            uuid=uuid,
            ecc_volatile_dbe=None if dbe is None else int(dbe),
            remapped_rows=None
            if rows is None
            else RemappedRows(
                corrected=int(rows[0]),
                uncorrected=int(rows[1]),
                pending=bool(rows[2]),
                failure=bool(rows[3]),
            ),
            recovery_action=action,
            lost=lost,
        )

    def _recovery_action(self, handle: Any) -> int | None:
        (value,) = self._nvml.nvmlDeviceGetFieldValues(
            handle, [NVML_FI_DEV_GET_GPU_RECOVERY_ACTION]
        )
        if value.nvmlReturn == NVML_ERROR_GPU_IS_LOST:
            raise self._nvml.NVMLError(NVML_ERROR_GPU_IS_LOST)
        if value.nvmlReturn != NVML_SUCCESS:
            return None  # NOT_SUPPORTED before the drivers that report it
        return int(getattr(value.value, _FIELD_VALUE_ATTRS[value.valueType]))

    # --- watching ----------------------------------------------------------------------

    async def watch(self) -> AsyncIterator[GpuFault]:
        """gpu.fault events as NVML reports them, until the iterator is closed.

        Close it deterministically (`contextlib.aclosing`): a loop that merely breaks
        leaves the watcher thread running until the generator is garbage-collected.
        """
        if not self._open:
            raise GpuProbeError("NvmlProbe.watch() before open()")
        send, receive = anyio.create_memory_object_stream[GpuFault](256)
        stopping = threading.Event()
        failure: list[BaseException] = []
        watcher = threading.Thread(
            target=self._watch_thread,
            args=(send, anyio.lowlevel.current_token(), stopping, failure),
            name=f"nvml-watch-{self.node}",
            daemon=True,
        )
        watcher.start()
        try:
            async with receive:
                async for fault in receive:
                    yield fault
            if failure:
                raise GpuProbeError(f"NVML watch stopped: {failure[0]}")
        finally:
            stopping.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(watcher.join, 5.0)

    def _watch_thread(
        self,
        send: MemoryObjectSendStream[GpuFault],
        token: anyio.lowlevel.EventLoopToken,
        stopping: threading.Event,
        failure: list[BaseException],
    ) -> None:
        def emit(faults: Iterable[GpuFault]) -> None:
            for fault in faults:
                anyio.from_thread.run(send.send, fault, token=token)

        try:
            self._watch_loop(emit, stopping)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, RuntimeError):
            pass  # the consumer (or its event loop) went away
        except Exception as exc:  # NVML failed outside a single read: say so, do not hang
            failure.append(exc)
        finally:
            try:
                anyio.from_thread.run_sync(send.close, token=token)
            except RuntimeError:
                pass

    def _watch_loop(
        self, emit: Callable[[Iterable[GpuFault]], None], stopping: threading.Event
    ) -> None:
        nvml = self._nvml
        handles = self._handles()
        event_set = nvml.nvmlEventSetCreate()
        try:
            registered = self._register(event_set, handles)
            previous: dict[str, HealthReading] = {}
            next_poll = 0.0
            while not stopping.is_set():
                if time.monotonic() >= next_poll:
                    emit(self._poll(handles, previous))
                    next_poll = time.monotonic() + self.poll_interval_s
                if not registered:
                    stopping.wait(self.wait_timeout_ms / 1000)
                    continue
                reading, lost = self._wait_event(event_set)
                if reading is not None:
                    at = datetime.now(UTC)
                    fault = xid_event_to_fault(reading, node=self.node, event_id=new_id(at), at=at)
                    emit([fault] if fault else [])
                elif lost:  # which GPU is lost shows in the next poll
                    next_poll = 0.0
                    stopping.wait(self.wait_timeout_ms / 1000)
        finally:
            try:
                nvml.nvmlEventSetFree(event_set)
            except nvml.NVMLError:
                pass

    def _register(self, event_set: Any, handles: dict[str, Any]) -> bool:
        nvml, registered = self._nvml, False
        for handle in handles.values():
            try:
                wanted = nvml.nvmlDeviceGetSupportedEventTypes(handle) & WATCHED_EVENT_TYPES
                if wanted:
                    nvml.nvmlDeviceRegisterEvents(handle, wanted, event_set)
                    registered = True
            except nvml.NVMLError:
                continue  # this GPU pushes nothing; its polls still run
        return registered

    def _wait_event(self, event_set: Any) -> tuple[XidReading | None, bool]:
        nvml = self._nvml
        try:
            data = nvml.nvmlEventSetWait(event_set, self.wait_timeout_ms)
            uuid = _text(nvml.nvmlDeviceGetUUID(data.device))
        except nvml.NVMLError as exc:
            return None, exc.value == NVML_ERROR_GPU_IS_LOST
        reading = XidReading(
            uuid=uuid,
            event_type=int(data.eventType),
            event_data=int(data.eventData),
            gpu_instance_id=int(data.gpuInstanceId),
            compute_instance_id=int(data.computeInstanceId),
        )
        return reading, False

    def _poll(self, handles: dict[str, Any], previous: dict[str, HealthReading]) -> list[GpuFault]:
        at = datetime.now(UTC)
        faults: list[GpuFault] = []
        for uuid, handle in handles.items():
            current = self.read_health(uuid, handle)
            found = health_faults(
                previous.get(uuid), current, node=self.node, at=at, ids=lambda: new_id(at)
            )
            faults.extend(found)
            previous[uuid] = current
        return faults


class ProbeResult(NamedTuple):
    inventory: tuple[GpuInfo, ...]
    source: str  # "nvml" | "declared"
    message: str


def probe_or_declare(
    node: str,
    *,
    count: int,
    model: str = "declared",
    memory_mb: int = 0,
    nvml: Any = None,
) -> ProbeResult:
    """NVML's inventory where a driver answers, else the declared one, said plainly."""
    try:
        with NvmlProbe(node, nvml=nvml) as probe:
            gpus = probe.inventory()
    except GpuProbeError as exc:
        reason = str(exc)
    else:
        if gpus:
            models = ", ".join(sorted({gpu.model for gpu in gpus}))
            return ProbeResult(gpus, "nvml", f"{len(gpus)} GPU(s) found by NVML: {models}")
        reason = "NVML found no GPUs"
    declared = declared_inventory(node, count, model, memory_mb)
    message = (
        f"no GPU probe on {node} ({reason}); using a declared inventory of {count} x {model}: "
        "GPU health (Xid, ECC) is not watched"
    )
    return ProbeResult(declared, "declared", message)
