"""Configuration: TOML + MEDICON_* overrides, and clear errors naming the bad key."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, load_config


def test_defaults_are_loopback():
    cfg = load_config(env={})
    assert cfg.server.host == "127.0.0.1"
    assert cfg.kubo.api_url.startswith("http://127.0.0.1:")


def test_file_then_env_then_overrides(tmp_path):
    f = tmp_path / "gw.toml"
    f.write_text('[server]\nport = 6000\nallowed_origins = ["https://a.example"]\n'
                 '[kubo]\napi_url = "http://127.0.0.1:7001"\nread_timeout = 3\n')
    cfg = load_config(f, env={"MEDICON_SERVER_PORT": "6001", "MEDICON_KUBO_CONNECT_TIMEOUT": "2.5",
                              "MEDICON_TOKEN": "not config", "OTHER": "x"})
    assert cfg.server.port == 6001
    assert cfg.server.allowed_origins == ("https://a.example",)
    assert cfg.kubo.api_url == "http://127.0.0.1:7001"
    assert cfg.kubo.read_timeout == 3.0 and cfg.kubo.connect_timeout == 2.5
    cfg = load_config(f, env={"MEDICON_SERVER_ALLOWED_ORIGINS": "https://b.example, https://c.example"},
                      overrides={"server.port": 0})
    assert cfg.server.port == 0
    assert cfg.server.allowed_origins == ("https://b.example", "https://c.example")


@pytest.mark.parametrize("text, env, needle", [
    ("[server]\nprot = 1\n", {}, "'server.prot'"),
    ("[srv]\nport = 1\n", {}, "'srv'"),
    ("[server]\nport = \"eighty\"\n", {}, "'server.port'"),
    ("[server]\nport = 70000\n", {}, "'server.port'"),
    ("[kubo]\napi_url = \"ftp://x\"\n", {}, "'kubo.api_url'"),
    ("[kubo]\nread_timeout = 0\n", {}, "'kubo.read_timeout'"),
    ("[server]\nallowed_origins = \"x\"\n", {}, "'server.allowed_origins'"),
    ("", {"MEDICON_KUBO_READ_TIMEOUT": "soon"}, "'kubo.read_timeout'"),
    ("", {"MEDICON_KUBO_APIURL": "http://x"}, "MEDICON_KUBO_APIURL"),
    ("[server\n", {}, "invalid TOML"),
    ("[server]\nmax_body_size = 0\n", {}, "'server.max_body_size'"),
    ("[server]\nmax_body_size = -1\n", {}, "'server.max_body_size'"),
    ("[server]\nmax_body_size = 1.5\n", {}, "'server.max_body_size'"),
    ("", {"MEDICON_SERVER_MAX_BODY_SIZE": "4G"}, "'server.max_body_size'"),
])
def test_bad_values_name_the_key(tmp_path, text, env, needle):
    f = tmp_path / "gw.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, env=env)
    assert needle in str(err.value)


def test_body_size_limit_default_and_overrides(tmp_path):
    """A generous default (4 GiB), set in bytes from a file or ``MEDICON_SERVER_MAX_BODY_SIZE``;
    0 is refused above, never read as "no limit"."""
    assert load_config(env={}).server.max_body_size == 4 * 1024 ** 3
    f = tmp_path / "gw.toml"
    f.write_text("[server]\nmax_body_size = 1048576\n")
    assert load_config(f, env={}).server.max_body_size == 1048576
    assert load_config(f, env={"MEDICON_SERVER_MAX_BODY_SIZE": "65536"}).server.max_body_size == 65536


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", env={})


def test_cli_reports_config_errors(tmp_path):
    import subprocess
    import sys
    f = tmp_path / "gw.toml"
    f.write_text("[server]\nprot = 1\n")
    r = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(f)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "unknown config key 'server.prot'" in r.stderr
    assert "Traceback" not in r.stderr


def test_event_loop_choice_is_checked_and_uvloop_is_used_when_chosen():
    from gateway.cli import run_loop
    assert load_config(env={}).server.event_loop == "asyncio"
    with pytest.raises(ConfigError, match="server.event_loop"):
        load_config(env={"MEDICON_SERVER_EVENT_LOOP": "trio"})

    async def loop_type():
        import asyncio
        return type(asyncio.get_running_loop()).__module__

    assert run_loop(load_config(env={"MEDICON_SERVER_EVENT_LOOP": "uvloop"}), loop_type()).startswith("uvloop")
    assert run_loop(load_config(env={}), loop_type()).startswith("asyncio")


def test_storage_is_embedded_sqlite_unless_a_postgresql_url_is_given(tmp_path):
    assert load_config(env={}).storage.url.get_secret_value() == ""
    url = "postgresql://medicon:S3cret-pw@db.internal:5432/medicon"
    f = tmp_path / "gw.toml"
    f.write_text('[storage]\nurl = "postgresql://other@h/x"\npool_min = 1\npool_max = 4\nmigrate_on_start = false\n')
    cfg = load_config(f, env={"MEDICON_STORAGE_URL": url, "MEDICON_STORAGE_COMMAND_TIMEOUT": "5"})
    assert cfg.storage.url.get_secret_value() == url  # the environment wins over the file
    assert (cfg.storage.pool_min, cfg.storage.pool_max, cfg.storage.migrate_on_start) == (1, 4, False)
    assert cfg.storage.command_timeout == 5.0
    assert "S3cret-pw" not in repr(cfg) and "S3cret-pw" not in str(cfg.storage)


@pytest.mark.parametrize("value", ["mysql://root:S3cret-pw@db/x", "postgresql://u:S3cret-pw@h:port/x",
                                   "postgresql://u:S3cret-pw@:5432/x", "S3cret-pw"])
def test_a_bad_storage_url_is_refused_without_repeating_it(tmp_path, value):
    f = tmp_path / "gw.toml"
    f.write_text(f'[storage]\nurl = "{value}"\n')
    for source in ({"path": f, "env": {}}, {"env": {"MEDICON_STORAGE_URL": value}}):
        with pytest.raises(ConfigError) as err:
            load_config(**source)
        assert "storage.url" in str(err.value) and "S3cret-pw" not in str(err.value)
