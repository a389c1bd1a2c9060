"""The duration and size grammar of DESIGN section 7, Settings checks, and format_size."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mxfs.cli import build_parser
from mxfs.config import ConfigError, Settings, default_text, format_size, load_settings, parse_duration, parse_size

# -- durations -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45),
        ("30m", 1800),
        ("2h30m", 9000),
        ("7d", 7 * 86400),
        ("1.5h", 5400),
        ("1w", 7 * 86400),
        ("500ms", 0.5),
        ("1m30s", 90),
        ("1d2h3m4s", 86400 + 7200 + 180 + 4),
        ("0s", 0),
        ("10", 10),
        ("0", 0),
        ("2.5", 2.5),
        (" 30s ", 30),
        ("30S", 30),
        ("2H30M", 9000),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, "lease") == pytest.approx(seconds)


@pytest.mark.parametrize(("value", "seconds"), [(30, 30.0), (0, 0.0), (1.5, 1.5)])
def test_parse_duration_numbers(value: float, seconds: float) -> None:
    result = parse_duration(value, "lease")
    assert result == seconds
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "value",
    ["", "abc", "s", "30x", "30 s", "1h 30m", "h30", "30m!", "--5s", "1..5h", "30sec", "5 minutes", "1.h", ".5h", True],
)
def test_parse_duration_garbage(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "eviction.unused_threshold")  # type: ignore[arg-type]
    message = str(info.value)
    assert "eviction.unused_threshold" in message
    assert repr(value) in message


@pytest.mark.parametrize("value", ["-5", "-5s", "-1h", -1, -0.5])
def test_parse_duration_negative(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "lease")  # type: ignore[arg-type]
    message = str(info.value)
    assert "lease" in message
    assert repr(value) in message


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "infinity", "Infinity", float("nan"), float("inf")])
def test_parse_duration_rejects_nan_and_infinity(value: object) -> None:
    # A NaN lease compares False to everything (so `lease <= 0` lets it through validate) and an
    # infinite one never expires: neither is a duration such as 30s, 5m, 2h30m or 7d.
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "lease")  # type: ignore[arg-type]
    assert "lease" in str(info.value)


def test_parse_duration_default_key_is_named() -> None:
    with pytest.raises(ConfigError, match="duration"):
        parse_duration("bogus")


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# -- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("500GiB", 500 * 2**30),
        ("10GB", 10 * 10**9),
        ("10G", 10 * 10**9),
        ("10Gi", 10 * 2**30),
        ("1.5MiB", 1572864),
        ("1048576", 1048576),
        ("0", 0),
        ("1B", 1),
        ("1b", 1),
        ("1k", 1000),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("1kib", 1024),
        ("2TiB", 2 * 2**40),
        ("3TB", 3 * 10**12),
        ("1PiB", 2**50),
        ("1PB", 10**15),
        ("50 GiB", 50 * 2**30),
        (" 50GiB ", 50 * 2**30),
        ("500gib", 500 * 2**30),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    result = parse_size(text, "eviction.max_cache_size")
    assert result == size
    assert isinstance(result, int)


def test_gb_is_decimal_and_gib_is_binary() -> None:
    assert parse_size("1GB") == 1_000_000_000
    assert parse_size("1GiB") == 1_073_741_824
    assert parse_size("1GiB") > parse_size("1GB")


@pytest.mark.parametrize("value", [0, 1, 500 * 2**30])
def test_parse_size_int(value: int) -> None:
    assert parse_size(value) == value


@pytest.mark.parametrize(
    "value",
    ["", "abc", "GiB", "10XB", "10 G B", "1.5.5GB", "10GiBs", "ten", "0x10", "1e3", "10i", "10ib", "10iB", True, False],
)
def test_parse_size_garbage(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(value, "eviction.min_free_space")  # type: ignore[arg-type]
    message = str(info.value)
    assert "eviction.min_free_space" in message
    assert repr(value) in message


@pytest.mark.parametrize("value", ["-5", "-5GiB", -1])
def test_parse_size_negative(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(value, "eviction.max_cache_size")  # type: ignore[arg-type]
    message = str(info.value)
    assert "eviction.max_cache_size" in message
    assert repr(value) in message


# -- format_size ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1572864, "1.5 MiB"),
        (500 * 2**30, "500.0 GiB"),
        (2**40, "1.0 TiB"),
        (3 * 2**50, "3072.0 TiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_format_size_parses_back() -> None:
    for n in (1024, 1572864, 500 * 2**30):
        assert parse_size(format_size(n).replace(" ", "")) == n


# -- Settings ------------------------------------------------------------------------------------


def test_default_settings_validate() -> None:
    settings = Settings()
    settings.validate()
    assert settings.cache_dir == Path("/var/cache/mxfs")
    assert settings.state_dir == Path("/var/cache/mxfs-state")
    assert settings.revision == "main"
    assert settings.lease == 30.0
    assert settings.negative_ttl == 30.0


def test_registry_url_defaults_into_state_dir(tmp_path: Path) -> None:
    assert Settings().registry_url == "sqlite:///var/cache/mxfs-state/registry.db"
    settings = Settings(state_dir=tmp_path / "state")
    assert settings.registry_url == f"sqlite://{tmp_path}/state/registry.db"


def test_registry_url_of_relative_state_dir_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = Settings(state_dir=Path("state")).registry_url
    assert url == f"sqlite://{tmp_path}/state/registry.db"
    assert url.startswith("sqlite:///")


def test_explicit_registry_wins(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, registry="redis://localhost:6379/0")
    assert settings.registry_url == "redis://localhost:6379/0"


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"verify": "paranoid"}, "verify"),
        ({"verify": ""}, "verify"),
        ({"lease": 0.0}, "lease"),
        ({"lease": -1.0}, "lease"),
        ({"connections": 0}, "connections"),
        ({"connections": -3}, "connections"),
        ({"chunk_size": 1024 * 1024 - 1}, "chunk_size"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_settings_validate_rejects(changes: dict[str, object], key: str) -> None:
    settings = Settings(**changes)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        settings.validate()
    message = str(info.value)
    assert key in message
    assert repr(next(iter(changes.values()))) in message


@pytest.mark.parametrize(
    "changes",
    [
        {"verify": "strict"},
        {"verify": "fast"},
        {"lease": 0.001},
        {"connections": 1},
        {"chunk_size": 1024 * 1024},
    ],
)
def test_settings_validate_accepts_limits(changes: dict[str, object]) -> None:
    Settings(**changes).validate()  # type: ignore[arg-type]


def test_a_limit_says_the_same_from_a_flag_and_from_code() -> None:
    with pytest.raises(ConfigError, match=r"^lease: must be positive, got '0s' \(from flag --lease\)$"):
        load_settings(None, env={"MXFS_CONFIG": "/dev/null"}, flags={"lease": ("0s", "--lease")})
    with pytest.raises(ConfigError, match=r"^lease: must be positive, got 0.0$"):
        Settings(lease=0.0).validate()


def test_help_shows_the_defaults_of_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert [default_text(key) for key in ("lease", "chunk_size", "verify", "cache_dir")] == [
        "30s",
        "64MiB",
        "fast",
        "/var/cache/mxfs",
    ]
    assert default_text("allow_other") == default_text("eviction.max_models") == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mount", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "download lease, e.g. 30s (default 30s)" in help_text
    assert "keep at most this many models (default off)" in help_text


def test_settings_extra_is_per_instance() -> None:
    a, b = Settings(), Settings()
    a.extra["x"] = 1
    assert b.extra == {}


def test_durations_are_finite() -> None:
    for text in ("45s", "30m", "2h30m", "7d", "1.5h", "10"):
        assert math.isfinite(parse_duration(text))


# -- peers ---------------------------------------------------------------------------------------


def test_with_peers_the_cache_registry_is_the_nodes_own_and_registry_is_the_fleets(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, registry="redis://redis:6379/0", peer_address="10.0.0.5:7170")
    settings.validate()
    assert settings.peers
    assert settings.registry_url == f"sqlite://{tmp_path}/registry.db"
    assert settings.shared_registry_url == "redis://redis:6379/0"
    assert settings.peer_url == "http://10.0.0.5:7170"
    tls = Settings(
        state_dir=tmp_path,
        registry="redis://redis:6379/0",
        peer_address="10.0.0.5:7170",
        peer_tls_cert=Path("/c.pem"),
        peer_tls_key=Path("/k.pem"),
        peer_tls_ca=Path("/ca.pem"),
    )
    assert tls.peer_url == "https://10.0.0.5:7170"  # and so its id in the fleet's listings
    # Without peers, one registry is both.
    plain = Settings(state_dir=tmp_path, registry="redis://redis:6379/0")
    assert plain.registry_url == plain.shared_registry_url == "redis://redis:6379/0"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peer_address": "10.0.0.5:7170"}, "peers need the fleet's shared registry"),
        ({"peer_address": ":7170", "registry": "redis://r/0"}, "with its host"),
        ({"peer_address": "0.0.0.0:7170", "registry": "redis://r/0"}, "with its host"),
        ({"peer_address": "10.0.0.5", "registry": "redis://r/0"}, "HOST:PORT"),
        ({"peer_tls_cert": "/c.pem"}, "peer_tls_cert set, peer_tls_key, peer_tls_ca not"),
        ({"peer_tls_cert": "/c.pem", "peer_tls_key": "/k.pem"}, "peer_tls_ca not"),
    ],
)
def test_peer_address_needs_a_host_and_a_shared_registry(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, env={"MXFS_CONFIG": "/dev/null"}, flags={k: (v, f"--{k}") for k, v in changes.items()})


def test_peer_allow_reads_networks_from_a_list_or_a_comma_separated_string() -> None:
    env = {"MXFS_CONFIG": "/dev/null", "MXFS_PEER_ALLOW": "10.1.0.0/16, fd00::/8,192.168.3.4"}
    assert load_settings(None, env=env).peer_allow == ["10.1.0.0/16", "fd00::/8", "192.168.3.4/32"]
    with pytest.raises(ConfigError, match="peer_allow: not a network"):
        load_settings(None, env={**env, "MXFS_PEER_ALLOW": "10.1.0.0/16,nonsense"})
    assert "10.0.0.0/8" in Settings().peer_allow
