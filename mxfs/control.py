"""The daemon's control socket: a command on the node asks the running daemon to do its work.

Why: ``mxfs prefetch`` beside a running daemon would be a second downloader on the node.  On one
cache that costs little (both use the registry's claim), but with peers on only the daemon
serves the fleet, so only the daemon may claim the fleet's Hub download and list itself as a
relay: a prefetch the daemon runs costs the fleet one Hub download however many nodes prefetch
at once, where a prefetch of its own would go to the Hub beside every other.  The daemon's own
download also feeds its readers directly, and shows in its metrics and ``mxfs status``.

The socket is ``control.sock`` in the state dir (a path bound to the cache the daemon serves),
mode 0600 under the state dir's 0750, and the daemon answers only root and its own user
(``SO_PEERCRED``).  One JSON object per line each way: a request, then replies, the last of
which says ``done`` or ``error``.  A command that finds no daemon there (no socket, or one that
a killed daemon left) does the work itself, as before.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import trio

from mxfs.errors import MxfsError
from mxfs.fetch import Fetcher
from mxfs.names import parse_model_arg

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
# A request is one short line; anything longer is not ours.
MAX_LINE = 64 * 1024
# How often a prefetch the daemon runs reports its progress to the command that asked.
PROGRESS_INTERVAL = 0.5
# A daemon that accepts but does not answer a request within this long is taken for wedged.
ANSWER_TIMEOUT = 10.0
# A prefetch's first answer waits for the Hub's listing (retries included); after it, progress
# comes every PROGRESS_INTERVAL, so a silence this long is a wedged daemon.
LOOKUP_TIMEOUT = 300.0
SILENCE_TIMEOUT = 60.0


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


class ControlError(Exception):
    """The daemon's control socket answered something that is not the protocol."""


class LineStream:
    """JSON lines over a trio stream (the control protocol's framing)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(json.dumps(message).encode() + b"\n")

    async def receive(self, within: float = math.inf) -> dict[str, Any] | None:
        """The next message; None at the end of the stream; ControlError if none came ``within``."""
        with trio.move_on_after(within):
            return await self._receive()
        raise ControlError(f"no answer within {within:.0f}s")

    async def _receive(self) -> dict[str, Any] | None:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                raise ControlError("a line longer than the protocol allows")
            data = await self.stream.receive_some(MAX_LINE)
            if not data:
                if self._buffer:
                    raise ControlError("the stream ended inside a line")
                return None
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise ControlError(f"not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise ControlError("not a JSON object")
        return message


# -- the daemon's side ---------------------------------------------------------------------------


def _peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class ControlServer:
    """Answers the commands of this node's CLI on the control socket (see the module's doc)."""

    def __init__(self, fetcher: Fetcher, cache_dir: Path) -> None:
        self.fetcher = fetcher
        self.cache_dir = cache_dir
        self._bound: os.stat_result | None = None

    async def listen(self, path: Path) -> trio.SocketListener | None:
        """Bind the socket; None if another daemon on this state dir answers there already."""
        if await _hello(path) is not None:
            log.info("control: another daemon answers at %s; this one takes no commands", path)
            return None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a daemon that was killed
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _short_path(path) as short:
                await sock.bind(short)
            # Not a umask around the bind: it is the process's, and the cache's files are made in
            # other threads.  Until the chmod, the umask's mode and the state dir's 0750 hold.
            os.chmod(path, 0o600)
            sock.listen(16)
            self._bound = os.stat(path)
        except OSError:
            sock.close()
            raise
        return trio.SocketListener(sock)

    async def serve(self, listener: trio.SocketListener, path: Path) -> None:
        """Answer commands until cancelled; the socket file goes with the daemon (unless another
        daemon has bound its own there since)."""
        try:
            await trio.serve_listeners(self._answer, [listener])
        finally:
            bound = self._bound
            with contextlib.suppress(OSError):
                now = os.stat(path)
                if bound is not None and (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
                    os.unlink(path)

    async def _answer(self, stream: trio.SocketStream) -> None:
        lines = LineStream(stream)
        try:
            uid = _peer_uid(stream.socket)
            if uid not in (0, os.getuid()):
                await lines.send({"error": f"uid {uid} may not command this daemon"})
                return
            request = await lines.receive(ANSWER_TIMEOUT)
            if request is None:
                return
            await self._handle(request, lines)
        except (ControlError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("control: a command's connection ended: %s", exc)
        except Exception as exc:
            # A command must never take the daemon down (this runs in the daemon's nursery).
            log.warning("control: a command failed: %s: %s", type(exc).__name__, exc)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await lines.send({"error": f"{type(exc).__name__}: {exc}"})
        finally:
            await stream.aclose()

    async def _handle(self, request: dict[str, Any], lines: LineStream) -> None:
        op = request.get("op")
        if op == "hello":
            await lines.send({"cache_dir": str(self.cache_dir), "pid": os.getpid()})
            return
        if op != "prefetch":
            await lines.send({"error": f"unknown op {op!r}"})
            return
        if request.get("cache_dir") != str(self.cache_dir):
            # A command pointed at another cache with this state dir: it must not fill this one.
            await lines.send({"wrong_cache": str(self.cache_dir)})
            return
        await self._prefetch(str(request.get("model", "")), lines)

    async def _prefetch(self, text: str, lines: LineStream) -> None:
        try:
            ref = parse_model_arg(text, "main")
            entry = await self.fetcher.lookup(ref)
        except MxfsError as exc:
            await lines.send({"error": str(exc), "errno": exc.errno})
            return
        log.info("%s: prefetch asked by a command on this node", entry)
        await lines.send({"commit": entry.commit, "size": entry.size})

        async def report() -> None:
            try:
                while True:
                    await trio.sleep(PROGRESS_INTERVAL)
                    await lines.send({"progress": list(self.fetcher.progress(entry))})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                nursery.cancel_scope.cancel()  # the command is gone: stop waiting for it

        # The command going away (Ctrl-C) stops the waiting, not the download: the fetcher
        # finishes what it started, as for a reader that closed its file.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(report)
            try:
                await self.fetcher.prefetch(entry)
            except MxfsError as exc:
                nursery.cancel_scope.cancel()
                await lines.send({"error": str(exc), "errno": exc.errno})
                return
            nursery.cancel_scope.cancel()
        await lines.send({"progress": list(self.fetcher.progress(entry)), "done": True})


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """``path`` as a socket address that fits ``sun_path`` (108 bytes) wherever the state dir is:
    through this process's descriptor of its directory (``/proc/self/fd/N/control.sock``)."""
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


async def _hello(path: Path) -> dict[str, Any] | None:
    """What the daemon answering on the socket at ``path`` says of itself (its pid and cache
    dir); None if none answers there."""
    try:
        async with await _connect(path) as stream:
            lines = LineStream(stream)
            await lines.send({"op": "hello"})
            return await lines.receive(ANSWER_TIMEOUT)
    except (OSError, ControlError, trio.BrokenResourceError):
        return None


async def _connect(path: Path) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _short_path(path) as short:
            await sock.connect(short)
    except OSError:
        sock.close()
        raise
    return trio.SocketStream(sock)


# -- the command's side --------------------------------------------------------------------------


class NoDaemon(Exception):
    """No daemon takes commands on this state dir (or it serves another cache)."""


@contextlib.asynccontextmanager
async def ask_daemon(state_dir: Path, request: dict[str, Any]) -> AsyncIterator[LineStream]:
    """Send ``request`` to the daemon on ``state_dir``; yields the stream of its replies.

    Raises :class:`NoDaemon` if nobody listens there: no socket, or one a killed daemon left.
    """
    try:
        stream = await _connect(socket_path(state_dir))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
            raise NoDaemon(str(exc)) from None
        raise
    async with stream:
        lines = LineStream(stream)
        await lines.send(request)
        yield lines


async def daemon_hello(state_dir: Path) -> dict[str, Any] | None:
    """What the daemon on ``state_dir`` says of itself (its pid and cache dir); None if none
    answers there."""
    return await _hello(socket_path(state_dir))
