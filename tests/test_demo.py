"""`gpuwarden demo`: the README's main-job command tells its story and says what it skipped."""

from __future__ import annotations

import pytest
from docker import DockerClient
from gpuwarden.engine.cli import main


def test_demo_plays_the_drills_and_explains(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for title in ("a preemption is rebuilt", "a user error fails at once", "fails over"):
        assert title in out
    assert out.count("-> as expected") == 4
    assert "rebuild.decided    finetune" in out
    assert "GPU node-a/0 quarantined (gpu_hardware" in out
    assert "task finetune 'finetune': running" in out
    assert "decision: fail (not_target_fault; fault user_error)" in out
    assert "Real container part skipped: no Docker engine is reachable" in out


@pytest.mark.docker
def test_demo_kills_and_rebuilds_a_real_container(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    docker_client: DockerClient,
    test_image: str,
) -> None:
    monkeypatch.setenv("GPUWARDEN_DEMO_IMAGE", test_image)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "killing it with SIGKILL" in out
    assert "classified preempted" in out
    assert "rebuilt in a new container" in out
    assert "skipped" not in out
