"""Rebuild policy: rules, fallback, budgets, backoff, and parse errors that name file and key."""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from gpuwarden.engine.core.errors import PolicyError
from gpuwarden.engine.core.events import FAULT_TYPES
from gpuwarden.engine.core.policy import (
    ACTIONS,
    DEFAULT_POLICY,
    FAILURE_FAULTS,
    Policy,
    Rule,
    Verdict,
    judge,
    parse_policy,
    policy_from_mapping,
    policy_to_mapping,
)
from hypothesis import given
from hypothesis import strategies as st

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def verdict(policy: Policy, fault: str, code: int | None, history: int = 0) -> Verdict:
    """Judge with `history` counted rebuilds, one a second, all recent."""
    return judge(policy, fault, code, [ago(i + 1) for i in range(history)], NOW)


# --- completion and fallback ------------------------------------------------------------------


def test_completed_is_never_judged_even_by_a_catch_all_fail_rule() -> None:
    policy = Policy(rules=(Rule("fail"),), max_rebuilds=0)
    assert verdict(policy, "completed", 0) == Verdict("complete")


@pytest.mark.parametrize("fault", ["gpu_hardware", "node_lost", "runtime_error", "preempted"])
def test_default_target_faults_rebuild_counted(fault: str) -> None:
    assert verdict(DEFAULT_POLICY, fault, 1) == Verdict("rebuild", counted=True, backoff_s=10.0)


@pytest.mark.parametrize(
    "fault", ["user_error", "image_error", "container_oom", "gpu_app_error", "unknown"]
)
def test_other_faults_fail_as_not_target(fault: str) -> None:
    assert verdict(DEFAULT_POLICY, fault, 1) == Verdict("fail", reason="not_target_fault")


def test_rebuild_on_is_configurable() -> None:
    policy = Policy(rebuild_on=frozenset({"user_error"}))
    assert verdict(policy, "user_error", 1).action == "rebuild"
    assert verdict(policy, "gpu_hardware", 1).reason == "not_target_fault"


# --- rules ------------------------------------------------------------------------------------


def test_fail_rule() -> None:
    policy = Policy(rules=(Rule("fail", exit_codes_in=frozenset({42})),))
    assert verdict(policy, "user_error", 42) == Verdict("fail", reason="policy_rule", rule=0)
    # an exit_codes rule matches whatever the fault: a node-lost task that exited 42
    assert verdict(policy, "node_lost", 42) == Verdict("fail", reason="policy_rule", rule=0)
    assert verdict(policy, "user_error", 43).reason == "not_target_fault"


def test_rebuild_rule_counts_and_turns_a_non_target_fault_into_a_rebuild() -> None:
    policy = Policy(rules=(Rule("rebuild", faults=frozenset({"container_oom"})),))
    assert verdict(policy, "container_oom", 137) == Verdict(
        "rebuild", counted=True, rule=0, backoff_s=10.0
    )


def test_rebuild_uncounted_rule_ignores_the_budget() -> None:
    policy = Policy(rules=(Rule("rebuild_uncounted", faults=frozenset({"preempted"})),))
    assert verdict(policy, "preempted", 143, history=3) == Verdict(
        "rebuild", counted=False, rule=0, backoff_s=10.0
    )
    # even with no budget at all
    assert verdict(replace(policy, max_rebuilds=0), "preempted", 143).action == "rebuild"


def test_exit_codes_not_in() -> None:
    policy = Policy(rules=(Rule("fail", exit_codes_not_in=frozenset({137, 143})),))
    assert verdict(policy, "user_error", 1).reason == "policy_rule"
    assert verdict(policy, "preempted", 143).counted is True  # no match -> fallback


def test_an_attempt_without_exit_code_never_matches_an_exit_codes_rule() -> None:
    in_rule = Policy(rules=(Rule("fail", exit_codes_in=frozenset({1})),))
    not_in_rule = Policy(rules=(Rule("fail", exit_codes_not_in=frozenset({1})),))
    for policy in (in_rule, not_in_rule):
        assert verdict(policy, "node_lost", None) == Verdict("rebuild", counted=True, backoff_s=10)
        assert verdict(policy, "image_error", None).reason == "not_target_fault"


def test_combined_conditions_all_have_to_hold() -> None:
    rule = Rule("fail", exit_codes_in=frozenset({137}), faults=frozenset({"preempted"}))
    policy = Policy(rules=(rule,))
    assert verdict(policy, "preempted", 137).reason == "policy_rule"
    assert verdict(policy, "preempted", 143).action == "rebuild"  # code differs
    assert verdict(policy, "container_oom", 137).reason == "not_target_fault"  # fault differs


def test_a_rule_without_conditions_matches_every_failure() -> None:
    policy = Policy(rules=(Rule("rebuild_uncounted"),))
    for fault in FAILURE_FAULTS:
        assert verdict(policy, fault, None) == Verdict("rebuild", rule=0, backoff_s=10.0)


def test_first_matching_rule_decides() -> None:
    policy = Policy(
        rules=(
            Rule("fail", exit_codes_in=frozenset({3})),
            Rule("rebuild_uncounted", faults=frozenset({"user_error"})),
            Rule("fail"),
        )
    )
    assert verdict(policy, "user_error", 3).rule == 0
    assert verdict(policy, "user_error", 4) == Verdict("rebuild", rule=1, backoff_s=10.0)
    assert verdict(policy, "gpu_hardware", 4) == Verdict("fail", reason="policy_rule", rule=2)


# --- budgets and backoff ----------------------------------------------------------------------


def test_budget_zero_allows_no_rebuild() -> None:
    policy = Policy(max_rebuilds=0)
    assert verdict(policy, "gpu_hardware", 1) == Verdict("fail", reason="budget_exhausted")


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_budget_n_allows_exactly_n(n: int) -> None:
    policy = Policy(max_rebuilds=n, backoff_max_s=1e9)
    for used in range(n):
        assert verdict(policy, "node_lost", None, history=used).action == "rebuild"
    assert verdict(policy, "node_lost", None, history=n) == Verdict(
        "fail", reason="budget_exhausted"
    )


def test_budget_minus_one_is_unlimited() -> None:
    assert verdict(Policy(max_rebuilds=-1), "preempted", 143, history=500).action == "rebuild"


def test_budget_exhausted_by_a_rebuild_rule_names_the_rule() -> None:
    policy = Policy(rules=(Rule("fail", exit_codes_in=frozenset({1})), Rule("rebuild")))
    assert verdict(replace(policy, max_rebuilds=1), "user_error", 2, history=1) == Verdict(
        "fail", reason="budget_exhausted", rule=1
    )


def test_the_window_slides() -> None:
    policy = Policy(max_rebuilds=2, window_s=60.0)
    old = [ago(120), ago(61), ago(60)]  # exactly window_s ago is outside the window
    assert judge(policy, "gpu_hardware", 1, old, NOW) == Verdict(
        "rebuild", counted=True, backoff_s=10.0
    )
    recent = [ago(120), ago(59), ago(1)]
    assert judge(policy, "gpu_hardware", 1, recent, NOW).reason == "budget_exhausted"
    # a minute on, the same history has left the window
    later = NOW + timedelta(seconds=60)
    assert judge(policy, "gpu_hardware", 1, recent, later).action == "rebuild"


def test_backoff_doubles_with_each_counted_rebuild_in_the_window_and_is_capped() -> None:
    policy = Policy(max_rebuilds=-1, backoff_initial_s=10.0, backoff_max_s=300.0)
    delays = [verdict(policy, "preempted", 143, history=k).backoff_s for k in range(8)]
    assert delays == [10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]


def test_backoff_restarts_once_old_rebuilds_leave_the_window() -> None:
    policy = Policy(window_s=100.0)
    assert judge(policy, "node_lost", None, [ago(200), ago(150)], NOW).backoff_s == 10.0
    assert judge(policy, "node_lost", None, [ago(200), ago(50)], NOW).backoff_s == 20.0


def test_backoff_survives_huge_histories() -> None:
    policy = Policy(max_rebuilds=-1)
    assert verdict(policy, "preempted", 143, history=5000).backoff_s == 300.0


def test_zero_backoff() -> None:
    policy = Policy(backoff_initial_s=0.0, backoff_max_s=0.0)
    assert verdict(policy, "preempted", 143, history=2).backoff_s == 0.0


def test_uncounted_rebuilds_wait_the_initial_backoff_and_do_not_escalate() -> None:
    policy = Policy(rules=(Rule("rebuild_uncounted"),), backoff_initial_s=7.0)
    assert verdict(policy, "preempted", 143, history=2).backoff_s == 7.0


@given(
    max_rebuilds=st.integers(-1, 6),
    times_ms=st.lists(st.integers(0, 10_000_000), max_size=12),
    window_ms=st.integers(1_000, 5_000_000),
)
def test_a_counted_rebuild_is_granted_only_within_budget(
    max_rebuilds: int, times_ms: list[int], window_ms: int
) -> None:
    # whole milliseconds: datetimes hold microseconds, so the expectation is exact
    policy = Policy(max_rebuilds=max_rebuilds, window_s=window_ms / 1000)
    got = judge(policy, "gpu_hardware", 1, [ago(t / 1000) for t in times_ms], NOW)
    recent = sum(1 for t in times_ms if t < window_ms)
    if max_rebuilds == -1 or recent < max_rebuilds:
        assert got.action == "rebuild" and got.counted
        assert policy.backoff_initial_s <= got.backoff_s <= policy.backoff_max_s
    else:
        assert got == Verdict("fail", reason="budget_exhausted")


# --- parsing ----------------------------------------------------------------------------------

FULL = """
[policy]
rebuild_on = ["gpu_hardware", "node_lost"]
max_rebuilds = 5
window_s = 600
backoff_initial_s = 2.5
backoff_max_s = 60
node_lost_after_s = 5
evidence_window_s = 0.5

[[policy.rules]]
action = "fail"
exit_codes = { in = [42, 43] }
faults = ["user_error"]

[[policy.rules]]
action = "rebuild_uncounted"
faults = ["preempted"]

[[policy.rules]]
action = "rebuild"
exit_codes = { not_in = [1] }
"""


def test_parse_a_full_policy_file() -> None:
    policy = parse_policy(FULL, "p.toml")
    assert policy == Policy(
        rebuild_on=frozenset({"gpu_hardware", "node_lost"}),
        rules=(
            Rule("fail", exit_codes_in=frozenset({42, 43}), faults=frozenset({"user_error"})),
            Rule("rebuild_uncounted", faults=frozenset({"preempted"})),
            Rule("rebuild", exit_codes_not_in=frozenset({1})),
        ),
        max_rebuilds=5,
        window_s=600.0,
        backoff_initial_s=2.5,
        backoff_max_s=60.0,
        node_lost_after_s=5.0,
        evidence_window_s=0.5,
    )


def test_top_level_keys_work_as_well_as_a_policy_table() -> None:
    text = 'max_rebuilds = 1\n[[rules]]\naction = "fail"\n'
    assert parse_policy(text, "p.toml") == Policy(max_rebuilds=1, rules=(Rule("fail"),))


def test_an_empty_file_is_the_default_policy() -> None:
    assert parse_policy("", "p.toml") == DEFAULT_POLICY
    assert policy_from_mapping({}, "s.toml") == DEFAULT_POLICY


def test_the_scenario_table_from_scenarios_md_parses() -> None:
    text = """
[policy]
rebuild_on = ["gpu_hardware", "node_lost", "runtime_error", "preempted"]
max_rebuilds = 3
window_s = 3600
backoff_initial_s = 10
backoff_max_s = 300
node_lost_after_s = 5

[[policy.rules]]
action = "fail"
exit_codes = { in = [42] }
faults = ["user_error"]
"""
    table = tomllib.loads(text)["policy"]
    policy = policy_from_mapping(table, "drill.toml")
    assert policy.node_lost_after_s == 5.0
    assert policy.rules == (
        Rule("fail", exit_codes_in=frozenset({42}), faults=frozenset({"user_error"})),
    )


BAD: list[tuple[str, str, str]] = [
    ("bogus = 1", "bogus", "unknown key"),
    ("[policy]\nmax_rebuild = 1", "policy.max_rebuild", "unknown key"),
    ("[policy]\nmax_rebuilds = 'three'", "policy.max_rebuilds", "expected an integer"),
    ("[policy]\nmax_rebuilds = 2.5", "policy.max_rebuilds", "expected an integer"),
    ("[policy]\nmax_rebuilds = true", "policy.max_rebuilds", "expected an integer"),
    ("[policy]\nmax_rebuilds = -2", "policy.max_rebuilds", "-1"),
    ("[policy]\nwindow_s = -1", "policy.window_s", "> 0"),
    ("[policy]\nwindow_s = 0", "policy.window_s", "> 0"),
    ("[policy]\nwindow_s = inf", "policy.window_s", "finite"),
    ("[policy]\nwindow_s = nan", "policy.window_s", "finite"),
    ("[policy]\nwindow_s = '1h'", "policy.window_s", "number of seconds"),
    ("[policy]\nbackoff_initial_s = -1", "policy.backoff_initial_s", "negative"),
    ("[policy]\nnode_lost_after_s = 0", "policy.node_lost_after_s", "> 0"),
    ("[policy]\nevidence_window_s = -0.5", "policy.evidence_window_s", "negative"),
    ("[policy]\nbackoff_initial_s = 60\nbackoff_max_s = 30", "policy.backoff_max_s", ">= backoff"),
    ("[policy]\nrebuild_on = 'gpu_hardware'", "policy.rebuild_on", "expected a list"),
    (
        "[policy]\nrebuild_on = ['gpu_hardware', 'gpu_broken']",
        "policy.rebuild_on[1]",
        "unknown fault type 'gpu_broken'",
    ),
    ("[policy]\nrebuild_on = ['completed']", "policy.rebuild_on[0]", "not a failure"),
    ("[policy]\nrebuild_on = [3]", "policy.rebuild_on[0]", "fault type name"),
    ("[policy]\nrules = 'fail'", "policy.rules", "expected a list"),
    ("[policy]\nrules = ['fail']", "policy.rules[0]", "expected a table"),
    ("[[policy.rules]]\nfaults = ['user_error']", "policy.rules[0].action", "missing"),
    (
        "[[policy.rules]]\naction = 'fail'\n[[policy.rules]]\naction = 'retry'",
        "policy.rules[1].action",
        "unknown action",
    ),
    ("[[policy.rules]]\naction = 'fail'\nwhen = 'always'", "policy.rules[0].when", "unknown key"),
    (
        "[[policy.rules]]\naction = 'fail'\n[[policy.rules]]\naction = 'fail'\n"
        "[[policy.rules]]\naction = 'fail'\nexit_codes = { in = [1], not_in = [2] }",
        "policy.rules[2].exit_codes",
        "exactly one",
    ),
    (
        "[[policy.rules]]\naction = 'fail'\nexit_codes = {}",
        "policy.rules[0].exit_codes",
        "exactly one",
    ),
    (
        "[[policy.rules]]\naction = 'fail'\nexit_codes = [1]",
        "policy.rules[0].exit_codes",
        "expected a table",
    ),
    (
        "[[policy.rules]]\naction = 'fail'\nexit_codes = { is = [1] }",
        "policy.rules[0].exit_codes.is",
        "unknown key",
    ),
    (
        "[[policy.rules]]\naction = 'fail'\nexit_codes = { in = [] }",
        "policy.rules[0].exit_codes.in",
        "must not be empty",
    ),
    (
        "[[policy.rules]]\naction = 'fail'\nexit_codes = { in = [1, 'x'] }",
        "policy.rules[0].exit_codes.in[1]",
        "expected an integer",
    ),
    (
        "[[policy.rules]]\naction = 'fail'\nexit_codes = { in = [256] }",
        "policy.rules[0].exit_codes.in[0]",
        "0..255",
    ),
    (
        "[[policy.rules]]\naction = 'fail'\nexit_codes = { in = [0] }",
        "policy.rules[0].exit_codes.in[0]",
        "completion",
    ),
    (
        "[[policy.rules]]\naction = 'fail'\nfaults = []",
        "policy.rules[0].faults",
        "must not be empty",
    ),
    (
        "[[policy.rules]]\naction = 'fail'\nfaults = ['oom']",
        "policy.rules[0].faults[0]",
        "unknown fault type",
    ),
    ("[policy]\nmax_rebuilds = 1\n[other]\nx = 1", "other", "beside the [policy] table"),
]


@pytest.mark.parametrize(("text", "path", "problem"), BAD, ids=[b[1] for b in BAD])
def test_parse_errors_name_the_file_the_key_and_the_problem(
    text: str, path: str, problem: str
) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "conf/policy.toml")
    message = str(info.value)
    assert message.startswith(f"conf/policy.toml: {path}: "), message
    assert problem in message


def test_invalid_toml_names_the_file() -> None:
    with pytest.raises(PolicyError, match=re.escape("bad.toml: not valid TOML")):
        parse_policy("max_rebuilds = ", "bad.toml")


def test_a_scenario_policy_table_error_names_the_scenario_file() -> None:
    with pytest.raises(PolicyError, match=re.escape("s.toml: policy.rules[0].action: ")):
        policy_from_mapping({"rules": [{"action": "reboot"}]}, "s.toml")
    with pytest.raises(PolicyError, match=re.escape("s.toml: policy: expected a table")):
        policy_from_mapping("fail", "s.toml")  # type: ignore[arg-type]


def test_not_in_may_list_exit_0() -> None:
    text = "[[rules]]\naction = 'fail'\nexit_codes = { not_in = [0, 137] }"
    assert parse_policy(text, "p.toml").rules[0].exit_codes_not_in == frozenset({0, 137})


# --- round trip -------------------------------------------------------------------------------

fault_sets = st.frozensets(st.sampled_from(FAILURE_FAULTS))
code_sets = st.frozensets(st.integers(1, 255), min_size=1)
rules = st.builds(
    lambda action, which, codes, faults: Rule(
        action,
        codes if which == "in" else None,
        codes if which == "not_in" else None,
        faults or None,
    ),
    st.sampled_from(ACTIONS),
    st.sampled_from(["in", "not_in", "none"]),
    code_sets,
    fault_sets,
)
seconds = st.floats(0, 1e6, allow_nan=False)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    initial = draw(seconds)
    return Policy(
        rebuild_on=draw(fault_sets),
        rules=tuple(draw(st.lists(rules, max_size=5))),
        max_rebuilds=draw(st.integers(-1, 100)),
        window_s=draw(st.floats(0.001, 1e7, allow_nan=False)),
        backoff_initial_s=initial,
        backoff_max_s=initial + draw(seconds),
        node_lost_after_s=draw(st.floats(0.001, 1e4, allow_nan=False)),
        evidence_window_s=draw(st.floats(0, 60, allow_nan=False)),
    )


@given(policies())
def test_policy_to_mapping_round_trips(policy: Policy) -> None:
    assert policy_from_mapping(policy_to_mapping(policy), "log") == policy


def test_the_default_policy_mapping_is_what_scenarios_md_documents() -> None:
    data = policy_to_mapping(DEFAULT_POLICY)
    assert data["rebuild_on"] == ["gpu_hardware", "node_lost", "runtime_error", "preempted"]
    assert (data["max_rebuilds"], data["window_s"]) == (3, 3600.0)
    assert (data["backoff_initial_s"], data["backoff_max_s"]) == (10.0, 300.0)
    assert data["rules"] == []
    assert set(FAILURE_FAULTS) == set(FAULT_TYPES) - {"completed"}
