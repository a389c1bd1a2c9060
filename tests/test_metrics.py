"""Prometheus metrics: the collector over real services, the /metrics endpoint, and a real mount.

Event counters live in one registry per process, so in-process tests compare before and after;
the mount test starts a fresh daemon, where every counter starts at zero and must end up at the
exact value the Hub's own request log implies.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from mxfs import __version__, exporter, metrics
from mxfs.config import ConfigError, Settings, split_address
from mxfs.daemon import Services, open_services
from mxfs.errors import MxfsError
from mxfs.evict import EvictionReport, Reason, Victim, record_evictions
from mxfs.hub import HubClient
from mxfs.names import EntryName
from mxfs.registry import Record, RegistryError, Status
from tests.hubserver import FakeHub
from tests.mounting import MountedFs, requires_fuse
from tests.scrape import free_port, http_scrape, parse, value

COMMIT = "a" * 40


# -- helpers -----------------------------------------------------------------------------------------


def event(name: str, **labels: str) -> float:
    """The current value of an event sample in this process's registry."""
    found = metrics.EVENTS.get_sample_value(name, labels)
    return 0.0 if found is None else found


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    settings = Settings(cache_dir=tmp_path / "cache", state_dir=tmp_path / "state")
    async with open_services(settings) as s:
        yield s


async def scrape(services: Services, accept: str = "") -> tuple[dict, str, str]:
    body, content_type = await exporter.Exporter(services.scrape_sources()).render(accept)
    text = body.decode()
    return parse(text), text, content_type


async def add_downloaded(services: Services, repo_id: str, commit: str, size: int = 0) -> str:
    name = EntryName(repo_id, commit).key
    await services.registry.try_claim(name, "c1", 30.0)
    await services.registry.finish_claim(name, "c1", Status.DOWNLOADED, None, size)
    return name


def put_blob(services: Services, repo_id: str, commit: str, data: bytes, etag: str = "e" * 64) -> None:
    cache = services.cache
    cache.blob_path(repo_id, etag).parent.mkdir(parents=True, exist_ok=True)
    cache.blob_path(repo_id, etag).write_bytes(data)
    cache.link_snapshot(repo_id, commit, "model.bin", etag)


# -- the collector ------------------------------------------------------------------------------------


async def test_every_metric_is_named_documented_and_present(services: Services) -> None:
    samples, text, content_type = await scrape(services)
    assert content_type.startswith("text/plain")
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    assert all(name.startswith("mxfs_") for name in names), names
    assert all(f.documentation for f in families)
    assert {
        "mxfs_build_info",
        "mxfs_entries",
        "mxfs_cache_bytes",
        "mxfs_cache_free_bytes",
        "mxfs_read_bytes",
        "mxfs_open_handles",
        "mxfs_downloads_in_progress",
        "mxfs_downloads_started",
        "mxfs_downloads_finished",
        "mxfs_downloads_failed",
        "mxfs_downloaded_bytes",
        "mxfs_hub_request_duration_seconds",
        "mxfs_evictions",
        "mxfs_evicted_bytes",
        "mxfs_eviction_cycles",
        "mxfs_registry_errors",
        "mxfs_handoff_enabled",
        "mxfs_handoff_model_dirs",
    } <= names
    # A fresh daemon: nothing read, nothing open, no entries, an empty cache on a real disk.
    assert value(samples, "mxfs_build_info", version=__version__, python=platform.python_version()) == 1
    assert value(samples, "mxfs_read_bytes_total") == 0
    assert value(samples, "mxfs_open_handles") == 0
    assert value(samples, "mxfs_downloads_in_progress") == 0
    # No mount, so no hand-off (a mount's is tested in tests/test_handoff.py).
    assert value(samples, "mxfs_handoff_enabled") == 0
    assert value(samples, "mxfs_handoff_model_dirs") == 0
    for status in ("downloading", "downloaded", "error"):
        assert value(samples, "mxfs_entries", status=status) == 0
    assert value(samples, "mxfs_cache_bytes") == 0
    assert value(samples, "mxfs_cache_free_bytes") > 0
    # Labelled series exist before their first event, so rate() sees them from the start.
    for kind in metrics.HUB_KINDS:
        assert value(samples, "mxfs_hub_request_duration_seconds_count", kind=kind) is not None
    for reason in Reason:
        assert value(samples, "mxfs_evictions_total", reason=reason) is not None
        assert value(samples, "mxfs_evicted_bytes_total", reason=reason) is not None


async def test_openmetrics_on_request(services: Services) -> None:
    _, text, content_type = await scrape(services, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")


async def test_entries_and_cache_bytes_follow_the_registry_and_the_disk(services: Services) -> None:
    await add_downloaded(services, "org/one", COMMIT, 100_000)
    await add_downloaded(services, "org/two", "b" * 40)
    await services.registry.try_claim(EntryName("org/three", COMMIT).key, "c2", 30.0)
    put_blob(services, "org/one", COMMIT, os.urandom(100_000))
    samples, _, _ = await scrape(services)
    assert value(samples, "mxfs_entries", status="downloaded") == 2
    assert value(samples, "mxfs_entries", status="downloading") == 1
    assert value(samples, "mxfs_entries", status="error") == 0
    # Disk usage (whole blocks), so at least the blob's bytes.
    assert 100_000 <= value(samples, "mxfs_cache_bytes") < 200_000


class _DownRegistry:
    async def status_counts(self) -> None:
        raise RegistryError("registry unreachable")


async def test_registry_outage_drops_entry_counts_only(services: Services) -> None:
    down = dataclasses.replace(services, registry=_DownRegistry())
    samples, text, _ = await scrape(down)
    assert "mxfs_entries{" not in text
    assert value(samples, "mxfs_cache_free_bytes") > 0
    assert value(samples, "mxfs_read_bytes_total") == 0


async def test_registry_errors_are_counted(services: Services) -> None:
    before = event("mxfs_registry_errors_total")
    with pytest.raises(RegistryError):
        await services.registry._run(lambda conn: conn.execute("SELECT * FROM no_such_table"))
    assert event("mxfs_registry_errors_total") == before + 1


async def test_manual_eviction_counts_entries_and_bytes(services: Services) -> None:
    name = await add_downloaded(services, "org/evictme", COMMIT, 50_000)
    put_blob(services, "org/evictme", COMMIT, os.urandom(50_000))
    before = event("mxfs_evictions_total", reason="manual"), event("mxfs_evicted_bytes_total", reason="manual")
    cycles = event("mxfs_eviction_cycles_total")
    report = await services.evictor.evict([name], force=True)
    assert [v.name for v in report.evicted] == [name]
    assert event("mxfs_evictions_total", reason="manual") == before[0] + 1
    assert event("mxfs_evicted_bytes_total", reason="manual") == before[1] + 50_000
    assert event("mxfs_eviction_cycles_total") == cycles  # a manual eviction is not a sweep


async def test_eviction_cycle_counts_by_reason(services: Services) -> None:
    old = datetime.now(UTC) - timedelta(days=30)
    record = Record(EntryName("org/old", COMMIT).key, "HuggingFace", Status.DOWNLOADED, old, old)
    before = event("mxfs_evictions_total", reason="time"), event("mxfs_eviction_cycles_total")
    record_evictions(EvictionReport(dry_run=True, evicted=[Victim(record, Reason.TIME, 10)]), cycle=True)
    assert (event("mxfs_evictions_total", reason="time"), event("mxfs_eviction_cycles_total")) == before
    record_evictions(EvictionReport(evicted=[Victim(record, Reason.TIME, 10)]), cycle=True)
    assert event("mxfs_evictions_total", reason="time") == before[0] + 1
    assert event("mxfs_eviction_cycles_total") == before[1] + 1
    # And through a real sweep that finds nothing to do: a cycle, no eviction.
    await services.evictor.cycle()
    assert event("mxfs_eviction_cycles_total") == before[1] + 2


def test_hub_latency_by_request_kind(hub: FakeHub, new_repo_id: Callable[[], str]) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": os.urandom(200_000)})
    client = HubClient(endpoint=hub.endpoint, offline=False)
    counts = {kind: event("mxfs_hub_request_duration_seconds_count", kind=kind) for kind in metrics.HUB_KINDS}
    resolved = client.resolve(repo, "main")
    tree = client.list_tree(repo, resolved.commit, resolved.commit_date)
    for f in tree.files:
        with client.open_range(repo, resolved.commit, f.path, 0, f.size) as body:
            assert sum(len(c) for c in body.chunks()) == f.size
    with pytest.raises(MxfsError):
        client.resolve(repo, "no-such-branch")
    after = {kind: event("mxfs_hub_request_duration_seconds_count", kind=kind) for kind in metrics.HUB_KINDS}
    # Failed requests are timed too: a slow failing Hub must show in the latency.
    assert after == {"resolve": counts["resolve"] + 2, "tree": counts["tree"] + 1, "range": counts["range"] + 2}


# -- the address and the HTTP endpoint -------------------------------------------------------------


def test_default_binds_to_loopback_only() -> None:
    assert split_address(Settings().metrics_address) == ("127.0.0.1", 9400)


async def test_bad_address_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="metrics_address"):
        await exporter.listen("::1:9400")


async def request(port: int, raw: bytes, host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` and read the whole answer (the server closes after one response)."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(raw)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.fixture
async def endpoint(services: Services, nursery: trio.Nursery) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(exporter.serve, listeners, services.scrape_sources())
    return listeners[0].socket.getsockname()[1]


async def test_endpoint_serves_metrics(endpoint: int) -> None:
    status, headers, body = await request(endpoint, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert int(headers["content-length"]) == len(body)
    assert value(parse(body.decode()), "mxfs_read_bytes_total") == 0
    status, headers, body = await request(endpoint, b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, headers, body = await request(
        endpoint, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n"
    )
    assert headers["content-type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"hello\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ],
)
async def test_endpoint_refuses_what_is_not_a_scrape(endpoint: int, raw: bytes, status: int) -> None:
    assert (await request(endpoint, raw))[0] == status


async def test_endpoint_survives_silent_and_vanishing_clients(endpoint: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exporter, "REQUEST_TIMEOUT", 0.3)
    # A client that never finishes its request is cut off after REQUEST_TIMEOUT...
    silent = await trio.open_tcp_stream("127.0.0.1", endpoint)
    await silent.send_all(b"GET /metrics HTTP/1.1\r\n")
    with trio.fail_after(exporter.REQUEST_TIMEOUT + 5):
        assert await silent.receive_some(100) == b""
    await silent.aclose()
    # ...one that hangs up mid-request costs nothing; the next scrape is served.
    gone = await trio.open_tcp_stream("127.0.0.1", endpoint)
    await gone.send_all(b"GET /met")
    await gone.aclose()
    assert (await request(endpoint, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200


async def test_bind_failure_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MxfsError, match=rf"metrics: cannot listen on 127\.0\.0\.1:{port}: Address already in use"):
            await exporter.listen(f"127.0.0.1:{port}")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_loopback(services: Services, nursery: trio.Nursery) -> None:
    port = free_port("::1")
    listeners = await exporter.listen(f"[::1]:{port}")
    assert [listener.socket.getsockname()[:2] for listener in listeners] == [("::1", port)]
    nursery.start_soon(exporter.serve, listeners, services.scrape_sources())
    assert (await request(port, b"GET /metrics HTTP/1.1\r\n\r\n", "::1"))[0] == 200


# -- a real mount -------------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (IPv4 and IPv6), as hex from /proc."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


@requires_fuse
def test_mount_metrics_follow_a_read(hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path) -> None:
    repo = new_repo_id()
    weights = os.urandom(3_000_000)
    files = {"config.json": b'{"model_type": "test"}', "model.safetensors": weights, "vocab.txt": b"a\nb\n" * 1000}
    hub.add_repo(repo, files)
    token = "hf_metrics_test_secret_token"
    hub.valid_tokens.add(token)
    port = free_port()
    mount: MountedFs = mxfs_mount("--metrics-address", f"127.0.0.1:{port}", env=hub.env(token=token))

    # Bound to loopback only, and said so.
    assert listening_addresses(port) == {"0100007F"}
    assert f"metrics at http://127.0.0.1:{port}/metrics" in mount.log()
    before = parse(http_scrape(port))
    assert value(before, "mxfs_read_bytes_total") == 0
    assert value(before, "mxfs_downloads_started_total") == 0

    with open(mount / repo / "model.safetensors", "rb") as f:
        assert f.read() == weights
        wait_for(lambda: value(parse(http_scrape(port)), "mxfs_open_handles") == 1)
    wait_for(lambda: value(parse(http_scrape(port)), "mxfs_downloads_finished_total") == 1)
    wait_for(lambda: value(parse(http_scrape(port)), "mxfs_open_handles") == 0)

    text = http_scrape(port)
    after = parse(text)
    total = sum(len(data) for data in files.values())
    file_requests = [r for r in hub.requests(method="GET", repo_id=repo) if r.kind in ("resolve", "cdn")]
    assert value(after, "mxfs_read_bytes_total") == len(weights)
    assert value(after, "mxfs_downloads_started_total") == 1
    assert value(after, "mxfs_downloads_failed_total") == 0
    assert value(after, "mxfs_downloads_in_progress") == 0
    # Exactly what the Hub sent, which is at least the whole entry.
    assert value(after, "mxfs_downloaded_bytes_total") == sum(r.bytes_sent for r in file_requests) >= total
    assert value(after, "mxfs_entries", status="downloaded") == 1
    assert value(after, "mxfs_cache_bytes") >= total
    assert value(after, "mxfs_cache_free_bytes") > 0
    # One resolve and one listing for the model; one range request per /resolve the Hub saw.
    assert value(after, "mxfs_hub_request_duration_seconds_count", kind="resolve") == 1
    assert value(after, "mxfs_hub_request_duration_seconds_count", kind="tree") == 1
    ranges = [r for r in file_requests if r.kind == "resolve"]
    assert value(after, "mxfs_hub_request_duration_seconds_count", kind="range") == len(ranges) >= len(files)
    assert value(after, "mxfs_hub_request_duration_seconds_sum", kind="range") > 0
    # No secret and no path leaks into the scrape.
    assert token not in text
    assert str(tmp_path) not in text and repo not in text

    assert mount.stop() == 0


@requires_fuse
def test_mount_fails_cleanly_when_the_metrics_port_is_taken(hub: FakeHub, mxfs_mount) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mount: MountedFs = mxfs_mount("--metrics-address", f"127.0.0.1:{port}", wait=False)
        assert mount.proc.wait(20) == 1
    assert f"metrics: cannot listen on 127.0.0.1:{port}: Address already in use" in mount.log()
    assert not os.path.ismount(mount.mountpoint)
