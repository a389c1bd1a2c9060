"""A Hugging Face Hub look-alike HTTP server for tests, on loopback, with failure injection.

``FakeHub`` serves repositories that tests build in memory (or from files on disk) through the
same endpoints, headers and error headers that ``huggingface_hub`` 2.x uses for model repos:

* ``GET  /api/models/{repo}[/revision/{rev}]``        model info (``?blobs=true`` for file metadata)
* ``GET  /api/models/{repo}/tree/{rev}[/{path}]``     tree listing, ``Link: <...>; rel="next"`` pagination
* ``GET  /api/models/{repo}/refs``                    branches and tags
* ``POST /api/models/{repo}/paths-info/{rev}``        metadata of given paths
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``           file metadata / bytes (single ``Range`` supported)
* ``HEAD|GET /cdn/{sha256}?...``                      LFS bytes, served on a *second* port (see below)

LFS files are answered on ``/resolve`` by a 302 to ``cdn_endpoint`` like the real Hub redirects to its
CDN.  The CDN listens on its own port on purpose: ``huggingface_hub`` follows same-origin redirects
during its metadata ``HEAD`` request, and only a cross-origin redirect keeps the ``X-Repo-Commit`` /
``X-Linked-*`` headers of the 302 visible to it (and makes it drop the ``Authorization`` header for the
CDN download, as it does with the real Hub).  No ``X-Xet-*`` header is ever sent, so downloads always
take the plain HTTP path.

Run standalone (e.g. for benchmarks)::

    python -m tests.hubserver --port 8777 --data DIR        # DIR/<org>/<name>/... become repos
    python tests/hubserver.py --port 8777 --repo org/name=/some/dir --token hf_secret
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import errno
import fnmatch
import hashlib
import http.server
import json
import logging
import os
import re
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

__all__ = [
    "DEFAULT_LFS_PATTERNS",
    "DEFAULT_LFS_THRESHOLD",
    "FAULT_KINDS",
    "FakeHub",
    "Fault",
    "RequestRecord",
]

logger = logging.getLogger(__name__)

#: Files bigger than this are stored with LFS (the Hub refuses plain git files over 10 MB).
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024

#: The patterns of the ``.gitattributes`` the Hub puts in every new model repo.
DEFAULT_LFS_PATTERNS: tuple[str, ...] = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
    "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
    "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*", "*.gguf",
)  # fmt: skip

#: Fault kinds accepted by :meth:`FakeHub.inject`.
FAULT_KINDS = ("error", "delay", "slow", "cut", "truncate", "ignore_range", "corrupt", "down")

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA40 = re.compile(r"^[0-9a-f]{40}$")
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_API_SUBPATHS = frozenset({"revision", "tree", "refs", "paths-info", "commits", "resolve", "blob", "raw"})
_CONN_ERRNOS = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.EBADF, errno.ENOTCONN, errno.ESHUTDOWN}
)
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------
# Content and repository model
# --------------------------------------------------------------------------------------------------

_HASH_CACHE: dict[tuple[Any, ...], dict[str, str]] = {}
_HASH_CACHE_LOCK = threading.Lock()


class _Content:
    """Bytes of one file, kept in memory or read from a path on disk when served."""

    __slots__ = ("data", "path", "size")

    def __init__(self, data: bytes | None = None, path: str | None = None) -> None:
        self.data = data
        self.path = path
        if data is not None:
            self.size = len(data)
        else:
            assert path is not None
            self.size = os.stat(path).st_size

    def read(self, offset: int, n: int, fd: int | None = None) -> bytes:
        if self.data is not None:
            return self.data[offset : offset + n]
        if fd is None:
            with open(self.path, "rb") as f:  # type: ignore[arg-type]
                f.seek(offset)
                return f.read(n)
        return os.pread(fd, n, offset)

    def _digest(self, algo: str) -> str:
        """``algo`` is "sha256" or "gitsha1" (sha1 of the git blob header + content)."""
        if self.data is not None:
            if algo == "sha256":
                return hashlib.sha256(self.data).hexdigest()
            return hashlib.sha1(b"blob %d\0" % self.size + self.data).hexdigest()
        assert self.path is not None
        st = os.stat(self.path)
        key = (os.path.realpath(self.path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with _HASH_CACHE_LOCK:
            cached = _HASH_CACHE.get(key, {}).get(algo)
        if cached is not None:
            return cached
        h = hashlib.sha256() if algo == "sha256" else hashlib.sha1(b"blob %d\0" % st.st_size)
        with open(self.path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        digest = h.hexdigest()
        with _HASH_CACHE_LOCK:
            _HASH_CACHE.setdefault(key, {})[algo] = digest
        return digest


@dataclass(frozen=True)
class _File:
    path: str
    content: _Content
    lfs: bool
    oid: str  # git blob id: of the content, or of the LFS pointer file for LFS files
    sha256: str | None = None  # LFS only
    pointer_size: int | None = None  # LFS only

    @property
    def size(self) -> int:
        return self.content.size

    @property
    def etag(self) -> str:
        return self.sha256 if self.sha256 is not None else self.oid


@dataclass
class _Commit:
    sha: str
    parent: str | None
    date: dt.datetime
    title: str
    files: dict[str, _File]
    dirs: dict[str, str]  # dir path -> fake tree oid
    last_changed: dict[str, str]  # file or dir path -> sha of the commit that last changed it
    entries: list[tuple[str, str]]  # (path, "file"|"directory"), tree order


@dataclass
class _Repo:
    repo_id: str
    private: bool
    gated: bool | str
    default_branch: str
    created_at: dt.datetime
    object_id: str
    lfs_threshold: int
    lfs_patterns: tuple[str, ...]
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> _Commit | None:
        sha = self.branches.get(rev) or self.tags.get(rev)
        if sha is None and rev.startswith("refs/heads/"):
            sha = self.branches.get(rev[len("refs/heads/") :])
        if sha is None and rev.startswith("refs/tags/"):
            sha = self.tags.get(rev[len("refs/tags/") :])
        if sha is None and rev in self.commits:
            sha = rev
        return self.commits.get(sha) if sha is not None else None

    def is_ref(self, name: str) -> bool:
        return name in self.branches or name in self.tags


def _iso(d: dt.datetime) -> str:
    d = d.astimezone(dt.UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def _to_datetime(value: dt.datetime | str | float | None) -> dt.datetime:
    if value is None:
        now = dt.datetime.now(dt.UTC)
        return now.replace(microsecond=now.microsecond // 1000 * 1000)
    if isinstance(value, dt.datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
    if isinstance(value, int | float):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    return _to_datetime(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))


def _validate_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if not 1 <= len(parts) <= 2 or not all(_REPO_PART.match(p) for p in parts):
        raise ValueError(f"invalid repo id {repo_id!r}")
    if any(".." in p or "--" in p for p in parts):
        raise ValueError(f"invalid repo id {repo_id!r}")


def _validate_path(path: str) -> None:
    if (
        not path
        or path.startswith("/")
        or path.endswith("/")
        or "\\" in path
        or any(seg in ("", ".", "..") for seg in path.split("/"))
    ):
        raise ValueError(f"invalid file path in repo: {path!r}")


def _is_lfs_path(path: str, patterns: Iterable[str]) -> bool:
    base = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        if "/" in pattern:
            if fnmatch.fnmatchcase(path, pattern.replace("**/", "*")):
                return True
        elif fnmatch.fnmatchcase(base, pattern):
            return True
    return False


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _make_content(value: bytes | bytearray | memoryview | str | os.PathLike[str]) -> _Content:
    if isinstance(value, bytes | bytearray | memoryview):
        return _Content(data=bytes(value))
    if isinstance(value, str):
        return _Content(data=value.encode())
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        return _Content(path=path)
    raise TypeError(f"file content must be bytes, str (text) or os.PathLike, not {type(value).__name__}")


def _tree_order(path: str) -> list[str]:
    return path.split("/")


def _parent_dir(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


# --------------------------------------------------------------------------------------------------
# Request log and faults
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    """One request as seen by the server (appended when the response is over)."""

    method: str
    path: str  # raw request target, with query string
    kind: str  # "api", "resolve", "cdn" or "other"
    repo_id: str | None
    filename: str | None  # path in repo (resolve/cdn); None for API calls
    revision: str | None  # as requested (URL-unquoted)
    range: str | None  # Range request header
    status: int  # 0 when the connection was dropped before a status line
    bytes_sent: int  # body bytes actually written
    auth: str | None  # bearer token sent, if any
    faults: tuple[str, ...]  # kinds of the injected faults applied
    complete: bool  # response fully sent
    done: bool  # False while the request is still being served
    started: float  # time.monotonic()
    duration: float  # so far, for a request still in flight
    server: str  # "hub" or "cdn" (which listening port)


class Fault:
    """Handle returned by :meth:`FakeHub.inject`; usable as a context manager that removes it."""

    def __init__(
        self,
        hub: FakeHub,
        kind: str,
        repo_id: str | None,
        filename: str | None,
        times: int | None,
        method: str | Iterable[str] | None,
        on: str | Iterable[str] | None,
        params: dict[str, Any],
        path: str | None = None,
    ) -> None:
        self._hub = hub
        self.path = path
        self.kind = kind
        self.repo_id = repo_id
        self.filename = filename
        self.times = times
        self.methods = (
            None
            if method is None
            else frozenset([method.upper()] if isinstance(method, str) else [m.upper() for m in method])
        )
        self.params = params
        self.hits = 0
        self.removed = False
        if kind in ("error", "down") or (kind == "delay" and params.get("after") is None):
            self.phase = "request"
        elif kind == "ignore_range":
            self.phase = "range"
        else:
            self.phase = "body"
        if on is None:
            self.on = None if self.phase == "request" else frozenset({"resolve", "cdn"})
        else:
            self.on = frozenset([on] if isinstance(on, str) else on)

    @property
    def active(self) -> bool:
        return not self.removed and (self.times is None or self.hits < self.times)

    def remove(self) -> None:
        self._hub._remove_fault(self)

    def __enter__(self) -> Fault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _matches(self, method: str, kind: str, repo_id: str | None, filename: str | None, path: str = "") -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.path is not None and not fnmatch.fnmatchcase(path, self.path):
            return False
        if self.on is not None and kind not in self.on:
            return False
        if self.repo_id is not None and (repo_id is None or not fnmatch.fnmatchcase(repo_id, self.repo_id)):
            return False
        return self.filename is None or (filename is not None and fnmatch.fnmatchcase(filename, self.filename))

    def __repr__(self) -> str:
        scope = ", ".join(
            f"{k}={v!r}"
            for k, v in (
                ("repo_id", self.repo_id),
                ("filename", self.filename),
                ("path", self.path),
                ("times", self.times),
            )
            if v is not None
        )
        return f"<Fault {self.kind} {self.params} {scope} hits={self.hits}>"


_FAULT_PARAMS: dict[str, dict[str, Any]] = {
    "error": {"status": 500, "error_code": None, "message": None, "headers": None, "retry_after": None},
    "delay": {"seconds": None, "after": None},
    "slow": {"bytes_per_second": None},
    "cut": {"after": None, "reset": True, "linger": 0.05},
    "truncate": {"after": None},
    "ignore_range": {},
    "corrupt": {"offset": 0, "length": 1, "covering": False},
    "down": {"reset": False},
}
_FAULT_REQUIRED = {
    "delay": ("seconds",),
    "slow": ("bytes_per_second",),
    "cut": ("after",),
    "truncate": ("after",),
}


class _Aborted(Exception):
    """The response was deliberately cut short; the connection is gone."""


class _SharedPace:
    """A byte budget all responses draw from: ``rate`` bytes/s in total (a shared uplink)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = 0.0

    def delay_for(self, nbytes: int) -> float:
        """Seconds to wait before sending ``nbytes``: until the end of the slot reserved for them."""
        with self._lock:
            now = time.monotonic()
            self._free_at = max(self._free_at, now) + nbytes / self.rate
            return self._free_at - now


@dataclass
class _BodyPlan:
    stop_after: int | None = None
    stop_reset: bool = False
    stop_linger: float = 0.0
    rate: float | None = None
    shared: _SharedPace | None = None
    corrupt: list[tuple[int, int]] = field(default_factory=list)
    stalls: list[tuple[int, float]] = field(default_factory=list)

    @property
    def trivial(self) -> bool:
        return (
            self.stop_after is None
            and self.rate is None
            and self.shared is None
            and not self.corrupt
            and not self.stalls
        )


class _Rec:
    """Mutable record of a request, in the log from the moment the request line is parsed.

    Counters are updated *before* the bytes they count are written, and rolled back if the write
    fails, so that a client that has just received a response always finds it fully logged.
    """

    __slots__ = (
        "auth", "bytes_sent", "complete", "ended", "faults", "filename", "kind", "method", "path",
        "range", "repo_id", "revision", "server", "started", "status",
    )  # fmt: skip

    def __init__(self, method: str, path: str, server: str) -> None:
        self.method = method
        self.path = path
        self.server = server
        self.kind = "other"
        self.repo_id: str | None = None
        self.filename: str | None = None
        self.revision: str | None = None
        self.range: str | None = None
        self.status = 0
        self.bytes_sent = 0
        self.auth: str | None = None
        self.faults: list[str] = []
        self.complete = False
        self.started = time.monotonic()
        self.ended: float | None = None

    def freeze(self) -> RequestRecord:
        return RequestRecord(
            method=self.method,
            path=self.path,
            kind=self.kind,
            repo_id=self.repo_id,
            filename=self.filename,
            revision=self.revision,
            range=self.range,
            status=self.status,
            bytes_sent=self.bytes_sent,
            auth=self.auth,
            faults=tuple(self.faults),
            complete=self.complete,
            done=self.ended is not None,
            started=self.started,
            duration=(self.ended or time.monotonic()) - self.started,
            server=self.server,
        )


# --------------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], hub: FakeHub, role: str) -> None:
        self.hub = hub
        self.role = role
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind's socket.getfqdn(), which may do a slow reverse DNS lookup.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if exc is not None and _is_conn_error(exc, self.hub):
            logger.debug("connection from %s dropped: %r", client_address, exc)
            return
        self.hub._server_error(exc)


def _is_conn_error(exc: BaseException, hub: FakeHub) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError | _Aborted):
        return True
    if isinstance(exc, OSError) and (exc.errno in _CONN_ERRNOS or hub._stopping.is_set()):
        return True
    return isinstance(exc, ValueError) and hub._stopping.is_set()  # I/O on a socket closed by stop()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def version_string(self) -> str:
        return "FakeHub/1.0"

    # ---- connection bookkeeping ----

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.hub._conn_opened(self.connection)

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError, ValueError):
                super().finish()
        finally:
            self.server.hub._conn_closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass

    # ---- entry points ----

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    # ---- request processing ----

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def _dispatch(self) -> None:
        hub = self.hub
        rec = self._rec = _Rec(self.command, self.path, self.server.role)
        self._headers_sent = False
        self._body = b""
        rec.range = self.headers.get("Range")
        auth = self.headers.get("Authorization")
        if auth and auth.lower().startswith("bearer "):
            rec.auth = auth[7:].strip()
        hub._log(rec)
        try:
            if self.command == "POST":
                length = int(self.headers.get("Content-Length") or 0)
                self._body = self.rfile.read(length) if length else b""
            split = urlsplit(self.path)
            self._query = parse_qs(split.query, keep_blank_values=True)
            action = self._route(split.path)
            if hub._stopping.is_set():
                raise _Aborted("server stopping")
            self._apply_request_faults()
            action()
        except _Done:
            pass
        except _Aborted:
            self.close_connection = True
        except Exception as exc:
            self.close_connection = True
            if not _is_conn_error(exc, hub):
                hub._server_error(exc)
                if not self._headers_sent:
                    with contextlib.suppress(Exception):
                        self._send_error(500, None, f"FakeHub internal error: {exc!r}")
        finally:
            rec.ended = time.monotonic()

    def _apply_request_faults(self) -> None:
        rec = self._rec
        faults = self.hub._take_faults("request", rec.method, rec.kind, rec.repo_id, rec.filename, rec.path)
        for f in faults:
            rec.faults.append(f.kind)
        for f in faults:
            if f.kind == "delay":
                self.hub._sleep(float(f.params["seconds"]))
        for f in faults:
            if f.kind == "down":
                self._abort(reset=bool(f.params["reset"]))
            if f.kind == "error":
                p = f.params
                headers = dict(p["headers"] or {})
                if p["retry_after"] is not None:
                    headers["Retry-After"] = str(p["retry_after"])
                message = p["message"] or f"Injected error {p['status']}"
                self._send_error(int(p["status"]), p["error_code"], message, headers)
                raise _Done("error injected")

    # ---- routing ----

    def _route(self, raw_path: str) -> Any:
        segs = raw_path.split("/")[1:]
        rec = self._rec
        if segs and segs[0] == "cdn":
            rec.kind = "cdn"
            rec.repo_id = (self._query.get("repo") or [None])[0]
            rec.filename = (self._query.get("file") or [None])[0]
            return lambda: self._serve_cdn(segs[1:])
        if self.server.role == "cdn":
            return lambda: self._send_plain(404, "Not Found")
        if len(segs) >= 3 and segs[0] == "api" and segs[1] == "models":
            rec.kind = "api"
            repo_id, n = self.hub._split_repo_id(segs[2:])
            rec.repo_id = repo_id
            rest = segs[2 + n :]
            return lambda: self._serve_api(repo_id, rest)
        if self.command in ("GET", "HEAD"):
            for idx in (2, 1):
                if len(segs) > idx + 1 and segs[idx] == "resolve" and (idx == 1 or segs[1] != "resolve"):
                    rec.kind = "resolve"
                    repo_id = "/".join(unquote(s) for s in segs[:idx])
                    rec.repo_id = repo_id
                    rev, filename = self.hub._split_rev(repo_id, segs[idx + 1 :], need_path=True)
                    rec.revision, rec.filename = rev, filename
                    return lambda: self._serve_resolve(repo_id, rev, filename)
        return lambda: self._send_plain(404, "Not Found")

    # ---- API ----

    def _serve_api(self, repo_id: str, rest: list[str]) -> None:
        rec = self._rec
        repo = self._check_access(repo_id)
        if repo is None:
            return
        sub = rest[0] if rest else ""
        if sub == "" and len(rest) <= 1 and self.command in ("GET", "HEAD"):
            return self._api_info(repo, None)
        if sub == "revision" and len(rest) >= 2 and self.command in ("GET", "HEAD"):
            rev = unquote("/".join(rest[1:]))
            rec.revision = rev
            return self._api_info(repo, rev)
        if sub == "tree" and len(rest) >= 2 and self.command in ("GET", "HEAD"):
            rev, path = self.hub._split_rev(repo_id, rest[1:], need_path=False)
            rec.revision = rev
            return self._api_tree(repo, rev, path)
        if sub == "refs" and len(rest) == 1 and self.command in ("GET", "HEAD"):
            return self._api_refs(repo)
        if sub == "paths-info" and len(rest) >= 2 and self.command == "POST":
            rev = unquote("/".join(rest[1:]))
            rec.revision = rev
            return self._api_paths_info(repo, rev)
        return self._send_plain(404, "Not Found")

    def _resolve_commit(self, repo: _Repo, rev: str | None) -> _Commit | None:
        rev = repo.default_branch if rev is None else rev
        with self.hub._lock:
            commit = repo.resolve(rev)
        if commit is None:
            self._send_error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    def _api_info(self, repo: _Repo, rev: str | None) -> None:
        commit = self._resolve_commit(repo, rev)
        if commit is None:
            return
        blobs = _truthy(self._query.get("blobs"))
        expand = self._query.get("expand") or self._query.get("expand[]")
        info = self.hub._model_info(repo, commit, blobs=blobs)
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        self._send_json(200, info)

    def _api_tree(self, repo: _Repo, rev: str, path: str) -> None:
        commit = self._resolve_commit(repo, rev)
        if commit is None:
            return
        path = path.strip("/")
        if path and path not in commit.dirs:
            self._send_error(404, "EntryNotFound", f'{path} does not exist on "{rev}"', {"X-Repo-Commit": commit.sha})
            return
        recursive = _truthy(self._query.get("recursive"))
        expand = _truthy(self._query.get("expand"))
        prefix = path + "/" if path else ""
        if recursive:
            entries = [e for e in commit.entries if e[0].startswith(prefix)]
        else:
            entries = [e for e in commit.entries if e[0].startswith(prefix) and _parent_dir(e[0]) == path]
        page_size = max(1, int(self.hub.tree_page_size))
        cursor = (self._query.get("cursor") or [""])[0]
        try:
            offset = int(base64.urlsafe_b64decode(cursor.encode()).decode()) if cursor else 0
        except ValueError:
            self._send_error(400, None, "Invalid cursor")
            return
        page = entries[offset : offset + page_size]
        body = [self.hub._tree_entry(repo, commit, p, t, expand) for p, t in page]
        headers: dict[str, str] = {}
        if offset + page_size < len(entries):
            next_cursor = base64.urlsafe_b64encode(str(offset + page_size).encode()).decode()
            query = urlencode(
                {
                    "recursive": "true" if recursive else "false",
                    "expand": "true" if expand else "false",
                    "cursor": next_cursor,
                }
            )
            url = (
                f"{self._origin()}/api/models/{repo.repo_id}/tree/{quote(rev, safe='')}"
                + (f"/{quote(path)}" if path else "")
                + f"?{query}"
            )
            headers["Link"] = f'<{url}>; rel="next"'
        self._send_json(200, body, headers)

    def _api_refs(self, repo: _Repo) -> None:
        with self.hub._lock:
            branches = dict(repo.branches)
            tags = dict(repo.tags)
        body = {
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in branches.items()],
            "converts": [],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in tags.items()],
        }
        if _truthy(self._query.get("include_prs")):
            body["pullRequests"] = []
        self._send_json(200, body)

    def _api_paths_info(self, repo: _Repo, rev: str) -> None:
        commit = self._resolve_commit(repo, rev)
        if commit is None:
            return
        form = parse_qs(self._body.decode("utf-8", "replace"), keep_blank_values=True)
        if "application/json" in (self.headers.get("Content-Type") or ""):
            data = json.loads(self._body or b"{}")
            paths, expand = list(data.get("paths", [])), bool(data.get("expand"))
        else:
            paths, expand = form.get("paths", []), _truthy(form.get("expand"))
        body = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                body.append(self.hub._tree_entry(repo, commit, p, "file", expand))
            elif p in commit.dirs:
                body.append(self.hub._tree_entry(repo, commit, p, "directory", expand))
        self._send_json(200, body)

    # ---- resolve / CDN ----

    def _serve_resolve(self, repo_id: str, rev: str, filename: str) -> None:
        hub = self.hub
        repo = self._check_access(repo_id)
        if repo is None:
            return
        if repo.gated and not self._has_valid_token():
            self._send_error(
                401,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated "
                "to access it. Please log in.",
            )
            return
        commit = self._resolve_commit(repo, rev)
        if commit is None:
            return
        f = commit.files.get(filename)
        if f is None:
            self._send_error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha})
            return
        headers = {"X-Repo-Commit": commit.sha}
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        if f.lfs and hub.lfs_redirect:
            headers["ETag"] = f'"{f.oid}"'
            headers["Location"] = hub._cdn_url(repo_id, f)
            headers["Content-Type"] = "text/plain; charset=utf-8"
            headers["Vary"] = "Origin, Accept"
            self._start(302, headers, 0, final=True)
            return
        headers["ETag"] = f'"{f.etag}"'
        headers["Content-Type"] = "application/octet-stream" if f.lfs else "text/plain; charset=utf-8"
        headers["Content-Disposition"] = _content_disposition(filename)
        self._serve_content(f.content, headers)

    def _serve_cdn(self, rest: list[str]) -> None:
        sha = rest[0] if len(rest) == 1 else ""
        content = self.hub._blob(sha)
        if content is None:
            self._send_plain(404, "<Error><Code>NoSuchKey</Code></Error>", "application/xml")
            return
        headers = {
            "ETag": f'"{sha}"',
            "Content-Type": "application/octet-stream",
            "Cache-Control": "public, max-age=604800, immutable",
            "Content-Disposition": _content_disposition(self._rec.filename or sha),
        }
        self._serve_content(content, headers)

    def _serve_content(self, content: _Content, headers: dict[str, str]) -> None:
        rec = self._rec
        size = content.size
        start, length, status = 0, size, 200
        headers["Accept-Ranges"] = "bytes"
        range_header = self.headers.get("Range")
        if range_header and self.hub._take_faults("range", rec.method, rec.kind, rec.repo_id, rec.filename, rec.path):
            rec.faults.append("ignore_range")
            range_header = None
        if range_header:
            parsed = _parse_range(range_header, size)
            if parsed == "unsatisfiable":
                headers["Content-Range"] = f"bytes */{size}"
                headers["Content-Type"] = "text/plain; charset=utf-8"
                self._start(416, headers, 0, final=True)
                return
            if parsed is not None:
                start, end = parsed
                length = end - start + 1
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if self.command == "HEAD":
            self._start(status, headers, length, final=True)
            return
        plan = _BodyPlan(rate=self.hub.pace, shared=self.hub.shared_pace)
        span = (start, start + length)
        for f in self.hub._take_faults("body", rec.method, rec.kind, rec.repo_id, rec.filename, rec.path, span):
            rec.faults.append(f.kind)
            p = f.params
            if f.kind in ("cut", "truncate") and (plan.stop_after is None or p["after"] < plan.stop_after):
                plan.stop_after = int(p["after"])
                plan.stop_reset = f.kind == "cut" and bool(p["reset"])
                plan.stop_linger = float(p.get("linger") or 0.0) if f.kind == "cut" else 0.0
            elif f.kind == "slow":
                rate = float(p["bytes_per_second"])
                plan.rate = rate if plan.rate is None else min(plan.rate, rate)
            elif f.kind == "corrupt":
                plan.corrupt.append((int(p["offset"]), int(p["length"])))
            elif f.kind == "delay":
                plan.stalls.append((int(p["after"]), float(p["seconds"])))
        plan.stalls.sort()
        self._start(status, headers, length, final=length == 0)
        self._write_content(content, start, length, plan)

    def _write_content(self, content: _Content, start: int, length: int, plan: _BodyPlan) -> None:
        rec = self._rec
        fd = os.open(content.path, os.O_RDONLY) if content.path is not None else None
        try:
            if plan.trivial:
                if fd is not None:
                    out, off, remaining = self.connection.fileno(), start, length
                    while remaining > 0:
                        want = min(remaining, 8 * _CHUNK)
                        rec.bytes_sent += want
                        rec.complete = want == remaining
                        try:
                            n = os.sendfile(out, fd, off, want)
                        except BaseException:
                            rec.bytes_sent -= want
                            rec.complete = False
                            raise
                        if n < want:
                            rec.bytes_sent -= want - n
                            rec.complete = False
                        if n == 0:
                            raise RuntimeError(f"{content.path} shrank while being served")
                        off += n
                        remaining -= n
                else:
                    view = memoryview(content.data)  # type: ignore[arg-type]
                    pos, end = start, start + length
                    while pos < end:
                        n = min(4 * _CHUNK, end - pos)
                        self._send_all(view[pos : pos + n], last=pos + n == end)
                        pos += n
                return
            limit = length if plan.stop_after is None else min(length, plan.stop_after)
            if plan.rate is None:
                chunk = _CHUNK
            else:
                # About 20 pieces a second; fast paces (a CDN's 200 MB/s) in larger pieces, so
                # that this server's own CPU is not what limits them.
                cap = 64 * 1024 if plan.rate < 64 * 1024 * 1024 else 4 * 1024 * 1024
                chunk = max(1, min(cap, int(plan.rate / 20)))
            stalls = list(plan.stalls)
            t0 = time.monotonic()
            pos = 0
            while True:
                while stalls and stalls[0][0] <= pos and pos < length:
                    self.hub._sleep(stalls.pop(0)[1])
                if pos >= limit:
                    break
                n = min(chunk, limit - pos)
                if stalls:
                    n = min(n, stalls[0][0] - pos)
                data = content.read(start + pos, n, fd)
                if not data:
                    raise RuntimeError(f"{content.path} shrank while being served")
                data = _corrupt(data, start + pos, plan.corrupt)
                if plan.shared is not None:
                    self.hub._sleep(plan.shared.delay_for(len(data)))
                self._send_all(data, last=limit == length and pos + len(data) == length)
                pos += len(data)
                if plan.rate is not None:
                    ahead = pos / plan.rate - (time.monotonic() - t0)
                    if ahead > 0:
                        self.hub._sleep(ahead)
            if limit < length:
                if plan.stop_linger:
                    self.hub._sleep(plan.stop_linger)
                self._abort(reset=plan.stop_reset)
        finally:
            if fd is not None:
                os.close(fd)

    # ---- access control ----

    def _has_valid_token(self) -> bool:
        return self._rec.auth is not None and self._rec.auth in self.hub.valid_tokens

    def _check_access(self, repo_id: str) -> _Repo | None:
        hub = self.hub
        repo = hub._get_repo(repo_id)
        valid = self._has_valid_token()
        if self._rec.auth is not None and not valid and hub.reject_invalid_tokens:
            self._send_error(401, None, "Invalid credentials in Authorization header")
            return None
        if repo is None or (repo.private and not valid):
            status = 401 if self._rec.auth is None else 404
            self._send_error(status, "RepoNotFound", "Repository not found")
            return None
        return repo

    # ---- response helpers ----

    def _origin(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.hub.endpoint

    def _start(self, status: int, headers: Mapping[str, str], content_length: int, *, final: bool) -> None:
        """Send the status line and headers; ``final`` when no body follows (HEAD, 302, empty)."""
        rec = self._rec
        rec.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(content_length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self._headers_sent = True
        rec.complete = final
        try:
            self.end_headers()
        except BaseException:
            rec.complete = False
            raise

    def _send_all(self, data: bytes | memoryview, *, last: bool) -> None:
        """sendall() that accounts the bytes (and completion) before they can reach the client."""
        rec = self._rec
        view = memoryview(data)
        total = len(view)
        rec.bytes_sent += total
        rec.complete = last
        sent = 0
        try:
            while sent < total:
                sent += self.connection.send(view[sent:])
        except BaseException:
            rec.bytes_sent -= total - sent
            rec.complete = False
            raise

    def _send_bytes(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        has_body = self.command != "HEAD" and bool(body)
        self._start(status, headers, len(body), final=not has_body)
        if has_body:
            self._send_all(body, last=True)

    def _send_json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self._send_bytes(status, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})

    def _send_plain(self, status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> None:
        self._send_bytes(status, text.encode(), {"Content-Type": content_type})

    def _send_error(
        self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        hdrs = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        if code is not None:
            hdrs["X-Error-Code"] = code
        hdrs["X-Error-Message"] = message.encode("latin-1", "replace").decode("latin-1")
        self._send_bytes(status, json.dumps({"error": message}).encode(), hdrs)

    def _abort(self, *, reset: bool) -> None:
        """Drop the connection: RST (reset=True) or FIN after what was sent so far."""
        self.close_connection = True
        sock = self.connection
        with contextlib.suppress(OSError):
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.hub._conn_closed(sock)
                os.close(sock.detach())
            else:
                sock.shutdown(socket.SHUT_WR)
        raise _Aborted("connection dropped on purpose")


class _Done(_Aborted):
    """Response fully sent by a fault (e.g. an injected error); not a dropped connection."""


def _truthy(values: list[str] | None) -> bool:
    return bool(values) and values[-1].strip().lower() in ("1", "true", "yes", "on")  # type: ignore[index]


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """(start, end) inclusive; "unsatisfiable"; or None when the header is ignored (invalid/multi)."""
    m = _RANGE.match(header)
    if m is None:
        return None
    first, last = m.groups()
    if not first and not last:
        return None
    if not first:
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def _corrupt(data: bytes, offset: int, spans: list[tuple[int, int]]) -> bytes:
    if not spans:
        return data
    buf: bytearray | None = None
    for coff, clen in spans:
        lo, hi = max(coff, offset), min(coff + clen, offset + len(data))
        if lo < hi:
            if buf is None:
                buf = bytearray(data)
            for i in range(lo - offset, hi - offset):
                buf[i] ^= 0xFF
    return bytes(buf) if buf is not None else data


def _content_disposition(filename: str) -> str:
    name = filename.rsplit("/", 1)[-1]
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    return f"inline; filename*=UTF-8''{quote(name)}; filename=\"{ascii_name}\";"


# --------------------------------------------------------------------------------------------------
# FakeHub
# --------------------------------------------------------------------------------------------------


class FakeHub:
    """Hub-compatible HTTP server on loopback, serving repos built by tests, with failure injection.

    Gating is checked on file downloads (``/resolve``) only: like on the Hub, the info, tree and
    refs endpoints of a gated repo stay public.  A private repo is "not found" without a valid token.

    Attributes that tests may set at any time:
        ``valid_tokens`` (set[str]): bearer tokens that open gated/private repos.
        ``tree_page_size`` (int): entries per ``/tree`` page (``Link: rel="next"`` pagination).
        ``lfs_redirect`` (bool): answer LFS files on ``/resolve`` with a 302 to the CDN port (default).
        ``reject_invalid_tokens`` (bool): 401 for any unknown token, like the real Hub (default False:
            unknown tokens are treated as anonymous).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        cdn_port: int = 0,
        valid_tokens: Iterable[str] = (),
        tree_page_size: int = 1000,
        lfs_redirect: bool = True,
        reject_invalid_tokens: bool = False,
        pace: float | None = None,
        pace_total: float | None = None,
    ) -> None:
        self.host = host
        # The network's shape (a CDN): each connection gets ``pace`` bytes/s of file bodies, and
        # all of them together at most ``pace_total``.  None: as fast as loopback goes.
        self.pace = pace
        self.shared_pace = _SharedPace(pace_total) if pace_total else None
        self._port = port
        self._cdn_port = cdn_port
        self.valid_tokens: set[str] = set(valid_tokens)
        self.tree_page_size = tree_page_size
        self.lfs_redirect = lfs_redirect
        self.reject_invalid_tokens = reject_invalid_tokens
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._blobs: dict[str, _Content] = {}
        self._faults: list[Fault] = []
        self._log_records: list[_Rec] = []
        self._errors: list[BaseException] = []
        self._conns: set[socket.socket] = set()
        self._conns_cv = threading.Condition(self._lock)
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._secret = os.urandom(8).hex()

    # ---- lifecycle ----

    def start(self) -> FakeHub:
        """Bind (to the same ports again after a ``stop()``) and serve in background threads."""
        if self._servers:
            return self
        self._stopping = threading.Event()
        hub_srv = _Server((self.host, self._port), self, "hub")
        try:
            cdn_srv = _Server((self.host, self._cdn_port), self, "cdn")
        except BaseException:
            hub_srv.server_close()
            raise
        self._port = hub_srv.server_port
        self._cdn_port = cdn_srv.server_port
        self._servers = [hub_srv, cdn_srv]
        for srv in self._servers:
            t = threading.Thread(
                target=srv.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"FakeHub-{srv.role}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection (clients then get "connection refused")."""
        servers, self._servers = self._servers, []
        if not servers:
            return
        self._stopping.set()
        for srv in servers:
            srv.shutdown()
            srv.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)
        self._threads = []
        deadline = time.monotonic() + 5
        with self._conns_cv:
            while self._conns and time.monotonic() < deadline:
                self._conns_cv.wait(0.05)

    @property
    def running(self) -> bool:
        return bool(self._servers)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def cdn_port(self) -> int:
        return self._cdn_port

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: pass as ``endpoint=`` / ``HF_ENDPOINT``."""
        return f"http://{self.host}:{self._port}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://{self.host}:{self._cdn_port}"

    def env(self, *, token: str | None = None, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
        """Environment variables pointing a *subprocess* using huggingface_hub at this server."""
        env = {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1" if token is None else "0",
            "HF_HUB_OFFLINE": "0",
        }
        if token is not None:
            env["HF_TOKEN"] = token
        if cache_dir is not None:
            env["HF_HUB_CACHE"] = os.fspath(cache_dir)
        return env

    # ---- repositories ----

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | os.PathLike[str]],
        *,
        branch: str = "main",
        tags: Iterable[str] = (),
        gated: bool | str | None = None,
        private: bool | None = None,
        lfs_threshold: int | None = None,
        lfs_patterns: Iterable[str] | None = None,
        commit_date: dt.datetime | str | float | None = None,
        message: str | None = None,
    ) -> str:
        """Commit ``files`` (the complete new tree) on ``branch``; create the repo if needed.

        Values are ``bytes``, ``str`` (UTF-8 text) or ``os.PathLike`` (served from disk with sendfile).
        Returns the new commit sha.  ``gated``: False, True (= "auto"), "auto" or "manual"; ``None``
        keeps the repo's current setting (False for a new repo).  ``lfs_threshold``/``lfs_patterns``
        decide which files are LFS (sha256 etag, CDN redirect) and stick to the repo.
        """
        return self._commit(
            repo_id,
            dict(files),
            replace=True,
            branch=branch,
            tags=tags,
            gated=gated,
            private=private,
            lfs_threshold=lfs_threshold,
            lfs_patterns=lfs_patterns,
            commit_date=commit_date,
            message=message,
        )

    def commit(
        self,
        repo_id: str,
        add: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
        delete: Iterable[str] = (),
        *,
        branch: str = "main",
        tags: Iterable[str] = (),
        commit_date: dt.datetime | str | float | None = None,
        message: str | None = None,
    ) -> str:
        """Incremental commit on top of ``branch`` of an existing repo: add/overwrite and delete files."""
        if self._get_repo(repo_id) is None:
            raise KeyError(f"unknown repo {repo_id!r}")
        changes: dict[str, Any] = dict(add or {})
        for path in delete:
            changes[path] = None
        return self._commit(
            repo_id,
            changes,
            replace=False,
            branch=branch,
            tags=tags,
            commit_date=commit_date,
            message=message,
        )

    def add_files_from_dir(self, repo_id: str, directory: str | os.PathLike[str], **kwargs: Any) -> str:
        """Serve a directory tree (files read from disk; ``.git`` skipped) as a commit of ``repo_id``."""
        root = Path(directory)
        files: dict[str, os.PathLike[str]] = {}
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if d != ".git")
            for name in filenames:
                full = Path(dirpath) / name
                files[full.relative_to(root).as_posix()] = full
        return self.add_repo(repo_id, files, **kwargs)

    def delete_repo(self, repo_id: str) -> None:
        with self._lock:
            self._repos.pop(repo_id, None)

    def set_ref(self, repo_id: str, name: str, sha: str | None, *, tag: bool = False) -> None:
        """Point branch (or tag) ``name`` at ``sha`` (None deletes it), e.g. to simulate a force-push."""
        with self._lock:
            repo = self._repos[repo_id]
            refs = repo.tags if tag else repo.branches
            if sha is None:
                refs.pop(name, None)
            elif sha not in repo.commits:
                raise KeyError(f"unknown commit {sha} in {repo_id}")
            else:
                refs[name] = sha

    def set_gated(self, repo_id: str, gated: bool | str, *, private: bool | None = None) -> None:
        with self._lock:
            repo = self._repos[repo_id]
            repo.gated = _norm_gated(gated)
            if private is not None:
                repo.private = private

    def head(self, repo_id: str, revision: str = "main") -> str:
        """Commit sha that ``revision`` (branch, tag or sha) points to."""
        with self._lock:
            commit = self._repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(f"unknown revision {revision!r} of {repo_id}")
        return commit.sha

    def repo_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._repos)

    def file_info(self, repo_id: str, filename: str, revision: str = "main") -> dict[str, Any]:
        """What the server knows about a file: size, lfs, etag (as huggingface_hub stores the blob), oid."""
        with self._lock:
            commit = self._repos[repo_id].resolve(revision)
            if commit is None:
                raise KeyError(revision)
            f = commit.files[filename]
        return {
            "size": f.size,
            "lfs": f.lfs,
            "etag": f.etag,
            "oid": f.oid,
            "sha256": f.sha256,
            "commit": commit.sha,
        }

    def url(self, repo_id: str, filename: str, revision: str = "main") -> str:
        """``/resolve`` URL of a file, quoted the way huggingface_hub's ``hf_hub_url`` does it."""
        return f"{self.endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"

    def _commit(
        self,
        repo_id: str,
        changes: dict[str, Any],
        *,
        replace: bool,
        branch: str,
        tags: Iterable[str],
        gated: bool | str | None = None,
        private: bool | None = None,
        lfs_threshold: int | None = None,
        lfs_patterns: Iterable[str] | None = None,
        commit_date: dt.datetime | str | float | None = None,
        message: str | None = None,
    ) -> str:
        _validate_repo_id(repo_id)
        if not branch or _SHA40.match(branch):
            raise ValueError(f"invalid branch name {branch!r}")
        tags = list(tags)
        date = _to_datetime(commit_date)
        for path in changes:
            _validate_path(path)
        # Hash outside the lock: big files on disk take a while.
        with self._lock:
            existing = self._repos.get(repo_id)
            threshold = (
                lfs_threshold
                if lfs_threshold is not None
                else (existing.lfs_threshold if existing else DEFAULT_LFS_THRESHOLD)
            )
            patterns = (
                tuple(lfs_patterns)
                if lfs_patterns is not None
                else (existing.lfs_patterns if existing else DEFAULT_LFS_PATTERNS)
            )
        new_files: dict[str, _File | None] = {}
        for path, value in changes.items():
            if value is None:
                new_files[path] = None
                continue
            content = _make_content(value)
            if content.size > threshold or _is_lfs_path(path, patterns):
                sha256 = content._digest("sha256")
                pointer = _lfs_pointer(sha256, content.size)
                oid = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
                new_files[path] = _File(path, content, True, oid, sha256, len(pointer))
            else:
                new_files[path] = _File(path, content, False, content._digest("gitsha1"))
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                repo = _Repo(
                    repo_id=repo_id,
                    private=bool(private),
                    gated=_norm_gated(gated or False),
                    default_branch=branch,
                    created_at=date,
                    object_id=hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                    lfs_threshold=threshold,
                    lfs_patterns=patterns,
                )
                self._repos[repo_id] = repo
            else:
                if gated is not None:
                    repo.gated = _norm_gated(gated)
                if private is not None:
                    repo.private = private
                if lfs_threshold is not None:
                    repo.lfs_threshold = lfs_threshold
                if lfs_patterns is not None:
                    repo.lfs_patterns = patterns
            parent_sha = repo.branches.get(branch) or repo.branches.get(repo.default_branch)
            parent = repo.commits.get(parent_sha) if parent_sha else None
            files: dict[str, _File] = {} if replace or parent is None else dict(parent.files)
            for path, f in new_files.items():
                if f is None:
                    files.pop(path, None)
                else:
                    files[path] = f
            for f in files.values():
                if f.sha256 is not None:
                    self._blobs.setdefault(f.sha256, f.content)
            title = message or (f"Upload {len(changes)} files" if parent else "Initial commit")
            commit = _build_commit(repo, parent, files, date, title, len(repo.commits))
            repo.commits[commit.sha] = commit
            repo.branches[branch] = commit.sha
            for tag in tags:
                repo.tags[tag] = commit.sha
            return commit.sha

    def _get_repo(self, repo_id: str) -> _Repo | None:
        with self._lock:
            return self._repos.get(repo_id)

    def _blob(self, sha256: str) -> _Content | None:
        with self._lock:
            return self._blobs.get(sha256)

    def _split_repo_id(self, segs: list[str]) -> tuple[str, int]:
        first = unquote(segs[0]) if segs else ""
        two = f"{first}/{unquote(segs[1])}" if len(segs) >= 2 else None
        with self._lock:
            if two is not None and two in self._repos:
                return two, 2
            if first in self._repos:
                return first, 1
        if two is not None and segs[1] not in _API_SUBPATHS:
            return two, 2
        return first, 1

    def _split_rev(self, repo_id: str, segs: list[str], *, need_path: bool) -> tuple[str, str]:
        """Split ``{rev}/{path}``: rev is one URL-quoted segment, or a longer unquoted known ref name."""
        repo = self._get_repo(repo_id)
        if repo is not None:
            with self._lock:
                for k in range(len(segs) - (1 if need_path else 0), 1, -1):
                    candidate = unquote("/".join(segs[:k]))
                    if repo.is_ref(candidate):
                        return candidate, unquote("/".join(segs[k:]))
        return unquote(segs[0]), unquote("/".join(segs[1:]))

    def _cdn_url(self, repo_id: str, f: _File) -> str:
        expires = int(time.time()) + 3600
        sig = hashlib.sha256(f"{self._secret}{f.sha256}{expires}".encode()).hexdigest()[:32]
        query = urlencode({"repo": repo_id, "file": f.path, "Expires": expires, "Signature": sig})
        return f"{self.cdn_endpoint}/cdn/{f.sha256}?{query}"

    def _model_info(self, repo: _Repo, commit: _Commit, *, blobs: bool) -> dict[str, Any]:
        siblings = []
        for path in sorted(commit.files):
            f = commit.files[path]
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib["size"] = f.size
                sib["blobId"] = f.oid
                if f.lfs:
                    sib["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            siblings.append(sib)
        return {
            "_id": repo.object_id,
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(f.size for f in commit.files.values()),
        }

    def _tree_entry(self, repo: _Repo, commit: _Commit, path: str, typ: str, expand: bool) -> dict[str, Any]:
        if typ == "file":
            f = commit.files[path]
            entry: dict[str, Any] = {"type": "file", "oid": f.oid, "size": f.size, "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        else:
            entry = {"type": "directory", "oid": commit.dirs[path], "size": 0, "path": path}
        if expand:
            with self._lock:
                last = repo.commits.get(commit.last_changed.get(path, commit.sha), commit)
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": _iso(last.date)}
        return entry

    # ---- failure injection ----

    def inject(
        self,
        kind: str,
        *,
        repo_id: str | None = None,
        filename: str | None = None,
        times: int | None = None,
        method: str | Iterable[str] | None = None,
        on: str | Iterable[str] | None = None,
        path: str | None = None,
        **params: Any,
    ) -> Fault:
        """Add a fault; returns its handle (``.hits``, ``.remove()``, context manager).

        Scope: ``repo_id`` and ``filename`` are globs (a request without a repo/filename never matches a
        scoped fault); ``times=N`` stops after N applications; ``method`` ("GET"/"HEAD"/...); ``on``:
        request kinds among "api", "resolve", "cdn" (default: all for error/delay/down, resolve+cdn for
        body faults); ``path``: a glob on the raw request target, query included (e.g. ``"*/tree/*"``
        for tree listings only).  Kinds and params:

        * ``error``: ``status=500, error_code=None, message=None, headers=None, retry_after=None``
        * ``delay``: ``seconds``; with ``after=N`` stall once N body bytes are sent instead of before
          the response
        * ``slow``: ``bytes_per_second``
        * ``cut``: ``after`` body bytes then close with a TCP RST (``reset=False``: FIN)
        * ``truncate``: ``after`` body bytes (Content-Length still the full length) then FIN
        * ``ignore_range``: answer 200 with the full body although ``Range`` was sent
        * ``corrupt``: flip ``length`` bytes at absolute file ``offset`` (same length); with
          ``covering=True`` only answers that carry those bytes count as hits, so ``times=1``
          corrupts exactly the first copy of them that the Hub sends
        * ``down``: close the connection without answering (``reset=True`` for an RST)

        Body faults (slow/cut/truncate/corrupt/delay+after) act on file content only (resolve/cdn,
        never on API JSON) and count a hit only when such a body is sent (GET with 200/206);
        ``ignore_range`` counts only when a Range was sent.  With the default CDN redirect, an LFS
        file's body is sent by the "cdn" request, the /resolve request being a body-less 302.
        """
        if kind not in _FAULT_PARAMS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        defaults = _FAULT_PARAMS[kind]
        unknown = set(params) - set(defaults)
        if unknown:
            raise TypeError(f"unexpected parameter(s) for {kind!r} fault: {sorted(unknown)}")
        merged = {**defaults, **params}
        for name in _FAULT_REQUIRED.get(kind, ()):
            if merged[name] is None:
                raise TypeError(f"{kind!r} fault needs {name}=")
        if times is not None and times < 0:
            raise ValueError("times must be >= 0")
        fault = Fault(self, kind, repo_id, filename, times, method, on, merged, path)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            for f in self._faults:
                f.removed = True
            self._faults.clear()

    @property
    def faults(self) -> list[Fault]:
        with self._lock:
            return [f for f in self._faults if f.active]

    def _remove_fault(self, fault: Fault) -> None:
        with self._lock:
            fault.removed = True
            if fault in self._faults:
                self._faults.remove(fault)

    def _take_faults(
        self,
        phase: str,
        method: str,
        kind: str,
        repo_id: str | None,
        filename: str | None,
        path: str = "",
        span: tuple[int, int] | None = None,
    ) -> list[Fault]:
        taken: list[Fault] = []
        with self._lock:
            for f in self._faults:
                if f.phase != phase or not f.active or not f._matches(method, kind, repo_id, filename, path):
                    continue
                if f.kind == "corrupt" and f.params["covering"] and span is not None:
                    lo, hi = f.params["offset"], f.params["offset"] + f.params["length"]
                    if not (span[0] < hi and lo < span[1]):
                        continue  # this answer does not carry the bytes to corrupt: no hit
                if f.kind in ("error", "down") and any(t.kind in ("error", "down") for t in taken):
                    continue
                f.hits += 1
                taken.append(f)
        return taken

    def _sleep(self, seconds: float) -> None:
        """Sleep that ``stop()`` interrupts."""
        if seconds > 0 and self._stopping.wait(seconds):
            raise _Aborted("server stopping")

    # ---- observability ----

    def requests(
        self,
        method: str | None = None,
        kind: str | None = None,
        repo_id: str | None = None,
        filename: str | None = None,
        *,
        status: int | None = None,
    ) -> list[RequestRecord]:
        """Logged requests (oldest first, in-flight ones included with ``done=False``), filtered.

        ``filename`` is a glob.  A request is logged when its request line is parsed, and its counters
        are updated before its bytes are written: once a client has a response, its record is final
        (except ``done``/``duration``, which the server thread sets a moment later).
        """
        with self._lock:
            records = [r.freeze() for r in self._log_records]
        return [
            r
            for r in records
            if (method is None or r.method == method.upper())
            and (kind is None or r.kind == kind)
            and (repo_id is None or r.repo_id == repo_id)
            and (filename is None or (r.filename is not None and fnmatch.fnmatchcase(r.filename, filename)))
            and (status is None or r.status == status)
        ]

    def count(self, method: str | None = None, kind: str | None = None, **kwargs: Any) -> int:
        return len(self.requests(method, kind, **kwargs))

    def bytes_served(self, repo_id: str | None = None, filename: str | None = None) -> int:
        """Body bytes of file content sent for ``repo_id``/``filename`` across resolve and CDN requests."""
        return sum(
            r.bytes_sent
            for r in self.requests(repo_id=repo_id, filename=filename)
            if r.kind in ("resolve", "cdn") and 200 <= r.status < 300
        )

    def reset_log(self) -> None:
        with self._lock:
            self._log_records.clear()

    @property
    def server_errors(self) -> list[BaseException]:
        """Unexpected exceptions raised while serving (bugs in the server); should stay empty."""
        with self._lock:
            return list(self._errors)

    def _log(self, record: _Rec) -> None:
        with self._lock:
            self._log_records.append(record)

    def _server_error(self, exc: BaseException | None) -> None:
        logger.error("FakeHub: error while serving a request", exc_info=exc)
        if exc is not None:
            with self._lock:
                self._errors.append(exc)

    def _conn_opened(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.add(sock)

    def _conn_closed(self, sock: socket.socket) -> None:
        with self._conns_cv:
            self._conns.discard(sock)
            self._conns_cv.notify_all()


def _norm_gated(gated: bool | str) -> bool | str:
    if gated is True:
        return "auto"
    if gated in (False, "auto", "manual"):
        return gated
    raise ValueError(f"gated must be False, True, 'auto' or 'manual', not {gated!r}")


def _build_commit(
    repo: _Repo, parent: _Commit | None, files: dict[str, _File], date: dt.datetime, title: str, seq: int
) -> _Commit:
    dirs_children: dict[str, list[tuple[str, str]]] = {}
    for path, f in files.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            dirs_children.setdefault("/".join(parts[:i]), [])
        dirs_children.setdefault(_parent_dir(path), []).append((parts[-1], f.oid))
    dirs: dict[str, str] = {}
    for d in sorted(dirs_children, key=lambda p: -p.count("/") if p else 1):
        if not d:
            continue
        children = list(dirs_children[d])
        prefix = d + "/"
        children += [(sub[len(prefix) :], oid) for sub, oid in dirs.items() if _parent_dir(sub) == d]
        dirs[d] = hashlib.sha1(repr(sorted(children)).encode()).hexdigest()
    listing = sorted((f.path, f.oid, f.lfs) for f in files.values())
    sha = hashlib.sha1(
        repr((repo.repo_id, parent.sha if parent else None, listing, title, _iso(date), seq)).encode()
    ).hexdigest()
    last_changed: dict[str, str] = {}
    for path, f in files.items():
        old = parent.files.get(path) if parent else None
        same = old is not None and old.oid == f.oid and old.lfs == f.lfs
        last_changed[path] = parent.last_changed[path] if same and parent else sha
    for d, oid in dirs.items():
        same = parent is not None and parent.dirs.get(d) == oid
        last_changed[d] = parent.last_changed[d] if same and parent else sha
    entries = sorted([(p, "file") for p in files] + [(d, "directory") for d in dirs], key=lambda e: _tree_order(e[0]))
    return _Commit(sha, parent.sha if parent else None, date, title, files, dirs, last_changed, entries)


# --------------------------------------------------------------------------------------------------
# Standalone use
# --------------------------------------------------------------------------------------------------


def _iter_data_repos(data: Path) -> Iterator[tuple[str, Path]]:
    """``DATA/<org>/<name>/`` -> repo ``org/name``."""
    for org in sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for name in sorted(p for p in org.iterdir() if p.is_dir() and not p.name.startswith(".")):
            yield f"{org.name}/{name.name}", name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Hub-compatible HTTP server for tests and benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cdn-port", type=int, default=0)
    parser.add_argument("--data", type=Path, help="directory laid out as DATA/<org>/<name>/<files>")
    parser.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR")
    parser.add_argument("--token", action="append", default=[], help="valid bearer token (repeatable)")
    parser.add_argument("--gated", action="append", default=[], metavar="ORG/NAME")
    parser.add_argument("--no-redirect", action="store_true", help="serve LFS files on /resolve directly")
    parser.add_argument("--tree-page-size", type=int, default=1000)
    parser.add_argument("--pace", type=float, help="bytes/s of file bodies per connection (a CDN's shape)")
    parser.add_argument("--pace-total", type=float, help="bytes/s of file bodies for all connections together")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)

    hub = FakeHub(
        host=args.host,
        port=args.port,
        cdn_port=args.cdn_port,
        valid_tokens=args.token,
        tree_page_size=args.tree_page_size,
        lfs_redirect=not args.no_redirect,
        pace=args.pace,
        pace_total=args.pace_total,
    )
    repos: list[tuple[str, Path]] = list(_iter_data_repos(args.data)) if args.data else []
    for spec in args.repo:
        repo_id, _, directory = spec.partition("=")
        repos.append((repo_id, Path(directory)))
    for repo_id, directory in repos:
        sha = hub.add_files_from_dir(repo_id, directory, gated=repo_id in args.gated or None)
        print(f"repo {repo_id} @ {sha} <- {directory}", file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # A benchmark that runs this server in a subprocess asks how many file bytes it has served so far
    # (``bytes_served()``, all repos) with SIGUSR1; the answer is one stdout line, ``SERVED <bytes>``.
    signal.signal(signal.SIGUSR1, lambda *_: print(f"SERVED {hub.bytes_served()}", flush=True))
    with hub:
        print(f"READY {hub.endpoint} cdn={hub.cdn_endpoint}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
