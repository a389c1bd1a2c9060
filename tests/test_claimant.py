"""Claim ids name their process (mxfs.fetch.claimant): who may end a claim without its lease."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

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
    assert dead_claimant(claim_id) == tag.pid


def test_a_pid_reused_by_a_later_process_is_dead() -> None:
    me = this_process()
    assert me is not None
    earlier = dataclasses.replace(me, start_time=me.start_time - 1)
    assert dead_claimant(f"{earlier.render()}.{'a' * 32}") == me.pid


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
