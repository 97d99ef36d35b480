"""Every fold over the log names every event type of the catalog: handled, or ignored
on purpose.

A type added to the catalog and forgotten by one fold would be dropped there in
silence (a read model that never shows it, a decision never taken on it). Each fold is
a dispatch table (`events.on`: mypy checks each handler takes its type) plus an
explicit set of the types it ignores; this holds every one of them to the catalog, so
adding a type fails here until each fold says what it does with it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import pytest
from gpuwarden.adapters import scenario_check
from gpuwarden.engine.core import admission, commands, decide, fold
from gpuwarden.engine.core import events as ev
from gpuwarden.projections import explain, model, timeline

# name: (the types it handles, the types it ignores on purpose)
FOLDS: dict[str, tuple[Collection[type[Any]], Collection[type[Any]]]] = {
    "supervisor evolve (engine/core/fold.py _EVOLVE)": (fold._EVOLVE, fold._EVOLVE_IGNORES),
    "supervisor timers (engine/core/fold.py _SETTLES_TIMERS)": (
        fold._SETTLES_TIMERS,
        fold._KEEPS_TIMERS,
    ),
    "supervisor decide (engine/core/decide.py _DECIDE)": (decide._DECIDE, decide._DECIDE_IGNORES),
    "commands_for (engine/core/commands.py)": (commands._COMMANDS, commands._COMMANDS_IGNORES),
    "admission checks (engine/core/admission.py _CHECKS)": (admission._CHECKS, frozenset()),
    "read model (projections/model.py)": (model.HANDLERS, model.IGNORED),
    "explain (projections/explain.py)": (explain._FEED, explain.IGNORED),
    "timeline: a GPU's rows (projections/timeline.py)": (
        timeline._GPU_ROWS,
        timeline._GPU_ROWS_IGNORES,
    ),
    "timeline: attempt outcomes (projections/timeline.py)": (
        timeline._OUTCOMES,
        timeline._OUTCOMES_IGNORES,
    ),
    "scenario observe (adapters/scenario_check.py)": (
        scenario_check._APPLY,
        scenario_check.IGNORED,
    ),
}


def _name(kind: type[Any]) -> str:
    config = getattr(kind, "__struct_config__", None)
    tag = getattr(config, "tag", None)
    return tag if isinstance(tag, str) else kind.__name__


def gaps(
    handled: Collection[type[Any]],
    ignored: Collection[type[Any]],
    catalog: Collection[type[Any]] = ev.CATALOG,
) -> list[str]:
    """What is wrong with one fold's account of the catalog (nothing: [])."""
    handled, ignored, catalog = set(handled), set(ignored), set(catalog)
    problems = [f"{_name(t)}: neither handled nor ignored" for t in catalog - handled - ignored]
    problems += [f"{_name(t)}: both handled and ignored" for t in handled & ignored]
    problems += [f"{_name(t)}: not in the catalog" for t in (handled | ignored) - catalog]
    return sorted(problems)


def check_fold(name: str, catalog: Collection[type[Any]] = ev.CATALOG) -> None:
    handled, ignored = FOLDS[name]
    problems = gaps(handled, ignored, catalog)
    assert not problems, f"{name}: " + "; ".join(problems)


@pytest.mark.parametrize("name", list(FOLDS))
def test_every_fold_handles_or_ignores_every_event_type(name: str) -> None:
    check_fold(name)


def test_the_catalog_is_every_type_that_decodes() -> None:
    assert ev.CATALOG == set(ev.Event.__args__)  # type: ignore[attr-defined]
    assert {_name(t) for t in ev.CATALOG} == set(ev.EVENT_TYPES)


class NodeDrained(ev._Base, frozen=True, tag="node.drained"):
    """A type the catalog does not have (yet): what a new one looks like to the folds."""

    node: str


@pytest.mark.parametrize("name", list(FOLDS))
def test_a_type_added_to_the_catalog_fails_every_fold_until_it_says(name: str) -> None:
    grown = ev.CATALOG | {NodeDrained}
    assert gaps(*FOLDS[name], grown) == ["node.drained: neither handled nor ignored"]
    with pytest.raises(AssertionError, match=r"node\.drained: neither handled nor ignored"):
        check_fold(name, grown)
    handled, ignored = FOLDS[name]
    assert gaps(handled, {*ignored, NodeDrained}, grown) == []  # ignored on purpose: fine


def test_the_check_reports_a_type_twice_or_from_elsewhere() -> None:
    handled, ignored = FOLDS["supervisor decide (engine/core/decide.py _DECIDE)"]
    assert gaps(handled, {*ignored, ev.TaskSubmitted}) == [
        "task.submitted: both handled and ignored"
    ]
    assert gaps({*handled, NodeDrained}, ignored) == ["node.drained: not in the catalog"]
    assert gaps(set(handled) - {ev.NodeLost}, ignored) == ["node.lost: neither handled nor ignored"]
