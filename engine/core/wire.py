"""Names and limits on the wire: the one home that writers and readers both import.

Streams, subjects, headers and the size limit every reader enforces. The catalog's
subject scheme (`subject_of` and friends) lives with the catalog in `events.py`, built
on the names here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Final

from gpuwarden.engine.core.policy import Policy, policy_to_mapping

# --- streams and subjects -----------------------------------------------------------

EVENTS_STREAM: Final = "GW_EVENTS"
COMMANDS_STREAM: Final = "GW_CMDS"
DLQ_STREAM: Final = "GW_DLQ"
EVENT_SUBJECTS: Final = "gw.evt.>"
COMMAND_SUBJECTS: Final = "gw.cmd.*"
DEAD_LETTER_SUBJECT: Final = "gw.dlq"

# --- limits ------------------------------------------------------------------------

MAX_EVENT_BYTES: Final = 256 * 1024  # a stored message's payload; larger is refused

# --- headers gpuwarden puts on its messages ----------------------------------------

# On every decision: a short hash of the policy that decided, so `replay --check`
# can tell a log recorded under another policy from a decision that does not re-derive.
POLICY_HEADER: Final = "Gw-Policy"
# On every message of a decision, so `replay --check` can re-derive it from exactly the
# state the engine saw: the last stream sequence it had folded, and what it decided on:
# "FROM-TO", the stream sequences of the events folded since its last round
# (undecodable ones excepted), "timer" for due timers only, or "reconcile" for the
# startup sweep.
BASIS_HEADER: Final = "Gw-Basis"
TRIGGER_HEADER: Final = "Gw-Trigger"
# On a dead letter's copy in GW_DLQ: why it was refused, and where the original lies.
DLQ_REASON_HEADER: Final = "Gw-Reason"
DLQ_SEQ_HEADER: Final = "Gw-Seq"
DLQ_SUBJECT_HEADER: Final = "Gw-Subject"


def policy_digest(policy: Policy) -> str:
    """12 hex digits of SHA-256 over the policy's canonical JSON."""
    text = json.dumps(policy_to_mapping(policy), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
