"""Clocks: the wall clock for production, a virtual one for scenarios and tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, deadline: datetime) -> None:
        delay = (deadline - self.now()).total_seconds()
        if delay > 0:
            await anyio.sleep(delay)


class VirtualClock:
    """Time that moves only when told to: scenarios pass hours in milliseconds.

    Sleepers wake when `advance_to` reaches their deadline, in deadline order.
    """

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._sleepers: list[tuple[datetime, int, anyio.Event]] = []
        self._count = 0

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, deadline: datetime) -> None:
        if deadline <= self._now:
            return
        wake = anyio.Event()
        self._count += 1
        self._sleepers.append((deadline, self._count, wake))
        try:
            await wake.wait()
        finally:
            self._sleepers = [s for s in self._sleepers if s[2] is not wake]

    def advance_to(self, moment: datetime) -> None:
        if moment > self._now:
            self._now = moment
        for deadline, _, wake in sorted(self._sleepers, key=lambda s: (s[0], s[1])):
            if deadline <= self._now:
                wake.set()

    def advance(self, seconds: float) -> None:
        self.advance_to(self._now + timedelta(seconds=seconds))
