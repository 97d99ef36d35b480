"""Rebuild policy: which classified faults earn a new attempt, how often, how soon.

Only a fault a rebuild can cure should cost another run, and even those get a budget
(Erlang/OTP's intensity within a period) and a doubling backoff, so a task that keeps
dying on good hardware stops burning GPUs. The ordered rules follow Kubernetes' pod
failure policy, so that an operator's intent ("exit 42 is a config bug, fail at once";
"evictions do not count") can be said without code. The semantics are the contract in
SCENARIOS.md ("Policy semantics"):

- `completed` is never judged: no rule is consulted.
- Rules are tried in order; a rule matches when every condition it names holds; one
  with no condition matches every failure. An attempt without an exit code never
  matches an `exit_codes` condition. The first match decides.
- No match: a counted rebuild if the fault is in `rebuild_on`, else fail
  (`not_target_fault`).
- A counted rebuild needs budget: fewer than `max_rebuilds` counted rebuilds in the
  last `window_s` (-1: no limit, 0: none), else fail (`budget_exhausted`).
- Backoff of a counted rebuild: `backoff_initial_s * 2**k`, capped at `backoff_max_s`,
  k = counted rebuilds already in the window. An uncounted rebuild waits
  `backoff_initial_s`: it must not hammer a node in a loop, but since it is by
  definition not the task's fault it does not escalate.

Rule indexes (in `Verdict.rule` and in error paths like `policy.rules[2].action`) count
from 0. Pure module: time comes in as an argument.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, TypeAlias, get_args

from gpuwarden.engine.core.errors import PolicyError
from gpuwarden.engine.core.events import FAULT_TYPES, FailureReason, Fault

# What a policy rule may say, and what a verdict says.
Action: TypeAlias = Literal["fail", "rebuild", "rebuild_uncounted"]
Outcome: TypeAlias = Literal["complete", "rebuild", "fail"]

ACTIONS: Final[tuple[Action, ...]] = get_args(Action)
FAILURE_FAULTS: Final[tuple[Fault, ...]] = tuple(f for f in FAULT_TYPES if f != "completed")
_ACTION_NAMED: Final[dict[str, Action]] = {action: action for action in ACTIONS}
_FAILURE_NAMED: Final[dict[str, Fault]] = {fault: fault for fault in FAILURE_FAULTS}


@dataclass(frozen=True, slots=True)
class Rule:
    """One ordered policy rule; a condition left as None is not checked."""

    action: Action
    exit_codes_in: frozenset[int] | None = None
    exit_codes_not_in: frozenset[int] | None = None
    faults: frozenset[Fault] | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """A task's rebuild policy (defaults: the engine's)."""

    rebuild_on: frozenset[Fault] = frozenset(
        {"gpu_hardware", "node_lost", "runtime_error", "preempted"}
    )
    rules: tuple[Rule, ...] = ()
    max_rebuilds: int = 3
    window_s: float = 3600.0
    backoff_initial_s: float = 10.0
    backoff_max_s: float = 300.0
    node_lost_after_s: float = 30.0
    evidence_window_s: float = 1.0


DEFAULT_POLICY: Final = Policy()


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with an attempt's outcome."""

    action: Outcome
    counted: bool = False
    reason: FailureReason | None = None
    rule: int | None = None
    backoff_s: float = 0.0


# --- judging -----------------------------------------------------------------------


def rule_matches(rule: Rule, fault: Fault, exit_code: int | None) -> bool:
    """Whether every condition the rule names holds for this failure."""
    if rule.faults is not None and fault not in rule.faults:
        return False
    if rule.exit_codes_in is not None and (
        exit_code is None or exit_code not in rule.exit_codes_in
    ):
        return False
    if rule.exit_codes_not_in is not None and (
        exit_code is None or exit_code in rule.exit_codes_not_in
    ):
        return False
    return True


def rebuilds_in_window(policy: Policy, counted_rebuilds: Sequence[datetime], now: datetime) -> int:
    """How many counted rebuilds fall within the sliding window ending now."""
    return sum(1 for t in counted_rebuilds if (now - t).total_seconds() < policy.window_s)


def backoff(policy: Policy, recent: int) -> float:
    """The delay before a counted rebuild, with `recent` counted rebuilds in the window."""
    if policy.backoff_initial_s <= 0:
        return 0.0
    if recent >= 1024:  # far past any cap; avoids float overflow
        return policy.backoff_max_s
    return min(policy.backoff_initial_s * 2.0**recent, policy.backoff_max_s)


def judge(
    policy: Policy,
    fault: Fault,
    exit_code: int | None,
    counted_rebuilds: Sequence[datetime],
    now: datetime,
) -> Verdict:
    """The verdict for one classified attempt, given the task's counted rebuilds so far."""
    if fault == "completed":
        return Verdict("complete")
    for index, rule in enumerate(policy.rules):
        if not rule_matches(rule, fault, exit_code):
            continue
        if rule.action == "fail":
            return Verdict("fail", reason="policy_rule", rule=index)
        if rule.action == "rebuild_uncounted":
            return Verdict("rebuild", rule=index, backoff_s=policy.backoff_initial_s)
        return _counted_rebuild(policy, index, counted_rebuilds, now)
    if fault in policy.rebuild_on:
        return _counted_rebuild(policy, None, counted_rebuilds, now)
    return Verdict("fail", reason="not_target_fault")


def _counted_rebuild(
    policy: Policy, rule: int | None, counted_rebuilds: Sequence[datetime], now: datetime
) -> Verdict:
    recent = rebuilds_in_window(policy, counted_rebuilds, now)
    if policy.max_rebuilds != -1 and recent >= policy.max_rebuilds:
        return Verdict("fail", reason="budget_exhausted", rule=rule)
    return Verdict("rebuild", counted=True, rule=rule, backoff_s=backoff(policy, recent))


# --- parsing -----------------------------------------------------------------------

_POLICY_KEYS: Final = (
    "rebuild_on",
    "rules",
    "max_rebuilds",
    "window_s",
    "backoff_initial_s",
    "backoff_max_s",
    "node_lost_after_s",
    "evidence_window_s",
)
_RULE_KEYS: Final = ("action", "exit_codes", "faults")
_EXIT_CODE_KEYS: Final = ("in", "not_in")
# Seconds that must be > 0 (a zero window or timeout means nothing) or >= 0.
_POSITIVE_SECONDS: Final = ("window_s", "node_lost_after_s")
_NON_NEGATIVE_SECONDS: Final = ("backoff_initial_s", "backoff_max_s", "evidence_window_s")
# Beyond this a deadline (now + seconds) no longer fits in a datetime; ~31 years.
MAX_SECONDS: Final = 1e9


class _Where:
    """A place in the policy, for error messages that name file and key path."""

    def __init__(self, source: str, path: str) -> None:
        self.source = source
        self.path = path

    def at(self, key: str | int) -> _Where:
        if isinstance(key, int):
            return _Where(self.source, f"{self.path}[{key}]")
        return _Where(self.source, f"{self.path}.{key}" if self.path else key)

    def error(self, problem: str) -> PolicyError:
        where = self.path or "(top level)"
        return PolicyError(f"{self.source}: {where}: {problem}")


def parse_policy(text: str, source: str) -> Policy:
    """A policy file: its keys at the top level, or under one [policy] table."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from None
    if "policy" in data:
        extra = sorted(set(data) - {"policy"})
        if extra:
            raise _Where(source, extra[0]).error(
                "unknown key beside the [policy] table (put every key inside it)"
            )
        return policy_from_mapping(data["policy"], source)
    return _policy(data, _Where(source, ""))


def policy_from_mapping(data: Mapping[str, object], source: str, path: str = "policy") -> Policy:
    """A policy from its table (the [policy] table of a scenario or policy file)."""
    where = _Where(source, path)
    if not isinstance(data, Mapping):
        raise where.error(f"expected a table, got {_describe(data)}")
    return _policy(data, where)


def _policy(data: Mapping[str, object], where: _Where) -> Policy:
    _check_keys(data, _POLICY_KEYS, where)
    fields: dict[str, object] = {}
    if "rebuild_on" in data:
        fields["rebuild_on"] = _faults(data["rebuild_on"], where.at("rebuild_on"), empty_ok=True)
    if "rules" in data:
        fields["rules"] = _rules(data["rules"], where.at("rules"))
    if "max_rebuilds" in data:
        fields["max_rebuilds"] = _max_rebuilds(data["max_rebuilds"], where.at("max_rebuilds"))
    for key in _POSITIVE_SECONDS + _NON_NEGATIVE_SECONDS:
        if key in data:
            fields[key] = _seconds(data[key], where.at(key), positive=key in _POSITIVE_SECONDS)
    policy = Policy(**fields)  # type: ignore[arg-type]
    if policy.backoff_max_s < policy.backoff_initial_s:
        raise where.at("backoff_max_s").error(
            f"must be >= backoff_initial_s ({policy.backoff_initial_s:g}), "
            f"got {policy.backoff_max_s:g}"
        )
    return policy


def _check_keys(data: Mapping[str, object], allowed: tuple[str, ...], where: _Where) -> None:
    for key in data:
        if key not in allowed:
            raise where.at(str(key)).error(f"unknown key (allowed: {', '.join(allowed)})")


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _integer(value: object, where: _Where) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(f"expected an integer, got {_describe(value)}")
    return value


def _max_rebuilds(value: object, where: _Where) -> int:
    number = _integer(value, where)
    if number < -1:
        raise where.error(f"must be -1 (no limit), 0 (none) or a positive count, got {number}")
    return number


def _seconds(value: object, where: _Where, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise where.error(f"expected a number of seconds, got {_describe(value)}")
    seconds = float(value)
    if not math.isfinite(seconds):
        raise where.error(f"must be a finite number of seconds, got {value}")
    if positive and seconds <= 0:
        raise where.error(f"must be > 0 seconds, got {value}")
    if seconds < 0:
        raise where.error(f"must not be negative, got {value}")
    if seconds > MAX_SECONDS:
        raise where.error(f"must be at most {MAX_SECONDS:g} seconds, got {value}")
    return seconds


def _list(value: object, where: _Where) -> list[object]:
    if not isinstance(value, list):
        raise where.error(f"expected a list, got {_describe(value)}")
    return value


def _faults(value: object, where: _Where, *, empty_ok: bool) -> frozenset[Fault]:
    items = _list(value, where)
    if not items and not empty_ok:
        raise where.error("must not be empty (leave the key out to match any fault)")
    faults: set[Fault] = set()
    for index, item in enumerate(items):
        here = where.at(index)
        if not isinstance(item, str):
            raise here.error(f"expected a fault type name, got {_describe(item)}")
        if item == "completed":
            raise here.error("'completed' is not a failure; exit 0 never reaches the policy")
        fault = _FAILURE_NAMED.get(item)
        if fault is None:
            raise here.error(f"unknown fault type {item!r} (known: {', '.join(FAILURE_FAULTS)})")
        faults.add(fault)
    return frozenset(faults)


def _rules(value: object, where: _Where) -> tuple[Rule, ...]:
    return tuple(_rule(item, where.at(index)) for index, item in enumerate(_list(value, where)))


def _rule(value: object, where: _Where) -> Rule:
    if not isinstance(value, Mapping):
        raise where.error(f"expected a table, got {_describe(value)}")
    _check_keys(value, _RULE_KEYS, where)
    if "action" not in value:
        raise where.at("action").error(f"missing (one of: {', '.join(ACTIONS)})")
    named = value["action"]
    action = _ACTION_NAMED.get(named) if isinstance(named, str) else None
    if action is None:
        raise where.at("action").error(
            f"unknown action {_describe(named)} (one of: {', '.join(ACTIONS)})"
        )
    codes_in, codes_not_in = None, None
    if "exit_codes" in value:
        codes_in, codes_not_in = _exit_codes(value["exit_codes"], where.at("exit_codes"))
    faults = None
    if "faults" in value:
        faults = _faults(value["faults"], where.at("faults"), empty_ok=False)
    return Rule(action, codes_in, codes_not_in, faults)


def _exit_codes(
    value: object, where: _Where
) -> tuple[frozenset[int] | None, frozenset[int] | None]:
    if not isinstance(value, Mapping):
        raise where.error(
            f"expected a table {{ in = [...] }} or {{ not_in = [...] }}, got {_describe(value)}"
        )
    _check_keys(value, _EXIT_CODE_KEYS, where)
    if len(value) != 1:
        raise where.error("give exactly one of 'in' or 'not_in'")
    key = "in" if "in" in value else "not_in"
    codes = _codes(value[key], where.at(key), allow_zero=key == "not_in")
    return (codes, None) if key == "in" else (None, codes)


def _codes(value: object, where: _Where, *, allow_zero: bool) -> frozenset[int]:
    items = _list(value, where)
    if not items:
        raise where.error("must not be empty (leave exit_codes out to match any exit code)")
    codes: set[int] = set()
    for index, item in enumerate(items):
        code = _integer(item, where.at(index))
        if not 0 <= code <= 255:
            raise where.at(index).error(f"exit codes are 0..255, got {code}")
        if code == 0 and not allow_zero:
            raise where.at(index).error("exit 0 is completion and never reaches a rule")
        codes.add(code)
    return frozenset(codes)


# --- recording ---------------------------------------------------------------------


def policy_to_mapping(policy: Policy) -> dict[str, object]:
    """The policy as plain data (TOML/JSON-able) that policy_from_mapping reads back."""
    return {
        "rebuild_on": _ordered_faults(policy.rebuild_on),
        "rules": [_rule_to_mapping(rule) for rule in policy.rules],
        "max_rebuilds": policy.max_rebuilds,
        "window_s": policy.window_s,
        "backoff_initial_s": policy.backoff_initial_s,
        "backoff_max_s": policy.backoff_max_s,
        "node_lost_after_s": policy.node_lost_after_s,
        "evidence_window_s": policy.evidence_window_s,
    }


def _rule_to_mapping(rule: Rule) -> dict[str, object]:
    data: dict[str, object] = {"action": rule.action}
    if rule.exit_codes_in is not None:
        data["exit_codes"] = {"in": sorted(rule.exit_codes_in)}
    elif rule.exit_codes_not_in is not None:
        data["exit_codes"] = {"not_in": sorted(rule.exit_codes_not_in)}
    if rule.faults is not None:
        data["faults"] = _ordered_faults(rule.faults)
    return data


def _ordered_faults(faults: frozenset[Fault]) -> list[str]:
    known: list[str] = [f for f in FAULT_TYPES if f in faults]
    return known + sorted(faults - set(FAULT_TYPES))  # a Policy built by hand may hold others
