"""Clocks: the wall clock for production, a virtual one for scenarios and tests."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, deadline: datetime) -> None:
        delay = (deadline - self.now()).total_seconds()
        if delay > 0:
            await anyio.sleep(delay)
