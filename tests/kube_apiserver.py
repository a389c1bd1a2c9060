"""A Kubernetes API server stand-in on loopback, for the ``kubernetes://`` registry tests.

No real API server can be installed here, so this implements, over real HTTP(S), exactly the
Kubernetes semantics the backend relies on, as a real server behaves:

- ``/apis/<group>/<version>/namespaces/<ns>/<plural>[/<name>]`` for the resources it serves
  (ModelCacheEntry, whose schema it reads from ``deploy/crd.yaml``, and coordination.k8s.io
  Lease); anything else is 404 NotFound, as for a CRD that is not installed;
- create (POST) -> 201, or 409 AlreadyExists; 404 NotFound if the namespace does not exist;
  the name must be a DNS-1123 subdomain (422 Invalid);
- get -> 200, or 404 NotFound;
- list with ``labelSelector`` (equality and existence terms), ``limit`` and ``continue``;
- replace (PUT) only with ``metadata.resourceVersion``, 409 Conflict if it is not the current
  one, 404 for a missing object (custom resources cannot be created by PUT);
- delete, with ``preconditions.resourceVersion`` (409 Conflict on mismatch), 404 if missing;
- every write bumps one server-wide resourceVersion (like etcd's revision) and is validated
  against the schema: types, enums, ``required``, ``format: date-time``, and the CRD's
  ``self == oldSelf`` immutability rule.  Unknown fields are *rejected* (422), where a real
  server would silently prune them: a field the code writes but the CRD lacks would be lost in
  a real cluster, so here it fails the test;
- the core group's ConfigMap at ``/api/v1/namespaces/<ns>/configmaps`` (string data under
  ``[-._a-zA-Z0-9]`` keys), where the backend keeps its ref records and peer holders;
- bearer-token auth (401 Unauthorized without a known token) or, over TLS, a client certificate
  signed by the stand-in's CA; ``forbid()`` makes a verb answer 403 Forbidden like missing RBAC;
- errors are ``Status`` objects (``kind: Status``, ``reason``, ``code``, ``message``, ``details``);
- watch: a list with ``watch=true`` and ``resourceVersion=N`` streams (chunked) one JSON line
  per change after N, ``{"type": "ADDED" | "MODIFIED" | "DELETED", "object": ...}`` in
  resourceVersion order, then waits for more until ``timeoutSeconds``; with
  ``allowWatchBookmarks=true`` a ``BOOKMARK`` (an object carrying only the current
  resourceVersion) ends a watch that timed out.  Changes are kept as etcd keeps its history until
  compaction: a version older than the oldest kept one gets an ``ERROR`` event holding a 410
  ``Expired`` Status, as a real server answers.  :meth:`expire_watches` ends every open watch and
  compacts the history, so a client must reconnect, and re-list when its version is too old.

The fixtures are registered under the names ``kube_apiserver`` (one plain-HTTP server for the
session), ``make_kube_apiserver`` (private servers, with ``tls=True`` for certificates) and
``kube_target`` (a fresh namespace and a KUBECONFIG pointing at it); a test module imports the
``*_fixture`` functions to use them::

    from tests.kube_apiserver import kube_apiserver_fixture, kube_target_fixture  # noqa: F401

There is no status subresource (the CRD declares none) and no patch: the backend uses neither.
The server runs ``http.server`` in a thread of the test process (a helper for tests only), so a
daemon in a subprocess can reach it too.  Hooks for tests: :attr:`calls` (every request as
``(verb, plural, name)``, to compare with ``deploy/rbac.yaml``), :meth:`interfere` (another
writer wins the race before the next write), :meth:`forbid`, :meth:`kubeconfig`,
:meth:`expire_watches` and :meth:`open_watches`.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import itertools
import json
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CRD_PATH = REPO_ROOT / "deploy" / "crd.yaml"

_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")
_PATH = re.compile(
    r"(/apis/(?P<group>[^/]+)|/api)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)(/(?P<name>[^/]+))?"
)

# The slice of coordination.k8s.io/v1 Lease that the backend writes, in the CRD schema dialect.
_LEASE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "properties": {
                "holderIdentity": {"type": "string"},
                "leaseDurationSeconds": {"type": "integer", "minimum": 1},
                "acquireTime": {"type": "string", "format": "date-time"},
                "renewTime": {"type": "string", "format": "date-time"},
                "leaseTransitions": {"type": "integer", "minimum": 0},
            },
        },
    },
}


# A core v1 ConfigMap: string data under string keys (the key syntax is checked on write).
_CONFIG_MAP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "data": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_CONFIG_MAP_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")


# The events of one watch, streamed by the handler thread as they come.
WatchStream = Generator[dict[str, Any], None, None]


class _Invalid(Exception):
    """An object the schema refuses; the message is a field path and what is wrong."""


@dataclass
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    schema: dict[str, Any]

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


def crd_resource_type(crd_path: Path = CRD_PATH) -> ResourceType:
    """The resource ``deploy/crd.yaml`` defines (its storage version), with its schema."""
    crd = yaml.safe_load(crd_path.read_text())
    spec = crd["spec"]
    [version] = [v for v in spec["versions"] if v.get("storage")]
    return ResourceType(
        spec["group"], version["name"], spec["names"]["plural"], spec["names"]["kind"],
        version["schema"]["openAPIV3Schema"],
    )  # fmt: skip


LEASE_TYPE = ResourceType("coordination.k8s.io", "v1", "leases", "Lease", _LEASE_SCHEMA)
CONFIG_MAP_TYPE = ResourceType("", "v1", "configmaps", "ConfigMap", _CONFIG_MAP_SCHEMA)


# -- schema validation ---------------------------------------------------------------------------


def _validate(value: Any, schema: dict[str, Any], path: str) -> None:
    """Check ``value`` against the subset of OpenAPI v3 that CRD schemas use; _Invalid if it fails."""
    kind = schema.get("type")
    checks: dict[str, Callable[[Any], bool]] = {
        "object": lambda v: isinstance(v, dict),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
    }
    if kind is not None and not checks[kind](value):
        raise _Invalid(f"{path}: Invalid value: {value!r}: must be of type {kind}")
    if "enum" in schema and value not in schema["enum"]:
        raise _Invalid(f"{path}: Unsupported value: {value!r}: supported values: {schema['enum']}")
    if schema.get("format") == "date-time" and not _RFC3339.fullmatch(value):
        raise _Invalid(f"{path}: Invalid value: {value!r}: must be an RFC 3339 date-time")
    if "minLength" in schema and len(value) < schema["minLength"]:
        raise _Invalid(f"{path}: Invalid value: {value!r}: should be at least {schema['minLength']} chars long")
    if "minimum" in schema and value < schema["minimum"]:
        raise _Invalid(f"{path}: Invalid value: {value!r}: should be greater than or equal to {schema['minimum']}")
    if kind == "object" and "properties" in schema and path != ".metadata":
        _validate_object(value, schema, path)
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            _validate(item, schema["additionalProperties"], f"{path}[{key}]")
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            _validate(item, schema["items"], f"{path}[{i}]")


def _validate_object(value: dict[str, Any], schema: dict[str, Any], path: str) -> None:
    properties = schema["properties"]
    for key in schema.get("required", []):
        if key not in value:
            raise _Invalid(f"{path}.{key}: Required value")
    for key, item in value.items():
        if key not in properties:
            if not schema.get("x-kubernetes-preserve-unknown-fields"):
                raise _Invalid(f'{path}.{key}: unknown field "{key}" (a real API server would prune it)')
            continue
        _validate(item, properties[key], f"{path}.{key}")


def _immutable_paths(schema: dict[str, Any], path: str = "") -> Iterator[str]:
    """Fields whose schema carries the CEL rule ``self == oldSelf`` (the only rule emulated)."""
    for rule in schema.get("x-kubernetes-validations", []):
        if rule.get("rule", "").replace(" ", "") == "self==oldSelf":
            yield path
    for key, sub in schema.get("properties", {}).items():
        yield from _immutable_paths(sub, f"{path}.{key}")


def _at(obj: Any, path: str) -> Any:
    for key in path.strip(".").split(".") if path else []:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


# -- label selectors -----------------------------------------------------------------------------


def _selector(text: str) -> Callable[[dict[str, str]], bool]:
    """Equality (``k=v``, ``k==v``, ``k!=v``) and existence (``k``, ``!k``) terms, ANDed."""
    terms: list[tuple[str, str, str | None]] = []  # (operator, key, value)
    for raw in filter(None, (t.strip() for t in text.split(","))):
        if " in " in raw or " notin " in raw:
            raise _Invalid(f"labelSelector {raw!r}: set-based requirements are not supported by the stand-in")
        if "!=" in raw:
            key, value = raw.split("!=", 1)
            terms.append(("!=", key.strip(), value.strip()))
        elif "=" in raw:
            key, value = re.split(r"==?", raw, maxsplit=1)
            terms.append(("=", key.strip(), value.strip()))
        elif raw.startswith("!"):
            terms.append(("!", raw[1:].strip(), None))
        else:
            terms.append(("exists", raw, None))

    def matches(labels: dict[str, str]) -> bool:
        for op, key, value in terms:
            if op == "=" and labels.get(key) != value:
                return False
            if op == "!=" and labels.get(key) == value:
                return False
            if op == "!" and key in labels:
                return False
            if op == "exists" and key not in labels:
                return False
        return True

    return matches


# -- the server ----------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answer: becomes a ``Status`` body with this code and reason."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict[str, Any]:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


@dataclass(frozen=True)
class _Overload:
    code: int
    method: str | None
    retry_after: int | None
    after_apply: bool

    def error(self) -> ApiError:
        reason = "TooManyRequests" if self.code == 429 else "InternalError"
        details = {"retryAfterSeconds": self.retry_after} if self.retry_after is not None else None
        return ApiError(self.code, reason, "the server is overloaded (stand-in)", details)


@dataclass
class Call:
    """One authenticated request, as RBAC sees it."""

    verb: str  # get, list, create, update, delete
    group: str
    plural: str
    namespace: str
    name: str | None


@dataclass
class _Tls:
    dir: Path
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _make_certificates(directory: Path) -> _Tls:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with ``openssl``."""
    tls = _Tls(directory, *(directory / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")))
    ca_key = directory / "ca.key"

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(ca_key),
        "-out", str(tls.ca_file), "-subj", "/CN=stand-in-ca")  # fmt: skip
    for cert, key, subject, ext in (
        (tls.server_cert, tls.server_key, "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1"),
        (tls.client_cert, tls.client_key, "/O=mxfs/CN=mxfs-node", "extendedKeyUsage=clientAuth"),
    ):
        csr = directory / "req.csr"
        extfile = directory / "ext.cnf"
        extfile.write_text(ext + "\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", subject)
        run("x509", "-req", "-in", str(csr), "-CA", str(tls.ca_file), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "1", "-out", str(cert), "-extfile", str(extfile))  # fmt: skip
    return tls


class KubeApiServer:
    """The stand-in, on ``127.0.0.1`` at a free port; a context manager that stops it at exit."""

    def __init__(self, tls: bool = False) -> None:
        self.token = "stand-in-" + secrets.token_hex(16)
        self.tokens: set[str] = {self.token}
        self.namespaces: set[str] = set()
        self.resources: dict[tuple[str, str, str], ResourceType] = {}
        for rt in (crd_resource_type(), LEASE_TYPE, CONFIG_MAP_TYPE):
            self.serve(rt)
        self.calls: list[Call] = []
        self.cert_users: list[str] = []  # subjects of the client certificates seen
        self.forbidden: set[tuple[str, str, str | None]] = set()  # (verb, plural, namespace or None: all)
        self._overloads: list[_Overload] = []  # answers that replace the next requests' answers
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, namespace, name)
        # (plural, namespace, name, what another writer does to the object)
        self._interference: list[tuple[str, str, str, Callable[[dict[str, Any]], None]]] = []
        self._rv = itertools.count(1000)
        self._last_rv = 999
        self._lock = threading.Lock()
        # The change history watches are served from: (resourceVersion, event type, plural,
        # namespace, object), oldest first; everything at or below _compacted_rv is forgotten.
        self._events: list[tuple[int, str, str, str, dict[str, Any]]] = []
        self._compacted_rv = 0
        self._changed = threading.Condition(self._lock)
        self._watch_epoch = 0  # bumped by expire_watches(): every open watch ends
        self.watches_open = 0
        self.watches_started = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="kube-standin-")
        self.tls = _make_certificates(Path(self._tmp.name)) if tls else None
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._httpd is not None, "not started"
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> KubeApiServer:
        context = None
        if self.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.tls.ca_file))
            context.load_cert_chain(str(self.tls.server_cert), str(self.tls.server_key))
            context.verify_mode = ssl.CERT_OPTIONAL  # a bearer token is the other way in
        self._httpd = _Server(("127.0.0.1", 0), _Handler, self, context)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kube-apiserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection, as a server that went away would."""
        self.expire_watches(compact=False)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.close_connections()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- test controls ---------------------------------------------------------------------------

    def serve(self, rt: ResourceType) -> None:
        self.resources[(rt.group, rt.version, rt.plural)] = rt

    def unserve(self, plural: str) -> None:
        """Stop serving ``plural``, as if its CRD were not installed."""
        self.resources = {k: v for k, v in self.resources.items() if v.plural != plural}

    def new_namespace(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        with self._lock:
            self.namespaces.add(name)
        return name

    def drop_namespace(self, namespace: str) -> None:
        """Forget the namespace, its objects and the test controls aimed at it."""
        with self._lock:
            self.namespaces.discard(namespace)
            self._interference = [i for i in self._interference if i[1] != namespace]
            self.forbidden = {f for f in self.forbidden if f[2] != namespace}
            for key in [k for k in self._objects if k[1] == namespace]:
                del self._objects[key]

    def objects(self, plural: str, namespace: str) -> dict[str, dict[str, Any]]:
        """A copy of the stored objects of ``plural`` in ``namespace``, by name."""
        with self._lock:
            return {k[2]: copy.deepcopy(v) for k, v in self._objects.items() if k[0] == plural and k[1] == namespace}

    def put_object(self, plural: str, namespace: str, obj: dict[str, Any]) -> None:
        """Store ``obj`` as another writer would (no validation): for malformed or foreign objects."""
        with self._lock:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            meta.update(namespace=namespace, resourceVersion=str(self._next_rv()), uid=str(uuid.uuid4()))
            kind = "MODIFIED" if (plural, namespace, meta["name"]) in self._objects else "ADDED"
            self._objects[(plural, namespace, meta["name"])] = obj
            self._events.append((int(meta["resourceVersion"]), kind, plural, namespace, copy.deepcopy(obj)))
            self._changed.notify_all()

    def interfere(self, plural: str, namespace: str, name: str, mutate: Callable[[dict[str, Any]], None]) -> None:
        """Before the next write to the object, let another writer change it (bumping its version).

        The client's write then carries a stale resourceVersion and loses, as when another node
        wrote between its read and its write.
        """
        with self._lock:
            self._interference.append((plural, namespace, name, mutate))

    def forbid(self, verb: str, plural: str, namespace: str | None = None) -> None:
        """Answer ``verb`` on ``plural`` (in ``namespace``, or anywhere) with 403, like a Role without it."""
        self.forbidden.add((verb, plural, namespace))

    def overload(
        self,
        times: int,
        code: int = 429,
        *,
        method: str | None = None,
        retry_after: int | None = None,
        after_apply: bool = False,
    ) -> None:
        """Answer the next ``times`` requests (of ``method`` only, if given) with ``code``.

        ``code`` is 429 TooManyRequests or a 5xx.  ``retry_after`` adds ``Retry-After`` and
        ``details.retryAfterSeconds``, as API priority and fairness does.  ``after_apply``: carry
        the request out first and lose only its answer, like a server that timed out after etcd
        committed the write.
        """
        with self._lock:
            self._overloads += [_Overload(code, method, retry_after, after_apply)] * times

    def expire_watches(self, compact: bool = True) -> None:
        """End every open watch now; with ``compact``, forget the history too (etcd compaction),
        so that a client resuming from its last version is told 410 Gone and must re-list."""
        with self._lock:
            self._watch_epoch += 1
            if compact:
                self._events.clear()
                self._compacted_rv = self._last_rv
            self._changed.notify_all()

    def open_watches(self) -> int:
        with self._lock:
            return self.watches_open

    def clear_overloads(self) -> None:
        with self._lock:
            self._overloads.clear()

    def verbs(self, namespace: str | None = None) -> set[tuple[str, str, str]]:
        """``(group, plural, verb)`` of every request so far (in ``namespace``, if given)."""
        with self._lock:
            return {(c.group, c.plural, c.verb) for c in self.calls if namespace in (None, c.namespace)}

    def kubeconfig(
        self,
        path: Path,
        *,
        namespace: str | None = None,
        auth: str = "token",
        token: str | None = None,
        inline: bool = False,
    ) -> Path:
        """Write a kubeconfig for this server: ``auth`` is ``token``, ``token-file``, ``cert`` or ``none``.

        ``inline`` puts the CA and client certificate in ``-data`` fields instead of naming files.
        """
        cluster: dict[str, Any] = {"server": self.url}
        user: dict[str, Any] = {}
        if self.tls:
            if inline:
                cluster["certificate-authority-data"] = _b64(self.tls.ca_file)
            else:
                cluster["certificate-authority"] = str(self.tls.ca_file)
        if auth == "token":
            user["token"] = token or self.token
        elif auth == "token-file":
            token_file = path.with_suffix(".token")
            token_file.write_text((token or self.token) + "\n")
            user["tokenFile"] = token_file.name  # relative to the kubeconfig's directory
        elif auth == "cert":
            assert self.tls, "client certificates need tls=True"
            if inline:
                user["client-certificate-data"] = _b64(self.tls.client_cert)
                user["client-key-data"] = _b64(self.tls.client_key)
            else:
                user["client-certificate"] = str(self.tls.client_cert)
                user["client-key"] = str(self.tls.client_key)
        context: dict[str, Any] = {"cluster": "stand-in", "user": "mxfs"}
        if namespace:
            context["namespace"] = namespace
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": cluster}],
            "users": [{"name": "mxfs", "user": user}],
            "contexts": [{"name": "stand-in", "context": context}],
            "current-context": "stand-in",
        }
        path.write_text(yaml.safe_dump(doc))
        return path

    # -- request handling (called from the server's threads) ------------------------------------

    def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes, peer_subject: str | None
    ) -> tuple[int, dict[str, Any] | WatchStream]:
        with self._lock:
            overload = next((o for o in self._overloads if o.method in (None, method)), None)
            if overload is not None:
                self._overloads.remove(overload)
        try:
            if overload is not None and not overload.after_apply:
                raise overload.error()
            answer = self._handle(method, target, headers, body, peer_subject)
            if overload is not None:
                raise overload.error()
            return answer
        except ApiError as exc:
            return exc.code, exc.status()

    def _handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes, peer_subject: str | None
    ) -> tuple[int, dict[str, Any] | WatchStream]:
        self._authenticate(headers, peer_subject)
        parts = urlsplit(target)
        match = _PATH.fullmatch(parts.path)
        rt = match and self.resources.get((match["group"] or "", match["version"], match["plural"]))
        if not match or rt is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        namespace, name = match["ns"], match["name"]
        verbs = {"GET": "get" if name else "list", "POST": "create", "PUT": "update", "DELETE": "delete"}
        verb = verbs.get(method)
        query = parse_qs(parts.query)
        if verb == "list" and query.get("watch", [""])[0] in ("true", "1"):
            verb = "watch"
        if verb is None or (name is None) != (verb in ("list", "watch", "create")):
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        with self._lock:
            self.calls.append(Call(verb, rt.group, rt.plural, namespace, name))
        if {(verb, rt.plural, namespace), (verb, rt.plural, None)} & self.forbidden:
            raise ApiError(
                403, "Forbidden",
                f'{rt.qualified} is forbidden: User "system:serviceaccount:{namespace}:mxfs" cannot {verb}'
                f' resource "{rt.plural}" in API group "{rt.group}" in the namespace "{namespace}"',
                {"group": rt.group, "kind": rt.plural},
            )  # fmt: skip
        payload = self._json(body) if verb in ("create", "update") or (verb == "delete" and body) else {}
        if verb == "watch":
            return 200, self._watch(rt, namespace, query)
        with self._lock:
            if verb == "get":
                return 200, self._get(rt, namespace, name)
            if verb == "list":
                return 200, self._list(rt, namespace, query)
            if verb == "create":
                return 201, self._create(rt, namespace, payload)
            if verb == "update":
                return 200, self._update(rt, namespace, name, payload)
            return 200, self._delete(rt, namespace, name, payload)

    def _authenticate(self, headers: dict[str, str], peer_subject: str | None) -> None:
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer ") and auth[len("Bearer ") :] in self.tokens:
            return
        if peer_subject is not None and not auth:
            with self._lock:
                self.cert_users.append(peer_subject)
            return
        raise ApiError(401, "Unauthorized", "Unauthorized")

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        try:
            value = json.loads(body)
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"the body of the request was in an unknown format: {exc}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "BadRequest", "the body of the request must be an object")
        return value

    def _stored(self, rt: ResourceType, namespace: str, name: str) -> dict[str, Any]:
        obj = self._objects.get((rt.plural, namespace, name))
        if obj is None:
            details = {"name": name, "group": rt.group, "kind": rt.plural}
            raise ApiError(404, "NotFound", f'{rt.qualified} "{name}" not found', details)
        return obj

    def _get(self, rt: ResourceType, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self._stored(rt, namespace, name))

    def _list(self, rt: ResourceType, namespace: str, query: dict[str, list[str]]) -> dict[str, Any]:
        try:
            matches = _selector(query.get("labelSelector", [""])[0])
        except _Invalid as exc:
            raise ApiError(400, "BadRequest", str(exc)) from None
        names = sorted(n for (p, ns, n) in self._objects if p == rt.plural and ns == namespace)
        start = query.get("continue", [""])[0]
        if start:
            after = json.loads(base64.urlsafe_b64decode(start))["after"]
            names = [n for n in names if n > after]
        items = [self._objects[(rt.plural, namespace, n)] for n in names]
        items = [o for o in items if matches(o["metadata"].get("labels") or {})]
        limit = int(query.get("limit", ["0"])[0] or 0)
        metadata: dict[str, Any] = {"resourceVersion": str(self._current_rv())}
        if limit and len(items) > limit:
            items = items[:limit]
            token = json.dumps({"after": items[-1]["metadata"]["name"]}).encode()
            metadata["continue"] = base64.urlsafe_b64encode(token).decode()
        return {
            "apiVersion": rt.api_version,
            "kind": f"{rt.kind}List",
            "metadata": metadata,
            "items": copy.deepcopy(items),
        }

    def _current_rv(self) -> int:
        return self._last_rv

    def _next_rv(self) -> int:
        self._last_rv = next(self._rv)
        return self._last_rv

    def _record(self, kind: str, rt: ResourceType, namespace: str, obj: dict[str, Any]) -> None:
        """Keep a change for the watches (called under the lock, after the write)."""
        version = int(obj["metadata"]["resourceVersion"])
        self._events.append((version, kind, rt.plural, namespace, copy.deepcopy(obj)))
        self._changed.notify_all()

    def _watch(self, rt: ResourceType, namespace: str, query: dict[str, list[str]]) -> WatchStream:
        """The events of a watch, as a generator the handler streams line by line (see module doc)."""
        since = int(query.get("resourceVersion", ["0"])[0] or 0)
        timeout = float(query.get("timeoutSeconds", ["1800"])[0])
        bookmarks = query.get("allowWatchBookmarks", [""])[0] == "true"
        deadline = time.monotonic() + timeout
        with self._lock:
            epoch = self._watch_epoch
            self.watches_open += 1
            self.watches_started += 1
        try:
            sent = since
            while True:
                last: dict[str, Any] | None = None  # what ends the watch, if it ends now
                with self._lock:
                    batch = [
                        (version, kind, copy.deepcopy(obj))
                        for version, kind, plural, ns, obj in self._events
                        if version > sent and plural == rt.plural and ns == namespace
                    ]
                    left = deadline - time.monotonic()
                    if sent < self._compacted_rv:
                        gone = ApiError(410, "Expired", f"too old resource version: {sent} ({self._compacted_rv})")
                        last = {"type": "ERROR", "object": gone.status()}
                    elif not batch and (self._watch_epoch != epoch or left <= 0):
                        meta = {"resourceVersion": str(self._last_rv)}
                        mark = {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}
                        last = {"type": "BOOKMARK", "object": mark} if bookmarks and left <= 0 else {}
                    elif not batch:
                        self._changed.wait(min(left, 0.5))
                        continue
                if last is not None:
                    if last:
                        yield last
                    return
                for version, kind, obj in batch:
                    yield {"type": kind, "object": obj}
                    sent = version
        finally:
            with self._lock:
                self.watches_open -= 1

    def _check_body(self, rt: ResourceType, namespace: str, obj: dict[str, Any]) -> str:
        if obj.get("apiVersion") != rt.api_version or obj.get("kind") != rt.kind:
            raise ApiError(
                400, "BadRequest",
                f"the API version in the data ({obj.get('apiVersion')}) does not match the expected API version"
                f" ({rt.api_version}) or kind {obj.get('kind')!r} is not {rt.kind!r}",
            )  # fmt: skip
        meta = obj.get("metadata")
        if not isinstance(meta, dict) or not meta.get("name"):
            raise ApiError(422, "Invalid", f"{rt.kind} is invalid: metadata.name: Required value")
        if meta.get("namespace", namespace) != namespace:
            message = "the namespace of the provided object does not match the namespace sent on the request"
            raise ApiError(400, "BadRequest", message)
        name = meta["name"]
        if len(name) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(name):
            raise ApiError(
                422, "Invalid",
                f'{rt.kind} "{name}" is invalid: metadata.name: Invalid value: "{name}": a lowercase RFC 1123'
                " subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and"
                " end with an alphanumeric character",
                {"name": name, "group": rt.group, "kind": rt.kind},
            )  # fmt: skip
        keys = list(obj.get("data") or {}) if rt is CONFIG_MAP_TYPE else []
        bad_keys = [k for k in keys if not _CONFIG_MAP_KEY.fullmatch(k)]
        if bad_keys:
            message = f'ConfigMap "{name}" is invalid: data[{bad_keys[0]}]: Invalid value: a valid config key must'
            raise ApiError(422, "Invalid", message + " consist of alphanumeric characters, '-', '_' or '.'")
        try:
            _validate(obj, rt.schema, "")
        except _Invalid as exc:
            message = f'{rt.kind}.{rt.group} "{name}" is invalid: {str(exc).lstrip(".")}'
            raise ApiError(422, "Invalid", message, {"name": name, "group": rt.group, "kind": rt.kind}) from None
        return name

    def _create(self, rt: ResourceType, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        name = self._check_body(rt, namespace, obj)
        if namespace not in self.namespaces:
            details = {"name": namespace, "kind": "namespaces"}
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found', details)
        if obj["metadata"].get("resourceVersion"):
            raise ApiError(500, "InternalError", "resourceVersion should not be set on objects to be created")
        if (rt.plural, namespace, name) in self._objects:
            raise ApiError(
                409, "AlreadyExists", f'{rt.qualified} "{name}" already exists',
                {"name": name, "group": rt.group, "kind": rt.plural},
            )  # fmt: skip
        stored = copy.deepcopy(obj)
        stored["metadata"].update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            resourceVersion=str(self._next_rv()),
            generation=1,
            creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        self._objects[(rt.plural, namespace, name)] = stored
        self._record("ADDED", rt, namespace, stored)
        return copy.deepcopy(stored)

    def _interfere(self, rt: ResourceType, namespace: str, name: str) -> None:
        for i, (plural, ns, target, mutate) in enumerate(self._interference):
            if (plural, ns, target) == (rt.plural, namespace, name) and (plural, ns, target) in self._objects:
                del self._interference[i]
                stored = self._objects[(rt.plural, namespace, name)]
                mutate(stored)
                stored["metadata"]["resourceVersion"] = str(self._next_rv())
                self._record("MODIFIED", rt, namespace, stored)
                return

    def _conflict(self, rt: ResourceType, name: str) -> ApiError:
        return ApiError(
            409, "Conflict",
            f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has been modified;'
            " please apply your changes to the latest version and try again",
            {"name": name, "group": rt.group, "kind": rt.plural},
        )  # fmt: skip

    def _update(self, rt: ResourceType, namespace: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        if self._check_body(rt, namespace, obj) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        self._interfere(rt, namespace, name)
        stored = self._stored(rt, namespace, name)
        version = obj["metadata"].get("resourceVersion")
        if not version:
            raise ApiError(
                422, "Invalid", f'{rt.kind} "{name}" is invalid: metadata.resourceVersion: Invalid value: 0x0:'
                " must be specified for an update",
            )  # fmt: skip
        if version != stored["metadata"]["resourceVersion"]:
            raise self._conflict(rt, name)
        for path in _immutable_paths(rt.schema):
            if _at(obj, path) != _at(stored, path):
                message = f'{rt.kind} "{name}" is invalid: {path.lstrip(".")}: Invalid value: immutable'
                raise ApiError(422, "Invalid", message)
        updated = copy.deepcopy(obj)
        server_set = {k: stored["metadata"][k] for k in ("uid", "creationTimestamp", "generation", "namespace")}
        updated["metadata"].update(server_set, resourceVersion=str(self._next_rv()))
        self._objects[(rt.plural, namespace, name)] = updated
        self._record("MODIFIED", rt, namespace, updated)
        return copy.deepcopy(updated)

    def _delete(self, rt: ResourceType, namespace: str, name: str, options: dict[str, Any]) -> dict[str, Any]:
        self._interfere(rt, namespace, name)
        stored = self._stored(rt, namespace, name)
        wanted = (options.get("preconditions") or {}).get("resourceVersion")
        if wanted is not None and wanted != stored["metadata"]["resourceVersion"]:
            raise ApiError(
                409, "Conflict",
                f'Operation cannot be fulfilled on {rt.qualified} "{name}": Precondition failed: ResourceVersion in'
                f" precondition: {wanted}, ResourceVersion in object meta: {stored['metadata']['resourceVersion']}",
                {"name": name, "group": rt.group, "kind": rt.plural},
            )  # fmt: skip
        del self._objects[(rt.plural, namespace, name)]
        # Like etcd, the deletion is a revision of its own; the event carries it.
        gone = copy.deepcopy(stored)
        gone["metadata"]["resourceVersion"] = str(self._next_rv())
        self._record("DELETED", rt, namespace, gone)
        return copy.deepcopy(stored)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], api: KubeApiServer,
        context: ssl.SSLContext | None,
    ) -> None:  # fmt: skip
        self.api = api
        self.context = context
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def close_connections(self) -> None:
        with self.connections_lock:
            for sock in self.connections:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.context is not None:
            # The handshake happens in the connection's own thread (see _Handler.setup), so a slow
            # or failing client cannot stall the accept loop.
            sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = 30
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)
        self.peer_subject: str | None = None
        self.handshake_failed = False
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (ssl.SSLError, OSError):
                self.handshake_failed = True  # e.g. a client that does not trust our CA: it gives up
                return
            cert = self.connection.getpeercert()
            if cert:
                subject = dict(item for rdn in cert.get("subject", ()) for item in rdn)
                self.peer_subject = subject.get("commonName")

    def handle(self) -> None:
        if self.handshake_failed:
            return
        with contextlib.suppress(ssl.SSLError, ConnectionError, TimeoutError):  # a client that went away
            super().handle()

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        code, payload = self.server.api.handle(self.command, self.path, headers, body, self.peer_subject)
        if not isinstance(payload, dict):
            self._stream(payload)
            return
        data = json.dumps(payload).encode()
        self.send_response(code)
        retry_after = (payload.get("details") or {}).get("retryAfterSeconds")
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, events: WatchStream) -> None:
        """A watch: one JSON line per event, chunked, as long as the watch lasts."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in events:
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        finally:
            events.close()

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are in KubeApiServer.calls


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session", name="kube_apiserver")
def kube_apiserver_fixture() -> Iterator[KubeApiServer]:
    """One plain-HTTP stand-in for the session; tests share it, each in namespaces of its own."""
    with KubeApiServer() as server:
        yield server


@pytest.fixture(name="make_kube_apiserver")
def make_kube_apiserver_fixture() -> Iterator[Callable[..., KubeApiServer]]:
    """Start a private stand-in (``make_kube_apiserver(tls=True)``) that the test may stop."""
    servers: list[KubeApiServer] = []

    def make(tls: bool = False) -> KubeApiServer:
        if tls and shutil.which("openssl") is None:
            pytest.skip("the openssl command is needed to make certificates for the TLS tests")
        server = KubeApiServer(tls=tls)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.close()


@dataclass
class KubeTarget:
    """A fresh namespace on the stand-in and the registry URL that reaches it (via KUBECONFIG)."""

    server: KubeApiServer
    namespace: str
    kubeconfig: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"kubernetes://{self.namespace}"


@pytest.fixture(name="kube_target")
def kube_target_fixture(
    kube_apiserver: KubeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[KubeTarget]:
    """A namespace of its own on the session's stand-in; KUBECONFIG points at it for this test."""
    namespace = kube_apiserver.new_namespace()
    kubeconfig = kube_apiserver.kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield KubeTarget(kube_apiserver, namespace, kubeconfig, {"KUBECONFIG": str(kubeconfig)})
    kube_apiserver.clear_overloads()
    kube_apiserver.drop_namespace(namespace)
