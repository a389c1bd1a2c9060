"""Complete models handed to the kernel: a read-only bind mount of hard links to the blobs.

``view`` builds the folder of links, ``kernel`` binds and detaches it, ``usage`` learns opens
through inotify, ``service`` ties them to the mount (docs/handoff.md).
"""

from mxfs.handoff.service import HandOff, KernelRelease

__all__ = ["HandOff", "KernelRelease"]
