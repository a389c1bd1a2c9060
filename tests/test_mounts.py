"""mountinfo, as the kernel writes it (paths octal-escaped), and the FUSE knobs set on a real mount."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mxfs import mounts
from mxfs.mounts import Mount, parse_mountinfo
from tests.mounting import requires_fuse


def escaped(path: Path) -> str:
    """``path`` as mountinfo spells it."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in str(path))


def mountinfo(*lines: tuple[str, Path, str]) -> str:
    """A mountinfo text with a root filesystem and then one line per (major:minor, mount point, type)."""
    text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
    for n, (device, path, fstype) in enumerate(lines, start=500):
        text += f"{n} 22 {device} / {escaped(path)} rw,nosuid,nodev,relatime shared:{n} - {fstype} mxfs ro\n"
    return text


def test_mount_points_are_unescaped() -> None:
    text = mountinfo(("0:52", Path("/mnt/my models"), "fuse.mxfs"), ("0:53", Path("/a\\b\tc"), "tmpfs"))
    assert parse_mountinfo(text) == [
        Mount((8, 1), "/", "ext4"),
        Mount((0, 52), "/mnt/my models", "fuse.mxfs"),
        Mount((0, 53), "/a\\b\tc", "tmpfs"),
    ]


def test_the_fuse_device_of_a_mount_point_with_a_space(tmp_path: Path) -> None:
    spaced, plain = tmp_path / "my models", tmp_path / "models"
    text = mountinfo(("0:52", spaced, "fuse.mxfs"), ("0:53", plain, "fuse.mxfs"), ("0:54", tmp_path / "x", "tmpfs"))
    assert mounts.fuse_device(spaced, parse_mountinfo(text)) == (0, 52)
    assert mounts.fuse_device(plain, parse_mountinfo(text)) == (0, 53)
    assert mounts.fuse_device(tmp_path / "x", parse_mountinfo(text)) is None  # not FUSE
    assert mounts.fuse_device(tmp_path / "y", parse_mountinfo(text)) is None  # nothing mounted


def test_the_last_mount_on_a_path_is_the_one_seen(tmp_path: Path) -> None:
    text = mountinfo(("0:52", tmp_path, "fuse.mxfs"), ("0:60", tmp_path, "fuse.mxfs"))
    assert mounts.fuse_device(tmp_path, parse_mountinfo(text)) == (0, 60)


@requires_fuse
def test_read_ahead_is_raised_on_a_mount_point_with_a_space(mxfs_mount, tmp_path: Path) -> None:
    mount = mxfs_mount(mountpoint=tmp_path / "my models")
    assert mounts.mount_type(mount.mountpoint) == "fuse.mxfs"
    dev = os.stat(mount.mountpoint).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    deadline = time.monotonic() + 10
    while knob.read_text().strip() != str(mounts.READ_AHEAD_KB) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert knob.read_text().strip() == str(mounts.READ_AHEAD_KB)
