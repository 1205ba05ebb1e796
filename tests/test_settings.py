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


# ---- the settings file, the stack's state, and `recsys config show` ------------------------------

@pytest.fixture
def folder(monkeypatch, tmp_path):
    """A working folder of its own, with none of the caller's RECSYS_* variables."""
    import os

    from recsys.settings import get_settings
    for name in [n for n in os.environ if n.startswith("RECSYS_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_recsys_toml_is_read_under_the_environment(folder, monkeypatch):
    (folder / "recsys.toml").write_text('home = "state"\n[kafka]\nevents_topic = "from-file"\n'
                                        '[training]\nworkers = 4\nepochs = 7\n')
    monkeypatch.setenv("RECSYS_TRAINING_WORKERS", "3")
    s = Settings()
    assert (s.home, s.kafka.events_topic, s.training.workers, s.training.epochs) == (folder / "state", "from-file", 3, 7)
    assert s.kafka.dlq_topic == "user-events.dlq"  # the rest of the section keeps its defaults


def test_recsys_config_names_the_file(folder, monkeypatch):
    from recsys.errors import InvalidInput
    elsewhere = folder / "etc" / "prod.toml"
    elsewhere.parent.mkdir()
    elsewhere.write_text("[redis]\nport = 16379\n")
    (folder / "recsys.toml").write_text("[redis]\nport = 1\n")  # not read: RECSYS_CONFIG names another
    monkeypatch.setenv("RECSYS_CONFIG", str(elsewhere))
    assert Settings().redis.port == 16379
    monkeypatch.setenv("RECSYS_CONFIG", str(folder / "missing.toml"))
    with pytest.raises(InvalidInput, match="RECSYS_CONFIG=.*missing.toml: no such file"):
        Settings()


@pytest.mark.parametrize("text, error", [
    ("colour = 'blue'\n", "unknown key 'colour': no such setting"),
    ("[kafka]\nbrokerz = 3\n", "unknown key 'kafka.brokerz': no such setting"),
    ("[kafka\n", "recsys.toml: "),  # not TOML
])
def test_a_bad_settings_file_is_an_error_naming_the_file_and_key(folder, text, error):
    from recsys.errors import InvalidInput
    (folder / "recsys.toml").write_text(text)
    with pytest.raises(InvalidInput, match=f"settings file {folder / 'recsys.toml'}") as bad:
        Settings()
    assert error in str(bad.value) and bad.value.exit_code == 2


def test_the_stack_is_remembered_below_the_file_and_the_environment(folder, monkeypatch):
    from recsys.settings import forget_stack, read_stack_state, remember_stack
    started = Settings().updated(kafka={"brokers": 3}, redis={"cluster_masters": 3})
    remember_stack(started, monitoring=True)
    s = Settings()
    assert (s.kafka.brokers, s.redis.cluster_masters) == (3, 3)
    remember_stack(s, monitoring=False)  # e.g. `serve up`: monitoring stays remembered
    assert read_stack_state(s.home)["monitoring"] is True
    (folder / "recsys.toml").write_text("[redis]\ncluster_masters = 0\n")
    monkeypatch.setenv("RECSYS_KAFKA_BROKERS", "2")
    assert (Settings().kafka.brokers, Settings().redis.cluster_masters) == (2, 0)
    forget_stack(s)
    monkeypatch.delenv("RECSYS_KAFKA_BROKERS")
    assert Settings().kafka.brokers == 1 and read_stack_state(s.home) == {}


def test_the_stack_state_is_found_in_the_home_the_environment_names(folder, monkeypatch):
    from recsys.settings import remember_stack
    remember_stack(Settings(home=folder / "other").updated(kafka={"brokers": 3}), monitoring=False)
    assert Settings().kafka.brokers == 1
    monkeypatch.setenv("RECSYS_HOME", str(folder / "other"))
    assert Settings().kafka.brokers == 3


def test_describe_says_where_each_setting_came_from(folder, monkeypatch):
    from recsys.settings import describe, remember_stack
    (folder / "recsys.toml").write_text('[kafka]\nevents_topic = "from-file"\n')
    remember_stack(Settings().updated(redis={"cluster_masters": 3}), monitoring=False)
    monkeypatch.setenv("RECSYS_RETRAINING_CRON", "0 3 * * *")
    rows = describe(Settings())
    assert rows["kafka.events_topic"] == {"value": "from-file", "source": "file", "from": str(folder / "recsys.toml")}
    assert rows["retraining.cron"] == {"value": "0 3 * * *", "source": "env", "from": "RECSYS_RETRAINING_CRON"}
    assert rows["redis.cluster_masters"] == {"value": 3, "source": "stack", "from": str(folder / ".recsys" / "stack.json")}
    assert rows["home"] == {"value": str(folder / ".recsys"), "source": "default", "from": None}
    assert set(rows) >= {"kafka.brokers", "online.attributable", "secrets_dir", "monitoring.prometheus_port"}
    assert len(rows) == sum(len(v) if isinstance(v, dict) else 1 for v in Settings().model_dump().values())


@pytest.mark.parametrize("name, masked", [("kafka.sasl_password", True), ("api_key", True), ("auth.secret", True),
                                          ("x.token", True), ("secrets_dir", False), ("kafka.sasl_username", False),
                                          ("monitoring.redis_exporter_port", False)])
def test_secrets_are_masked(name, masked):
    from recsys.settings import shown
    assert (shown(name, "s3cret") != "s3cret") is masked and shown(name, None) is None


def test_config_show_prints_every_setting(folder, monkeypatch, capsys):
    import json

    from cli.main import main
    monkeypatch.setenv("RECSYS_KAFKA_BROKERS", "3")
    assert main(["config", "show", "--json", "-v"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["kafka.brokers"] == {"value": 3, "source": "env", "from": "RECSYS_KAFKA_BROKERS"}
    assert main(["config", "show", "-v"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(rows)
    assert [line.split() for line in lines if line.startswith("kafka.brokers ")] == \
        [["kafka.brokers", "3", "(env", "RECSYS_KAFKA_BROKERS)"]]
    (folder / "recsys.toml").write_text("[kafka]\nbrokerz = 3\n")
    assert main(["config", "show", "-v"]) == 2
    assert "unknown key 'kafka.brokerz'" in capsys.readouterr().err
