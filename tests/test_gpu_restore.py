"""An operator restores a quarantined GPU; the engine places work on it again."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import anyio
from gpuwarden.adapters.embedded_nats import EmbeddedNats
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.engine.core import events as ev

AT = datetime(2026, 11, 29, tzinfo=UTC)
CLI = [sys.executable, "-m", "gpuwarden.engine.cli"]


async def gw(url: str, *args: str) -> tuple[int, str, str]:
    with anyio.fail_after(30):
        result = await anyio.run_process([*CLI, "--nats", url, *args], check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_restore_a_quarantined_gpu(
    nats_server: EmbeddedNats, event_log: JetStreamEventLog
) -> None:
    gpu = ev.GpuInfo(uuid="GPU-1", index=0, model="H100", memory_mb=1)
    await event_log.append(
        ev.node_subject("n1"),
        [ev.NodeRegistered(id="r", at=AT, actor="agent:n1", node="n1", runtime="sim", gpus=(gpu,))],
    )
    code, _, err = await gw(nats_server.url, "gpu-restore", "GPU-1")
    assert code == 2 and "never been quarantined" in err
    await event_log.append(
        ev.gpu_subject("GPU-1"),
        [
            ev.GpuQuarantined(
                id="q",
                at=AT,
                actor="engine",
                gpu_uuid="GPU-1",
                node="n1",
                reason="gpu_hardware: xid 48",
            )
        ],
    )
    code, _, err = await gw(nats_server.url, "gpu-restore", "GPU-1", "--reason", "reset")
    assert code == 0, err
    restored = [r.event async for r in event_log.read(subject=ev.gpu_subject("GPU-1"))][-1]
    assert isinstance(restored, ev.GpuRestored) and restored.reason == "reset"
    code, _, err = await gw(nats_server.url, "gpu-restore", "GPU-1")
    assert code == 2 and "is not quarantined" in err
