"""Section ``peers`` of bench/run.py: a fleet of nodes loads one model at once, with peers vs without.

Side by side in one run, ``--peers-nodes`` daemons (default 4), each with its own cache and state
dir, read every file of a model of 2 shards (``--peers-size`` in all) at the same moment, one
thread per node and file, from a Hub paced like a CDN (``--pace`` bytes/s per connection):

* without peers: each node has its own SQLite registry and downloads the whole model from the Hub;
* with peers: the nodes share a real ``redis-server`` (``--registry redis://...``) and serve each
  other at ``--peer-address 127.0.0.1:<port>``: one node downloads from the Hub for the fleet, the
  others take the bytes from it (and from each other) as they land.

Twice: with the per-connection pace only, and with an uplink that all connections share
(``--peers-uplink`` bytes/s in total, the fleet's egress; FakeHub's ``--pace-total``).  Each run
measures the seconds until the last node has every byte (each read is hashed and compared with
the file's sha256: a wrong byte fails the run), the Hub's body bytes (FakeHub ``bytes_served``,
asked of the Hub subprocess by SIGUSR1) per node and model copy, and the daemons' CPU seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SHARDS = 2
READ_TIMEOUT = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_and_hash(path: Path, bs: int) -> tuple[int, str]:
    """Every byte of ``path`` in ``bs``-sized reads, hashed as they come: (bytes, sha256)."""
    h = hashlib.sha256()
    size = os.stat(path).st_size
    buf = bytearray(bs)
    view = memoryview(buf)
    total = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for _ in range(size // bs + 64):  # bounded: the file is ``size`` bytes
            n = os.readv(fd, [buf])
            if n == 0:
                break
            h.update(view[:n])  # hashlib releases the GIL for large buffers: the readers run side by side
            total += n
        else:
            raise RuntimeError(f"{path}: more bytes than its size {size}")
    finally:
        os.close(fd)
    return total, h.hexdigest()


def load_at_once(models: list[Path], expected: dict[str, str], bs: int) -> float:
    """Every node reads every file at the same moment (a thread per node and file); the seconds
    until the last read ends.  Raises on any read whose bytes are not the file's."""
    jobs = [(model, name) for model in models for name in sorted(expected)]
    start = threading.Barrier(len(jobs) + 1)
    ends: list[float] = []
    errors: list[str] = []

    def reader(model: Path, name: str) -> None:
        try:
            start.wait(60)
            _n, digest = read_and_hash(model / name, bs)
            if digest != expected[name]:
                errors.append(f"{model / name}: sha256 {digest}, expected {expected[name]}")
        except BaseException as exc:  # reported below, with the others
            errors.append(f"{model / name}: {type(exc).__name__}: {exc}")
        finally:
            ends.append(time.perf_counter())

    threads = [threading.Thread(target=reader, args=job, daemon=True) for job in jobs]
    for t in threads:
        t.start()
    start.wait(60)
    t0 = time.perf_counter()
    deadline = time.monotonic() + READ_TIMEOUT
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"readers still running after {READ_TIMEOUT:.0f}s")
    if errors:
        raise RuntimeError("wrong or failed reads: " + "; ".join(errors[:4]))
    return max(ends) - t0


def busiest_thread_cpu(pid: int) -> float:
    """CPU seconds of a process's busiest thread: near the wall time, that thread (with its GIL)
    is what bounds the process."""
    best = 0.0
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        best = max(best, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return best


@dataclass
class FleetRun:
    seconds: float
    hub_bytes: int
    cpu: list[float]  # each daemon's CPU seconds
    top_thread: list[float]  # each daemon's busiest thread's CPU seconds
    hub_cpu: float  # the Hub process's CPU seconds meanwhile (what the peers take over)


def make_fleet_certificates(directory: Path) -> tuple[str, ...]:
    """A fleet CA and one node certificate signed by it (``openssl``): the daemons' TLS flags."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key, cert, key, csr = (directory / n for n in ("ca.pem", "ca.key", "node.pem", "node.key", "node.csr"))

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(ca_key), "-out", str(ca),
            "-subj", "/CN=mxfs-bench-fleet")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=node")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "1",
            "-out", str(cert))  # fmt: skip
    return ("--peer-tls-cert", str(cert), "--peer-tls-key", str(key), "--peer-tls-ca", str(ca))


def one_fleet(
    suite, tools, hub, redis, repo_id: str, expected: dict[str, str], peers: bool, tag: str, tls: tuple[str, ...] = ()
) -> FleetRun:
    """Start the nodes (side by side), load the model on all of them at once, stop them.
    ``tls``: the peers' TLS flags (peers over mutual TLS)."""
    nodes = suite.args.peers_nodes
    caches = [suite.fresh("cache") for _ in range(nodes)]
    if redis is not None:
        redis.client().flushdb()

    def start(i: int):
        extra: tuple[str, ...] = ()
        if peers:
            extra = ("--registry", redis.url(), "--peer-address", f"127.0.0.1:{free_port()}", *tls)
        return suite.mxfs(caches[i], suite.fresh("state"), f"{tag}-node{i}", hub.endpoint, extra)

    daemons = []
    with ThreadPoolExecutor(nodes) as pool:
        futures = [pool.submit(start, i) for i in range(nodes)]
        errors = []
        for future in futures:
            try:
                daemons.append(future.result())
            except Exception as exc:  # stop the ones that did start, then fail
                errors.append(exc)
    try:
        if errors:
            raise errors[0]
        served_before, hub_cpu_before = hub.bytes_served(), tools.cpu_seconds(hub.proc.pid) or 0.0
        seconds = load_at_once([d.mnt / repo_id for d in daemons], expected, tools.READ_BS)
        # Every node's download published (nothing still in flight that the Hub would count later).
        for cache in caches:
            suite.wait_cached(cache, sorted(expected), repo_id)
        served = hub.bytes_served() - served_before
        hub_cpu = (tools.cpu_seconds(hub.proc.pid) or 0.0) - hub_cpu_before
        cpu = [tools.cpu_seconds(d.pid) or 0.0 for d in daemons]
        top = [busiest_thread_cpu(d.pid) for d in daemons]
    finally:
        with ThreadPoolExecutor(nodes) as pool:
            list(pool.map(lambda d: d.stop(), daemons))
    for path in caches:
        shutil.rmtree(path, ignore_errors=True)
    return FleetRun(seconds, served, cpu, top, hub_cpu)


def run_section(suite, tools) -> None:
    """Rows p1-p3 for each Hub shape; ``suite`` is bench/run.py's Suite, ``tools`` that module."""
    sys.path.insert(0, str(tools.REPO_ROOT))  # tests.redis_server: the tests' real redis-server
    from tests.redis_server import RedisServer, redis_server_available

    args = suite.args
    nodes, size, pace = args.peers_nodes, args.peers_size, args.pace
    repo_id = "bench/peers"
    repo_dir = suite.work / "peers-repo"
    tools.make_sharded_repo(repo_dir, size, SHARDS)
    expected = {name: sha256_of(repo_dir / name) for name in os.listdir(repo_dir)}
    total = sum((repo_dir / name).stat().st_size for name in expected)
    if not redis_server_available():
        suite.notes.append("peers skipped: no redis-server binary")
        tools.log("peers skipped: no redis-server binary")
        return
    paced = f"Hub {pace / tools.MIB:.0f} MiB/s per connection" if pace else "Hub unpaced"
    shapes = [(paced, "paced", ["--pace", str(pace)] if pace else [])]
    if args.peers_uplink:
        shapes.append((f"{paced}, {args.peers_uplink / tools.MIB:.0f} MiB/s uplink", "uplink",
                       [*shapes[0][2], "--pace-total", str(args.peers_uplink)]))  # fmt: skip
    tls = make_fleet_certificates(suite.work / "peers-tls") if args.peers_tls else ()
    with RedisServer() as redis:
        for label, tag, hub_args in shapes:
            hub = tools.HubServer({repo_id: repo_dir}, suite.work / f"hub-peers-{tag}.log", hub_args)
            try:
                modes = ["own", "peers", *(["tls"] if tls else [])]
                vals: dict[str, dict[str, list[float]]] = {
                    mode: {"s": [], "hub": [], "cpu": [], "top": [], "thread": []} for mode in modes
                }
                for r in range(suite.repeat):
                    # Rotate which goes first: none always meets a warmer machine.
                    for which in modes[r % len(modes) :] + modes[: r % len(modes)]:
                        peers = which != "own"
                        run = one_fleet(
                            suite, tools, hub, redis if peers else None, repo_id, expected, peers, f"{tag}-{which}{r}",
                            tls if which == "tls" else (),
                        )  # fmt: skip
                        per_copy = run.hub_bytes / (nodes * total)
                        busiest = max(range(nodes), key=lambda i: run.cpu[i])
                        said = {"own": "without peers", "peers": "with peers", "tls": "with peers over mutual TLS"}
                        tools.log(f"peers/{tag}, {said[which]}: {run.seconds:.2f} s, "
                                  f"Hub sent {run.hub_bytes / tools.MIB:.0f} MiB ({per_copy:.2f} per node-model), "
                                  f"daemons' CPU {sum(run.cpu):.1f} s "
                                  f"({', '.join(f'{c:.1f}' for c in run.cpu)}; the busiest's busiest thread "
                                  f"{run.top_thread[busiest]:.1f} s); the Hub's CPU {run.hub_cpu:.1f} s")  # fmt: skip
                        vals[which]["s"].append(run.seconds)
                        vals[which]["hub"].append(per_copy)
                        vals[which]["cpu"].append(sum(run.cpu))
                        vals[which]["top"].append(max(run.cpu))
                        vals[which]["thread"].append(run.top_thread[busiest])
            finally:
                hub.stop()
            what = f"{nodes} nodes load {size / tools.MIB:.0f} MiB ({SHARDS} shards) at once, {label}"
            base = "without peers"
            rows = (
                ("p1", "until the last node has every byte (sha256 checked)", "s", "s"),
                ("p2", f"Hub bytes / ({nodes} x model size)", "x", "hub"),
                ("p3", f"the {nodes} daemons' CPU", "CPU-s", "cpu"),
                ("p4", "the busiest daemon's CPU", "CPU-s", "top"),
                ("p5", "the busiest daemon's busiest thread's CPU", "CPU-s", "thread"),
            )
            for row, name, unit, key in rows:
                suite.add(f"{row}. {what}: {name}", unit, vals["peers"][key], {base: vals["own"][key]}, False)
            if tls:
                for row, name, unit, key in (
                    ("p6", "until the last node has every byte, peers over mutual TLS", "s", "s"),
                    ("p7", f"the {nodes} daemons' CPU, peers over mutual TLS", "CPU-s", "cpu"),
                ):
                    suite.add(
                        f"{row}. {what}: {name}", unit, vals["tls"][key], {"plain peers": vals["peers"][key]}, False
                    )
