"""Talking to systemd (``Type=notify``): state notifications and the watchdog.

Both are no-ops when systemd did not start us: no ``NOTIFY_SOCKET``, no ``WATCHDOG_USEC``.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

from mxfs.mounts import MountProbe

log = logging.getLogger(__name__)


def sd_notify(message: str) -> None:
    """Tell systemd (``NOTIFY_SOCKET``) about our state; a no-op when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("sd_notify(%s) failed: %s", message, exc)


def watchdog_period() -> float | None:
    """systemd's watchdog timeout in seconds (``WATCHDOG_USEC``), if it is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid.isdigit() and int(pid) != os.getpid():
        return None  # inherited from a parent that systemd watches, not us
    return int(usec) / 1e6


async def feed_watchdog(
    probe: MountProbe, period: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """``WATCHDOG=1`` every quarter of systemd's period while the mount answers.

    A quarter (not the half systemd asks for at least) leaves room for a slow probe and a busy
    loop.  No ping when the probe fails: if the mount stays wedged, systemd kills and restarts us.
    """
    interval = period / 4
    log.info("systemd watchdog: %.1fs, pinging every %.1fs", period, interval)
    task_status.started()
    while True:
        started = trio.current_time()
        if await probe.answers(interval):
            sd_notify("WATCHDOG=1")
        else:
            log.warning(
                "the mount at %s did not answer within %.1fs; not pinging the watchdog", probe.mountpoint, interval
            )
        await trio.sleep_until(started + interval)
