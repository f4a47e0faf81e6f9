"""docker-compose.yml cannot run here (no Docker engine), so its shape is checked instead."""

from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def test_compose_defines_logical_postgres_and_kraft_kafka() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]

    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    command = postgres["command"]
    assert "wal_level=logical" in command
    assert command[command.index("wal_level=logical") - 1] == "-c"

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    # KRaft: the node is its own controller, with a controller quorum and no ZooKeeper.
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in env
    assert not any("ZOOKEEPER" in key for key in env)
    for name in services.values():
        assert "healthcheck" in name
