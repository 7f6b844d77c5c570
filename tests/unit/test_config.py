"""Settings: environment names, weights from the model, Kafka security pass-through."""

from __future__ import annotations

from worker.config import KafkaSettings, TopicSettings, WorkerSettings
from worker.core.scoring import Weights


def test_worker_uses_training_weights_unless_overridden():
    manifest = {
        "data_summary": {
            "training": {
                "weights": {
                    "view": 1.5,
                    "like": 3.0,
                    "neutral": 0.25,
                    "dislike": 4.0,
                    "watch_cap": 1.0,
                    "default_duration_s": 600.0,
                }
            }
        }
    }
    assert WorkerSettings().weights(manifest).like == 3.0
    assert WorkerSettings(weight_like=5.0).weights(manifest).like == 5.0
    assert WorkerSettings(weight_like=5.0).weights(manifest).dislike == 4.0
    assert WorkerSettings().weights({}) == Weights()


def test_env_overrides(monkeypatch):
    monkeypatch.setenv("REFOLD_BOOTSTRAP_SERVERS", "10.0.0.1:9093")
    monkeypatch.setenv("REFOLD_TOPIC_RATINGS", "prod.ratings")
    monkeypatch.setenv("REFOLD_METRICS_PORT", "9999")
    assert KafkaSettings().bootstrap_servers == "10.0.0.1:9093"
    assert TopicSettings().ratings == "prod.ratings"
    assert WorkerSettings().metrics_port == 9999


def sasl_ssl(ca, **kw) -> KafkaSettings:
    """SASL over TLS with a CA file; ``kw`` overrides any setting."""
    base = {
        "bootstrap_servers": "b1:9093,b2:9093",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "refold",
        "sasl_password": "s3cret",
        "ssl_cafile": ca,
    }
    return KafkaSettings(**{**base, **kw})


def test_security_settings_reach_librdkafka(tmp_path):
    from confluent_kafka import Producer

    ca = tmp_path / "ca.pem"
    k = sasl_ssl(ca, bootstrap_servers="b1:9093, b2:9093", ssl_check_hostname=False)
    conf = k.rdkafka_config()
    assert conf["bootstrap.servers"] == "b1:9093,b2:9093"
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "refold" and conf["sasl.password"] == "s3cret"
    assert conf["ssl.ca.location"] == str(ca)
    assert conf["ssl.endpoint.identification.algorithm"] == "none"
    assert "s3cret" not in repr(k)  # secrets never print
    plain = KafkaSettings().rdkafka_config()
    assert set(plain) == {"bootstrap.servers", "security.protocol"}
    Producer(plain).flush(0)  # librdkafka accepts every property name it is given
