"""Everything that talks to the Hugging Face Hub, through ``huggingface_hub``.

Two layers:

* :class:`HubClient` is synchronous and thin: resolve a revision to a commit, list a repo tree,
  stream a byte range of a file.  It uses ``huggingface_hub``'s own session, headers
  (``HF_TOKEN``, user agent), endpoint (``HF_ENDPOINT``), offline flag (``HF_HUB_OFFLINE``) and
  error classes, and turns those errors into mxfs's domain errors.
* :class:`Hub` is its trio face: every call runs in a worker thread under a ``CapacityLimiter``
  (the library blocks), transient failures are retried with exponential backoff on trio's clock,
  and a bounded number of attempts turns a dead Hub into ``HubUnavailable`` instead of a hang.

Nothing here knows about FUSE, the registry or the cache layout.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import httpx2
import trio
from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, set_client_factory

# The request hook of the library's default session (offline mode, request ids); public in all but name.
from huggingface_hub.utils._http import hf_request_event_hook

from mxfs import metrics
from mxfs.errors import AccessDenied, HubUnavailable, MxfsError, NotFound, OfflineMiss
from mxfs.names import EntryName
from mxfs.retry import RetryPolicy
from mxfs.tree import HubFile, RepoTree

log = logging.getLogger(__name__)

T = TypeVar("T")


def _seconds_from_env(name: str, default: float) -> float:
    """A timeout from huggingface_hub's own variable when the user set one, else ``default``."""
    try:
        seconds = float(os.environ.get(name) or default)
    except ValueError:
        return default
    return seconds if seconds > 0 else default


# Seconds to wait for a connection and between two reads of an answer: a stalled connection is
# given up on (and retried or resumed) instead of holding a reader forever.  The variables are
# huggingface_hub's (metadata requests, file downloads), so one setting serves both.
CONNECT_TIMEOUT = 10.0
API_TIMEOUT = _seconds_from_env("HF_HUB_ETAG_TIMEOUT", 30.0)
READ_TIMEOUT = _seconds_from_env("HF_HUB_DOWNLOAD_TIMEOUT", 30.0)
CHUNK_SIZE = 1 << 20
# Pieces in one batch of a body (RangeBody.batches): a slow server's many small pieces still make
# an iovec array far below IOV_MAX (1024).
MAX_BATCH_PIECES = 256
# A tree listing comes in pages (1000 entries each): a bound, so a server that keeps sending a
# "next" link cannot keep a lookup busy forever.
MAX_TREE_PAGES = 10_000


def trust_ca_bundle(path: os.PathLike[str] | str) -> None:
    """Make every Hub connection trust the CAs in ``path`` (PEM) instead of the system store.

    For a proxy that re-signs TLS (a corporate gateway, a caching proxy between the fleet and
    the Hub).  Every request mxfs makes to the Hub, CDN redirects included, goes through
    huggingface_hub's shared session, so this replaces the factory of that session with the
    library's own recipe plus ``verify``; proxies still come from ``HTTPS_PROXY``/``HTTP_PROXY``/
    ``NO_PROXY`` (httpx2's ``trust_env``).  Blocking (reads the file); ValueError if it holds no
    usable certificate.
    """
    try:
        context = ssl.create_default_context(cafile=os.fspath(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"ca_bundle {os.fspath(path)!r}: {exc}") from None

    def factory() -> httpx2.Client:
        # As huggingface_hub's default_client_factory, with our trust store.
        return httpx2.Client(
            event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True, timeout=None, verify=context
        )

    set_client_factory(factory)


@dataclass(frozen=True)
class Resolved:
    commit: str
    commit_date: datetime


class Transient(HubUnavailable):
    """A failure worth retrying: network error, timeout, 429 or 5xx."""


def _translate(exc: BaseException, what: str) -> MxfsError:
    """Map huggingface_hub / httpx2 errors onto domain errors (order matters: Gated is a RepoNotFound)."""
    if isinstance(exc, MxfsError):
        return exc
    if isinstance(exc, GatedRepoError):
        return AccessDenied(f"{what}: gated repo, access not granted; set HF_TOKEN to a token with access")
    if isinstance(exc, RepositoryNotFoundError):
        return NotFound(f"{what}: repository not found (or private: set HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return NotFound(f"{what}: revision not found")
    if isinstance(exc, EntryNotFoundError):
        return NotFound(f"{what}: file not found")
    if isinstance(exc, OfflineModeIsEnabled):
        return OfflineMiss(f"{what}: HF_HUB_OFFLINE is set and this is not cached")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return AccessDenied(f"{what}: HTTP {status}; set HF_TOKEN to a token with access")
        if status is not None and (status == 408 or status == 429 or status >= 500):
            return Transient(f"{what}: HTTP {status}")
        return HubUnavailable(f"{what}: HTTP {status}")
    if isinstance(exc, httpx2.HTTPError | OSError):
        return Transient(f"{what}: {type(exc).__name__}: {exc}")
    return HubUnavailable(f"{what}: {type(exc).__name__}: {exc}")


class HubClient:
    """Synchronous Hub access; every method may block on the network."""

    def __init__(self, endpoint: str | None = None, token: str | None = None, offline: bool | None = None):
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        # None lets huggingface_hub find the token itself (HF_TOKEN, then the stored login).
        self._token = token
        self.offline = constants.is_offline_mode() if offline is None else offline
        self._api = HfApi(endpoint=self.endpoint, token=token)
        # Set once a range request was answered with the whole file (a mirror or proxy that
        # ignores Range): from then on every file is fetched in one request, for the daemon's life.
        self.ignores_ranges = False
        # Where each file's bytes were served from after the Hub's redirect (the CDN's signed URL),
        # so a file's next ranges skip the round trip to the Hub (see open_range).
        self._locations: dict[tuple[str, str, str], str] = {}
        self._locations_lock = threading.Lock()

    def warm_up(self) -> None:
        """Make the HTTP session and the request headers now, not in the first reader's lookup.

        Both are made lazily by huggingface_hub, and the headers' first build asks the Hub for
        its list of agent harnesses (once a day per machine, up to a 3 s timeout): a cost the
        first lookup of a model would otherwise pay before its own requests start.
        """
        if self.offline:
            return
        get_session()
        build_hf_headers(token=self._token)

    def bad_copy(self, path: str) -> None:
        """A file's bytes failed their checksum: the Hub is the source of truth, so the next copy
        asks it again (a peer client stops asking the peers that sent them: mxfs.peers.client)."""

    def _check_online(self, what: str) -> None:
        if self.offline:
            raise OfflineMiss(f"{what}: HF_HUB_OFFLINE is set and this is not cached")

    def resolve(self, repo_id: str, revision: str) -> Resolved:
        """The commit a branch, tag or commit name points to, and that commit's date."""
        what = f"{repo_id}@{revision}"
        self._check_online(what)
        try:
            with metrics.hub_request("resolve"):
                info = self._api.model_info(repo_id, revision=revision, timeout=API_TIMEOUT)
        except Exception as exc:
            raise _translate(exc, what) from exc
        if not info.sha:
            raise HubUnavailable(f"{what}: the Hub returned no commit for this revision")
        date = info.last_modified or datetime.fromtimestamp(0, UTC)
        return Resolved(info.sha, date)

    def list_tree(self, repo_id: str, commit: str, commit_date: datetime) -> RepoTree:
        """Every file of the repo at ``commit``, subfolders included, with sizes and hashes."""
        what = EntryName(repo_id, commit).label
        self._check_online(what)
        try:
            with metrics.hub_request("tree"):
                items = self._tree_files(repo_id, commit)
        except Exception as exc:
            raise _translate(exc, what) from exc
        files = tuple(
            sorted(
                (
                    HubFile(
                        path=item.path,
                        size=item.lfs.size if item.lfs is not None else item.size,
                        blob_id=item.blob_id,
                        lfs_sha256=item.lfs.sha256 if item.lfs is not None else None,
                    )
                    for item in items
                    if isinstance(item, RepoFile)
                ),
                key=lambda f: f.path,
            )
        )
        return RepoTree(repo_id, commit, commit_date, files)

    def _tree_files(self, repo_id: str, commit: str) -> list[RepoFile]:
        """Follow the tree listing's pages here rather than through ``HfApi.list_repo_tree``.

        That method retries each page with its own backoff (five times, up to 8 s apart) and no
        timeout: under :meth:`Hub.call`'s retries, a Hub answering 503 to tree listings kept a
        lookup busy for two minutes before EIO, and one that stalled kept it forever.  Here each
        request has a timeout and the only retries are :class:`Hub`'s.
        """
        url: str | None = f"{self.endpoint}/api/models/{repo_id}/tree/{quote(commit, safe='')}"
        params: dict[str, str] | None = {"recursive": "true", "expand": "false"}
        headers = build_hf_headers(token=self._token)
        timeout = httpx2.Timeout(API_TIMEOUT, connect=CONNECT_TIMEOUT)
        files: list[RepoFile] = []
        for _ in range(MAX_TREE_PAGES):
            if url is None:
                return files
            response = get_session().get(url, params=params, headers=headers, timeout=timeout)
            hf_raise_for_status(response)
            files += [RepoFile(**item) for item in response.json() if item.get("type") == "file"]
            url = response.links.get("next", {}).get("url")
            params = None  # the next link carries the query, cursor included
            if url is not None and not url.startswith(f"{self.endpoint}/"):
                # The request carries the token: never send it where the listing points elsewhere.
                raise HubUnavailable(f"{EntryName(repo_id, commit)}: tree listing continues off the Hub at {url!r}")
        raise HubUnavailable(f"{EntryName(repo_id, commit)}: tree listing has more than {MAX_TREE_PAGES} pages")

    @contextmanager
    def open_range(self, repo_id: str, commit: str, path: str, start: int, end: int) -> Iterator[RangeBody]:
        """Stream bytes ``[start, end)`` of a file.

        Redirects (LFS files go to a CDN) are followed by huggingface_hub's session, which drops
        the Authorization header when the redirect leaves the Hub's origin.  The server may ignore
        ``Range`` and answer 200 with the whole file: :class:`RangeBody` then skips to ``start``.

        A file is downloaded as many ranges, and on the real Hub each would first ask the Hub
        (one round trip to huggingface.co, answered with a redirect) and only then the CDN.  The
        CDN's URL of a file at a commit names its content, so the first redirect's target is
        remembered and later ranges go there directly, without the Hub's token (as the redirect
        would have).  A remembered URL that the CDN refuses (its signature expired: 403, or 401,
        404, 410) or that fails in any way is forgotten, and that range asks the Hub again.
        """
        what = f"{EntryName(repo_id, commit)}/{path}"
        self._check_online(what)
        key = (repo_id, commit, path)
        with self._locations_lock:
            located = self._locations.get(key)
        if located is not None:
            try:
                with self._open_range_at(located, start, end, what, authorized=False) as body:
                    yield body
                return
            except _StaleLocation:
                self._forget_location(key, located)
            except BaseException:
                self._forget_location(key, located)
                raise
        url = hf_hub_url(repo_id, path, revision=commit, endpoint=self.endpoint)
        with self._open_range_at(url, start, end, what, authorized=True, remember=key) as body:
            yield body

    @contextmanager
    def _open_range_at(
        self,
        url: str,
        start: int,
        end: int,
        what: str,
        *,
        authorized: bool,
        remember: tuple[str, str, str] | None = None,
    ) -> Iterator[RangeBody]:
        if authorized:
            headers = build_hf_headers(token=self._token)
        else:
            headers = build_hf_headers(token=False)
            headers.pop("authorization", None)
        headers["Range"] = f"bytes={start}-{end - 1}"
        # The size and hashes we check against are those of the listing: no compression.
        headers["Accept-Encoding"] = "identity"
        timeout = httpx2.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)
        try:
            with ExitStack() as stack:
                # Latency up to the response headers: the body's duration is the file's size.
                with metrics.hub_request("range"):
                    response = stack.enter_context(get_session().stream("GET", url, headers=headers, timeout=timeout))
                if not authorized and response.status_code in _STALE_LOCATION:
                    response.read()
                    raise _StaleLocation(response.status_code)
                try:
                    hf_raise_for_status(response)
                except Exception:
                    response.read()
                    raise
                if remember is not None:
                    self._remember_location(remember, url, str(response.url))
                yield RangeBody(response, start, end, what)
        except (MxfsError, _StaleLocation):
            raise
        except Exception as exc:
            raise _translate(exc, what) from exc

    def _remember_location(self, key: tuple[str, str, str], asked: str, served: str) -> None:
        """Keep a redirect's target, but only one on another origin: a mirror that serves bytes
        itself has no redirect to save, and the Hub's token must never go to a remembered URL."""
        if served == asked or _origin(served) == _origin(self.endpoint):
            return
        with self._locations_lock:
            if len(self._locations) >= MAX_LOCATIONS:
                del self._locations[next(iter(self._locations))]
            self._locations[key] = served

    def _forget_location(self, key: tuple[str, str, str], located: str) -> None:
        with self._locations_lock:
            if self._locations.get(key) == located:
                del self._locations[key]


# A remembered CDN URL answered with one of these is out of date (an expired signature), not a
# failure of the file: ask the Hub again.
_STALE_LOCATION = frozenset({400, 401, 403, 404, 410})
# Remembered CDN URLs (a few hundred bytes each): one per file recently downloaded.
MAX_LOCATIONS = 4096


class _StaleLocation(Exception):
    """A remembered CDN URL was refused; the range is asked of the Hub instead."""


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


class RangeBody:
    """The body of a range answer, cut to exactly ``[start, end)`` whatever the server did."""

    def __init__(
        self,
        response: httpx2.Response,
        start: int,
        end: int,
        what: str,
        *,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.start = start
        self.end = end
        self._what = what
        self._response = response
        self._skip = 0
        # Told the length of each piece handed out (a peer client counts its bytes).
        self._on_bytes = on_bytes
        if response.status_code == 206:
            content_range = response.headers.get("Content-Range", "")
            first = content_range.removeprefix("bytes ").split("-", 1)[0]
            if not first.isdigit() or int(first) != start:
                raise HubUnavailable(f"{what}: server answered range {content_range!r}, asked for {start}")
        elif response.status_code == 200:
            # A server (or proxy) that ignores Range sends the whole file: skip what we did not ask
            # for, unless the caller takes the whole body (see whole_chunks).
            self._skip = start
        else:
            raise HubUnavailable(f"{what}: unexpected HTTP {response.status_code} for a range request")

    @property
    def whole_file(self) -> bool:
        """The server ignored Range and sends the whole file."""
        return self._response.status_code == 200

    def whole_chunks(self, size: int, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """A whole-file answer from byte 0, in pieces, cut at ``size``; Transient if it ends early."""
        return self._pieces(0, size, chunk_size)

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the body in pieces; raises Transient if the body ends before ``end``."""
        return self._pieces(self._skip, self.end - self.start, chunk_size)

    def batches(self, batch_size: int = CHUNK_SIZE) -> Iterator[list[bytes]]:
        """The body as lists of the pieces the connection received, about ``batch_size`` bytes
        each; raises Transient if the body ends before ``end``.

        For ``os.pwritev``: one write per batch, and the pieces are never joined into one buffer
        (``chunks`` joins them: a copy of every byte, a tenth of a cold load's CPU).  At most
        MAX_BATCH_PIECES pieces per list, well under the kernel's IOV_MAX.
        """
        batch: list[bytes] = []
        size = 0
        for piece in self._pieces(self._skip, self.end - self.start, None):
            batch.append(piece)
            size += len(piece)
            if size >= batch_size or len(batch) >= MAX_BATCH_PIECES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _pieces(self, skip: int, length: int, chunk_size: int | None) -> Iterator[bytes]:
        """``length`` bytes of the body after its first ``skip``, in pieces (of ``chunk_size``,
        or as received when None)."""
        remaining = length
        try:
            for chunk in self._response.iter_bytes(chunk_size):
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk = chunk[skip:]
                    skip = 0
                if len(chunk) >= remaining:
                    chunk = chunk[:remaining]
                    if self._on_bytes is not None:
                        self._on_bytes(len(chunk))
                    yield chunk
                    return
                remaining -= len(chunk)
                if self._on_bytes is not None:
                    self._on_bytes(len(chunk))
                yield chunk
        except httpx2.HTTPError as exc:
            raise Transient(f"{self._what}: connection broke: {type(exc).__name__}: {exc}") from exc
        raise Transient(f"{self._what}: body ended {remaining} bytes early")


# One request to the Hub (metadata, or a range of a file): five tries, 0.5, 1, 2 and 4 s apart.
HUB_RETRY = RetryPolicy(attempts=5, initial_delay=0.5, max_delay=10.0)


class Hub:
    """The trio face of :class:`HubClient`: worker threads, a limiter, retries with backoff."""

    def __init__(self, client: HubClient, *, concurrency: int = 16, retry: RetryPolicy | None = None):
        self.client = client
        self.limiter = trio.CapacityLimiter(concurrency)
        self.retry = retry or HUB_RETRY

    @property
    def offline(self) -> bool:
        return self.client.offline

    async def warm_up(self) -> None:
        """:meth:`HubClient.warm_up` in a thread; best effort (a lookup would make them anyway)."""
        try:
            await trio.to_thread.run_sync(self.client.warm_up, limiter=self.limiter, abandon_on_cancel=True)
        except Exception as exc:  # never fatal: the first lookup tries again and reports
            log.debug("warming up the Hub session: %s", exc)

    async def call(self, fn: Callable[..., T], *args: Any, what: str) -> T:
        """Run ``fn(*args)`` in a thread, retrying transient failures with backoff.

        A cancelled call (the daemon stopping) abandons its thread instead of waiting for it: a
        request to a stalled Hub would otherwise hold up the exit for a whole timeout.  The calls
        made here only read metadata, so nothing is left half-written; the thread ends by itself
        at its timeout and its answer is dropped.
        """
        failures = 0
        while True:
            try:
                return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter, abandon_on_cancel=True)
            except Transient as exc:
                failures += 1
                if self.retry.gives_up_after(failures):
                    raise HubUnavailable(f"{exc} (gave up after {failures} attempts)") from exc
                delay = self.retry.delay(failures - 1)
                log.warning("%s: %s; retrying in %.1fs", what, exc, delay)
                await trio.sleep(delay)

    async def resolve(self, repo_id: str, revision: str) -> Resolved:
        return await self.call(self.client.resolve, repo_id, revision, what=f"resolve {repo_id}@{revision}")

    async def list_tree(self, repo_id: str, resolved: Resolved) -> RepoTree:
        return await self.call(
            self.client.list_tree,
            repo_id,
            resolved.commit,
            resolved.commit_date,
            what=f"list {EntryName(repo_id, resolved.commit)}",
        )
