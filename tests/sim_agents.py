"""Simulated node agents for engine tests: they speak only through the real log and bus.

Each node consumes its `gw.cmd.<node>` queue; a run command starts a "container"
(container.started) and, per a script of exit codes for the task's attempts, makes it
exit at once (container.exited). Duplicate run commands for one attempt (a resend
after an engine restart) start nothing new, as a real agent's labels ensure.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import anyio
from gpuwarden.adapters.command_bus import JetStreamCommandBus
from gpuwarden.adapters.event_log import JetStreamEventLog
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.commands import RunCommand, StopCommand
from gpuwarden.engine.ports import EventLogError


class SimAgents:
    def __init__(
        self,
        log: JetStreamEventLog,
        bus: JetStreamCommandBus,
        nodes: Mapping[str, int],
        script: Mapping[str, Sequence[int]],
        *,
        seed: int = 7,
    ) -> None:
        self.log = log
        self.bus = bus
        self.nodes = dict(nodes)
        self.script = {task: list(codes) for task, codes in script.items()}
        self.started: set[tuple[str, int]] = set()
        self.random = random.Random(seed)
        self.n = 0

    def _id(self, node: str) -> str:
        self.n += 1
        return ev.make_id(
            int(datetime.now(UTC).timestamp() * 1000), hash((node, self.n)) & (2**80 - 1)
        )

    async def _append(self, event: ev.Event) -> None:
        for _ in range(50):  # ride out a server restart; the id de-duplicates a retry
            try:
                await self.log.append(ev.subject_of(event), [event])
                return
            except EventLogError:
                await anyio.sleep(0.1)
        raise RuntimeError(f"could not append {event}")

    async def register(self) -> None:
        for node, count in self.nodes.items():
            gpus = tuple(
                ev.GpuInfo(uuid=f"{node}/{i}", index=i, model="sim", memory_mb=81920)
                for i in range(count)
            )
            await self._append(
                ev.NodeRegistered(
                    id=self._id(node),
                    at=datetime.now(UTC),
                    actor=f"agent:{node}",
                    node=node,
                    runtime="sim",
                    gpus=gpus,
                )
            )

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for node in self.nodes:
                tg.start_soon(self._serve, node)

    async def _serve(self, node: str) -> None:
        while True:  # a server restart may end the consumer: consume again
            try:
                async for received in self.bus.receive(node):
                    command = received.command
                    if isinstance(command, RunCommand):
                        await self._run(node, command)
                    elif isinstance(command, StopCommand):
                        pass  # containers here end at once; nothing left to stop
                    try:
                        await received.ack()
                    except EventLogError:
                        pass  # not acked: redelivered later, and _run is idempotent
            except EventLogError:
                await anyio.sleep(0.1)

    async def _run(self, node: str, command: RunCommand) -> None:
        key = (command.task_id, command.attempt)
        if key in self.started:
            return
        self.started.add(key)
        now = datetime.now(UTC)
        container = f"sim-{command.task_id}-{command.attempt}"
        common = {"actor": f"agent:{node}", "correlation_id": command.task_id}
        await self._append(
            ev.ContainerStarted(
                id=self._id(node),
                at=now,
                task_id=command.task_id,
                attempt=command.attempt,
                node=node,
                container_id=container,
                **common,
            )
        )
        codes = self.script.get(command.task_id, [0])
        code = codes[command.attempt - 1] if command.attempt <= len(codes) else 0
        await self._append(
            ev.ContainerExited(
                id=self._id(node),
                at=datetime.now(UTC),
                task_id=command.task_id,
                attempt=command.attempt,
                node=node,
                container_id=container,
                exit_code=code,
                signal=code - 128 if code > 128 else None,
                **common,
            )
        )
