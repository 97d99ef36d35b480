"""The Docker engine and the test image work at all, seen through the bare SDK.

If these fail, every Docker-backed test after them is about the environment, not
about gpuwarden.
"""

from __future__ import annotations

import docker
import pytest

from tests.fixtures.docker import DockerJanitor

pytestmark = pytest.mark.docker


@pytest.mark.parametrize("code", [0, 3])
def test_container_exit_code_reaches_inspect(
    docker_client: docker.DockerClient, test_image: str, docker_janitor: DockerJanitor, code: int
) -> None:
    container = docker_client.containers.run(
        test_image,
        ["sh", "-c", f"exit {code}"],
        detach=True,
        network_mode="none",
        labels=docker_janitor.labels,
    )
    result = container.wait(timeout=20)
    container.reload()
    assert result["StatusCode"] == code
    assert container.attrs["State"]["ExitCode"] == code
    assert container.attrs["HostConfig"]["NetworkMode"] == "none"


def test_janitor_removes_what_it_labelled(
    docker_client: docker.DockerClient, test_image: str, docker_janitor: DockerJanitor
) -> None:
    docker_client.containers.create(test_image, ["true"], labels=docker_janitor.labels)
    assert docker_janitor.cleanup() == 1
    left = docker_client.containers.list(
        all=True, filters={"label": f"gpuwarden.test={docker_janitor.token}"}
    )
    assert left == []
