"""docker-compose.yml cannot run here (no Docker engine), so its shape is checked instead."""

import os
from pathlib import Path
from unittest import mock

import yaml

from cdc.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_defines_logical_postgres_and_kraft_kafka() -> None:
    all_services = services()

    postgres = all_services["postgres"]
    assert postgres["image"].startswith("postgres:")
    command = postgres["command"]
    assert "wal_level=logical" in command
    assert command[command.index("wal_level=logical") - 1] == "-c"

    kafka = all_services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    # KRaft: the node is its own controller, with a controller quorum and no ZooKeeper.
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in env
    assert not any("ZOOKEEPER" in key for key in env)
    # Every service others wait for is healthy only once it answers.
    for service in all_services.values():
        for name, condition in (service.get("depends_on") or {}).items():
            assert condition == {"condition": "service_healthy"}
            assert "healthcheck" in all_services[name]


def _settings(service: dict) -> Settings:
    """The settings the `cdc` command in ``service`` reads from its environment."""
    env = {k: str(v) for k, v in service["environment"].items()}
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings(_env_file=None)


def test_compose_runs_one_capture_and_two_sinks_of_one_pipeline() -> None:
    all_services = services()
    kafka_listener = all_services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    capture = all_services["capture"]
    sinks = [all_services["sink-1"], all_services["sink-2"]]

    assert capture["command"] == ["cdc", "capture"]
    assert all(s["command"] == ["cdc", "sink"] for s in sinks)
    for service in [capture, *sinks]:
        assert service["build"] == "." and (ROOT / "Dockerfile").exists()
        assert set(service["depends_on"]) == {"postgres", "kafka"}
        assert service["restart"] == "on-failure"  # exit 75 (transient) is retried

    captured = _settings(capture)
    assert captured.source_dsn().startswith("postgresql://")
    assert "@postgres:5432/" in captured.source_dsn()  # the compose service, not localhost
    bootstrap = captured.kafka_bootstrap()
    assert f"PLAINTEXT://{bootstrap}" in kafka_listener  # the listener other containers use

    sunk = [_settings(s) for s in sinks]
    # Same pipeline, same topics, one group sharing the partitions, one lake.
    assert {s.topic_prefix for s in sunk} == {captured.topic_prefix}
    assert {s.name for s in sunk} == {captured.name}
    assert {s.kafka_bootstrap() for s in sunk} == {bootstrap}
    assert len({s.kafka_group for s in sunk}) == 1
    lake = sunk[0].lake.path
    assert all(s.lake.path == lake for s in sunk)
    for sink in sinks:
        volume, _, mount = sink["volumes"][0].partition(":")
        assert mount == lake and volume in yaml.safe_load(COMPOSE.read_text())["volumes"]


def test_dockerfile_installs_the_package_without_local_state() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install" in dockerfile
    for package in ("cdc", "sinks", "catalog", "transforms", "jobs"):
        assert f"COPY {package} " in dockerfile
    assert "COPY . " not in dockerfile  # a developer's .venv or lake would be copied
