"""A cold load through the mount, this tree against another revision, alternating, side by side.

For a change meant to make cold loads cheaper: on a shared, noisy machine only runs taken in
turns say anything.  Each run starts the test Hub (paced per connection like a CDN), mounts with
``--no-handoff``, reads the file once with 1 MiB reads, and reads the daemon's CPU time from
``/proc/<pid>/stat``.

    .venv/bin/python bench/cold_ab.py --against HEAD~2 --size 1GiB --repeat 3

The other revision is checked out with ``git worktree`` into the work dir; both trees run with
this checkout's virtual environment.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.run import parse_size  # noqa: E402
from tests.scrape import free_port  # noqa: E402

PY = sys.executable
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def one_load(tree: Path, data: Path, work: Path, pace: int) -> tuple[float, float]:
    """(seconds, daemon CPU seconds) of one cold load of ``org/big/model.safetensors``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "MXFS_CONFIG": "/dev/null", "MXFS_METRICS_ADDRESS": ""}
    port = free_port()
    paced = ["--pace", str(pace)] if pace else []  # 0: unpaced
    hub = subprocess.Popen(
        [PY, "-m", "tests.hubserver", "--port", str(port), "--data", str(data), *paced],
        cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    mnt, cache, state = work / "mnt", work / "cache", work / "state"
    for d in (mnt, cache, state):
        subprocess.run(["rm", "-rf", str(d)], check=True)
        d.mkdir()
    daemon = None
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/api/models/org/big"), 20, "the Hub")
        daemon = subprocess.Popen(
            [PY, "-m", "mxfs", "mount", str(mnt), "--cache-dir", str(cache), "--state-dir", str(state),
             "--no-handoff", "--no-eviction"],
            cwd=tree, env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{port}"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: os.path.ismount(mnt), 20, "the mount")
        (mnt / "org" / "big" / "config.json").read_bytes()  # the lookup and tree listing, not timed
        before, started = cpu_seconds(daemon.pid), time.monotonic()
        with open(mnt / "org" / "big" / "model.safetensors", "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
        return time.monotonic() - started, cpu_seconds(daemon.pid) - before
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(30)
        hub.terminate()
        hub.wait(30)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="the git revision to compare with (e.g. HEAD~1)")
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--pace", type=parse_size, default=parse_size("200MiB"), help="Hub bytes/s per connection; 0: unpaced"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mxfs-ab-") as tmp:
        work = Path(tmp)
        other = work / "other"
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "-q", "--detach", str(other), args.against],
                       check=True)  # fmt: skip
        try:
            data = work / "data" / "org" / "big"
            data.mkdir(parents=True)
            (data / "config.json").write_text("{}")
            with open(data / "model.safetensors", "wb") as f:
                for _ in range(args.size >> 20):
                    f.write(os.urandom(1 << 20))
            results: dict[str, list[tuple[float, float]]] = {"this tree": [], args.against: []}
            for _ in range(args.repeat):
                for label, tree in ((args.against, other), ("this tree", REPO_ROOT)):
                    results[label].append(one_load(tree, work / "data", work, args.pace))
                    print(f"{label}: {results[label][-1][0]:.2f} s, daemon {results[label][-1][1]:.2f} CPU-s")
        finally:
            subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(other)], check=False)
    hub = f"paced {args.pace >> 20} MiB/s per connection" if args.pace else "unpaced"
    print(f"\ncold load of {args.size >> 20} MiB, Hub {hub}, medians:")
    print("| tree | seconds | daemon CPU-s |\n|---|---|---|")
    for label, runs in results.items():
        seconds, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"| {label} | {seconds:.2f} | {cpu:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
