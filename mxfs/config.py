"""Settings and the duration/size grammar of DESIGN section 7.

Durations: ``45s``, ``30m``, ``2h30m``, ``7d``, ``1.5h`` or plain seconds.  Sizes: ``500GiB``,
``10GB``, ``1.5MiB`` or plain bytes.  Parse errors name the key and the bad value, so a typo in
``/etc/mxfs/mxfs.toml`` is reported as such and not as a stack trace.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CACHE_DIR = Path("/var/cache/mxfs")
DEFAULT_STATE_DIR = Path("/var/cache/mxfs-state")

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


@dataclass
class EvictionSettings:
    """DESIGN section 6; ``None`` switches a rule off."""

    enabled: bool = True
    check_interval: float = 300.0
    unused_threshold: float | None = 7 * 86400.0
    max_models: int | None = None
    max_cache_size: int | None = None
    min_free_space: int | None = None
    in_use_grace: float = 600.0

    def validate(self) -> None:
        if self.check_interval <= 0:
            raise ConfigError(f"eviction.check_interval: must be positive, got {self.check_interval!r}")
        if self.max_models is not None and self.max_models < 0:
            raise ConfigError(f"eviction.max_models: cannot be negative, got {self.max_models!r}")


@dataclass
class Settings:
    """Everything the daemon and the cache commands can be told."""

    cache_dir: Path = DEFAULT_CACHE_DIR
    state_dir: Path = DEFAULT_STATE_DIR
    registry: str = ""  # empty: sqlite in the state dir
    revision: str = "main"
    lease: float = 30.0
    negative_ttl: float = 30.0
    # "fast": serve range bytes as they arrive; "strict": only bytes of a verified blob.
    verify: str = "fast"
    # Parallel HTTP connections of one entry's download, and the size of one range request.
    connections: int = 8
    chunk_size: int = 64 * 1024 * 1024
    # How often a node that waits for another node's download looks at the registry and the cache.
    poll_interval: float = 0.5
    allow_other: bool = False
    log_level: str = "info"
    eviction: EvictionSettings = field(default_factory=lambda: EvictionSettings())
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def registry_url(self) -> str:
        return self.registry or f"sqlite://{(self.state_dir / 'registry.db').absolute()}"

    def validate(self) -> None:
        self.eviction.validate()
        if self.verify not in ("fast", "strict"):
            raise ConfigError(f"verify: expected 'fast' or 'strict', got {self.verify!r}")
        if self.lease <= 0:
            raise ConfigError(f"lease: must be positive, got {self.lease!r}")
        if self.connections < 1:
            raise ConfigError(f"connections: must be at least 1, got {self.connections!r}")
        if self.chunk_size < 1024 * 1024:
            raise ConfigError(f"chunk_size: must be at least 1MiB, got {self.chunk_size!r}")
