"""A small Kubernetes REST client: get, list, create, replace and delete of namespaced objects.

Why hand-written, on ``httpx2``: the registry needs five verbs on two resources, and nothing
else of Kubernetes.  ``httpx2`` is already what mxfs talks to the Hub with (huggingface_hub
depends on it), and its async client runs natively under trio (httpcore2 has a trio backend), so
calls are cancellable and need no worker threads.  The alternatives cost more than they give:
the official ``kubernetes`` client is synchronous and large, ``kubernetes-asyncio`` is asyncio
only, and ``lightkube`` pulls in its generated models and msgspec and sleeps with
``asyncio.sleep`` in its retry path.

Outcomes that are part of the protocol come back as values, not exceptions: ``get`` of a missing
object is ``None``; ``create`` of an existing one (409 AlreadyExists), ``replace`` or ``delete``
of one that changed (409 Conflict) or vanished (404) report that the caller lost a race, so it
can re-read and decide again.  Everything else raises :class:`ApiError` (a
:class:`~mxfs.registry.base.RegistryError`) carrying the server's ``Status`` message.  Messages
name the server and the object, never a credential.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import trio

from mxfs import metrics
from mxfs.registry.base import RegistryError, redact_url
from mxfs.registry.kubernetes.config import ClusterConfig
from mxfs.retry import RetryPolicy

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
# Every call is one small object or one page of a listing; ten seconds means the server is gone.
READ_TIMEOUT = 10.0
MAX_CONNECTIONS = 8
# Items per page of a listing (the server hands out a continue token for the rest).
PAGE_SIZE = 500
# The kubelet rewrites a projected service account token well before it expires; re-reading it
# this often (as client-go does) always sends a valid one.
TOKEN_REREAD_INTERVAL = 60.0
# Answers that mean "not now": 429 from API priority and fairness when the server sheds load, and
# 5xx while an API server restarts or etcd elects a leader.  Tried five times, waiting what the
# server's Retry-After asks (capped) or a jittered 0.25, 0.5, 1, 2 s; then the caller gets the error.
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
API_RETRY = RetryPolicy(attempts=5, initial_delay=0.25, max_delay=2.0, jitter=True)
MAX_RETRY_AFTER = 5.0


@dataclass(frozen=True)
class Resource:
    """A namespaced resource type: ``/apis/<group>/<version>/namespaces/<ns>/<plural>``.

    The core group (ConfigMap) has the empty name and lives under ``/api/<version>``.
    """

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str, name: str | None = None) -> str:
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        base = f"{root}/namespaces/{namespace}/{self.plural}"
        return base if name is None else f"{base}/{name}"


class ApiError(RegistryError):
    """The API server refused a request; ``code`` and ``reason`` are from its ``Status``."""

    def __init__(self, message: str, code: int, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class _Token:
    """The bearer token to send: inline, or read from a file and re-read as the kubelet rotates it."""

    def __init__(self, value: str | None, path: Path | None) -> None:
        self._value = value
        self._path = path
        self._read_at = -float("inf")

    @property
    def rereadable(self) -> bool:
        return self._path is not None

    async def get(self, fresh: bool = False) -> str | None:
        if self._path is None:
            return self._value
        if fresh or trio.current_time() - self._read_at >= TOKEN_REREAD_INTERVAL:
            try:
                text = await trio.to_thread.run_sync(self._path.read_text)
            except OSError as exc:
                raise RegistryError(f"cannot read the token file {self._path}: {exc.strerror or exc}") from None
            if not text.strip():
                raise RegistryError(f"the token file {self._path} is empty")
            self._value = text.strip()
            self._read_at = trio.current_time()
        return self._value


class KubeApi:
    """Requests to one API server in one namespace."""

    def __init__(self, config: ClusterConfig, namespace: str, where: str) -> None:
        self.config = config
        self.namespace = namespace
        self._where = where  # "registry kubernetes://ns", for messages
        self._token = _Token(config.token, config.token_file)
        # trust_env=False: no proxy, netrc or SSL_CERT_FILE from the environment; the kubeconfig
        # or the service account says everything about this connection.
        self._client = httpx2.AsyncClient(
            base_url=config.server,
            verify=config.ssl_context if config.ssl_context is not None else True,
            timeout=httpx2.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
            limits=httpx2.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS),
            headers={"Accept": "application/json", "User-Agent": "mxfs"},
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- verbs -----------------------------------------------------------------------------------

    async def get(self, resource: Resource, name: str) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        response = await self._request("GET", resource.path(self.namespace, name))
        if response.status_code == 404:
            return None
        return self._body(response, f"get {resource.plural}/{name}")

    async def list(self, resource: Resource, label_selector: str | None = None) -> list[dict[str, Any]]:
        """Every object of ``resource`` in the namespace, page by page."""
        return (await self.list_at(resource, label_selector))[0]

    async def list_at(self, resource: Resource, label_selector: str | None = None) -> tuple[list[dict[str, Any]], str]:
        """Every object of ``resource``, and the resourceVersion of the listing (where a watch starts)."""
        items: list[dict[str, Any]] = []
        params: dict[str, str] = {"limit": str(PAGE_SIZE)}
        if label_selector:
            params["labelSelector"] = label_selector
        while True:
            body = await self._list_page(resource, params)
            items += body.get("items") or []
            metadata = body.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                # The last page's version: the pages of one listing are one snapshot.
                return items, str(metadata.get("resourceVersion") or "")
            params["continue"] = token

    async def probe(self, resource: Resource) -> None:
        """Check that ``resource`` is served and we may list it (one item at most is read)."""
        await self._list_page(resource, {"limit": "1"})

    async def _list_page(self, resource: Resource, params: dict[str, str]) -> dict[str, Any]:
        response = await self._request("GET", resource.path(self.namespace), params=params)
        if response.status_code == 404:
            raise self._error(
                response,
                f"list {resource.plural}",
                hint=f"is the {resource.kind} resource installed? (kubectl apply -f deploy/crd.yaml)",
            )
        return self._body(response, f"list {resource.plural}")

    async def create(self, resource: Resource, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created object, or None if one of that name exists already."""
        name = body["metadata"]["name"]
        response = await self._request("POST", resource.path(self.namespace), json_body=body)
        if response.status_code == 409 and self._reason(response) == "AlreadyExists":
            return None
        if response.status_code == 404:
            raise self._error(response, f"create {resource.plural}/{name}", hint="does the namespace exist?")
        return self._body(response, f"create {resource.plural}/{name}")

    async def replace(self, resource: Resource, body: dict[str, Any]) -> dict[str, Any] | None:
        """The updated object, or None if it changed since ``body`` was read (or is gone).

        ``body`` carries the ``metadata.resourceVersion`` it was read at; the server applies the
        write only if that is still the current one.
        """
        name = body["metadata"]["name"]
        response = await self._request("PUT", resource.path(self.namespace, name), json_body=body)
        if response.status_code in (404, 409):
            return None
        return self._body(response, f"update {resource.plural}/{name}")

    async def delete(self, resource: Resource, name: str, resource_version: str | None = None) -> bool:
        """Delete the object (only at ``resource_version``, if given); False if it changed or is gone."""
        options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if resource_version is not None:
            options["preconditions"] = {"resourceVersion": resource_version}
        response = await self._request("DELETE", resource.path(self.namespace, name), json_body=options)
        if response.status_code in (404, 409):
            return False
        self._body(response, f"delete {resource.plural}/{name}")
        return True

    async def watch(
        self, resource: Resource, resource_version: str, server_timeout: float
    ) -> AsyncIterator[dict[str, Any]]:
        """The changes of ``resource`` after ``resource_version``: ``{"type", "object"}`` events.

        Ends when the server ends the watch (after ``server_timeout`` seconds, or sooner when it
        restarts or compacts); the caller watches again from the last version it saw.  A version the
        server no longer has comes back as an ``ERROR`` event whose object is a 410 ``Status``
        (or, from some servers, as a 410 answer: :class:`ApiError` with code 410); the caller
        must then list again.  Other failures raise :class:`RegistryError` like every call.
        """
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(max(1, round(server_timeout))),
            "allowWatchBookmarks": "true",
        }
        path = resource.path(self.namespace)
        token = await self._token.get()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Silence between events is normal: the read timeout covers the whole watch, plus slack.
        timeouts = httpx2.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT, read=server_timeout + READ_TIMEOUT)
        try:
            async with self._client.stream("GET", path, params=params, headers=headers, timeout=timeouts) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise self._error(response, f"watch {resource.plural}")
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        raise RegistryError(f"{self._where}: watch {resource.plural}: a line is not JSON") from None
                    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
                        raise RegistryError(f"{self._where}: watch {resource.plural}: an event is not an object")
                    yield event
        except httpx2.HTTPError as exc:
            metrics.REGISTRY_ERRORS.inc()
            server = redact_url(self.config.server)
            raise RegistryError(f"{self._where}: watch {resource.plural} on {server}: {exc}") from exc

    # -- transport -------------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
    ) -> httpx2.Response:
        """Send one request; a 401 re-reads a rotated token and tries once more.

        Overload and server errors are retried (:data:`RETRIED_STATUSES`), writes included: a
        write is either fenced by its resourceVersion or a create, so one that was applied
        before its answer got lost comes back as a 409 the caller already handles by re-reading.
        """
        for retry in range(API_RETRY.attempts - 1):
            response = await self._authorized(method, path, params, json_body)
            if response.status_code not in RETRIED_STATUSES:
                return response
            delay = self._retry_delay(response, retry)
            log.debug(
                "%s: %s %s answered %d; retrying in %.2fs", self._where, method, path, response.status_code, delay
            )
            metrics.REGISTRY_ERRORS.inc()
            await trio.sleep(delay)
        return await self._authorized(method, path, params, json_body)  # the last try, whatever it answers

    @staticmethod
    def _retry_delay(response: httpx2.Response, retry: int) -> float:
        try:
            asked = float(response.headers.get("Retry-After", ""))
        except ValueError:
            asked = -1.0
        if asked >= 0:
            return min(asked, MAX_RETRY_AFTER)
        return API_RETRY.delay(retry)

    async def _authorized(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        json_body: dict[str, Any] | None,
    ) -> httpx2.Response:
        response = await self._send(method, path, params, json_body, await self._token.get())
        if response.status_code == 401 and self._token.rereadable:
            response = await self._send(method, path, params, json_body, await self._token.get(fresh=True))
        if response.status_code == 401:
            raise self._error(
                response, f"{method} {path}", hint=f"the server rejected the credentials from {self.config.source}"
            )
        if response.status_code == 403:
            raise self._error(
                response, f"{method} {path}", hint="the service account needs the Role in deploy/rbac.yaml"
            )
        return response

    async def _send(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        json_body: dict[str, Any] | None,
        token: str | None,
    ) -> httpx2.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        content = None
        if json_body is not None:
            content = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        try:
            return await self._client.request(method, path, params=params, content=content, headers=headers)
        except httpx2.HTTPError as exc:
            metrics.REGISTRY_ERRORS.inc()
            # httpx2's messages name the URL (which holds no credential), never the headers.
            server = redact_url(self.config.server)
            raise RegistryError(f"{self._where}: cannot reach the API server {server}: {exc}") from exc

    def _body(self, response: httpx2.Response, what: str) -> dict[str, Any]:
        """The JSON object of a successful response; ApiError for any other status."""
        if not response.is_success:
            raise self._error(response, what)
        try:
            body = response.json()
        except ValueError:
            raise RegistryError(f"{self._where}: {what}: the API server's answer is not JSON") from None
        if not isinstance(body, dict):
            raise RegistryError(f"{self._where}: {what}: the API server's answer is not an object")
        return body

    @staticmethod
    def _status(response: httpx2.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) and body.get("kind") == "Status" else {}

    def _reason(self, response: httpx2.Response) -> str:
        return str(self._status(response).get("reason", ""))

    def _error(self, response: httpx2.Response, what: str, hint: str = "") -> ApiError:
        status = self._status(response)
        reason = str(status.get("reason") or response.reason_phrase or "")
        message = str(status.get("message") or response.text[:200].strip() or reason)
        text = f"{self._where}: {what}: {message} ({response.status_code} {reason})"
        if hint:
            text += f"; {hint}"
        return ApiError(text, response.status_code, reason)
