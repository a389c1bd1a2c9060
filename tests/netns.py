"""Hosts of their own on one machine: network namespaces on a bridge, for tests of what crosses
a network (peers at real, different addresses; who a peer server admits by source address).

    with Hosts(2) as hosts:
        hosts.bridge_ip                  # the test process's address on the bridge (servers bind it)
        hosts.ips[0], hosts.ips[1]       # each namespace's address
        hosts.enter(0)                   # a command prefix that runs a process in namespace 0

Only the network is separate: ``nsenter --net`` keeps the mount namespace, so a daemon started
in a namespace mounts where the test can read it.  Names and the /24 come from the test
process's pid, so pytest-xdist workers never share them; everything made is deleted on exit.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Collection
from pathlib import Path


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


# Held while a set of hosts picks its /24 and makes its bridge: test processes side by side
# (pytest-xdist) never pick the same one.
LOCK = Path("/tmp/mxfs-test-netns.lock")


def _subnets_in_use() -> set[str]:
    listing = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return {field.rsplit(".", 1)[0] for field in listing.split() if field.startswith("10.231.")}


class Hosts:
    def __init__(self, count: int) -> None:
        pid = os.getpid()
        self.count = count
        self.tag = f"{pid % 100000}"
        self.bridge = f"mxb{self.tag}"
        self.names = [f"mxfs-{self.tag}-{i}" for i in range(count)]
        self._pick(pid)

    def _pick(self, start: int, used: Collection[str] = ()) -> None:
        """A /24 of 10.231.0.0/16 (private, unlikely to be the machine's own) that no bridge uses."""
        for n in range(250):
            subnet = f"10.231.{(start + n) % 250 + 1}"
            if subnet not in used:
                break
        self.subnet = subnet
        self.bridge_ip = f"{subnet}.1"
        self.ips = [f"{subnet}.{i + 2}" for i in range(self.count)]

    def enter(self, i: int) -> tuple[str, ...]:
        """The prefix that runs a command in namespace ``i`` (its network only)."""
        return ("nsenter", f"--net=/run/netns/{self.names[i]}")

    def __enter__(self) -> Hosts:
        self.close()  # leftovers of a process that had this pid and was killed
        try:
            with open(LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._pick(os.getpid(), _subnets_in_use())
                ip("link", "add", self.bridge, "type", "bridge")
                ip("addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for i, (name, address) in enumerate(zip(self.names, self.ips, strict=True)):
                outside, inside = f"mxv{self.tag}{i}", f"mxp{self.tag}{i}"
                ip("netns", "add", name)
                ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                ip("link", "set", inside, "netns", name)
                ip("link", "set", outside, "master", self.bridge, "up")
                ip("-n", name, "addr", "add", f"{address}/24", "dev", inside)
                ip("-n", name, "link", "set", inside, "up")
                ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for name in self.names:
            if Path(f"/run/netns/{name}").exists():
                subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
