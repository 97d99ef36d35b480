"""Hostile events against the live engine (issue #13, "Must show"): a hypothesis fuzz.

One `gpuwarden up --runtime sim` (authorization on) runs for the module. Each example is
a batch of 1-6 schema-shaped events that no writer may store: naive or absurd times,
integers of 100 bits, control and invisible characters, 100 KB strings, bad env names,
unknown tasks and attempts, a node speaking for another node, a GPU that is not the
node's, one node claiming another's GPU, decisions on an agent's subject, unknown types
and JSON that is not JSON. They go in through the two principals that can store such
things: the local agent (`node-local`, only `gw.evt.*.*.node.local`) and `admin` (any
subject). After each batch: the `up` process still runs, every hostile event is in
GW_DLQ with a reason (and nothing legitimate is), a fresh task is still placed and
completed, the read commands answer, and neither the read models nor the task API hold
anything a hostile event said. Then `up` is restarted on the same data directory and
must fold past all of it.

Every generated event is inadmissible for at least one reason by construction (each
one carries a guaranteed poison, and decorations are applied before it, never after);
`test_every_generated_event_is_inadmissible` checks that against the pure admission.
No shrinking (each try of a live example costs a task): a failure prints its events.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import string
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import anyio
import nats.errors
import nats.js.errors
import pytest
from gpuwarden.adapters.event_log import JetStreamEventLog, stored_event
from gpuwarden.adapters.nats_connection import connect
from gpuwarden.engine.core import admission as adm
from gpuwarden.engine.core import events as ev
from gpuwarden.engine.core.admission import Admission, check_size
from gpuwarden.engine.core.wire import DLQ_STREAM, MAX_EVENT_BYTES
from gpuwarden.engine.ids import new_id
from gpuwarden.engine.ports import StoredEvent
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient

CLI = [sys.executable, "-m", "gpuwarden.engine.cli"]
MAX_EXAMPLES = 40  # 1.1-1.5 s each on a 2-core machine (a task, five read commands)
DEADLINE_S = 30.0  # for anything the engine must do after a batch

LOCAL = "local"
LOCAL_GPUS = ("local/0", "local/1")  # the simulated node's declared GPUs
AT = "2026-12-04T13:50:00Z"
REAL = "ZZREALTASKZZ"  # replaced, when published, by a task that ran and completed
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Product bugs this fuzz found have their reproducers at the end of the file (each
# failed before its fix).
DEEPEST = 20_000  # JSON nesting (5000 deep once broke `gpuwarden events --json` for good)

NODE_FACTS = ("container.started", "container.start_failed", "container.exited", "gpu.fault")
TASK_FACTS = ("container.started", "container.start_failed", "container.exited")
DECISIONS = (
    "task.pending",
    "task.scheduled",
    "task.completed",
    "task.failed",
    "fault.classified",
    "rebuild.decided",
    "gpu.quarantined",
    "gpu.allocated",
    "gpu.released",
    "node.lost",
    "node.recovered",
)
API_TYPES = ("task.submitted", "task.cancelled")
ALL_TYPES = (*NODE_FACTS, "node.registered", *DECISIONS, *API_TYPES, "gpu.restored")
assert set(ALL_TYPES) == set(ev.EVENT_TYPES)
# Types whose admission needs the task to exist (unknown task: refused).
NEEDS_TASK = (*TASK_FACTS, *DECISIONS[:6], "gpu.allocated", "gpu.released", "task.cancelled")
GPU_KEYED = ("gpu.fault", "gpu.quarantined", "gpu.restored", "gpu.allocated", "gpu.released")
NODE_KEYED = ("node.registered", "node.lost", "node.recovered")


# --- hostile values ------------------------------------------------------------------

# Characters that no id, node name or label may hold (str.isprintable() refuses them, and
# ids refuse the space too): controls, invisible format characters (zero-width, RTL
# marks and overrides, BOM, tag characters), separators, private use, noncharacters.
INVISIBLE = (
    "\x00", "\x01", "\x07", "\x1b", "\x7f", "\x85", "\t", "\n", "\r", "\u00a0", "\u200b",
    "\u200d", "\u200e", "\u200f", "\u202e", "\u2066", "\u2028", "\ufeff", "\ue000",
    "\U000e0001", "\U0010ffff",
)  # fmt: skip
LONE_SURROGATES = ("\ud800", "\udbff", "\udfff")  # not even text: JSON and UTF-8 refuse it
PRINTABLE_ODD = (
    "é",
    "漢",
    "\u05d0",
    "😀",
    "\U0001f525",
    "\U0001d518",
    "\u03a9",
)  # printable: allowed

ODD_TIMES = (
    "2000-01-01T00:00:00Z",
    "2199-12-31T23:59:59.999999Z",
    "2026-12-04T13:50:00.999999+14:00",
    "2026-12-04T13:50:00-12:00",
    "2026-12-04T13:50:00+05:45",
    "2026-12-04 13:50:00Z",
)
ids = st.text(alphabet=CROCKFORD, min_size=26, max_size=26)
safe_tokens = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)
ghost_tasks = st.one_of(
    safe_tokens.map(lambda s: "ghost-" + s),
    st.sampled_from(PRINTABLE_ODD).map(lambda c: "ghost-" + c),  # printable: refused by state
)
other_nodes = st.one_of(
    st.sampled_from(["n2", "rogue", "LOCAL", "local2", "l\u043ecal", "local.", "local "]),
    safe_tokens.filter(lambda s: s != LOCAL),
)
foreign_gpus = st.one_of(
    st.sampled_from(["local/2", "n2/0", "LOCAL/0", "local/0/", "GPU-00000000-0000"]),
    safe_tokens.map(lambda s: "GPU-" + s),
)
odd_text = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30),
    st.sampled_from(["\u202eevil\u202c", "😀" * 5, "a\u200bb", "\u05d0\u05d1 rtl", "line\nbreak"]),
)


def _width(char: str) -> int:
    """Bytes a character takes in ASCII-escaped JSON (the worst case of both encodings)."""
    return 1 if char.isascii() else (6 if ord(char) < 0x10000 else 12)


@st.composite
def long_strings(draw: st.DrawFn, min_size: int, max_bytes: int = 100_000) -> str:
    """A string of at least min_size characters and about max_bytes at most."""
    char = draw(st.sampled_from(["a", "Z", "é", "😀", "\u05d0", "x "]))
    most = max(min_size, max_bytes // (_width(char[0]) * len(char)))
    count = draw(st.integers(min_size, most))
    return (char * count)[: max(count, min_size)]


@st.composite
def with_char(draw: st.DrawFn, chars: tuple[str, ...]) -> str:
    """A plausible value with one bad character somewhere in it."""
    left = draw(st.sampled_from(["", "task", "local", "GPU-1", "a"]))
    right = draw(st.sampled_from(["", "x", "local", "1"]))
    return left + draw(st.sampled_from(chars)) + right


def bad_tokens(limit: int, *, empty: bool = True) -> st.SearchStrategy[Any]:
    """Refused as an id / token: empty, too long, a control or invisible character, a
    space, not a string at all."""
    options = [
        long_strings(limit + 1),
        with_char((*INVISIBLE, " ", *LONE_SURROGATES)),
        st.sampled_from([0, {"a": 1}, True, 1.5]),  # not a string (no None: some are optional)
    ]
    if empty:
        options.append(st.just(""))
    return st.one_of(options)


def bad_names(limit: int) -> st.SearchStrategy[Any]:
    """Refused as a one-line label: too long or not printable (a space is fine)."""
    return st.one_of(long_strings(limit + 1), with_char((*INVISIBLE, *LONE_SURROGATES)))


def bad_actors() -> st.SearchStrategy[Any]:
    return st.one_of(st.just(""), bad_names(adm.MAX_ID_CHARS))


def bad_texts() -> st.SearchStrategy[Any]:
    """Refused as free text: over 16384 characters, a NUL, not UTF-8, not a string."""
    return st.one_of(
        long_strings(adm.MAX_TEXT_CHARS + 1),
        with_char(("\x00", *LONE_SURROGATES)),
        st.sampled_from([7, ["text"]]),
    )


def bad_times() -> st.SearchStrategy[Any]:
    """No zone, out of 2000..2200, or no time at all."""
    naive = st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)
    ).map(lambda d: d.isoformat())
    zones = st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12))])
    early = st.datetimes(max_value=datetime(1999, 12, 31, 9, 0), timezones=zones)
    late = st.datetimes(min_value=datetime(2200, 1, 2), timezones=zones)
    return st.one_of(
        st.sampled_from(
            [
                "2026-12-04T13:50:00",
                "2026-12-04T13:50:00.123456",
                "9999-12-31T23:59:59.999Z",
                "9999-12-31T23:59:59.999999+00:00",
                "0001-01-01T00:00:00Z",
                "1999-12-31T23:59:59.999999Z",
                "2200-01-01T00:00:00Z",
                "2199-12-31T23:00:00-05:00",  # 2200-01-01T04:00Z
                "2026-13-01T00:00:00Z",
                "yesterday",
                "",
                1733320200,
                None,
            ]
        ),
        naive,
        early.map(lambda d: d.isoformat()),
        late.map(lambda d: d.isoformat()),
    )


def bad_ints(low: int, high: int) -> st.SearchStrategy[Any]:
    """Out of low..high (100-bit integers included), or not an integer."""
    return st.one_of(
        st.sampled_from([10**30, -(10**30), 2**63, -(2**63) - 1, 2**64, low - 1, high + 1]),
        st.integers(max_value=low - 1),
        st.integers(min_value=high + 1),
        st.sampled_from([1.5, "1", True, [1], "NaN"]),
    )


def bad_enums(allowed: frozenset[str] | tuple[str, ...]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.text(max_size=20).filter(lambda s: s not in allowed),
        st.sampled_from(["", "XID", "completed ", "user_error\x00", 3]),
    )


@st.composite
def bad_ids_lists(draw: st.DrawFn, *, duplicates: bool) -> Any:
    good = draw(st.lists(st.sampled_from(["e1", "local/0", "local/1", "x"]), max_size=3))
    if duplicates and draw(st.booleans()):
        return [*good, "local/1", "local/1"]
    bad = draw(bad_tokens(adm.MAX_ID_CHARS))
    return [*good, bad] if draw(st.booleans()) else bad  # not even a list, perhaps


@st.composite
def bad_envs(draw: st.DrawFn) -> Any:
    name = draw(
        st.one_of(
            st.sampled_from(
                ["", "1X", "A-B", "A B", "A=B", "PATH\n", "É", "😀", "A\x00", "\u200bX", "A.B"]
            ),
            st.text(max_size=10).filter(lambda s: adm._ENV_NAME.fullmatch(s) is None),
        )
    )
    return draw(
        st.sampled_from(
            [
                {"OK": "1", name: "v"},
                {"OK": "a\x00b"},
                {"OK": "\ud800"},
                {"OK": "x" * (adm.MAX_ENV_VALUE_BYTES + 1)},
                {"OK": 1},
                ["OK=1"],
            ]
        )
    )


def bad_commands() -> st.SearchStrategy[Any]:
    return st.sampled_from(
        [[], ["a\x00b"], ["\udfff"], ["x" * (adm.MAX_COMMAND_BYTES + 1)], "python train.py", [1]]
    )


@st.composite
def bad_gpu_lists(draw: st.DrawFn) -> Any:
    gpus = [dict(g) for g in local_inventory()]
    which = draw(st.sampled_from(["uuid", "index", "model", "memory_mb", "dup", "shape"]))
    if which == "uuid":
        gpus[0]["uuid"] = draw(bad_tokens(adm.MAX_ID_CHARS))
    elif which == "index":
        gpus[0]["index"] = draw(bad_ints(0, adm.MAX_GPU_INDEX))
    elif which == "model":
        gpus[0]["model"] = draw(bad_names(adm.MAX_LABEL_CHARS))
    elif which == "memory_mb":
        gpus[0]["memory_mb"] = draw(bad_ints(0, adm.MAX_GPU_MEMORY_MB))
    elif which == "dup":
        gpus.append(dict(gpus[0]))
    else:
        return draw(st.sampled_from([{"uuid": "local/0"}, "local/0", [{"index": 0}]]))
    return gpus


def local_inventory() -> list[dict[str, Any]]:
    return [
        {"uuid": u, "index": i, "model": "declared", "memory_mb": 81920}
        for i, u in enumerate(LOCAL_GPUS)
    ]


# Per type, the fields admission checks and values it must refuse there.
ID = bad_tokens(adm.MAX_ID_CHARS)
COMMON: list[tuple[str, st.SearchStrategy[Any]]] = [
    ("id", ID),
    ("at", bad_times()),
    ("actor", bad_actors()),
    ("causation_id", bad_tokens(adm.MAX_ID_CHARS)),
    ("correlation_id", bad_tokens(adm.MAX_ID_CHARS)),
]
ATTEMPT = ("attempt", bad_ints(adm.MIN_ATTEMPT, adm.MAX_ATTEMPT))
OPT_ATTEMPT = (
    "attempt",
    bad_ints(adm.MIN_ATTEMPT, adm.MAX_ATTEMPT).filter(lambda v: v is not None),
)
ON_NODE = [("task_id", ID), ATTEMPT, ("node", ID)]
GPU_HELD = [("gpu_uuid", ID), ("node", ID)]
FIELDS: dict[str, list[tuple[str, st.SearchStrategy[Any]]]] = {
    "node.registered": [
        ("node", ID),
        ("runtime", bad_names(adm.MAX_LABEL_CHARS)),
        ("gpus", bad_gpu_lists()),
    ],
    "node.lost": [("node", ID), ("last_heartbeat_at", bad_times().filter(lambda v: v is not None))],
    "gpu.fault": [
        *GPU_HELD,
        ("kind", bad_enums(adm.GPU_FAULT_KINDS)),
        ("xid", bad_ints(0, adm.MAX_XID)),
        ("detail", bad_texts()),
    ],
    "gpu.quarantined": [*GPU_HELD, ("reason", bad_texts())],
    "gpu.allocated": [*GPU_HELD, ("task_id", ID), ATTEMPT],
    "task.submitted": [
        ("task_id", ID),
        ("name", bad_names(adm.MAX_NAME_CHARS)),
        ("image", bad_tokens(adm.MAX_LABEL_CHARS)),
        ("command", bad_commands()),
        ("gpus", bad_ints(0, adm.MAX_GPUS)),
        ("gpu_model", bad_names(adm.MAX_NAME_CHARS)),
        ("min_gpu_memory_mb", bad_ints(0, adm.MAX_GPU_MEMORY_MB)),
        ("env", bad_envs()),
        ("owner", bad_names(adm.MAX_NAME_CHARS)),
        ("memory_mb", bad_ints(1, adm.MAX_MEMORY_MB)),
        ("request_id", bad_tokens(adm.MAX_ID_CHARS)),
    ],
    "task.pending": [("task_id", ID), ATTEMPT, ("reason", bad_texts())],
    "task.scheduled": [*ON_NODE, ("gpu_uuids", bad_ids_lists(duplicates=True))],
    "container.started": [*ON_NODE, ("container_id", bad_tokens(adm.MAX_ID_CHARS, empty=False))],
    "container.start_failed": [*ON_NODE, ("error", bad_texts())],
    "container.exited": [
        *ON_NODE,
        ("container_id", bad_tokens(adm.MAX_ID_CHARS, empty=False)),
        ("exit_code", bad_ints(adm.MIN_EXIT_CODE, adm.MAX_EXIT_CODE)),
        ("signal", bad_ints(adm.MIN_SIGNAL, adm.MAX_SIGNAL)),
        ("error", bad_texts()),
        ("finished_at", bad_times().filter(lambda v: v is not None)),
    ],
    "fault.classified": [
        ("task_id", ID),
        ATTEMPT,
        ("fault", bad_enums(ev.FAULT_TYPES)),
        ("rule", bad_names(adm.MAX_LABEL_CHARS)),
        ("evidence", bad_ids_lists(duplicates=False)),
    ],
    "rebuild.decided": [
        ("task_id", ID),
        ATTEMPT,
        ("previous_attempt", bad_ints(adm.MIN_ATTEMPT, adm.MAX_ATTEMPT)),
        ("fault", bad_enums(ev.FAULT_TYPES)),
        ("rule", bad_ints(0, adm.MAX_RULE)),
        ("not_before", bad_times()),
        ("exclude_gpus", bad_ids_lists(duplicates=False)),
        ("exclude_nodes", bad_ids_lists(duplicates=False)),
    ],
    "task.completed": [("task_id", ID), ATTEMPT],
    "task.failed": [
        ("task_id", ID),
        OPT_ATTEMPT,
        ("fault", bad_enums(ev.FAULT_TYPES)),
        ("reason", bad_enums(ev.FAILURE_REASONS)),
        ("rule", bad_ints(0, adm.MAX_RULE)),
        ("detail", bad_texts()),
    ],
    "task.cancelled": [("task_id", ID), ("reason", bad_texts()), OPT_ATTEMPT],
}
FIELDS["node.recovered"] = FIELDS["node.lost"]
FIELDS["gpu.restored"] = FIELDS["gpu.quarantined"]
FIELDS["gpu.released"] = FIELDS["gpu.allocated"]
assert set(FIELDS) == set(ALL_TYPES)
TEXT_FIELDS = {  # free text (admission: bounded, no NUL): decorations may go here
    "gpu.fault": "detail",
    "gpu.quarantined": "reason",
    "gpu.restored": "reason",
    "task.pending": "reason",
    "container.start_failed": "error",
    "container.exited": "error",
    "task.failed": "detail",
    "task.cancelled": "reason",
}


# --- hostile events --------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    """One message to store: who publishes it, where, and what (a dict is JSON-encoded;
    bytes go as they are). `why` names the poison that makes it inadmissible."""

    who: str  # "local" (node-local.creds) or "admin"
    subject: str
    body: dict[str, Any] | bytes
    why: str
    ascii: bool = True
    scenario: str = "fixed"  # the strategy that made it

    def payload(self, real: str) -> bytes:
        if isinstance(self.body, bytes):
            data = self.body
        else:
            text = json.dumps(self.body, ensure_ascii=self.ascii)
            data = text.encode("utf-8", "surrogatepass")  # a lone surrogate: not UTF-8
        return data.replace(REAL.encode(), real.encode())

    def subject_for(self, real: str) -> str:
        return self.subject.replace(REAL, real)

    def __repr__(self) -> str:
        return f"Hostile({self.short()})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis prints this, not 100 KB of fields

    def short(self) -> str:
        """A readable one-liner: long strings clipped."""
        body = self.body if isinstance(self.body, bytes) else _clip(self.body)
        return f"{self.why} | {self.who} -> {self.subject} | {body!r}"[:1500]


def _clip(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= 60 else f"{value[:30]}...({len(value)} chars)"
    if isinstance(value, list):
        return [_clip(v) for v in value[:5]] + ([f"...({len(value)})"] if len(value) > 5 else [])
    if isinstance(value, dict):
        return {_clip(k): _clip(v) for k, v in value.items()}
    return value


def aggregate_of(body: dict[str, Any]) -> str:
    kind = body["type"]
    if kind in GPU_KEYED:
        return ev.gpu_subject(body["gpu_uuid"])
    if kind in NODE_KEYED:
        return ev.node_subject(body["node"])
    return ev.task_subject(body["task_id"])


def writer_of(body: dict[str, Any]) -> str:
    kind = body["type"]
    if kind in (*NODE_FACTS, "node.registered"):
        return ev.node_writer(body["node"])
    return {"task.submitted": "api", "task.cancelled": "api", "gpu.restored": "op"}.get(
        kind, "engine"
    )


def proper_subject(body: dict[str, Any]) -> str:
    return f"{aggregate_of(body)}.{writer_of(body)}"


@st.composite
def sane(
    draw: st.DrawFn,
    kind: str,
    *,
    task: str = REAL,
    node: str = LOCAL,
    gpu: str = LOCAL_GPUS[0],
    attempt: int = 1,
) -> dict[str, Any]:
    """An event of `kind` that would pass admission's field checks, with hostile but
    admissible decorations (odd unicode in free text, unknown extra keys). Whether it
    is admissible on its subject is the caller's business."""
    body: dict[str, Any] = {"type": kind, "id": draw(ids), "at": AT, "actor": f"agent:{node}"}
    if kind in ("node.registered", "node.lost", "node.recovered"):
        body["node"] = node
        if kind == "node.registered":
            body["runtime"] = "sim"
            body["gpus"] = local_inventory() if node == LOCAL else []
        else:
            body["last_heartbeat_at"] = AT
    elif kind in GPU_KEYED:
        body.update(gpu_uuid=gpu, node=node)
        if kind == "gpu.fault":
            body.update(kind="xid", xid=79, detail="Xid 79")
        elif kind in ("gpu.quarantined", "gpu.restored"):
            body["reason"] = "gpu_hardware: xid"
        else:
            body.update(task_id=task, attempt=attempt)
    else:
        body["task_id"] = task
        extras: dict[str, dict[str, Any]] = {
            "task.submitted": {
                "name": "n",
                "image": "img",
                "command": ["x"],
                "gpus": 1,
                "env": {"A": "1"},
                "owner": "operator",
            },
            "task.cancelled": {"reason": "cancelled by owner", "attempt": attempt},
            "task.pending": {"reason": "waiting", "attempt": attempt},
            "task.scheduled": {"attempt": attempt, "node": node, "gpu_uuids": [gpu]},
            "container.started": {"attempt": attempt, "node": node, "container_id": "c-1"},
            "container.start_failed": {"attempt": attempt, "node": node, "error": "boom"},
            "container.exited": {
                "attempt": attempt,
                "node": node,
                "container_id": "c-1",
                "exit_code": 0,
                "finished_at": AT,
            },
            "fault.classified": {
                "attempt": attempt,
                "fault": "completed",
                "rule": "exit_0",
                "evidence": [],
            },
            "rebuild.decided": {
                "attempt": attempt + 1,
                "previous_attempt": attempt,
                "fault": "preempted",
                "counted": True,
                "rule": None,
                "not_before": AT,
            },
            "task.completed": {"attempt": attempt},
            "task.failed": {
                "attempt": attempt,
                "fault": "user_error",
                "reason": "not_target_fault",
                "detail": "",
            },
        }
        extra = extras[kind]
        body.update(extra)
    if draw(st.integers(0, 3)) == 0:  # in range, but odd
        body["at"] = draw(st.sampled_from(ODD_TIMES))
    if kind in TEXT_FIELDS and draw(st.booleans()):
        body[TEXT_FIELDS[kind]] = draw(odd_text)
    if draw(st.integers(0, 3)) == 0:
        body["zz_unknown"] = draw(odd_text)  # msgspec ignores unknown keys
    if draw(st.integers(0, 3)) == 0:
        body["correlation_id"] = draw(st.sampled_from(PRINTABLE_ODD))
    return body


@st.composite
def poisoned_fields(draw: st.DrawFn, body: dict[str, Any], at_least: int = 1) -> str:
    """Set at_least..3 of the fields admission checks to values it refuses; which."""
    options = COMMON + FIELDS[body["type"]]
    chosen = draw(st.lists(st.sampled_from(options), min_size=at_least, max_size=3))
    for name, values in chosen:
        body[name] = draw(values)
    return ",".join(name for name, _ in chosen)


def writer_for(kind: str, node: str = LOCAL) -> str:
    """Who may publish an event of `kind` on its proper subject in this cluster."""
    return "local" if kind in NODE_FACTS and node == LOCAL else "admin"


@st.composite
def field_poison(draw: st.DrawFn) -> Hostile:
    """Any type, on its proper (or legacy) subject: one or more fields refused."""
    kind = draw(st.sampled_from(ALL_TYPES))
    body = draw(sane(kind, task=draw(st.sampled_from([REAL, "ghost-t"]))))
    subject = proper_subject(body)
    who = writer_for(kind)
    if kind == "node.registered" or (who == "admin" and draw(st.booleans())):
        who = "admin"  # local may not publish to a legacy subject, admin may
        subject = draw(st.sampled_from([subject, aggregate_of(body)]))
    fields = draw(poisoned_fields(body))
    return Hostile(who, subject, body, f"fields {fields}", draw(st.booleans()))


@st.composite
def wrong_node(draw: st.DrawFn) -> Hostile:
    """The local agent states a fact about another node on its own subject."""
    kind = draw(st.sampled_from([*NODE_FACTS, "node.registered"]))
    other = draw(other_nodes)
    body = draw(sane(kind, node=other, task=draw(st.sampled_from([REAL, "ghost-n"]))))
    aggregate = aggregate_of(body) if kind != "node.registered" else ev.node_subject(LOCAL)
    return Hostile("local", f"{aggregate}.node.{LOCAL}", body, f"node {other!r} on local's subject")


WRITERS = ("engine", "api", "op", f"node.{LOCAL}", "node.n2")


@st.composite
def wrong_subject(draw: st.DrawFn) -> Hostile:
    """An event where its type does not go: a decision on the agent's subject, a task's
    event on another aggregate, subjects of the wrong shape."""
    how = draw(st.sampled_from(["local", "writer", "aggregate", "shape"]))
    if how == "local":
        kind = draw(st.sampled_from([*DECISIONS, *API_TYPES, "gpu.restored"]))
    else:
        kind = draw(st.sampled_from(ALL_TYPES))
    body = draw(sane(kind, task=draw(st.sampled_from([REAL, "ghost-s"]))))
    if how == "local":
        return Hostile("local", f"{aggregate_of(body)}.node.{LOCAL}", body, f"{kind} on local's")
    if how == "writer":
        writer = draw(st.sampled_from([w for w in WRITERS if w != writer_of(body)]))
        return Hostile("admin", f"{aggregate_of(body)}.{writer}", body, f"{kind} by {writer}")
    if how == "aggregate":
        other = dict(body)
        key = {"gpu": "gpu_uuid", "node": "node"}.get(aggregate_of(body).split(".")[2], "task_id")
        other[key] = body[key] + draw(st.sampled_from(["x", "-2", "/9"]))
        subject = proper_subject(other)
        return Hostile("admin", subject, body, f"{kind} on another aggregate")
    proper = proper_subject(body)
    subject = draw(
        st.sampled_from(
            [
                proper + ".extra",
                "gw.evt.x",
                "gw.evt.task",
                f"gw.evt.task.{body.get('task_id', 'x')}\u200b.engine",  # raw unicode token
                f"gw.evt.tasks.{ev.subject_token(str(body.get('task_id', 'x')))}.engine",
                proper.replace("gw.evt.", "gw.evt.x.", 1),
                f"gw.evt.task.{REAL}.node",
            ]
        )
    )
    return Hostile("admin", subject, body, f"{kind} on a misshapen subject")


@st.composite
def foreign_gpu_fault(draw: st.DrawFn) -> Hostile:
    """A GPU fault about a GPU that is not the writing node's."""
    if draw(st.booleans()):
        gpu = draw(foreign_gpus)
        body = draw(sane("gpu.fault", gpu=gpu))
        return Hostile("local", proper_subject(body), body, f"fault of {gpu!r}, not local's")
    other = draw(other_nodes.filter(lambda n: n.strip() == n))
    body = draw(sane("gpu.fault", node=other, gpu=draw(st.sampled_from(LOCAL_GPUS))))
    return Hostile("admin", proper_subject(body), body, f"{other!r} faults local's GPU")


@st.composite
def stolen_gpus(draw: st.DrawFn) -> Hostile:
    """Another node registers with a GPU of node local."""
    other = draw(other_nodes)
    body = draw(sane("node.registered", node=other))
    taken = draw(st.lists(st.sampled_from(LOCAL_GPUS), min_size=1, max_size=2, unique=True))
    body["gpus"] = [{"uuid": u, "index": i, "model": "x"} for i, u in enumerate(taken)]
    if draw(st.booleans()):
        body["gpus"].append({"uuid": "GPU-new", "index": len(taken)})
    subject = draw(st.sampled_from([proper_subject(body), aggregate_of(body)]))
    return Hostile("admin", subject, body, f"{other!r} claims {taken}")


@st.composite
def ghost_task(draw: st.DrawFn) -> Hostile:
    """Facts and decisions about a task that was never submitted."""
    kind = draw(st.sampled_from(NEEDS_TASK))
    body = draw(sane(kind, task=draw(ghost_tasks)))
    subject = proper_subject(body)
    who = writer_for(kind)
    if who == "admin" and draw(st.booleans()):
        subject = aggregate_of(body)  # the legacy subject: admitted there, refused by state
    return Hostile(who, subject, body, f"{kind} of unknown task")


@st.composite
def wrong_attempt(draw: st.DrawFn) -> Hostile:
    """A container fact of a real task: an attempt it never had (99), or attempt 1 told
    by a node it never ran on."""
    kind = draw(st.sampled_from(TASK_FACTS))
    if draw(st.booleans()):
        attempt = draw(st.one_of(st.just(99), st.integers(2, adm.MAX_ATTEMPT)))
        body = draw(sane(kind, attempt=attempt))
        return Hostile("local", proper_subject(body), body, f"attempt {attempt} of a real task")
    other = draw(other_nodes)
    body = draw(sane(kind, node=other))
    return Hostile("admin", proper_subject(body), body, f"attempt 1 told by {other!r}")


@st.composite
def resubmitted(draw: st.DrawFn) -> Hostile:
    """A second task.submitted for a task that exists."""
    body = draw(sane("task.submitted"))
    subject = draw(st.sampled_from([proper_subject(body), aggregate_of(body)]))
    return Hostile("admin", subject, body, "task submitted twice")


@st.composite
def any_subject(draw: st.DrawFn) -> tuple[str, str]:
    """A publisher and a subject it may publish to."""
    key = draw(st.sampled_from([REAL, "ghost-u", "local", "local_0~x", "t\u0161k", "\U0001f600"]))
    kind = draw(st.sampled_from(["task", "gpu", "node", "zzz"]))
    if draw(st.booleans()):
        return "local", f"gw.evt.{kind}.{key}.node.{LOCAL}"
    tail = draw(st.sampled_from(["", ".engine", ".api", ".op", ".node.local", ".node.n2"]))
    return "admin", f"gw.evt.{kind}.{key}{tail}"


@st.composite
def unknown_type(draw: st.DrawFn) -> Hostile:
    """A well-formed event whose `type` is no type of the catalog (or missing)."""
    body = draw(sane(draw(st.sampled_from(ALL_TYPES))))
    tag = draw(
        st.one_of(
            st.text(max_size=20).filter(lambda s: s not in ev.EVENT_TYPES),
            st.sampled_from(["TASK.SUBMITTED", "task.submitted ", "task.*", None, 1, ["x"]]),
        )
    )
    if tag is None and draw(st.booleans()):
        del body["type"]
    else:
        body["type"] = tag
    who, subject = draw(any_subject())
    return Hostile(who, subject, body, f"type {_clip(tag)!r}", draw(st.booleans()))


MALFORMED = (
    b"",
    b"null",
    b"[]",
    b'"task.submitted"',
    b"{",
    b'{"type": "task.pending"',
    b'{"type": "task.pending", "id": "x", "at": NaN}',
    b'{"type": "task.pending", "task_id": "\xff\xfe", "id": "i", "at": "' + AT.encode() + b'"}',
    b'{"type": "task.pending", "id": "\\ud800", "at": "2026-12-04T13:50:00Z"}',
    b"\x00\x01\x02",
    b"\xef\xbb\xbf{}",
)


@st.composite
def malformed(draw: st.DrawFn) -> Hostile:
    """Not an event: not JSON, truncated JSON, a sane event cut short, missing fields,
    nesting deeper than any decoder should follow."""
    how = draw(st.sampled_from(["fixed", "random", "truncated", "missing", "deep"]))
    who, subject = draw(any_subject())
    if how == "fixed":
        return Hostile(who, subject, draw(st.sampled_from(MALFORMED)), "malformed JSON")
    if how == "random":
        data = draw(st.binary(max_size=200))
        return Hostile(who, subject, b"\xff" + data, "random bytes")  # never valid UTF-8
    body = draw(sane(draw(st.sampled_from(ALL_TYPES))))
    if how == "deep":  # poisoned as well: whether the nesting decodes is msgspec's business
        fields = draw(poisoned_fields(body))
        depth = draw(st.integers(1, DEEPEST))
        text = json.dumps(body).encode()[:-1] + b', "zz_deep": ' + b"[" * depth + b"]" * depth
        return Hostile(who, subject, text + b"}", f"{depth} deep, fields {fields}")
    if how == "truncated":
        text = json.dumps(body).encode()
        cut = draw(st.integers(1, len(text) - 1))
        return Hostile(who, subject, text[:cut], f"JSON cut at {cut}")
    required = [k for k in body if k in ("id", "at", "actor", "task_id", "node", "gpu_uuid")]
    gone = draw(st.sampled_from(required))
    del body[gone]
    return Hostile(who, subject, body, f"no {gone}")


@st.composite
def oversized(draw: st.DrawFn) -> Hostile:
    """An event past the engine's size limit (the padding is a key msgspec ignores)."""
    kind = draw(st.sampled_from(ALL_TYPES))
    body = draw(sane(kind, task=draw(st.sampled_from([REAL, "ghost-o"]))))
    body["zz_padding"] = "p" * draw(st.integers(MAX_EVENT_BYTES + 1, MAX_EVENT_BYTES + 100_000))
    who = writer_for(kind)
    subject = proper_subject(body)
    if who == "admin" and draw(st.booleans()):
        subject = aggregate_of(body)
    # Sometimes poisoned as well; the size alone is refused by every reader.
    fields = draw(poisoned_fields(body)) if draw(st.booleans()) else "none but its size"
    return Hostile(who, subject, body, f"oversized, fields {fields}")


SCENARIOS: dict[str, st.SearchStrategy[Hostile]] = {
    "bad-fields": field_poison(),
    "wrong-node": wrong_node(),
    "wrong-subject": wrong_subject(),
    "foreign-gpu-fault": foreign_gpu_fault(),
    "stolen-gpus": stolen_gpus(),
    "unknown-task": ghost_task(),
    "wrong-attempt": wrong_attempt(),
    "resubmitted": resubmitted(),
    "unknown-type": unknown_type(),
    "malformed": malformed(),
    "oversized": oversized(),
}


def _named(name: str) -> Callable[[Hostile], Hostile]:
    return lambda hostile: replace(hostile, scenario=name)


hostile_events = st.one_of([made.map(_named(name)) for name, made in SCENARIOS.items()])
batches = st.lists(hostile_events, min_size=1, max_size=6)


def may_publish(who: str, subject: str) -> bool:
    """What the server lets each principal publish (auth.py's permissions)."""
    if who == "admin":
        return subject.startswith("gw.evt.")
    tokens = subject.split(".")
    return len(tokens) == 6 and tokens[:2] == ["gw", "evt"] and tokens[4:] == ["node", LOCAL]


# --- the strategy, checked against the pure admission (no engine) ----------------------


def _admission_with_a_real_task(real: str) -> Admission:
    """The admission state of the live cluster: node local with its GPUs, one task that
    ran attempt 1 on it."""
    admission = Admission()
    at = datetime(2026, 12, 4, tzinfo=UTC)
    inventory = tuple(ev.GpuInfo(**g) for g in local_inventory())
    facts: list[ev.Event] = [
        ev.NodeRegistered(id="r1", at=at, actor="agent:local", node=LOCAL, runtime="sim",
                          gpus=inventory),
        ev.TaskSubmitted(id="s1", at=at, actor="api", task_id=real, name=real, image="img",
                         command=("x",), owner="operator"),
        ev.TaskScheduled(id="d1", at=at, actor="engine", task_id=real, attempt=1, node=LOCAL,
                         gpu_uuids=(LOCAL_GPUS[0],)),
    ]  # fmt: skip
    for event in facts:
        assert admission.admit(ev.subject_of(event), event) is None
    return admission


def refusal(admission: Admission, subject: str, data: bytes) -> str | None:
    """Why every reader of the log (engine, API, read models) refuses a stored message
    (its size, or its meaning), or None."""
    record = stored_event(1, subject, data, {})
    if record.event is None:
        return record.error or "undecodable"
    return check_size(len(data)) or admission.check(subject, record.event)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(hostile=hostile_events)
def test_every_generated_event_is_inadmissible(hostile: Hostile) -> None:
    """The live fuzz asserts that every hostile event is dead-lettered: sound only if
    each one is inadmissible, which this checks against the pure admission."""
    real = "01REALTASK0000000000000000"
    subject, data = hostile.subject_for(real), hostile.payload(real)
    assert may_publish(hostile.who, subject), hostile.short()
    assert len(data) < 1_000_000, hostile.short()  # the server's max_payload
    assert refusal(_admission_with_a_real_task(real), subject, data), hostile.short()


# --- the live cluster ------------------------------------------------------------------


@dataclass
class Up:
    """`gpuwarden up --runtime sim` in its own process group, and what the tests learnt
    about it (the dead letters read so far, the tasks that ran)."""

    data: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    log_offset: int = 0
    dead: dict[int, list[tuple[str, str]]] = field(default_factory=dict)  # Gw-Seq -> entries
    dlq_read: int = 0  # GW_DLQ sequence read up to
    hostile_seqs: set[int] = field(default_factory=set)
    real_tasks: list[str] = field(default_factory=list)
    examples: int = 0
    hostile_published: int = 0
    kinds: Counter[str] = field(default_factory=Counter)  # scenarios published, by name

    def start(self) -> None:
        with self.log_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [*CLI, "--data-dir", str(self.data), "up", "--runtime", "sim"],
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        lines: queue.Queue[bytes] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None

        def pump() -> None:  # reads the URL, then keeps the pipe drained
            for line in stdout:
                lines.put(line)
            lines.put(b"")

        threading.Thread(target=pump, daemon=True).start()
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            pytest.fail(f"gpuwarden up printed no URL within 60 s\n{self.log_tail()}")
        self.url = line.decode().strip()
        assert self.url.startswith("nats://"), f"{line!r}\n{self.log_tail()}"

    def stop(self) -> int:
        """SIGTERM, as an operator stops it; its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"gpuwarden up did not stop on SIGTERM within 30 s\n{self.log_tail()}")

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its group: up and its nats-server
            self.proc.wait(timeout=10)

    def assert_alive(self, when: str) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            pytest.fail(f"gpuwarden up exited with {code} {when}\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        text = self.log_path.read_text(errors="replace")
        return "--- gpuwarden up stderr (tail) ---\n" + text[-chars:]

    def new_errors(self) -> list[str]:
        """ERROR lines and tracebacks `up` logged since the last call."""
        with self.log_path.open("rb") as f:
            f.seek(self.log_offset)
            text = f.read().decode(errors="replace")
            self.log_offset = f.tell()
        markers = (" ERROR ", " CRITICAL ", "Traceback", "gpuwarden: error")
        return [line for line in text.splitlines() if any(m in line for m in markers)]

    def creds(self, principal: str) -> str:
        return str(self.data / "auth" / f"{principal}.creds")


@dataclass
class Conns:
    local: NatsClient
    admin: NatsClient
    operator: NatsClient
    errors: list[str]


@asynccontextmanager
async def connected(up: Up) -> AsyncIterator[Conns]:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(f"{type(exc).__name__}: {exc}")

    opened: list[NatsClient] = []
    try:
        for principal in ("node-local", "admin", "operator"):
            nc = await connect(
                up.url, creds=up.creds(principal), name=f"fuzz-{principal}", error_cb=on_error
            )
            opened.append(nc)
        local, admin, operator = opened
        yield Conns(local, admin, operator, errors)
    finally:
        for nc in opened:
            await nc.close()


async def publish(c: Conns, up: Up, hostile: Hostile) -> int:
    """Store one hostile message; its stream sequence."""
    real = up.real_tasks[-1]
    nc = c.local if hostile.who == "local" else c.admin
    subject = hostile.subject_for(real)
    try:
        ack = await nc.jetstream(timeout=10).publish(
            subject,
            hostile.payload(real),
            headers={"Nats-Msg-Id": f"fuzz-{uuid.uuid4().hex}"},
        )
    except Exception as exc:
        pytest.fail(
            f"publishing {hostile.short()} failed: {type(exc).__name__}: {exc} "
            f"(connection errors: {c.errors})"
        )
    assert not ack.duplicate
    up.hostile_seqs.add(ack.seq)
    up.hostile_published += 1
    up.kinds[hostile.scenario] += 1
    return int(ack.seq)


def _headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("utf-8").split("\r\n")[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip()] = value.strip()
    return headers


async def read_dead_letters(nc: NatsClient, up: Up) -> None:
    """Read GW_DLQ on from where the last read stopped (headers only, as sent)."""
    try:
        info = await nc.jetstream(timeout=10).stream_info(DLQ_STREAM)
    except nats.js.errors.NotFoundError:
        return
    for seq in range(max(up.dlq_read + 1, info.state.first_seq), info.state.last_seq + 1):
        reply = await nc.request(
            f"$JS.API.STREAM.MSG.GET.{DLQ_STREAM}", json.dumps({"seq": seq}).encode(), timeout=10
        )
        message = json.loads(reply.data)["message"]
        headers = _headers(base64.b64decode(message.get("hdrs") or b""))
        entry = (headers.get("Gw-Reason", ""), headers.get("Gw-Subject", ""))
        up.dead.setdefault(int(headers["Gw-Seq"]), []).append(entry)
        up.dlq_read = seq


async def wait_dead_lettered(
    c: Conns, up: Up, published: list[tuple[int, Hostile]], real: str
) -> None:
    """Every hostile message is in GW_DLQ, once, with a reason and its subject."""
    missing = [seq for seq, _ in published]
    with anyio.move_on_after(DEADLINE_S):
        while True:
            await read_dead_letters(c.admin, up)
            missing = [seq for seq, _ in published if seq not in up.dead]
            if not missing:
                break
            await anyio.sleep(0.05)  # polling GW_DLQ, inside the deadline
    if missing:
        lost = "\n".join(f"  seq {s}: {h.short()}" for s, h in published if s in missing)
        pytest.fail(f"not dead-lettered within {DEADLINE_S} s:\n{lost}\n{up.log_tail()}")
    for seq, hostile in published:
        entries = up.dead[seq]
        assert len(entries) == 1, f"seq {seq} dead-lettered {len(entries)} times: {entries}"
        reason, subject = entry = entries[0]
        assert reason.strip(), f"seq {seq} dead-lettered without a reason: {hostile.short()}"
        assert subject == hostile.subject_for(real), (seq, entry, hostile.short())
    legit = sorted(set(up.dead) - up.hostile_seqs)
    assert not legit, f"legitimate events dead-lettered: {[(s, up.dead[s]) for s in legit]}"


async def api_answers(c: Conns) -> None:
    """Wait (deadline) until the task API answers. Needed after every start: `up` prints
    its URL before the API has subscribed (a product race, reported with issue #13), so
    a request sent at once finds no responders."""
    with anyio.fail_after(DEADLINE_S):
        while True:
            try:
                await c.operator.request("gw.api.operator.task.list", b"{}", timeout=DEADLINE_S)
                return
            except nats.errors.NoRespondersError:
                await anyio.sleep(0.05)  # polling for the subscription, inside the deadline


async def api_knows_only(c: Conns, tasks: list[str]) -> None:
    """The task API's own fold holds only the tasks that were really submitted."""
    reply = await c.operator.request(
        "gw.api.operator.task.list", json.dumps({"limit": 1000}).encode(), timeout=DEADLINE_S
    )
    listed = {t["task_id"] for t in json.loads(reply.data)["tasks"]}
    assert listed == set(tasks), (sorted(listed - set(tasks)), sorted(set(tasks) - listed))


async def run_a_task(c: Conns) -> str:
    """Submit a task as the operator; once it is scheduled and started, exit its
    container as the local agent would (exit 0) and wait for task.completed."""
    reply = await c.operator.request(
        "gw.api.operator.task.create",
        json.dumps({"image": "img", "command": ["x"]}).encode(),
        timeout=DEADLINE_S,
    )
    answer = json.loads(reply.data)
    assert "error" not in answer, answer
    task = str(answer["task_id"])
    log = JetStreamEventLog(c.operator, heartbeat_s=0.5)
    seen: list[str] = []
    scheduled: ev.TaskScheduled | None = None
    with anyio.move_on_after(DEADLINE_S):
        reading = cast(AsyncGenerator[StoredEvent], log.subscribe(1, ev.task_subject(task)))
        async with aclosing(reading) as records:
            async for record in records:
                event = record.event
                assert event is not None, f"task {task}: undecodable {record.data[:200]!r}"
                seen.append(ev.type_of(event))
                if isinstance(event, ev.TaskScheduled):
                    scheduled = event
                elif isinstance(event, ev.ContainerStarted) and scheduled is not None:
                    assert (event.attempt, event.node) == (scheduled.attempt, scheduled.node)
                    now = datetime.now(UTC)
                    exited = ev.ContainerExited(
                        id=new_id(now),
                        at=now,
                        actor=f"agent:{LOCAL}",
                        correlation_id=task,
                        task_id=task,
                        attempt=event.attempt,
                        node=LOCAL,
                        container_id=event.container_id,
                        exit_code=0,
                        finished_at=now,
                    )
                    await c.local.jetstream(timeout=10).publish(
                        ev.subject_of(exited), ev.encode(exited), headers={"Nats-Msg-Id": exited.id}
                    )
                elif isinstance(event, ev.TaskFailed | ev.TaskCancelled):
                    pytest.fail(f"task {task} ended {ev.type_of(event)}: {event}; saw {seen}")
                elif isinstance(event, ev.TaskCompleted):
                    assert scheduled is not None and event.attempt == scheduled.attempt, seen
                    assert "container.started" in seen, seen
                    return task
    pytest.fail(f"task {task} did not complete within {DEADLINE_S} s; its events: {seen}")


def read_commands_answer(up: Up, task: str, *more: str) -> None:
    """tasks, gpus, nodes, events, explain (and `more`): each exits 0 (run together), and
    the read models refused exactly what the engine refused."""
    commands = {
        "tasks": ["tasks", "--json"],
        "gpus": ["gpus", "--json"],
        "nodes": ["nodes", "--json"],
        "events": ["events", "--json"],
        "explain": ["explain", task],
        **{name: [name, "--check"] for name in more},
    }
    procs = {
        name: subprocess.Popen(
            [*CLI, "--data-dir", str(up.data), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, args in commands.items()
    }
    outputs: dict[str, bytes] = {}
    failed: list[str] = []
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            failed.append(f"{name}: no answer within 90 s; stderr {err[-2000:]!r}")
            continue
        outputs[name] = out
        if proc.returncode != 0:
            failed.append(f"{name}: exit {proc.returncode}; stderr {err[-3000:].decode()}")
    assert not failed, "\n".join(failed)
    rows = json.loads(outputs["tasks"])
    states = {row["id"]: (row["state"], row["attempts"]) for row in rows}
    assert states.get(task) == ("completed", 1), (task, states.get(task))
    assert set(states) <= set(up.real_tasks), sorted(set(states) - set(up.real_tasks))
    changed = {t: state for t, state in states.items() if state != ("completed", 1)}
    assert not changed, f"hostile events changed real tasks in the read model: {changed}"
    index = [json.loads(line) for line in outputs["events"].splitlines()]
    folded = [(r["seq"], r["type"]) for r in index if r["seq"] in up.hostile_seqs and
              (r["type"] != "!invalid" or not r["error"])]  # fmt: skip
    assert not folded, f"the events index took hostile events as valid: {folded}"
    refused = [(r["seq"], r["error"]) for r in index if r["seq"] not in up.hostile_seqs and
               (r["type"] == "!invalid" or r["error"])]  # fmt: skip
    assert not refused, f"the events index refused legitimate events: {refused}"
    gpus = {(g["uuid"], g["node"], g["quarantined"], g["fault_count"]) for g in
            json.loads(outputs["gpus"])}  # fmt: skip
    assert gpus == {(uuid, LOCAL, False, 0) for uuid in LOCAL_GPUS}, gpus
    nodes = [(n["name"], n["gpus"]) for n in json.loads(outputs["nodes"])]
    assert nodes == [(LOCAL, list(LOCAL_GPUS))], nodes
    assert task.encode() in outputs["explain"]


def check_errors_logged(up: Up) -> None:
    errors = up.new_errors()
    assert not errors, "gpuwarden up logged errors:\n" + "\n".join(errors[:20])


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """One `gpuwarden up --runtime sim` for the module, with one task run to completion
    (the real task hostile events aim at)."""
    root = tmp_path_factory.mktemp("fuzz-live")
    cluster = Up(root / "data", root / "up.stderr")
    try:
        cluster.start()

        async def warm_up() -> None:
            async with connected(cluster) as c:
                await api_answers(c)
                cluster.real_tasks.append(await run_a_task(c))

        anyio.run(warm_up)
        yield cluster
    finally:
        cluster.kill()


def check_batch(up: Up, batch: list[Hostile]) -> None:
    """One example: store the batch, then every assertion of the issue."""
    up.assert_alive("before the batch")
    real = up.real_tasks[-1]

    async def live() -> str:
        async with connected(up) as c:
            published = [(await publish(c, up, hostile), hostile) for hostile in batch]
            await wait_dead_lettered(c, up, published, real)
            up.assert_alive("after the batch was dead-lettered")
            task = await run_a_task(c)
            up.real_tasks.append(task)
            await api_knows_only(c, up.real_tasks)
            return task

    task = anyio.run(live)
    up.assert_alive("after a task ran")
    read_commands_answer(up, task)
    up.assert_alive("after the read commands")
    check_errors_logged(up)


def test_hostile_events_are_dead_lettered_and_the_engine_goes_on(up: Up) -> None:
    started, before = time.monotonic(), up.examples

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=False,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each try costs a task
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(batch=batches)
    def example(batch: list[Hostile]) -> None:
        up.examples += 1
        check_batch(up, batch)

    example()
    ran = up.examples - before
    print(
        f"\nfuzz: {ran} examples ran in {time.monotonic() - started:.1f} s; "
        f"{up.hostile_published} hostile events stored and dead-lettered so far "
        f"({', '.join(f'{k} {n}' for k, n in up.kinds.most_common())})"
    )
    assert ran >= 1


FIXED_POISON = (
    Hostile("admin", f"gw.evt.task.{REAL}.engine",
            {"type": "task.completed", "id": "fx1", "at": "2026-12-04T13:50:00", "actor": "e",
             "task_id": REAL, "attempt": 1}, "naive at"),
    Hostile("admin", f"gw.evt.task.{REAL}",
            {"type": "task.pending", "id": "fx2", "at": "9999-12-31T23:59:59.999Z",
             "actor": "e", "task_id": REAL, "reason": "r", "attempt": 10**30}, "year 9999"),
    Hostile("local", f"gw.evt.task.{REAL}.node.local",
            {"type": "rebuild.decided", "id": "fx3", "at": AT, "actor": "e", "task_id": REAL,
             "attempt": 2, "previous_attempt": 1, "fault": "preempted", "counted": True,
             "rule": None, "not_before": AT}, "decision on the agent's subject"),
    Hostile("local", f"gw.evt.task.{REAL}.node.local",
            {"type": "container.exited", "id": "fx4", "at": AT, "actor": "agent:local",
             "task_id": REAL, "attempt": 99, "node": "local", "container_id": "c",
             "exit_code": 1}, "attempt 99"),
    Hostile("local", "gw.evt.gpu.n2_0~x.node.local",
            {"type": "gpu.fault", "id": "fx5", "at": AT, "actor": "agent:local",
             "gpu_uuid": "n2/0", "node": "n2", "kind": "xid", "xid": 79}, "n2 on local's"),
    Hostile("admin", "gw.evt.node.n2.node.n2",
            {"type": "node.registered", "id": "fx6", "at": AT, "actor": "agent:n2",
             "node": "n2", "runtime": "sim", "gpus": [{"uuid": "local/0", "index": 0}]},
            "n2 claims local/0"),
    Hostile("admin", "gw.evt.task.ghost.api",
            {"type": "task.submitted", "id": "fx7", "at": AT, "actor": "api",
             "task_id": "ghost", "name": "n", "image": "img", "command": ["x"], "gpus": -1,
             "env": {"1BAD": "v\x00"}}, "negative gpus, bad env"),
    Hostile("admin", "gw.evt.task.ghost.engine", b'{"type": "task.exploded"}', "unknown type"),
    Hostile("local", "gw.evt.task.ghost.node.local", b"\xff{not json", "malformed"),
)  # fmt: skip


def test_restart_folds_past_the_poison(up: Up) -> None:
    """SIGTERM and start again on the same data directory: the engine, the API and the
    read models fold the whole log again, past every poison in it, and go on."""

    async def poison() -> None:
        async with connected(up) as c:
            real = up.real_tasks[-1]
            published = [(await publish(c, up, hostile), hostile) for hostile in FIXED_POISON]
            await wait_dead_lettered(c, up, published, real)

    up.assert_alive("before the restart")
    anyio.run(poison)
    before = set(up.dead)  # every message dead-lettered so far, each once
    assert up.stop() == 0, up.log_tail()
    check_errors_logged(up)
    up.start()
    up.assert_alive("after the restart")

    async def after_restart() -> str:
        async with connected(up) as c:
            await api_answers(c)
            task = await run_a_task(c)  # the engine is live: it caught up past everything
            up.real_tasks.append(task)
            await api_knows_only(c, up.real_tasks)
            await read_dead_letters(c.admin, up)
            return task

    task = anyio.run(after_restart)
    # It folded the whole log again: each poison was dead-lettered again, and the server
    # dropped the copy (its msg id derives from the sequence), so each is there once.
    twice = {seq: up.dead[seq] for seq in before if len(up.dead[seq]) != 1}
    assert not twice, f"dead-lettered again after the restart: {twice}"
    legit = sorted(set(up.dead) - up.hostile_seqs)
    assert not legit, f"legitimate events dead-lettered: {[(s, up.dead[s]) for s in legit]}"
    anyio.run(poison)  # the restarted engine dead-letters new poison too
    up.assert_alive("after poison following the restart")
    read_commands_answer(up, task, "replay")  # and every recorded decision re-derives
    up.assert_alive("after the read commands")
    check_errors_logged(up)


def test_oversized_event_is_refused_by_every_reader(tmp_path: Path) -> None:
    """Found by this fuzz: a sane task.submitted padded past the engine's 256 KiB limit
    is dead-lettered by the engine, yet the API and `gpuwarden tasks` list it (pending
    for ever). Its own `up`: the module's must not hold the divergence."""
    cluster = Up(tmp_path / "data", tmp_path / "up.stderr")
    try:
        cluster.start()
        task = f"oversized-{uuid.uuid4().hex[:8]}"
        body = {"type": "task.submitted", "id": new_id(), "at": AT, "actor": "api",
                "task_id": task, "name": "n", "image": "img", "command": ["x"],
                "owner": "operator", "zz_padding": "p" * (MAX_EVENT_BYTES + 1)}  # fmt: skip
        hostile = Hostile("admin", ev.subject_of(ev.decode(json.dumps(body))), body, "oversized")

        async def go() -> None:
            async with connected(cluster) as c:
                await api_answers(c)
                cluster.real_tasks.append(await run_a_task(c))
                seq = await publish(c, cluster, hostile)
                await wait_dead_lettered(c, cluster, [(seq, hostile)], cluster.real_tasks[-1])
                assert "exceeds" in cluster.dead[seq][0][0]
                await api_knows_only(c, cluster.real_tasks)  # fails: the API folded it

        anyio.run(go)
        read_commands_answer(cluster, cluster.real_tasks[-1])  # fails: `tasks` lists it
    finally:
        cluster.kill()


def test_deeply_nested_message_does_not_break_events_json(tmp_path: Path) -> None:
    """Found by this fuzz: one message of JSON nested 5000 deep, stored by a node agent
    on its own subject, is dead-lettered by the engine and indexed as `!invalid` by the
    read model, but from then on every `events --json` whose answer includes it exits 2
    ("RecursionError: maximum recursion depth exceeded while decoding a JSON array"): the
    log denies purge, so for good. Its own `up`: the module's must not hold it."""
    cluster = Up(tmp_path / "data", tmp_path / "up.stderr")
    try:
        cluster.start()
        deep = b'{"zz": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        hostile = Hostile("local", "gw.evt.task.deep.node.local", deep, "5000 deep")

        async def go() -> None:
            async with connected(cluster) as c:
                await api_answers(c)
                cluster.real_tasks.append(await run_a_task(c))
                seq = await publish(c, cluster, hostile)
                await wait_dead_lettered(c, cluster, [(seq, hostile)], cluster.real_tasks[-1])

        anyio.run(go)
        read_commands_answer(cluster, cluster.real_tasks[-1])  # fails: events --json exits 2
    finally:
        cluster.kill()


async def appears(c: Conns, task: str, kind: type[ev.Event], within_s: float) -> bool:
    """Whether an event of `kind` is in the task's log within `within_s`."""
    log = JetStreamEventLog(c.operator, heartbeat_s=0.5)
    with anyio.move_on_after(within_s):
        reading = cast(AsyncGenerator[StoredEvent], log.subscribe(1, ev.task_subject(task)))
        async with aclosing(reading) as records:
            async for record in records:
                if isinstance(record.event, kind):
                    return True
    return False


def test_a_node_cannot_squat_the_id_of_a_decision(tmp_path: Path) -> None:
    """Found while writing this fuzz (its messages carry unique msg ids): node local, on
    its own subject, stores junk under Nats-Msg-Id derive_id(E, "classified") before it
    appends its container.exited E. The engine dead-letters the junk, but its decision
    on E (fault.classified, task.completed, ...) is refused 10201 ("not stored whole")
    and retried every 2 s; meanwhile nothing else is decided: another user's task is
    not even scheduled. Its own `up`: the module's must not stall."""
    cluster = Up(tmp_path / "data", tmp_path / "up.stderr")
    try:
        cluster.start()

        async def go() -> None:
            async with connected(cluster) as c:
                await api_answers(c)
                request = json.dumps({"image": "img", "command": ["x"]}).encode()
                reply = await c.operator.request("gw.api.operator.task.create", request, 10)
                task = json.loads(reply.data)["task_id"]
                log = JetStreamEventLog(c.operator, heartbeat_s=0.5)
                started = None
                with anyio.fail_after(DEADLINE_S):
                    async for record in log.subscribe(1, ev.task_subject(task)):
                        if isinstance(record.event, ev.ContainerStarted):
                            started = record.event
                            break
                assert started is not None
                now = datetime.now(UTC)
                exited = ev.ContainerExited(
                    id=new_id(now), at=now, actor="agent:local", task_id=task,
                    attempt=started.attempt, node=LOCAL, container_id=started.container_id,
                    exit_code=0, finished_at=now,
                )  # fmt: skip
                js = c.local.jetstream(timeout=10)
                squat = {"Nats-Msg-Id": ev.derive_id(exited.id, "classified")}
                await js.publish("gw.evt.task.squat.node.local", b"junk", headers=squat)
                await js.publish(ev.subject_of(exited), ev.encode(exited),
                                 headers={"Nats-Msg-Id": exited.id})  # fmt: skip
                reply = await c.operator.request("gw.api.operator.task.create", request, 10)
                other = json.loads(reply.data)["task_id"]
                placed = await appears(c, other, ev.TaskScheduled, 10)
                done = await appears(c, task, ev.TaskCompleted, 1)
                assert placed and done, f"stalled: other task placed {placed}, done {done}"

        anyio.run(go)
        cluster.assert_alive("after the squat")
    finally:
        cluster.kill()
