"""A reader of one file, run as its own process: ``python -m tests.reader PATTERN PATH SHA256 [--delay S]``.

Patterns: ``seq:<chunk>`` (read() to the end in ``chunk`` pieces), ``mmap`` (map the whole file and
hash it through the mapping), ``pread:<chunk>:<seed>`` (every ``chunk`` of the file once, with
os.pread in a shuffled order).  It prints one word and exits 0: ``correct`` (the bytes hash to
SHA256), ``wrong`` (they do not: the outcome no test may ever see), or the errno name of the error
that ended the read.  A reader of a mapping whose pages the daemon refuses dies of SIGBUS, which
the caller sees as the return code ``-SIGBUS``.

A process of its own, not a thread of the test: a SIGBUS must not take pytest down, and a real
loader is another process too.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import mmap
import os
import random
import sys
import time


class Digest:
    """sha256 of what was read, and the bytes themselves when MXFS_READER_DUMP names a file to
    keep them in (to see where a wrong read went wrong)."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._keep = bytearray() if os.environ.get("MXFS_READER_DUMP") else None

    def update(self, data: bytes) -> None:
        self._sha.update(data)
        if self._keep is not None:
            self._keep += data

    def digest(self) -> bytes:
        if self._keep is not None:
            with open(os.environ["MXFS_READER_DUMP"], "wb") as f:
                f.write(self._keep)
        return self._sha.digest()


def read_sequential(path: str, chunk: int) -> bytes:
    digest = Digest()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.digest()


def read_mapped(path: str) -> bytes:
    digest = Digest()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return digest.digest()
        with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mapped:
            for pos in range(0, size, 1 << 20):
                digest.update(mapped[pos : pos + (1 << 20)])
    return digest.digest()


def pread_fully(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset``, as a careful program reads them: a short count is not the
    end (the kernel returns what it copied before an error, and the error on the next call)."""
    parts = []
    while size > 0:
        data = os.pread(fd, size, offset)
        if not data:
            break  # end of file: the caller sees the bytes missing
        parts.append(data)
        size -= len(data)
        offset += len(data)
    return b"".join(parts)


def read_scattered(path: str, chunk: int, seed: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offsets = list(range(0, size, chunk))
        random.Random(seed).shuffle(offsets)
        blocks = {}
        for offset in offsets:
            blocks[offset] = pread_fully(fd, min(chunk, size - offset), offset)
    finally:
        os.close(fd)
    digest = Digest()
    for offset in sorted(blocks):
        digest.update(blocks[offset])
    return digest.digest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pattern")
    parser.add_argument("path")
    parser.add_argument("sha256")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    time.sleep(args.delay)
    kind, *params = args.pattern.split(":")
    try:
        if kind == "seq":
            digest = read_sequential(args.path, int(params[0]))
        elif kind == "mmap":
            digest = read_mapped(args.path)
        elif kind == "pread":
            digest = read_scattered(args.path, int(params[0]), int(params[1]))
        else:
            raise SystemExit(f"unknown pattern {args.pattern!r}")
    except OSError as exc:
        print(errno.errorcode.get(exc.errno or 0, str(exc)))
        return
    print("correct" if digest.hex() == args.sha256 else "wrong")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
