"""Section ``handoff`` of bench/run.py: a model handed to the kernel vs the cache's own files.

Side by side in one run, on one cached model: the mxfs mount with the hand-off on (the model
directory is a read-only bind of hard links to the blobs) against direct reads of the cache's
snapshot (its symlinks into blobs).  Cold rows drop the file's pages first: ``drop_caches`` where
it is writable, else ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the blobs (the hand-off's files
are the blobs' inodes, so one drop clears both).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

MOUNT_WAIT = 60.0


def drop_pages(files: list[Path]) -> None:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    except OSError:
        pass
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def wait_handed_off(model: Path) -> None:
    """Until the model directory is a mount point of its own (the hand-off's bind)."""
    deadline = time.monotonic() + MOUNT_WAIT
    while time.monotonic() < deadline:
        with open("/proc/self/mountinfo") as f:
            if any(len(fields) > 4 and fields[4] == str(model) for fields in (line.split() for line in f)):
                return
        time.sleep(0.05)
    raise RuntimeError(f"{model} was not handed off within {MOUNT_WAIT:.0f}s")


def list_and_stat(root: Path) -> int:
    """``find -L -type f`` with a stat of each file (``-printf %s``); the number of files.

    ``-L``: the cache dir's snapshot holds symlinks, and a reader stats what they point to."""
    out = subprocess.run(["find", "-L", str(root), "-type", "f", "-printf", "%s\n"], capture_output=True, check=True)
    return out.stdout.count(b"\n")


def load_file(path: Path) -> int:
    from safetensors.torch import load_file as load

    tensors = load(str(path))
    # clone(): every byte copied to private memory, as a move to a device reads them all.
    return sum(t.clone().numel() * t.element_size() for t in tensors.values())


def run_section(suite, tools, cache: Path, many_repo: str | None, many_endpoint: str | None) -> None:
    """Rows h1-h7; ``suite`` is bench/run.py's Suite (``add``, ``mxfs``, ``repeat``), ``tools`` that
    module (its measuring helpers)."""
    BIG, REPO_ID, gbps, timed = tools.BIG, tools.REPO_ID, tools.gbps, tools.timed
    read_file, load_safetensors = tools.read_file, tools.load_safetensors

    snap = suite.snapshot_of(cache)
    blob = (snap / BIG).resolve()
    state = suite.fresh("state")
    with suite.mxfs(cache, state, "handoff") as mx:
        model = mx.mnt / REPO_ID
        read_file(model / BIG)  # resolves the directory; the hand-off follows
        wait_handed_off(model)
        paths = {"handoff": model / BIG, "direct": snap / BIG}
        blobs = [blob]
        rows = (
            ("h1. warm re-read, 1 MiB reads", "GB/s", True, False, read_file),
            ("h2. first read, page cache dropped, 1 MiB reads", "GB/s", True, True, read_file),
            ("h3. safetensors load_file, warm", "s", False, False, load_file),
            ("h4. safetensors load_file, page cache dropped", "s", False, True, load_file),
            ("h5. safetensors safe_open + every tensor, warm", "s", False, False, load_safetensors),
            ("h6. safetensors safe_open + every tensor, page cache dropped", "s", False, True, load_safetensors),
        )
        for name, unit, higher_better, cold, fn in rows:
            for p in paths.values():
                fn(p)  # warm up
            vals: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(suite.repeat):
                for k, p in paths.items():
                    if cold:
                        drop_pages(blobs)
                    dt, n = timed(fn, p)
                    vals[k].append(gbps(n, dt) if unit == "GB/s" else dt)
            suite.add(name, unit, vals["handoff"], {"direct (cache dir)": vals["direct"]}, higher_better)
    if many_repo is None or many_endpoint is None:
        return
    mcache, mstate = suite.fresh("cache"), suite.fresh("state")
    with suite.mxfs(mcache, mstate, "handoff-files", many_endpoint) as mx:
        model = mx.mnt / many_repo
        for name in sorted(os.listdir(model / "parts")):
            read_file(model / "parts" / name)
        wait_handed_off(model)
        snap = suite.snapshot_of_repo(mcache, many_repo)
        first: list[float] = []
        vals = {"handoff, second listing": [], "direct (cache dir)": []}
        for _ in range(suite.repeat):
            dt, n = timed(list_and_stat, model)
            first.append(dt)
            vals["handoff, second listing"].append(timed(list_and_stat, model)[0])
            vals["direct (cache dir)"].append(timed(list_and_stat, snap)[0])
        suite.add(f"h7. find -type f + stat of a {n}-file model", "s", first, vals, False)


def from_pretrained_row(suite, tools, endpoint: str, repo_id: str) -> None:
    """Row h8: ``transformers.AutoModel.from_pretrained`` of a real model through the hand-off vs
    from the cache's snapshot dir (the same blobs), warm."""
    from transformers import AutoModel

    def load(path: Path) -> int:
        model = AutoModel.from_pretrained(str(path))
        return sum(p.numel() for p in model.parameters())

    cache, state = suite.fresh("cache"), suite.fresh("state")
    with suite.mxfs(cache, state, "handoff-model", endpoint) as mx:
        model = mx.mnt / repo_id
        for dirpath, _dirs, files in os.walk(model):
            for name in files:
                tools.read_file(Path(dirpath) / name)
        wait_handed_off(model)
        paths = {"handoff": model, "direct": suite.snapshot_of_repo(cache, repo_id)}
        for p in paths.values():
            load(p)  # warm up (imports, page cache)
        vals: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(suite.repeat):
            for k, p in paths.items():
                vals[k].append(tools.timed(load, p)[0])
        suite.add(f"h8. AutoModel.from_pretrained({repo_id}), warm", "s", vals["handoff"],
                  {"direct (cache dir)": vals["direct"]}, False)  # fmt: skip
