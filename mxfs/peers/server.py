"""Serve this node's verified files to peers, in the Hub's own URL scheme.

A peer asks ``GET /<org>/<name>/resolve/<commit>/<path>`` with ``Range``, exactly what it would ask
the Hub, so the transfer that downloads from the Hub downloads from a peer by changing the base URL.
Only files the cache holds *verified* are served: a snapshot link exists only once its blob passed
its checksum and was published, so the server follows ``snapshots/<commit>/<path>`` and refuses
anything that is not a link into the repo's own ``blobs/``.  The receiving node checks every file
against the Hub's checksum again, so a bad peer can cost time, never bytes.

A node that is downloading an entry from the Hub for the fleet also serves that entry's files
while they land (:class:`Downloads`): each piece of an answer is sent once this node has it, and
a range it has not reached yet is fetched next, as for a reader of its own.  Those bytes are not
verified yet; the receiving node's checksum is what makes them safe, as for any peer's bytes.

Who may ask: clients whose address is in ``allow`` (networks), and, when a token is set, only
requests carrying ``Authorization: Bearer <token>``.  Everything else is answered 403 without
touching the disk.  The server speaks just enough HTTP/1.1 for this: GET and HEAD, one byte range,
persistent connections, bounded header size and idle time.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import logging
import os
import ssl
from collections.abc import Iterable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote

import trio

from mxfs import metrics
from mxfs.cache import HubCache
from mxfs.config import split_address
from mxfs.errors import MxfsError
from mxfs.names import COMMIT_RE, validate_repo_part
from mxfs.tree import HubFile

log = logging.getLogger(__name__)

# A request's line and headers; peers send a handful of short headers.
MAX_HEAD = 16 * 1024
# A connection that sends no complete request for this long is closed.
IDLE_TIMEOUT = 30.0
# A peer that has not finished its TLS handshake within this long is dropped.
HANDSHAKE_TIMEOUT = 10.0
# Bytes per pread and per send: large enough that the syscalls cost little, small enough that many
# concurrent peers do not hold much memory.
PIECE = 1 << 20
# A download in progress serves a range as its bytes land; a piece that has not landed in this
# long ends the answer (the peer's own read timeout is about as long) and the peer asks elsewhere.
LANDING_TIMEOUT = 25.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class PeerAccess:
    """Who may read from this node: client networks, and a shared token if set."""

    allow: tuple[Network, ...]
    token: str | None = None

    @classmethod
    def parse(cls, allow: Iterable[str], token: str | None = None) -> PeerAccess:
        return cls(tuple(ipaddress.ip_network(a, strict=False) for a in allow), token or None)

    def admits(self, address: str, authorization: str | None) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not any(ip in net for net in self.allow):
            return False
        if self.token is None:
            return True
        presented = (authorization or "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(presented.encode(), self.token.encode())


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close"


def parse_head(head: bytes) -> Request:
    """A request line and headers (without the blank line); BadRequest when malformed."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest(400, "undecodable request") from exc
    line, *header_lines = text.split("\r\n")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    headers: dict[str, str] = {}
    for header in header_lines:
        name, colon, value = header.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(400, "malformed header")
        headers[name.lower()] = value.strip()
    return Request(parts[0], parts[1], headers)


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """``Range: bytes=a-b`` (one range) as ``[start, end)``; None for no header.

    BadRequest(416) for a range that does not fit the file; several ranges are refused (a
    peer's transfer never asks for them).
    """
    if value is None:
        return None
    unit, _, spec = value.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise BadRequest(416, "only one byte range is served")
    first, dash, last = spec.strip().partition("-")
    if not dash:
        raise BadRequest(416, "malformed range")
    try:
        if first == "":  # the last N bytes
            count = int(last)
            if count <= 0:
                raise BadRequest(416, "empty suffix range")
            return max(0, size - count), size
        start = int(first)
        end = size if last == "" else min(size, int(last) + 1)
    except ValueError as exc:
        raise BadRequest(416, "malformed range") from exc
    if start < 0 or start >= size or end <= start:
        raise BadRequest(416, "range not satisfiable")
    return start, end


@dataclass(frozen=True)
class Target:
    """What a request names: a file of a repo at a commit."""

    repo_id: str
    commit: str
    path: str


def parse_target(target: str) -> Target:
    """The file a ``/<org>/<name>/resolve/<commit>/<path>`` names.

    BadRequest(404) for anything else: another URL shape, a revision that is not a commit (a
    peer asks for what the Hub resolved, never a branch), or a path that leaves the snapshot.
    """
    path = target.split("?", 1)[0]
    parts = path.split("/")
    if len(parts) < 6 or parts[0] != "" or parts[3] != "resolve":
        raise BadRequest(404, "not a resolve URL")
    org, name, commit = unquote(parts[1]), unquote(parts[2]), unquote(parts[4])
    rel = [unquote(p) for p in parts[5:]]
    try:
        validate_repo_part(org)
        validate_repo_part(name)
    except MxfsError as exc:
        raise BadRequest(404, "bad repo name") from exc
    if not COMMIT_RE.fullmatch(commit):
        raise BadRequest(404, "a peer serves commits only")
    if any(p in ("", ".", "..") or "\0" in p for p in rel):
        raise BadRequest(404, "bad path")
    return Target(f"{org}/{name}", commit, "/".join(rel))


def resolve_target(cache: HubCache, target: str | Target) -> tuple[Path, str]:
    """The verified blob a request names, and its etag; BadRequest(404) if it names none.

    A snapshot link exists only once its blob passed its checksum and was published; anything
    that is not a link into the repo's own ``blobs/`` is refused.
    """
    wanted = parse_target(target) if isinstance(target, str) else target
    repo_id = wanted.repo_id
    link = cache.snapshot_file(repo_id, wanted.commit, wanted.path)
    blobs = cache.repo_dir(repo_id) / "blobs"
    try:
        if not link.is_symlink():
            raise BadRequest(404, "not held verified here")
        blob = Path(os.path.realpath(link))
    except OSError as exc:
        raise BadRequest(404, "not held verified here") from exc
    if blob.parent != Path(os.path.realpath(blobs)) or blob.name.endswith(".incomplete"):
        raise BadRequest(404, "not held verified here")
    return blob, blob.name


class ReadHandle(Protocol):
    """A handle on a file this node is downloading (the fetcher's FileSource)."""

    @property
    def file(self) -> HubFile: ...

    async def read(self, offset: int, size: int) -> bytes:
        """The bytes at ``offset``, waiting for them to land; MxfsError if the copy is dropped."""
        ...

    def close(self) -> None: ...


class Downloads(Protocol):
    """The entries this node is downloading from the Hub now, whose ranges it serves as they land."""

    async def open_downloading(self, repo_id: str, commit: str, path: str) -> ReadHandle | None: ...


async def listen_for_peers(address: str) -> list[trio.SocketListener]:
    """Listen at ``peer_address`` (HOST:PORT): before the mount, so a port in use fails the start."""
    host, port = split_address(address, "peer_address")
    return await trio.open_tcp_listeners(port, host=host)


class PeerServer:
    """Serves verified files from ``cache``, and the ranges of ``downloads`` in progress, to the
    peers ``access`` admits."""

    def __init__(
        self,
        cache: HubCache,
        access: PeerAccess,
        *,
        downloads: Downloads | None = None,
        read_limiter: trio.CapacityLimiter | None = None,
        tls: ssl.SSLContext | None = None,
    ):
        self.cache = cache
        self.access = access
        self.downloads = downloads
        # Mutual TLS (mxfs.peers.tls): every connection's handshake, client certificate included.
        self.tls = tls
        self._read_limiter = read_limiter or trio.CapacityLimiter(8)
        self.bytes_served = 0

    async def serve_on(self, listeners: list[trio.SocketListener]) -> None:
        """Serve on listeners opened beforehand (:func:`listen_for_peers`) until cancelled."""
        await trio.serve_listeners(self._connection, listeners)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (port 0: any free port) until cancelled; started with the listeners."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        await trio.serve_listeners(self._connection, listeners, task_status=task_status)

    async def _connection(self, plain: trio.SocketStream) -> None:
        try:
            address = plain.socket.getpeername()[0]
        except OSError:
            return
        stream: trio.abc.Stream = plain
        if self.tls is not None:
            stream = await self._handshake(plain, address)
            if stream is None:
                return
        buffer = bytearray()
        try:
            async with stream:
                while True:
                    head = await self._read_head(stream, buffer)
                    if head is None:
                        return
                    try:
                        request = parse_head(head)
                    except BadRequest as exc:
                        await self._send_error(stream, exc, "GET", keep_alive=False)
                        return
                    if not await self._answer(stream, request, address):
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            return  # the peer went away: its transfer retries elsewhere

    async def _handshake(self, plain: trio.SocketStream, address: str) -> trio.SSLStream[trio.SocketStream] | None:
        """The TLS stream once both ends proved their certificates; None (and the connection
        closed) when the peer did not: no certificate, another CA's, plain HTTP, or too slow."""
        assert self.tls is not None
        stream = trio.SSLStream(plain, self.tls, server_side=True)
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            try:
                await stream.do_handshake()
                return stream
            except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                reason = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
                log.info("peer TLS: refused %s: %s", address, reason)
        await trio.aclose_forcefully(plain)
        return None

    async def _read_head(self, stream: trio.abc.Stream, buffer: bytearray) -> bytes | None:
        with trio.move_on_after(IDLE_TIMEOUT):
            while b"\r\n\r\n" not in buffer:
                if len(buffer) > MAX_HEAD:
                    return None
                data = await stream.receive_some(MAX_HEAD)
                if not data:
                    return None
                buffer.extend(data)
            head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
            buffer[:] = rest
            return head
        return None

    async def _answer(self, stream: trio.abc.Stream, request: Request, address: str) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        keep_alive = request.keep_alive
        try:
            if request.method not in ("GET", "HEAD"):
                raise BadRequest(405, "only GET and HEAD")
            if not self.access.admits(address, request.headers.get("authorization")):
                raise BadRequest(403, "not an allowed peer")
            target = parse_target(request.target)
            try:
                blob, etag = resolve_target(self.cache, target)
                fd = os.open(blob, os.O_RDONLY | os.O_CLOEXEC)
            except (BadRequest, FileNotFoundError) as exc:  # (evicted between the check and the open)
                handle = await self.downloads.open_downloading(*astuple(target)) if self.downloads else None
                if handle is None:
                    raise BadRequest(404, "not held verified here") from exc
                with contextlib.closing(handle):
                    return await self._answer_from(stream, request, handle.file.size, handle.file.etag, handle)
        except BadRequest as exc:
            await self._send_error(stream, exc, request.method, keep_alive=keep_alive)
            return keep_alive
        with contextlib.closing(_Fd(fd)):
            return await self._answer_from(stream, request, os.fstat(fd).st_size, etag, fd)

    async def _answer_from(
        self, stream: trio.abc.Stream, request: Request, size: int, etag: str, source: int | ReadHandle
    ) -> bool:
        """Answer a request for ``[range of] size`` bytes read from a blob's descriptor or a
        download's handle."""
        keep_alive = request.keep_alive
        try:
            wanted = parse_range(request.headers.get("range"), size)
        except BadRequest as exc:
            await self._send_error(stream, exc, request.method, keep_alive=keep_alive, size=size)
            return keep_alive
        start, end = wanted if wanted is not None else (0, size)
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(end - start)),
            ("Accept-Ranges", "bytes"),
            ("ETag", f'"{etag}"'),
        ]
        if wanted is not None:
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        await stream.send_all(_head(206 if wanted is not None else 200, headers, keep_alive))
        if request.method == "GET":
            if isinstance(source, int):
                await self._send_body(stream, source, start, end)
            else:
                await self._send_landing(stream, source, start, end)
        return keep_alive

    async def _send_body(self, stream: trio.abc.Stream, fd: int, start: int, end: int) -> None:
        offset = start
        while offset < end:
            piece = await trio.to_thread.run_sync(
                os.pread, fd, min(PIECE, end - offset), offset, limiter=self._read_limiter
            )
            if not piece:
                # The blob shrank under us: it cannot (blobs are immutable), so close rather than
                # send a body shorter than its Content-Length said.
                raise trio.BrokenResourceError(errno.EIO, "blob ended early")
            await stream.send_all(piece)
            offset += len(piece)
            self._served(len(piece))

    async def _send_landing(self, stream: trio.abc.Stream, handle: ReadHandle, start: int, end: int) -> None:
        """Send bytes of a file this node is downloading, each piece as soon as it has landed.

        A piece that does not land within LANDING_TIMEOUT, or a copy dropped under the read (it
        failed its checksum, the download stopped), closes the connection: the peer asks
        elsewhere, and checks whatever it got against the Hub's checksum anyway.
        """
        offset = start
        while offset < end:
            try:
                with trio.fail_after(LANDING_TIMEOUT):
                    piece = await handle.read(offset, min(PIECE, end - offset))
            except (MxfsError, trio.TooSlowError) as exc:
                raise trio.BrokenResourceError(f"stopped serving a download in progress: {exc}") from exc
            if not piece:
                raise trio.BrokenResourceError(errno.EIO, "file ended early")
            await stream.send_all(piece)
            offset += len(piece)
            self._served(len(piece))

    def _served(self, n: int) -> None:
        self.bytes_served += n
        metrics.PEER_SERVED_BYTES.inc(n)

    async def _send_error(
        self, stream: trio.abc.Stream, exc: BadRequest, method: str, *, keep_alive: bool, size: int | None = None
    ) -> None:
        body = f"{exc.reason}\n".encode()
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        if exc.status == 416 and size is not None:
            headers.append(("Content-Range", f"bytes */{size}"))
        await stream.send_all(_head(exc.status, headers, keep_alive) + (body if method != "HEAD" else b""))


_REASONS = {200: "OK", 206: "Partial Content", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 416: "Range Not Satisfiable"}  # fmt: skip


def _head(status: int, headers: list[tuple[str, str]], keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", *(f"{k}: {v}" for k, v in headers)]
    lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)
