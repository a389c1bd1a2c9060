"""Settings and the duration/size grammar of DESIGN section 7.

Durations: ``45s``, ``30m``, ``2h30m``, ``7d``, ``1.5h`` or plain seconds.  Sizes: ``500GiB``,
``10GB``, ``1.5MiB`` or plain bytes.  Parse errors name the key and the bad value, so a typo in
``/etc/mxfs/mxfs.toml`` is reported as such and not as a stack trace.

Settings come from three layers, each overriding the one before: the TOML file
(``/etc/mxfs/mxfs.toml`` or ``--config``), the environment (``MXFS_`` + the upper-cased key path
joined by ``_``, e.g. ``MXFS_EVICTION_MAX_MODELS``) and command-line flags.  One table,
:data:`OPTIONS`, lists every key with its parser, so the file, the environment and the flags
accept the same spellings and an error always says which key, which value and which layer.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import json
import logging
import math
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxfs.errors import InvalidName
from mxfs.names import parse_model_arg, validate_revision

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("/var/cache/mxfs")
DEFAULT_STATE_DIR = Path("/var/cache/mxfs-state")
DEFAULT_CONFIG_FILE = Path("/etc/mxfs/mxfs.toml")
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9400"
# Who may fetch from a node's peer server by default: loopback and the private networks a fleet's
# nodes sit on.  Narrow it to the fleet's own subnet.
DEFAULT_PEER_ALLOW = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
# Names a config file when no --config is given (handy where flags are awkward: containers).
CONFIG_ENV = "MXFS_CONFIG"
ENV_PREFIX = "MXFS_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(b|[kmgtp](?:ib|i|b)?)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _SIZE_UNITS[f"{_p}"] = 1000**_i
    _SIZE_UNITS[f"{_p}b"] = 1000**_i
    _SIZE_UNITS[f"{_p}ib"] = 1024**_i
    _SIZE_UNITS[f"{_p}i"] = 1024**_i


class ConfigError(ValueError):
    """A setting with a bad value; the message names the key and the value."""


def parse_duration(value: str | float | int, key: str = "duration") -> float:
    """Seconds from ``45s`` / ``2h30m`` / ``7d`` / plain seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration such as 30s, 5m, 2h30m or 7d, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ConfigError(f"{key}: expected a duration such as 30s, 5m, 2h30m or 7d, got {value!r}") from None
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not math.isfinite(seconds):
        raise ConfigError(f"{key}: expected a finite duration such as 30s, 5m, 2h30m or 7d, got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{key}: a duration cannot be negative, got {value!r}")
    return seconds


def parse_size(value: str | int | float, key: str = "size") -> int:
    """Bytes from ``500GiB`` / ``10GB`` / plain bytes (GB = 10^9, GiB = 2^30)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size such as 500GiB, 10GB or 1048576, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ConfigError(f"{key}: expected a whole number of bytes, got {value!r}")
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: a size cannot be negative, got {value!r}")
        return value
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ConfigError(f"{key}: expected a size such as 500GiB, 10GB or 1048576, got {value!r}")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "").lower()])


def format_size(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """The shortest spelling :func:`parse_duration` reads back exactly: ``2h30m``, ``500ms``, ``7d``."""
    if seconds != int(seconds):
        ms = seconds * 1000
        return f"{ms:.0f}ms" if ms == int(ms) else f"{seconds!r}s"
    rest, parts = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) or "0s"


def format_exact_size(n: int) -> str:
    """``500GiB`` / ``10GB`` when exact, else plain bytes: a spelling :func:`parse_size` reads back."""
    for base, suffix in ((1024, "iB"), (1000, "B")):
        for power, prefix in reversed(list(enumerate("KMGTP", start=1))):
            if n and n % base**power == 0:
                return f"{n // base**power}{prefix}{suffix}"
    return str(n)


@dataclass
class Rules:
    """The eviction policy's limits (DESIGN section 6); ``None`` switches a rule off.

    Defined once, here, for both sides: each is an ``eviction.*`` key of :data:`OPTIONS`, and
    :func:`mxfs.evict.select_victims` applies them.  A new rule is a field here, its key in
    :data:`OPTIONS` and its step in the policy.
    """

    unused_threshold: float | None = 7 * 86400.0
    max_models: int | None = None
    max_cache_size: int | None = None
    min_free_space: int | None = None
    in_use_grace: float = 600.0


@dataclass
class EvictionSettings(Rules):
    """The ``[eviction]`` table: the rules, and how the background task applies them."""

    enabled: bool = True
    check_interval: float = 300.0
    # Models (``org/name`` or ``org/name@rev``) the daemon pins in the registry: never evicted.
    pinned: list[str] = field(default_factory=list)


@dataclass
class Settings:
    """Everything the daemon and the cache commands can be told."""

    cache_dir: Path = DEFAULT_CACHE_DIR
    state_dir: Path = DEFAULT_STATE_DIR
    registry: str = ""  # empty: sqlite in the state dir
    revision: str = "main"
    lease: float = 30.0
    negative_ttl: float = 30.0
    # "fast": serve range bytes as they arrive; "strict": only bytes of a copy that passed its checksum.
    verify: str = "fast"
    # Parallel HTTP connections of one entry's download, and the size of one range request.
    connections: int = 8
    chunk_size: int = 64 * 1024 * 1024
    # How often a node that waits for another node's download looks at the registry and the cache.
    poll_interval: float = 0.5
    # How soon every daemon following a branch moves after `mxfs refresh` on any node (the
    # daemon reads the shared registry's ref records twice per this period).
    refresh_within: float = 10.0
    # A CA bundle (PEM) that Hub connections trust instead of the system's: for a proxy that
    # re-signs TLS.  None: SSL_CERT_FILE / SSL_CERT_DIR, else the system store.
    ca_bundle: Path | None = None
    allow_other: bool = False
    # Hand complete, verified models to the kernel (a read-only bind mount of hard links to the
    # blobs over the model directory): FUSE leaves the data path (docs/handoff.md).
    handoff: bool = True
    # How often the daemon checks its hand-offs against the mount table and the cache: a bind
    # unmounted behind its back is made again, one whose files left the cache is taken back.
    handoff_check_interval: float = 45.0
    # Owner shown for every file and folder of the mount; None: the daemon's own user and group.
    uid: int | None = None
    gid: int | None = None
    # Where /metrics listens (HOST:PORT, [IPv6]:PORT or :PORT); empty: no metrics server.
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    # Peers (docs/peers.md): where this node serves its files to other nodes (HOST:PORT, the
    # address they reach it at; it listens there too).  Empty: off.  With peers on, this node's
    # cache is its own (claims, last-used times and eviction in the state dir's registry) and
    # `registry` is the fleet's shared registry of who holds what.
    peer_address: str = ""
    # Networks whose nodes may fetch from this one.
    peer_allow: list[str] = field(default_factory=lambda: list(DEFAULT_PEER_ALLOW))
    # A file holding a token every node of the fleet shares; peers must present it.
    peer_token_file: Path | None = None
    # Mutual TLS between peers (all three, or none): this node's certificate chain and key
    # (PEM), and the fleet's CA, which must have signed every peer's certificate.
    peer_tls_cert: Path | None = None
    peer_tls_key: Path | None = None
    peer_tls_ca: Path | None = None
    log_level: str = "info"
    # A file holding the Hub token (instead of HF_TOKEN in the environment, which leaks into
    # `systemctl show` and /proc/<pid>/environ); read when the daemon starts, never logged.
    token_file: Path | None = None
    eviction: EvictionSettings = field(default_factory=lambda: EvictionSettings())
    extra: dict[str, object] = field(default_factory=dict)
    # Where each value that is not a default came from ("flag --lease", "environment MXFS_LEASE",
    # "file /etc/mxfs/mxfs.toml"), for error messages and --print-config.
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    # The config file that was read, if any.
    config_file: Path | None = None
    # Problems worth a log line but not a refusal to start (an unknown MXFS_ variable); the CLI
    # logs them once logging is set up.
    warnings: list[str] = field(default_factory=list, repr=False, compare=False)

    @property
    def peers(self) -> bool:
        """Peers are on: the cache is this node's own, ``registry`` is the fleet's."""
        return bool(self.peer_address)

    @property
    def registry_url(self) -> str:
        """The registry of this node's cache: claims, last-used times, pins, eviction.

        The one named by ``registry``, unless peers are on: then each node's cache is its own
        and so is its registry (in the state dir); ``registry`` is the fleet's (shared_registry_url).
        """
        if self.registry and not self.peers:
            return self.registry
        return f"sqlite://{(self.state_dir / 'registry.db').absolute()}"

    @property
    def peer_tls(self) -> bool:
        """Peers speak mutual TLS (docs/peers.md#security)."""
        return self.peer_tls_cert is not None

    @property
    def peer_url(self) -> str:
        """The base URL peers fetch from this node at, and its id in the fleet's holder listings."""
        return f"{'https' if self.peer_tls else 'http'}://{self.peer_address}"

    @property
    def shared_registry_url(self) -> str:
        """The registry every node shares: ref records (``mxfs refresh``) and, with peers, the
        fleet's claims and holders.  Without peers it is the cache's registry."""
        return self.registry if self.peers else self.registry_url

    def read_peer_token(self) -> str | None:
        """The peers' shared token from ``peer_token_file`` (None when unset)."""
        if self.peer_token_file is None:
            return None
        return self._read_secret("peer_token_file", self.peer_token_file)

    def validate(self) -> None:
        """Hold every value to its option's limit, as the parsers do: settings made in code (tests,
        embedders) never went through them."""
        for option in OPTIONS:
            try:
                option.check(get_value(self, option.key))
            except ConfigError as exc:
                if option.key in self.sources:
                    raise ConfigError(f"{exc} (from {self.sources[option.key]})") from None
                raise
        if self.peers and split_address(self.peer_address, "peer_address")[0] in (None, "0.0.0.0", "::"):
            raise ConfigError(
                f"peer_address: the address other nodes reach this one at, with its host, got {self.peer_address!r}"
            )
        tls = {key: getattr(self, key) for key in ("peer_tls_cert", "peer_tls_key", "peer_tls_ca")}
        if any(v is not None for v in tls.values()) and any(v is None for v in tls.values()):
            given = ", ".join(k for k, v in tls.items() if v is not None)
            missing = ", ".join(k for k, v in tls.items() if v is None)
            raise ConfigError(f"peer TLS needs peer_tls_cert, peer_tls_key and peer_tls_ca: {given} set, {missing} not")
        if self.peers and not self.registry:
            where = self.sources.get("peer_address")
            raise ConfigError(
                "peer_address: peers need the fleet's shared registry (registry = redis://... or kubernetes://...)"
                + (f" (from {where})" if where else "")
            )

    def read_token(self) -> str | None:
        """The Hub token from ``token_file`` (None when unset); warns if others may read the file.

        Read at start-up rather than at config time so that commands which never talk to the Hub
        (``status``, ``gc``) do not need to be able to read it.
        """
        if self.token_file is None:
            return None
        return self._read_secret("token_file", self.token_file)

    def _read_secret(self, key: str, path: Path) -> str:
        where = self.sources.get(key, "config")
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                token = f.read().decode("utf-8", "replace").strip()
        except OSError as exc:
            reason = f"cannot read {str(path)!r}: {exc.strerror}"
            raise ConfigError(f"{key}: {reason} (from {where})") from None
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning(
                "%s %s is readable by its group or by everyone (mode %04o); chmod 600 it",
                key,
                path,
                stat.S_IMODE(mode),
            )
        if not token:
            raise ConfigError(f"{key}: {str(path)!r} is empty (from {where})")
        return token


# -- the keys -------------------------------------------------------------------------------------

Parser = Callable[[object, str], object]
# What is wrong with a parsed value ("must be positive"), or None if nothing is.
Limit = Callable[[Any], str | None]
_OFF = ("off", "none", "")


def _text(raw: object, key: str) -> str:
    if not isinstance(raw, str):
        raise ConfigError(f"{key}: expected a string, got {raw!r}")
    return raw.strip()


def _path(raw: object, key: str) -> Path:
    text = _text(raw, key)
    if not text:
        raise ConfigError(f"{key}: expected a path, got {raw!r}")
    return Path(text).expanduser().absolute()


def _optional(parse: Parser) -> Parser:
    """``"off"`` (or ``false``, or empty) switches the setting off: None."""

    def parse_optional(raw: object, key: str) -> object:
        if raw is False or (isinstance(raw, str) and raw.strip().lower() in _OFF):
            return None
        return parse(raw, key)

    return parse_optional


def _bool(raw: object, key: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    raise ConfigError(f"{key}: expected true or false, got {raw!r}")


def _int(raw: object, key: str) -> int:
    if isinstance(raw, str) and re.fullmatch(r"[+-]?\d+", raw.strip()):
        return int(raw.strip())
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    raise ConfigError(f"{key}: expected a whole number, got {raw!r}")


def _duration(raw: object, key: str) -> float:
    if not isinstance(raw, str | int | float):
        raise ConfigError(f"{key}: expected a duration such as 30s, 5m, 2h30m or 7d, got {raw!r}")
    return parse_duration(raw, key)


def _size(raw: object, key: str) -> int:
    if not isinstance(raw, str | int | float):
        raise ConfigError(f"{key}: expected a size such as 500GiB, 10GB or 1048576, got {raw!r}")
    return parse_size(raw, key)


def _lowercase(raw: object, key: str) -> str:
    return _text(raw, key).lower()


def _at_least(minimum: int, spelled: str = "") -> Limit:
    return lambda value: f"must be at least {spelled or minimum}" if value < minimum else None


def _positive(value: float) -> str | None:
    return "must be positive" if value <= 0 else None


def _one_of(*values: str) -> Limit:
    return lambda value: None if value in values else f"expected one of {', '.join(values)}"


def _revision(raw: object, key: str) -> str:
    try:
        return validate_revision(_text(raw, key))
    except InvalidName:
        raise ConfigError(f"{key}: not a valid branch, tag or commit name, got {raw!r}") from None


def _models(raw: object, key: str) -> list[str]:
    """A TOML array of ``org/name[@rev]``, or (environment, flags) one comma-separated string."""
    if isinstance(raw, str):
        items: list[object] = [part for part in raw.split(",") if part.strip()]
    elif isinstance(raw, list):
        items = raw
    else:
        raise ConfigError(f'{key}: expected a list of models such as ["org/name", "org/other@v1"], got {raw!r}')
    models = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{key}: expected a model name such as org/name or org/name@v1, got {item!r}")
        try:
            parse_model_arg(item.strip(), "main")
        except InvalidName:
            raise ConfigError(f"{key}: expected a model name such as org/name or org/name@v1, got {item!r}") from None
        models.append(item.strip())
    return models


def _networks(raw: object, key: str) -> list[str]:
    """A TOML array of networks (``10.0.0.0/8``, ``fd00::/8``, or one address), or one
    comma-separated string (environment, flags)."""
    if isinstance(raw, str):
        items: list[object] = [part.strip() for part in raw.split(",") if part.strip()]
    elif isinstance(raw, list):
        items = raw
    else:
        raise ConfigError(f'{key}: expected a list of networks such as ["10.0.0.0/8", "fd00::/8"], got {raw!r}')
    networks = []
    for item in items:
        try:
            networks.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
        except ValueError:
            raise ConfigError(f"{key}: not a network such as 10.0.0.0/8 or fd00::/8: {item!r}") from None
    return networks


def split_address(text: str, key: str = "metrics_address") -> tuple[str | None, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (every interface) into (host or None, port)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT such as 127.0.0.1:9400 or [::1]:9400, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{key}: put an IPv6 address in brackets, e.g. [::1]:9400, got {text!r}")
    return host or None, int(port)


def _address(raw: object, key: str) -> str:
    text = _text(raw, key)
    if text:
        split_address(text, key)
    return text


def _owner(database: str) -> Parser:
    """A user (``database="user"``) or group id, by number or by name; resolved once, here."""

    def parse(raw: object, key: str) -> int:
        if isinstance(raw, int) or (isinstance(raw, str) and re.fullmatch(r"[+-]?\d+", raw.strip())):
            return _int(raw, key)
        name = _text(raw, key)
        try:
            return pwd.getpwnam(name).pw_uid if database == "user" else grp.getgrnam(name).gr_gid
        except KeyError:
            raise ConfigError(f"{key}: no {database} named {raw!r}") from None

    return parse


@dataclass(frozen=True)
class Option:
    """One setting: its key path in the file, how to read a value, what it means, and its limit."""

    key: str
    kind: str  # how --print-config spells a value: path, text, bool, int, duration, size, models
    parse: Parser
    help: str
    # Checked on values from the file, the environment and flags, and by Settings.validate.
    limit: Limit | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper().replace(".", "_")

    def read(self, raw: object) -> object:
        """A value as the file, the environment or a flag spells it: parsed, then checked."""
        value = self.parse(raw, self.key)
        self.check(value, raw)
        return value

    def check(self, value: object, spelled: object = None) -> None:
        """ConfigError naming the key and the value (as ``spelled``, if given) if it breaks the limit."""
        if value is not None and self.limit is not None and (problem := self.limit(value)):
            raise ConfigError(f"{self.key}: {problem}, got {value if spelled is None else spelled!r}")


OPTIONS: tuple[Option, ...] = (
    Option("cache_dir", "path", _path, "the Hugging Face hub cache that holds the files"),
    Option("state_dir", "path", _path, "mxfs's own state: SQLite registry, resolved revisions, tree listings"),
    Option("registry", "text", _text, "registry URL: sqlite:///path, redis://..., rediss://..."),
    Option("revision", "text", _revision, "the revision /<org>/<name> shows"),
    Option("lease", "duration", _duration, "download lease; the owner renews it every third of it", _positive),
    Option("negative_ttl", "duration", _duration, "how long a name the Hub does not know stays unknown"),
    Option(
        "verify",
        "text",
        _lowercase,
        "fast: serve bytes as they arrive; strict: only verified files",
        _one_of("fast", "strict"),
    ),
    Option("connections", "int", _int, "parallel HTTP connections of one model's download", _at_least(1)),
    Option("chunk_size", "size", _size, "size of one range request of a large file", _at_least(1 << 20, "1MiB")),
    Option("poll_interval", "duration", _duration, "how often a waiter looks at another node's download", _positive),
    Option(
        "refresh_within",
        "duration",
        _duration,
        "how soon every node following a branch moves after `mxfs refresh` on any node",
        _positive,
    ),
    Option("ca_bundle", "path", _optional(_path), "CA bundle (PEM) Hub connections trust (a proxy that re-signs TLS)"),
    Option("allow_other", "bool", _bool, "let users other than the daemon's read the mount (pods running as non-root)"),
    Option("handoff", "bool", _bool, "serve complete models by the kernel (bind mount), FUSE off the data path"),
    Option(
        "handoff_check_interval",
        "duration",
        _duration,
        "how often handed-off models are checked against the mount table and the cache",
        _positive,
    ),
    Option(
        "uid",
        "int",
        _optional(_owner("user")),
        "owner shown for files and folders (default: the daemon's user)",
        _at_least(0),
    ),
    Option(
        "gid",
        "int",
        _optional(_owner("group")),
        "group shown for files and folders (default: the daemon's group)",
        _at_least(0),
    ),
    Option("metrics_address", "text", _address, "where Prometheus /metrics listens; empty: off"),
    Option("peer_address", "text", _address, "HOST:PORT this node serves its files to peers at; empty: peers off"),
    Option("peer_allow", "networks", _networks, "networks (CIDR) whose nodes may fetch from this one"),
    Option("peer_token_file", "path", _optional(_path), "a file holding the token every node of the fleet shares"),
    Option("peer_tls_cert", "path", _optional(_path), "peers speak mutual TLS: this node's certificate chain (PEM)"),
    Option("peer_tls_key", "path", _optional(_path), "the private key of peer_tls_cert (PEM); keep it mode 0600"),
    Option("peer_tls_ca", "path", _optional(_path), "the fleet's CA (PEM): it signed every peer's certificate"),
    Option("log_level", "text", _lowercase, "debug, info, warning, error", _one_of(*LOG_LEVELS)),
    Option("token_file", "path", _optional(_path), "a file holding the Hub token (like HF_TOKEN); keep it mode 0600"),
    Option("eviction.enabled", "bool", _bool, "run the background eviction task"),
    Option("eviction.check_interval", "duration", _duration, "how often the eviction task runs", _positive),
    Option("eviction.unused_threshold", "duration", _optional(_duration), "evict models unused for this long"),
    Option("eviction.max_models", "int", _optional(_int), "keep at most this many models", _at_least(0)),
    Option("eviction.max_cache_size", "size", _optional(_size), "keep the cache's blobs below this size"),
    Option("eviction.min_free_space", "size", _optional(_size), "keep this much free on the cache's disk"),
    Option("eviction.in_use_grace", "duration", _duration, "never evict a model used this recently"),
    Option("eviction.pinned", "models", _models, "models never evicted (org/name, or org/name@rev)"),
)
OPTIONS_BY_KEY = {option.key: option for option in OPTIONS}
OPTIONS_BY_ENV = {option.env: option for option in OPTIONS}


def toml_value(option: Option, value: object) -> str | None:
    """``value`` as a TOML literal that ``option`` parses back; None for an unset optional value."""
    if value is None:
        # An eviction rule that is off says so; an unset uid, gid or token_file is just absent.
        return '"off"' if option.key.startswith("eviction.") else None
    if isinstance(value, bool):
        return "true" if value else "false"
    if option.kind == "duration" and isinstance(value, int | float):
        return json.dumps(format_duration(value))
    if option.kind == "size" and isinstance(value, int):
        return json.dumps(format_exact_size(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return json.dumps([str(item) for item in value])
    # A JSON string (or array of strings) is also a valid TOML basic string (or array).
    return json.dumps(str(value))


def default_text(key: str) -> str:
    """``key``'s default as help text spells it: ``30s``, ``64MiB``, ``off``."""
    value = get_value(Settings(), key)
    if value is None or isinstance(value, bool):
        return "on" if value else "off"
    text = toml_value(OPTIONS_BY_KEY[key], value)
    assert text is not None
    return json.loads(text) if text.startswith('"') else text


def get_value(settings: Settings, key: str) -> object:
    target: object = settings
    for part in key.split("."):
        target = getattr(target, part)
    return target


def _set_value(settings: Settings, key: str, value: object) -> None:
    *parents, name = key.split(".")
    target: object = settings
    for part in parents:
        target = getattr(target, part)
    setattr(target, name, value)


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, OPTIONS_BY_KEY, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def read_config_file(path: Path) -> dict[str, object]:
    """The file's settings by dotted key; unknown keys and TOML syntax errors are ConfigErrors."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict[str, object] = {}
    for key, value in data.items():
        if key == "eviction":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: eviction: expected a table ([eviction]), got {value!r}")
            for sub, sub_value in value.items():
                values[f"eviction.{sub}"] = sub_value
        else:
            values[key] = value
    for key in values:
        if key not in OPTIONS_BY_KEY:
            raise _unknown(key, str(path))
    return values


def load_settings(
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, tuple[object, str]] | None = None,
) -> Settings:
    """Defaults, then the config file, then ``MXFS_*`` variables, then flags; validated.

    ``config`` is ``--config`` (a missing file is an error); without it ``$MXFS_CONFIG`` (also
    required to exist) or ``/etc/mxfs/mxfs.toml`` (optional: no file means defaults).  ``flags``
    maps a key to (value, the flag's spelling) for the error messages.
    """
    env = os.environ if env is None else env
    settings = Settings()
    layers: list[tuple[dict[str, object], Callable[[str], str]]] = []

    path, explicit = config, config is not None
    if path is None and env.get(CONFIG_ENV):
        path, explicit = Path(env[CONFIG_ENV]), True
    path = path or DEFAULT_CONFIG_FILE
    try:
        file_values = read_config_file(path)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {str(path)!r} not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc.strerror}") from None
    else:
        settings.config_file = file_path = path.absolute()
        layers.append((file_values, lambda _key: f"file {file_path}"))

    env_values: dict[str, object] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        option = OPTIONS_BY_ENV.get(name)
        if option is None:
            settings.warnings.append(f"ignoring unknown environment variable {name}")
            continue
        env_values[option.key] = value
    layers.append((env_values, lambda key: f"environment {OPTIONS_BY_KEY[key].env}"))

    flag_values = {key: value for key, (value, _flag) in (flags or {}).items()}
    flag_names = {key: flag for key, (_value, flag) in (flags or {}).items()}
    layers.append((flag_values, lambda key: f"flag {flag_names[key]}"))

    for values, where in layers:
        for key, raw in values.items():
            option = OPTIONS_BY_KEY.get(key)
            if option is None:
                raise _unknown(key, where(key))
            try:
                value = option.read(raw)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (from {where(key)})") from None
            _set_value(settings, key, value)
            settings.sources[key] = where(key)
    settings.validate()
    return settings
