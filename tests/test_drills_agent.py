"""The drills run the real node `Agent`: break one of its rules and a drill fails.

The simulated cluster has no copy of the agent's rules (adapters/sim_runtime.py holds
none), so a drill proves the code that runs on a GPU host, not a stand-in for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gpuwarden.adapters.agent import Agent
from gpuwarden.adapters.scenario_file import load_scenario
from gpuwarden.adapters.scenario_runner import run_scenario

LIBRARY = Path(__file__).parent.parent / "scenarios"


async def test_a_drill_fails_when_the_agents_run_rule_is_broken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run rule: a run starts a container unless the log says it must not. Broken
    here to refuse every run, drill 01 (an exit 0 completes its task) fails."""
    drill = load_scenario(LIBRARY / "01-exit-zero-completes.toml")
    assert (await run_scenario(drill)).passed

    async def refuse_all(self: Agent, task_id: str, attempt: int) -> str:
        return "broken on purpose"

    monkeypatch.setattr(Agent, "_refusal", refuse_all)
    result = await run_scenario(drill)
    assert not result.passed
    failed = [e for e in result.records if getattr(e.event, "error", None)]
    assert any("not started: broken on purpose" in e.event.error for e in failed)  # type: ignore[union-attr]
