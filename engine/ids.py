"""Fresh event ids for events that start a chain (submissions, agent observations).

Not pure (reads the clock and os.urandom); decisions derive their ids with
events.derive_id instead, so replays re-derive them.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from gpuwarden.engine.core.events import make_id


def new_id(at: datetime | None = None) -> str:
    moment = at if at is not None else datetime.now(UTC)
    return make_id(int(moment.timestamp() * 1000), int.from_bytes(os.urandom(10), "big"))
