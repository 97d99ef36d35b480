"""`gpuwarden gpu-restore`: an operator puts a quarantined GPU back into service.

A GPU is quarantined by the engine when a fault calls for a reset; after the reset
(or a replacement) someone has to say it is healthy again. The restore is an event
like any other, appended with the GPU subject's expected last sequence, so it cannot
slip in past a fault the operator has not seen.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from datetime import UTC, datetime
from typing import Any

from gpuwarden.engine.cli.common import open_event_log
from gpuwarden.engine.core.errors import GpuwardenError
from gpuwarden.engine.core.events import (
    GpuQuarantined,
    GpuRestored,
    gpu_subject,
    is_legacy_subject,
    node_subject,
    to_builtins,
)
from gpuwarden.engine.core.fold import evolve
from gpuwarden.engine.core.state import initial_state
from gpuwarden.engine.ids import new_id


class GpuRestoreError(GpuwardenError):
    """The GPU is unknown, or not quarantined."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "gpu-restore",
        help="put a quarantined GPU back into service (after a reset or a swap)",
    )
    p.add_argument("gpu_uuid", metavar="UUID", help="the GPU, as `gpuwarden gpus` lists it")
    p.add_argument("--reason", default="restored by operator", help="recorded in the event")
    p.add_argument("--json", action="store_true", help="print the stored event as JSON")
    p.set_defaults(handler=run_restore)


async def run_restore(args: argparse.Namespace) -> int:

    async with open_event_log(args) as log:
        subject = gpu_subject(args.gpu_uuid)
        records = [r async for r in log.read(subject=subject)]
        # The compare-and-set covers the GPU's scheme-2 subjects (events.py).
        last = max((r.seq for r in records if not is_legacy_subject(r.subject)), default=0)
        quarantines = [r.event for r in records if isinstance(r.event, GpuQuarantined)]
        if not quarantines:
            raise GpuRestoreError(f"GPU {args.gpu_uuid} has never been quarantined")
        state = initial_state()  # the node's inventory, then the GPU's own history
        async for record in log.read(subject=node_subject(quarantines[-1].node)):
            if record.event is not None:
                evolve(state, record.event)
        for record in records:
            if record.event is not None:
                evolve(state, record.event)
        gpu = state.gpus.get(args.gpu_uuid)
        if gpu is None or not gpu.quarantined:
            raise GpuRestoreError(f"GPU {args.gpu_uuid} is not quarantined")
        now = datetime.now(UTC)
        event = GpuRestored(
            id=new_id(now),
            at=now,
            actor=f"api:{getpass.getuser()}",
            gpu_uuid=args.gpu_uuid,
            node=gpu.node,
            reason=args.reason,
        )
        await log.append(subject, [event], last)
    print(json.dumps(to_builtins(event), default=str) if args.json else event.gpu_uuid)
    print(f"gpuwarden: {args.gpu_uuid} back in service", file=sys.stderr)
    return 0
