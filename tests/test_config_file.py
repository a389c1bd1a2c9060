"""Settings from /etc/mxfs/mxfs.toml, MXFS_* variables and flags (DESIGN section 7), and --print-config.

Precedence is file < environment < flags; every error names the key, the bad value and where it
came from (the file's path, the variable, the flag).  These tests never read the machine's
/etc/mxfs/mxfs.toml: the default path is pointed at a file that does not exist.
"""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path

import pytest

from mxfs import config
from mxfs.cli import build_parser, render_config, settings_from_args
from mxfs.config import OPTIONS, OPTIONS_BY_KEY, ConfigError, Settings, get_value, load_settings
from tests.mounting import REPO_ROOT, run_cli


@pytest.fixture(autouse=True)
def no_default_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", tmp_path / "no-such-default.toml")


def write(tmp_path: Path, text: str, name: str = "mxfs.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def from_cli(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    return settings_from_args(build_parser().parse_args(argv), env=env or {})


# -- precedence ----------------------------------------------------------------------------------


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
cache_dir = "{tmp_path}/file-cache"
lease = "10s"
negative_ttl = "1m"
verify = "strict"

[eviction]
max_models = 5
in_use_grace = "1m"
max_cache_size = "100GiB"
""",
    )
    env = {"MXFS_LEASE": "20s", "MXFS_EVICTION_MAX_MODELS": "7", "MXFS_VERIFY": "fast"}
    settings = from_cli(["status", "--config", str(path), "--lease", "30s", "--verify", "strict"], env)
    assert settings.lease == 30.0  # flag over environment over file
    assert settings.verify == "strict"  # flag over environment
    assert settings.eviction.max_models == 7  # environment over file
    assert settings.negative_ttl == 60.0  # file over default
    assert settings.eviction.in_use_grace == 60.0
    assert settings.eviction.max_cache_size == 100 * 2**30
    assert settings.cache_dir == tmp_path / "file-cache"
    assert settings.state_dir == Path("/var/cache/mxfs-state")  # default
    assert settings.config_file == path
    assert settings.sources["lease"] == "flag --lease"
    assert settings.sources["eviction.max_models"] == "environment MXFS_EVICTION_MAX_MODELS"
    assert settings.sources["negative_ttl"] == f"file {path}"
    assert "state_dir" not in settings.sources


def test_off_in_a_later_layer_switches_a_rule_off(tmp_path: Path) -> None:
    path = write(tmp_path, '[eviction]\nmax_cache_size = "1TiB"\nunused_threshold = "3d"\nmax_models = 3\n')
    settings = from_cli(
        ["gc", "--config", str(path), "--unused-threshold", "off"], {"MXFS_EVICTION_MAX_CACHE_SIZE": "off"}
    )
    assert settings.eviction.max_cache_size is None
    assert settings.eviction.unused_threshold is None
    assert settings.eviction.max_models == 3


def test_boolean_flags_override_both_ways(tmp_path: Path) -> None:
    on = write(tmp_path, "allow_other = true\n")
    assert from_cli(["mount", "--config", str(on)]).allow_other is True
    assert from_cli(["mount", "--config", str(on), "--no-allow-other"]).allow_other is False
    assert from_cli(["mount", "--allow-other"], {"MXFS_ALLOW_OTHER": "false"}).allow_other is True
    assert from_cli(["mount"], {"MXFS_ALLOW_OTHER": "yes"}).allow_other is True
    assert from_cli(["mount", "--no-eviction"], {"MXFS_EVICTION_ENABLED": "true"}).eviction.enabled is False


def test_no_file_means_defaults() -> None:
    settings = load_settings(None, env={})
    assert settings.config_file is None
    defaults = Settings()
    for option in OPTIONS:
        assert get_value(settings, option.key) == get_value(defaults, option.key), option.key
    assert settings.metrics_address == "127.0.0.1:9400"


def test_a_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file '.*nope\.toml' not found"):
        load_settings(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(None, env={"MXFS_CONFIG": str(tmp_path / "nope.toml")})
    done = run_cli("status", "--config", str(tmp_path / "nope.toml"))
    assert done.returncode == 2
    assert "nope.toml' not found" in done.stderr


def test_mxfs_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'revision = "v2"\n')
    assert load_settings(None, env={"MXFS_CONFIG": str(path)}).revision == "v2"
    # --config wins over MXFS_CONFIG.
    other = write(tmp_path, 'revision = "v3"\n', "other.toml")
    assert load_settings(other, env={"MXFS_CONFIG": str(path)}).revision == "v3"


@pytest.mark.parametrize(
    "argv",
    [
        ["mount", "/mnt"],
        ["status"],
        ["prefetch", "org/name"],
        ["gc"],
        ["evict", "org/name"],
        ["pin", "org/name"],
        ["unpin", "org/name"],
    ],
)
def test_every_cache_command_reads_the_config(argv: list[str], tmp_path: Path) -> None:
    path = write(tmp_path, f'state_dir = "{tmp_path}/st"\nrevision = "v9"\n')
    settings = from_cli([*argv, "--config", str(path)])
    assert settings.state_dir == tmp_path / "st"
    assert settings.revision == "v9"


# -- every key, every layer ----------------------------------------------------------------------

# A valid spelling of every key, as an environment variable would give it, and the value it means.
SAMPLES: dict[str, tuple[str, object]] = {
    "cache_dir": ("/srv/cache", Path("/srv/cache")),
    "state_dir": ("/srv/state", Path("/srv/state")),
    "registry": ("redis://redis:6379/1", "redis://redis:6379/1"),
    "revision": ("refs/pr/1", "refs/pr/1"),
    "lease": ("1m30s", 90.0),
    "negative_ttl": ("0", 0.0),
    "verify": ("STRICT", "strict"),
    "connections": ("16", 16),
    "chunk_size": ("16MiB", 16 * 2**20),
    "poll_interval": ("250ms", 0.25),
    "refresh_within": ("30s", 30.0),
    "ca_bundle": ("/etc/ssl/proxy-ca.pem", Path("/etc/ssl/proxy-ca.pem")),
    "allow_other": ("on", True),
    "handoff": ("off", False),
    "handoff_check_interval": ("30s", 30.0),
    "uid": ("1000", 1000),
    "gid": ("nogroup", 65534),
    "metrics_address": ("[::1]:9500", "[::1]:9500"),
    "log_level": ("DEBUG", "debug"),
    "token_file": ("/etc/mxfs/hf-token", Path("/etc/mxfs/hf-token")),
    "eviction.enabled": ("0", False),
    "eviction.check_interval": ("1h", 3600.0),
    "eviction.unused_threshold": ("2d12h", 2.5 * 86400),
    "eviction.max_models": ("20", 20),
    "eviction.max_cache_size": ("500GiB", 500 * 2**30),
    "eviction.min_free_space": ("50GB", 50 * 10**9),
    "eviction.in_use_grace": ("15m", 900.0),
    "eviction.pinned": ("org/a, org/b@v1.0", ["org/a", "org/b@v1.0"]),
    "peer_address": ("10.0.0.5:7170", "10.0.0.5:7170"),
    "peer_allow": ("10.1.0.0/16, fd00::/8", ["10.1.0.0/16", "fd00::/8"]),
    "peer_token_file": ("/etc/mxfs/peer-token", Path("/etc/mxfs/peer-token")),
    "peer_tls_cert": ("/etc/mxfs/node.pem", Path("/etc/mxfs/node.pem")),
    "peer_tls_key": ("/etc/mxfs/node.key", Path("/etc/mxfs/node.key")),
    "peer_tls_ca": ("/etc/mxfs/fleet-ca.pem", Path("/etc/mxfs/fleet-ca.pem")),
}
# Keys that are only valid together with others: what each needs.
TLS = {"peer_tls_cert": "/c.pem", "peer_tls_key": "/k.pem", "peer_tls_ca": "/ca.pem"}
NEEDS = {
    "peer_address": {"registry": "redis://redis:6379/0"},
    **{key: {k: v for k, v in TLS.items() if k != key} for key in TLS},
}


def test_samples_cover_every_key() -> None:
    assert set(SAMPLES) == set(OPTIONS_BY_KEY)


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_every_key_from_every_layer(key: str, tmp_path: Path) -> None:
    raw, expected = SAMPLES[key]
    option = OPTIONS_BY_KEY[key]
    assert option.env == "MXFS_" + key.upper().replace(".", "_")
    others = NEEDS.get(key, {})
    env = {OPTIONS_BY_KEY[other].env: value for other, value in others.items()}
    assert get_value(load_settings(None, env={**env, option.env: raw}), key) == expected
    assert get_value(load_settings(None, env=env, flags={key: (raw, "--x")}), key) == expected
    table, _, name = key.rpartition(".")
    text = f"[{table}]\n{name} = {raw!r}\n" if table else f"{name} = {raw!r}\n"
    text = text.replace("'", '"')
    if key == "eviction.pinned":
        text = '[eviction]\npinned = ["org/a", "org/b@v1.0"]\n'
    if key == "peer_allow":
        text = 'peer_allow = ["10.1.0.0/16", "fd00::/8"]\n'
    text = "".join(f'{other} = "{value}"\n' for other, value in others.items()) + text
    assert get_value(load_settings(write(tmp_path, text), env={}), key) == expected


def test_toml_types_are_accepted_where_they_make_sense(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
lease = 45
poll_interval = 0.25
chunk_size = 8388608
allow_other = true
uid = 0
[eviction]
max_models = 0
max_cache_size = false
""",
    )
    settings = load_settings(path, env={})
    assert settings.lease == 45.0
    assert settings.poll_interval == 0.25
    assert settings.chunk_size == 8 * 2**20
    assert settings.allow_other is True
    assert settings.uid == 0
    assert settings.eviction.max_models == 0
    assert settings.eviction.max_cache_size is None


# -- errors name the key, the value and the source -----------------------------------------------

BAD_VALUES = [
    ("lease", "30x"),
    ("lease", "0s"),
    ("lease", "-5s"),
    ("negative_ttl", "soon"),
    ("verify", "paranoid"),
    ("connections", "0"),
    ("connections", "many"),
    ("chunk_size", "512KiB"),
    ("chunk_size", "lots"),
    ("poll_interval", "0"),
    ("allow_other", "maybe"),
    ("uid", "-1"),
    ("uid", "no-such-user-xyz"),
    ("gid", "no-such-group-xyz"),
    ("metrics_address", "9400"),
    ("metrics_address", "localhost"),
    ("metrics_address", "::1:9400"),
    ("metrics_address", "host:99999"),
    ("log_level", "loud"),
    ("revision", "bad..rev"),
    ("eviction.enabled", "sometimes"),
    ("eviction.check_interval", "0s"),
    ("eviction.unused_threshold", "a week"),
    ("eviction.max_models", "-1"),
    ("eviction.max_models", "ten"),
    ("eviction.max_cache_size", "500 potatoes"),
    ("eviction.min_free_space", "-5GiB"),
    ("eviction.in_use_grace", "10 min"),
    ("eviction.pinned", "not-a-model"),
    ("eviction.pinned", "org/name@bad..rev"),
]


@pytest.mark.parametrize(("key", "bad"), BAD_VALUES)
def test_bad_values_name_key_value_and_environment_variable(key: str, bad: str) -> None:
    option = OPTIONS_BY_KEY[key]
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={option.env: bad})
    message = str(info.value)
    assert message.startswith(f"{key}:"), message
    assert repr(bad) in message or repr(bad.split(",")[0].strip()) in message, message
    assert f"(from environment {option.env})" in message


@pytest.mark.parametrize(("key", "bad"), BAD_VALUES)
def test_bad_values_name_key_value_and_file(key: str, bad: str, tmp_path: Path) -> None:
    table, _, name = key.rpartition(".")
    line = f'{name} = "{bad}"\n'
    path = write(tmp_path, f"[{table}]\n{line}" if table else line)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    message = str(info.value)
    assert message.startswith(f"{key}:"), message
    assert repr(bad) in message, message
    assert f"(from file {path})" in message


@pytest.mark.parametrize(("key", "bad"), BAD_VALUES[:6])
def test_bad_flags_name_the_flag(key: str, bad: str) -> None:
    flag = "--" + key.rpartition(".")[2].replace("_", "-")
    done = run_cli("status", "--config", "/dev/null", f"{flag}={bad}")
    assert done.returncode == 2, done.stderr
    assert f"{key}:" in done.stderr
    assert repr(bad) in done.stderr
    assert f"(from flag {flag})" in done.stderr


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ("lease = true", "lease: expected a duration"),
        ("connections = 2.5", "connections: expected a whole number"),
        ('connections = "8"', None),  # a string of digits is fine
        ("allow_other = 1", "allow_other: expected true or false"),
        ('cache_dir = ""', "cache_dir: expected a path"),
        ("cache_dir = 5", "cache_dir: expected a string"),
        ('uid = ""', None),  # empty: not set
        ("[eviction]\npinned = [1]", "eviction.pinned: expected a model name"),
        ("[eviction]\npinned = {a = 1}", "eviction.pinned: expected a list of models"),
        ("[eviction]\nmax_models = 1.5", "eviction.max_models: expected a whole number"),
        ("[eviction]\nmax_cache_size = 1.5", "eviction.max_cache_size: expected a whole number of bytes"),
    ],
)
def test_toml_values_of_the_wrong_type(text: str, wanted: str | None, tmp_path: Path) -> None:
    path = write(tmp_path, text + "\n")
    if wanted is None:
        load_settings(path, env={})
        return
    with pytest.raises(ConfigError, match=wanted) as info:
        load_settings(path, env={})
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ('lese = "30s"', r"unknown key 'lese' \(did you mean 'lease'\?\)"),
        ("[eviction]\nmax_model = 3", r"unknown key 'eviction.max_model' \(did you mean 'eviction.max_models'\?\)"),
        ('[cache]\ndir = "/x"', r"unknown key 'cache'"),
        ("eviction = 3", r"eviction: expected a table \(\[eviction\]\)"),
        ('token = "hf_secret"', r"unknown key 'token'"),
    ],
)
def test_unknown_keys_in_the_file_are_errors(text: str, wanted: str, tmp_path: Path) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError, match=wanted) as info:
        load_settings(path, env={})
    assert str(info.value).startswith(str(path))
    assert "hf_secret" not in str(info.value)


def test_toml_syntax_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'lease = "30s\n')
    with pytest.raises(ConfigError, match=rf"^{path}: not valid TOML: .*line 1"):
        load_settings(path, env={})


def test_an_unknown_environment_variable_is_a_warning(tmp_path: Path) -> None:
    settings = load_settings(None, env={"MXFS_LEASES": "5s", "MXFS_CONFIG": "", "OTHER": "x"})
    assert settings.warnings == ["ignoring unknown environment variable MXFS_LEASES"]
    done = run_cli("status", "--config", "/dev/null", "--state-dir", str(tmp_path), env={"MXFS_LEASES": "5s"})
    assert done.returncode == 0, done.stderr
    assert "ignoring unknown environment variable MXFS_LEASES" in done.stderr


def test_cross_checks_name_the_source() -> None:
    settings = Settings(chunk_size=1)
    settings.sources["chunk_size"] = "file /etc/mxfs/mxfs.toml"
    with pytest.raises(
        ConfigError, match=r"chunk_size: must be at least 1MiB, got 1 \(from file /etc/mxfs/mxfs.toml\)"
    ):
        settings.validate()


def test_split_address() -> None:
    assert config.split_address("127.0.0.1:9400") == ("127.0.0.1", 9400)
    assert config.split_address("[::1]:9400") == ("::1", 9400)
    assert config.split_address(":9400") == (None, 9400)
    assert load_settings(None, env={"MXFS_METRICS_ADDRESS": ""}).metrics_address == ""  # off


# -- --print-config ------------------------------------------------------------------------------


def test_print_config_reads_back_to_the_same_settings(tmp_path: Path) -> None:
    env = {option.env: raw for option, (raw, _) in ((OPTIONS_BY_KEY[k], v) for k, v in SAMPLES.items())}
    settings = load_settings(None, env=env)
    text = render_config(settings, env={})
    tomllib.loads(text)
    again = load_settings(write(tmp_path, text), env={})
    for option in OPTIONS:
        assert get_value(again, option.key) == get_value(settings, option.key), option.key
    assert re.search(r'^lease = "1m30s" +# environment MXFS_LEASE$', text, re.MULTILINE), text


def test_print_config_of_defaults_reads_back(tmp_path: Path) -> None:
    text = render_config(load_settings(None, env={}), env={})
    again = load_settings(write(tmp_path, text), env={})
    for option in OPTIONS:
        if option.key != "registry":  # printed as the effective URL, which the default means anyway
            assert get_value(again, option.key) == get_value(Settings(), option.key), option.key
    assert again.registry_url == Settings().registry_url


def test_print_config_never_shows_passwords_or_tokens(tmp_path: Path) -> None:
    token_file = tmp_path / "hf-token"
    token_file.write_text("hf_tokenfromfile\n")
    token_file.chmod(0o600)
    path = write(
        tmp_path,
        f'registry = "redis://:filepassword@redis.internal:6379/0"\ntoken_file = "{token_file}"\n',
    )
    env = {"HF_TOKEN": "hf_tokenfromenv", "MXFS_LOG_LEVEL": "debug"}
    outputs = []
    for argv in (
        ["mount", "--print-config", "--config", str(path)],
        ["status", "--print-config", "--config", str(path)],
        ["mount", "--print-config", "--config", str(path), "--registry", "rediss://user:flagpassword@r:6380/2"],
    ):
        done = run_cli(*argv, env=env)
        assert done.returncode == 0, done.stderr
        out = done.stdout + done.stderr
        for secret in ("filepassword", "flagpassword", "hf_tokenfromfile", "hf_tokenfromenv"):
            assert secret not in out, (secret, out)
        assert f'token_file = "{token_file}"' in out
        assert tomllib.loads(done.stdout)["log_level"] == "debug"
        outputs.append(done.stdout)
    assert 'registry = "redis://:***@redis.internal:6379/0"' in outputs[0]
    assert 'registry = "rediss://user:***@r:6380/2"' in outputs[2]


def test_print_config_env_token_is_mentioned_not_shown() -> None:
    text = render_config(load_settings(None, env={}), env={"HF_TOKEN": "hf_abc"})
    assert "HF_TOKEN" in text and "hf_abc" not in text


# -- token_file ----------------------------------------------------------------------------------


def test_token_file_is_read_and_only_a_private_file_is_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "token"
    path.write_text("  hf_secretvalue \n")
    path.chmod(0o600)
    settings = load_settings(None, env={"MXFS_TOKEN_FILE": str(path)})
    with caplog.at_level(logging.WARNING):
        assert settings.read_token() == "hf_secretvalue"
    assert caplog.records == []

    for mode in (0o640, 0o604, 0o644):
        caplog.clear()
        path.chmod(mode)
        with caplog.at_level(logging.WARNING):
            assert settings.read_token() == "hf_secretvalue"
        (record,) = caplog.records
        assert str(path) in record.getMessage()
        assert "readable by its group or by everyone" in record.getMessage()
        assert f"{mode:04o}" in record.getMessage()
        assert "hf_secretvalue" not in caplog.text


def test_token_file_problems_are_config_errors(tmp_path: Path) -> None:
    missing = load_settings(None, env={"MXFS_TOKEN_FILE": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match=r"token_file: cannot read .*none.* \(from environment MXFS_TOKEN_FILE\)"):
        missing.read_token()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        load_settings(None, env={"MXFS_TOKEN_FILE": str(empty)}).read_token()
    assert Settings().read_token() is None


# -- the example file ----------------------------------------------------------------------------


def test_example_config_is_valid_and_documents_every_key() -> None:
    example = REPO_ROOT / "systemd" / "mxfs.toml"
    settings = load_settings(example, env={})
    defaults = Settings()
    for option in OPTIONS:
        name = option.key.rpartition(".")[2]
        assert f"\n{name} = " in example.read_text() or f"\n# {name} = " in example.read_text(), option.key
        if option.key != "registry":
            # The example spells out the defaults.
            assert get_value(settings, option.key) == get_value(defaults, option.key), option.key
