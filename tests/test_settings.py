"""The settings object: sections read from RECSYS_<SECTION>_<FIELD>, copies, and the
environment that hands the same settings to a child process."""
import pytest

from recsys.settings import Settings


def test_sections_read_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RECSYS_KAFKA_EVENTS_TOPIC", "t1")
    monkeypatch.setenv("RECSYS_RETRAINING_CRON", "0 3 * * *")
    monkeypatch.setenv("RECSYS_TRAINING_WORKERS", "3")
    monkeypatch.setenv("RECSYS_ARCHIVE_DIR", str(tmp_path / "a"))
    s = Settings()
    assert (s.kafka.events_topic, s.retraining.cron, s.training.workers) == ("t1", "0 3 * * *", 3)
    assert s.archive_dir == tmp_path / "a" and s.kafka.bootstrap == "127.0.0.1:29092"


def test_updated_changes_only_what_it_names_and_validates():
    s = Settings()
    u = s.updated(kafka={"events_topic": "t2"}, home="rel")
    assert u.kafka.events_topic == "t2" and u.kafka.dlq_topic == s.kafka.dlq_topic
    assert u.home.is_absolute() and s.kafka.events_topic != "t2"
    with pytest.raises(TypeError, match="no field 'kafka_bootstrap'"):
        s.updated(kafka_bootstrap="x")
    with pytest.raises(ValueError):
        s.updated(redis={"port": "not a port"})


def test_the_environment_round_trips(monkeypatch):
    s = Settings().updated(kafka={"events_topic": "t3"}, retraining={"cron": "*/5 * * * *"}, training={"epochs": 2})
    env = s.environment()
    assert env["RECSYS_TRAINING_EPOCHS"] == "2" and Settings().environment()["RECSYS_TRAINING_EPOCHS"] is None
    for key, value in env.items():
        if value is not None:
            monkeypatch.setenv(key, value)
    assert Settings() == s


def test_kafka_clients_use_tls_and_sasl_only_where_the_settings_ask(monkeypatch, tmp_path):
    """recsys.kafka_io.connection: plaintext by default (the local stack); SASL_SSL with SCRAM as
    deploy/k8s sets it, the password from the secret kafka-password; a missing part is a clear error."""
    from recsys.errors import InvalidInput
    from recsys.kafka_io import connection
    from recsys.settings import Settings
    monkeypatch.delenv("RECSYS_SECRET_KAFKA_PASSWORD", raising=False)
    plain = Settings(secrets_dir=tmp_path)
    assert connection(plain) == {"bootstrap_servers": plain.kafka.servers}
    s = plain.updated(kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                             "sasl_username": "recsys-api", "ssl_cafile": "/etc/recsys/secrets/kafka-ca.crt"})
    with pytest.raises(InvalidInput, match="kafka-password"):
        connection(s)
    (tmp_path / "kafka-password").write_text("s3cret\n")
    assert connection(s) == {"bootstrap_servers": s.kafka.servers, "security_protocol": "SASL_SSL",
                             "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "recsys-api",
                             "sasl_plain_password": "s3cret", "ssl_cafile": "/etc/recsys/secrets/kafka-ca.crt"}
    with pytest.raises(InvalidInput, match="RECSYS_KAFKA_SASL_USERNAME"):
        connection(s.updated(kafka={"sasl_username": None}))
