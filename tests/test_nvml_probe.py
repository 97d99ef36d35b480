"""NVML readings into gpu.fault events, and the probe around them.

No GPU exists here, so the translation is tested on readings recorded by hand from the
NVML reference (tests/data/nvml), and the probe's watcher thread on a stand-in that
replays one recorded session through pynvml's own call names. Tests marked `gpu` run
the real NVML path and are skipped where nvmlInit fails.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from gpuwarden.adapters import nvml_probe
from gpuwarden.adapters.nvml_probe import (
    DeviceReading,
    HealthReading,
    NvmlProbe,
    XidReading,
    declared_inventory,
    gpu_info_from_reading,
    health_faults,
    load_pynvml,
    probe_or_declare,
    recovery_action_to_fault,
    xid_event_to_fault,
)
from gpuwarden.engine.core.events import GpuFault, GpuInfo, decode, encode
from gpuwarden.engine.ports import GpuProbeError

DATA = Path(__file__).parent / "data" / "nvml"
AT = datetime(2026, 1, 1, tzinfo=UTC)


def load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DATA / name).read_text())
    return loaded


def brief(fault: GpuFault | None) -> dict[str, Any] | None:
    return None if fault is None else {"kind": fault.kind, "xid": fault.xid, "detail": fault.detail}


# --- constants are NVML's ----------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("EVENT_TYPE_DOUBLE_BIT_ECC", "nvmlEventTypeDoubleBitEccError"),
        ("EVENT_TYPE_XID_CRITICAL", "nvmlEventTypeXidCriticalError"),
        ("NVML_SUCCESS", "NVML_SUCCESS"),
        ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_NOT_SUPPORTED"),
        ("NVML_ERROR_TIMEOUT", "NVML_ERROR_TIMEOUT"),
        ("NVML_ERROR_GPU_IS_LOST", "NVML_ERROR_GPU_IS_LOST"),
        ("NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED"),
        ("NVML_VOLATILE_ECC", "NVML_VOLATILE_ECC"),
        ("NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION"),
    ],
)
def test_constants_match_pynvml(ours: str, theirs: str) -> None:
    assert getattr(nvml_probe, ours) == getattr(load_pynvml(), theirs)


def test_recovery_action_names_match_pynvml() -> None:
    pynvml = load_pynvml()
    for value, name in nvml_probe.RECOVERY_ACTIONS.items():
        assert getattr(pynvml, name) == value


# --- pure translation on recorded readings -----------------------------------------


def test_inventory_from_recorded_devices() -> None:
    recorded = load("devices_h100x2.json")
    readings = [msgspec.convert(d, DeviceReading) for d in recorded["devices"]]
    expected = [msgspec.convert(e, GpuInfo) for e in recorded["expect"]]
    assert [gpu_info_from_reading(r) for r in readings] == expected


@pytest.mark.parametrize("case", load("xid_events.json")["cases"], ids=lambda c: c["name"])
def test_xid_event_to_fault(case: dict[str, Any]) -> None:
    reading = msgspec.convert(case["reading"], XidReading)
    fault = xid_event_to_fault(reading, node="n1", event_id="e1", at=AT)
    assert brief(fault) == case["expect"]
    if fault is not None:
        assert (fault.gpu_uuid, fault.node, fault.id, fault.at) == (reading.uuid, "n1", "e1", AT)
        assert decode(encode(fault)) == fault


@pytest.mark.parametrize(
    "sequence", load("health_polls.json")["sequences"], ids=lambda s: s["name"]
)
def test_health_polls_to_faults(sequence: dict[str, Any]) -> None:
    previous: HealthReading | None = None
    counter = iter(range(1000))
    for poll, expected in zip(sequence["polls"], sequence["expect"], strict=True):
        current = msgspec.convert({"uuid": "GPU-x", **poll}, HealthReading)
        faults = health_faults(
            previous, current, node="n1", at=AT, ids=lambda: f"id-{next(counter)}"
        )
        assert [{"kind": f.kind, "detail": f.detail} for f in faults] == expected
        assert all(f.gpu_uuid == "GPU-x" and f.actor == "agent:n1" for f in faults)
        assert len({f.id for f in faults}) == len(faults)
        previous = current


def test_recovery_action_none_or_unchanged_is_quiet() -> None:
    kw = {"uuid": "GPU-x", "node": "n", "event_id": "e", "at": AT}
    assert recovery_action_to_fault(None, 0, **kw) is None
    assert recovery_action_to_fault(None, None, **kw) is None
    assert recovery_action_to_fault(6, 6, **kw) is None
    fault = recovery_action_to_fault(None, 7, **kw)
    assert fault is not None and fault.detail == "NVML_GPU_RECOVERY_ACTION_SYSTEM_REBOOT"


def test_declared_inventory() -> None:
    gpus = declared_inventory("node-a", 3, "A100", 40960)
    assert [g.uuid for g in gpus] == [f"GPU-declared-node-a-{i}" for i in range(3)]
    assert {(g.model, g.memory_mb) for g in gpus} == {("A100", 40960)}
    assert [g.index for g in gpus] == [0, 1, 2]


# --- a stand-in for pynvml that replays a recorded session -------------------------


class ReplayNvmlError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class ReplayNvml:
    """pynvml's calls the probe makes, answered from session_two_gpus.json."""

    NVMLError = ReplayNvmlError

    def __init__(self, session: dict[str, Any]) -> None:
        self.devices = session["devices"]
        self.events = list(session["events"])
        self.cursors: dict[tuple[int, str], int] = {}
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def nvmlInit(self) -> None:
        self.calls.append("init")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return str(self.devices[handle]["uuid"]).encode()

    def nvmlDeviceGetName(self, handle: int) -> str:
        return str(self.devices[handle]["name"])

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return type("Memory", (), {"total": self.devices[handle]["memory_total_bytes"]})

    def nvmlDeviceGetSupportedEventTypes(self, handle: int) -> int:
        return int(self.devices[handle]["supported_events"])

    def nvmlDeviceRegisterEvents(self, handle: int, mask: int, event_set: Any) -> None:
        self.calls.append(f"register {handle} {mask}")

    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlEventSetFree(self, event_set: Any) -> None:
        self.calls.append("free")

    def nvmlEventSetWait(self, event_set: Any, timeout_ms: int) -> Any:
        with self.lock:
            step = self.events.pop(0) if self.events else {"error": 10}
        if "error" in step:
            if step["error"] == 10:
                time.sleep(timeout_ms / 1000)
            raise ReplayNvmlError(step["error"])
        handle = next(i for i, d in enumerate(self.devices) if d["uuid"] == step["uuid"])
        return type(
            "EventData",
            (),
            {
                "device": handle,
                "eventType": step["event_type"],
                "eventData": step["event_data"],
                "gpuInstanceId": step["gpu_instance_id"],
                "computeInstanceId": step["compute_instance_id"],
            },
        )

    def _poll(self, handle: int, key: str) -> Any:
        polls = self.devices[handle]["polls"]
        cursor = self.cursors.get((handle, key), 0)
        self.cursors[handle, key] = cursor + 1
        value = polls[min(cursor, len(polls) - 1)][key]
        if isinstance(value, dict):
            raise ReplayNvmlError(value["error"])
        return value

    def nvmlDeviceGetTotalEccErrors(self, handle: int, error_type: int, counter: int) -> int:
        assert (error_type, counter) == (1, 0)  # uncorrected, volatile
        return int(self._poll(handle, "ecc_volatile_dbe"))

    def nvmlDeviceGetRemappedRows(self, handle: int) -> tuple[int, int, int, int]:
        corrected, uncorrected, pending, failure = self._poll(handle, "remapped_rows")
        return corrected, uncorrected, pending, failure

    def nvmlDeviceGetFieldValues(self, handle: int, field_ids: list[int]) -> list[Any]:
        assert field_ids == [230]
        try:
            value, code = self._poll(handle, "recovery_action"), 0
        except ReplayNvmlError as exc:
            value, code = 0, exc.value
        return [
            type(
                "FieldValue",
                (),
                {"nvmlReturn": code, "valueType": 1, "value": type("V", (), {"uiVal": value})},
            )
        ]


def test_probe_inventory_through_nvml_calls() -> None:
    session = load("session_two_gpus.json")
    with NvmlProbe("n1", nvml=ReplayNvml(session)) as probe:
        gpus = probe.inventory()
    assert [(g.uuid, g.index, g.memory_mb) for g in gpus] == [
        (d["uuid"], d["index"], 81559) for d in session["devices"]
    ]


async def test_probe_watch_replays_a_session_into_faults() -> None:
    session = load("session_two_gpus.json")
    nvml = ReplayNvml(session)
    probe = NvmlProbe("n1", nvml=nvml, poll_interval_s=0, wait_timeout_ms=5).open()
    seen: list[GpuFault] = []
    with anyio.fail_after(10):
        async with aclosing(probe.watch()) as faults:
            async for fault in faults:
                seen.append(fault)
                if len(seen) == len(session["expect"]):
                    break
    probe.close()
    got = [{"uuid": f.gpu_uuid, **(brief(f) or {})} for f in seen]
    key = json.dumps
    assert sorted(got, key=key) == sorted(session["expect"], key=key)
    assert all(f.node == "n1" and f.actor == "agent:n1" for f in seen)
    assert len({f.id for f in seen}) == len(seen)
    assert {"register 0 10", "register 1 10", "free", "shutdown"} <= set(nvml.calls)


async def test_watch_before_open_is_refused() -> None:
    probe = NvmlProbe("n1", nvml=ReplayNvml(load("session_two_gpus.json")))
    with pytest.raises(GpuProbeError, match="before open"):
        async with aclosing(probe.watch()) as faults:
            async for _ in faults:
                pass


async def test_watch_reports_nvml_failing_underneath() -> None:
    class Broken(ReplayNvml):
        def nvmlEventSetCreate(self) -> str:
            raise ReplayNvmlError(999)

    probe = NvmlProbe("n1", nvml=Broken(load("session_two_gpus.json"))).open()
    with anyio.fail_after(5), pytest.raises(GpuProbeError, match="NVML watch stopped"):
        async with aclosing(probe.watch()) as faults:
            async for _ in faults:
                pass


def test_probe_or_declare_says_plainly_when_there_is_no_driver() -> None:
    class NoDriver(ReplayNvml):
        def nvmlInit(self) -> None:
            raise ReplayNvmlError(12)

    result = probe_or_declare(
        "n1", count=2, model="H100", memory_mb=81559, nvml=NoDriver({"devices": [], "events": []})
    )
    inventory, source, message = result
    assert source == "declared"
    assert inventory == declared_inventory("n1", 2, "H100", 81559)
    assert "declared inventory of 2 x H100" in message and "NVML unavailable" in message
    assert "not watched" in message


def test_probe_or_declare_prefers_nvml() -> None:
    inventory, source, message = probe_or_declare(
        "n1", count=8, nvml=ReplayNvml(load("session_two_gpus.json"))
    )
    assert source == "nvml" and len(inventory) == 2
    assert message == "2 GPU(s) found by NVML: NVIDIA H100 80GB HBM3"


# --- the real driver (skipped without one) -----------------------------------------


@pytest.fixture
def real_probe() -> Any:
    try:
        probe = NvmlProbe("gpu-host").open()
    except GpuProbeError as exc:
        pytest.skip(f"no NVIDIA driver: {exc}")
    yield probe
    probe.close()


@pytest.mark.gpu
def test_real_inventory(real_probe: NvmlProbe) -> None:
    gpus = real_probe.inventory()
    assert gpus, "NVML initialised but found no GPU"
    assert all(g.uuid.startswith(("GPU-", "MIG-")) and g.memory_mb > 0 for g in gpus)
    assert [g.index for g in gpus] == list(range(len(gpus)))


@pytest.mark.gpu
def test_real_health_poll_reads_without_faults_on_a_healthy_gpu(real_probe: NvmlProbe) -> None:
    handles = real_probe._handles()
    for uuid, handle in handles.items():
        reading = real_probe.read_health(uuid, handle)
        assert not reading.lost
        faults = health_faults(None, reading, node="gpu-host", at=AT, ids=lambda: "x")
        assert [f.kind for f in faults if f.kind == "fallen_off_bus"] == []


@pytest.mark.gpu
async def test_real_watch_starts_and_stops(real_probe: NvmlProbe) -> None:
    real_probe.wait_timeout_ms = 50
    with anyio.move_on_after(0.5):
        async with aclosing(real_probe.watch()) as faults:
            async for fault in faults:
                assert fault.node == "gpu-host"
    assert not [t for t in threading.enumerate() if t.name == "nvml-watch-gpu-host"]
