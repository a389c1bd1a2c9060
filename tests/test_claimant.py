"""Claim ids name their process (mxfs.fetch.claimant): who may end a claim without its lease."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mxfs.fetch import claimant
from mxfs.fetch.claimant import ProcessTag, dead_claimant, new_claim_id, this_process


def test_a_claim_id_names_this_process_and_is_unique() -> None:
    me = this_process()
    assert me is not None
    first, second = new_claim_id(), new_claim_id()
    assert first != second
    assert ProcessTag.parse(first) == me == ProcessTag.parse(second)
    assert dead_claimant(first) is None  # this process runs


def test_a_claim_of_a_process_that_ended_is_dead() -> None:
    child = subprocess.run(
        [sys.executable, "-c", "from mxfs.fetch.claimant import new_claim_id; print(new_claim_id())"],
        capture_output=True,
        text=True,
        check=True,
    )
    claim_id = child.stdout.strip()
    tag = ProcessTag.parse(claim_id)
    assert tag is not None and tag.pid != this_process().pid
    assert dead_claimant(claim_id) == f"pid {tag.pid}"


def test_a_pid_reused_by_a_later_process_is_dead() -> None:
    me = this_process()
    assert me is not None
    earlier = dataclasses.replace(me, start_time=me.start_time - 1)
    assert dead_claimant(f"{earlier.render()}.{'a' * 32}") == f"pid {me.pid}"


@pytest.mark.parametrize(
    "change",
    [
        {"boot_id": "0" * 32},  # another host, or this one before a reboot
        {"pid_namespace": 1},  # another container: its pids mean nothing here
    ],
)
def test_a_claim_from_elsewhere_is_left_to_its_lease(change: dict) -> None:
    me = this_process()
    assert me is not None
    gone = dataclasses.replace(me, pid=2**22 + 7, **change)  # no such pid runs here
    assert dead_claimant(f"{gone.render()}.{'a' * 32}") is None


@pytest.mark.parametrize("claim_id", ["a" * 32, "node-1#" + "b" * 32, "p.x.y.z.w.v", "p.abc.1.2.3", ""])
def test_ids_in_another_form_are_left_to_their_lease(claim_id: str) -> None:
    assert ProcessTag.parse(claim_id) is None
    assert dead_claimant(claim_id) is None


# -- claimants of another pid namespace, known by their lock in the state dir --------------------

HOLD = (
    "import sys; from pathlib import Path; from mxfs.fetch.claimant import hold_lock, new_claim_id; "
    "hold_lock(Path(sys.argv[1])); print(new_claim_id(), flush=True); sys.stdin.read()"
)


def claimant_in_a_container(state_dir: Path) -> tuple[subprocess.Popen[str], str]:
    """A process in a pid namespace of its own (with its own /proc, as in a container) that holds
    its lock in ``state_dir`` until its stdin closes; and a claim id it made."""
    child = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", HOLD, str(state_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --pid needs root")
def test_a_claimant_of_another_pid_namespace_is_known_dead_by_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    child, claim_id = claimant_in_a_container(tmp_path)
    tag, me = ProcessTag.parse(claim_id), this_process()
    assert tag is not None and me is not None and tag.pid_namespace != me.pid_namespace
    # As a daemon of this state dir sees it (its own lock held there).
    monkeypatch.setattr(claimant, "_held", (tmp_path / claimant.LOCKS_DIR, -1))
    assert dead_claimant(claim_id) is None  # it runs, holding its lock
    # From a process with another state dir, nothing can be told.
    assert child.stdin is not None
    child.stdin.close()
    assert child.wait(10) == 0
    assert dead_claimant(claim_id) == f"pid {tag.pid} of another pid namespace"
    monkeypatch.setattr(claimant, "_held", (tmp_path / "elsewhere", -1))
    assert dead_claimant(claim_id) is None


def test_hold_lock_removes_the_locks_of_processes_that_are_gone(tmp_path: Path) -> None:
    locks = tmp_path / claimant.LOCKS_DIR
    locks.mkdir()
    (locks / ("0" * 32)).touch()  # a lock nobody holds: its process is gone, long ago
    long_ago = time.time() - claimant.STALE_LOCK_AGE - 60
    os.utime(locks / ("0" * 32), (long_ago, long_ago))
    (locks / ("1" * 32)).touch()  # gone just now: its claims may still be waiting to be seen dead
    alive = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert alive.stdout is not None and alive.stdout.readline()
    try:
        after = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from mxfs.fetch.claimant import hold_lock; "
             "import os; hold_lock(Path(sys.argv[1])); print(len(os.listdir(Path(sys.argv[1]) / 'claims')))",
             str(tmp_path)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert after.stdout.strip() == "3"  # the live process's, the recent one's and its own
        assert not (locks / ("0" * 32)).exists()
        assert (locks / ("1" * 32)).exists()
    finally:
        assert alive.stdin is not None
        alive.stdin.close()
        alive.wait(10)
