"""Shared fixtures: the broker (session-wide) and a tiny saved model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from tests.kit import (
    TEST_BROKER_CONFIG,
    Topics,
    broker_choice,
    kafka_settings,
    save_tiny_model,
)
from worker.producer import RatingProducer


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """bootstrap_servers of the broker chosen by REFOLD_TEST_BROKER."""
    choice = broker_choice()
    if choice == "tansu":
        from worker.brokers.tansu import TansuBroker

        with TansuBroker() as b:
            yield b.bootstrap_servers
    elif choice == "apache":
        from worker.brokers.apache import ApacheKafkaBroker

        with ApacheKafkaBroker(
            data_dir=tmp_path_factory.mktemp("kafka"), extra_config=TEST_BROKER_CONFIG
        ) as b:
            yield b.bootstrap_servers
    else:
        yield choice


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def topics() -> Topics:
    """Fresh topic names (and group) for one test, so tests can share the broker."""
    return Topics()


@pytest.fixture
def producer(broker: str, topics: Topics) -> Iterator[RatingProducer]:
    p = RatingProducer(kafka=kafka_settings(broker), topics=topics.settings)
    yield p
    p.close()
