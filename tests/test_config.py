"""The processes' settings: the command line's defaults, refused values, data-dir credentials."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from gpuwarden.adapters import auth
from gpuwarden.engine.cli import build_parser, main
from gpuwarden.engine.cli.agent import _local_node_creds
from gpuwarden.engine.cli.config import (
    AgentConfig,
    ConfigError,
    ConnectionConfig,
    EngineConfig,
    UpConfig,
)
from gpuwarden.engine.cli.serve import _local_engine_creds
from gpuwarden.engine.core.errors import PolicyError
from gpuwarden.engine.core.policy import DEFAULT_POLICY


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUWARDEN_NATS_URL", raising=False)
    monkeypatch.delenv("GPUWARDEN_DATA_DIR", raising=False)


def test_the_configs_defaults_are_the_command_lines() -> None:
    assert EngineConfig.from_args(build_parser().parse_args(["engine"])) == EngineConfig()
    assert UpConfig.from_args(build_parser().parse_args(["up"])) == UpConfig()
    agent = AgentConfig.from_args(build_parser().parse_args(["agent", "--node", "n1"]))
    assert agent == AgentConfig(node="n1")


def test_options_reach_the_configs(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text("[policy]\nnode_lost_after_s = 7\n")
    args = build_parser().parse_args(
        [
            *("--nats", "nats://a", "--creds", "c.creds", "engine", "--tls-ca", "ca.pem"),
            *("--policy", str(policy), "--replicas", "3", "--no-api", "--api-creds", "api.creds"),
            *("--env-key", "env.key", "--metrics-port", "0", "--data-dir", str(tmp_path)),
        ]
    )
    config = EngineConfig.from_args(args)
    assert config.connection == ConnectionConfig(
        nats="nats://a", creds="c.creds", tls_ca="ca.pem", data_dir=tmp_path
    )
    assert config.policy.node_lost_after_s == 7 and config.policy != DEFAULT_POLICY
    assert (config.replicas, config.serve_api, config.api_creds) == (3, False, "api.creds")
    assert (config.env_key, config.metrics_port) == (Path("env.key"), 0)

    up = UpConfig.from_args(
        build_parser().parse_args(["up", "--insecure", "--node", "box", "--runtime", "sim"])
    )
    assert up.engine.connection.insecure and (up.node, up.runtime) == ("box", "sim")
    agent = AgentConfig.from_args(
        build_parser().parse_args(
            ["agent", "--node", "n2", "--runtime", "sim", "--gpus", "4", "--heartbeat-s", "0.2"]
        )
    )
    assert (agent.runtime, agent.gpus, agent.heartbeat_s) == ("sim", 4, 0.2)


def test_up_gives_its_local_agent_its_node_and_the_agents_defaults() -> None:
    up = UpConfig(node="box", gpus=3, gpu_model="H100", gpu_memory_mb=80_000, network="bridge")
    connection = up.engine.connection.at("nats://127.0.0.1:4222", "box.creds")
    agent = up.agent("sim", connection)
    assert agent == AgentConfig(
        node="box",
        connection=ConnectionConfig(nats="nats://127.0.0.1:4222", creds="box.creds"),
        runtime="sim",
        gpus=3,
        gpu_model="H100",
        gpu_memory_mb=80_000,
        network="bridge",
    )
    assert (agent.heartbeat_s, agent.stop_timeout_s) == (1.0, 10.0)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["engine", "--replicas", "0"], "--replicas"),
        (["engine", "--metrics-port", "70000"], "--metrics-port"),
        (["up", "--gpus", "-1"], "--gpus"),
        (["up", "--node", ""], "--node"),
        (["agent", "--node", "n", "--heartbeat-s", "0"], "--heartbeat-s"),
        (["agent", "--node", "n", "--stop-timeout-s", "-1"], "--stop-timeout-s"),
        (["agent", "--node", "n", "--gpu-memory-mb", "-5"], "--gpu-memory-mb"),
    ],
)
def test_a_value_that_cannot_work_is_refused_by_name(argv: list[str], named: str) -> None:
    args = build_parser().parse_args(argv)
    makers: dict[str, Callable[[argparse.Namespace], object]] = {
        "engine": EngineConfig.from_args,
        "up": UpConfig.from_args,
        "agent": AgentConfig.from_args,
    }
    with pytest.raises(ConfigError, match=named):
        makers[argv[0]](args)


def test_a_policy_file_that_is_not_there_is_named(tmp_path: Path) -> None:
    args = build_parser().parse_args(["engine", "--policy", str(tmp_path / "nope.toml")])
    with pytest.raises(PolicyError, match=r"nope\.toml: cannot read policy file"):
        EngineConfig.from_args(args)


def test_the_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineConfig().replicas = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        AgentConfig(node="n").connection.creds = "x"  # type: ignore[misc]


def test_the_agent_command_refuses_a_bad_option_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["agent", "--node", "n", "--gpus", "-1"]) == 2
    assert capsys.readouterr().err == "gpuwarden: error: --gpus must be >= 0, not -1\n"


def test_in_a_data_directory_up_made_each_process_acts_as_its_principal(tmp_path: Path) -> None:
    auth.prepare_local(tmp_path, "box")
    made = auth.local_auth_dir(tmp_path)
    engine = _local_engine_creds(EngineConfig(connection=ConnectionConfig(data_dir=tmp_path)))
    assert engine.connection.creds == str(made / "engine.creds")
    assert engine.api_creds == str(made / "api.creds")
    assert engine.env_key == made / auth.ENV_KEY
    given = EngineConfig(connection=ConnectionConfig(data_dir=tmp_path), api_creds="mine.creds")
    assert _local_engine_creds(given).api_creds == "mine.creds"
    node = AgentConfig(node="box", connection=ConnectionConfig(data_dir=tmp_path))
    principal = auth.node_principal("box").name
    assert _local_node_creds(node).connection.creds == str(made / f"{principal}.creds")
    # --nats or --creds: the operator said who to be; nothing is picked.
    at_server = ConnectionConfig(data_dir=tmp_path, nats="nats://x")
    assert _local_engine_creds(EngineConfig(connection=at_server)).connection.creds is None
    node = AgentConfig(node="box", connection=at_server)
    assert _local_node_creds(node).connection.creds is None
