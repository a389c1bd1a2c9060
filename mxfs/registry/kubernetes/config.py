"""Where the Kubernetes API server is and how to prove who we are: in-cluster or a kubeconfig.

Two sources, tried in this order:

1. ``KUBECONFIG`` (one path, or several joined by ``:``): an operator who sets it means it, even
   inside a pod.
2. In-cluster: ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT`` and the service account
   files under ``/var/run/secrets/kubernetes.io/serviceaccount`` (``token``, ``ca.crt``,
   ``namespace``): what the DaemonSet uses.  It beats ``~/.kube/config`` so that a stray file in an
   image cannot redirect a pod to another cluster.
3. ``~/.kube/config``: a developer's machine or a node outside the cluster.

From a kubeconfig we take the server, its CA (``certificate-authority`` or
``certificate-authority-data``, else the system's trust store; ``insecure-skip-tls-verify``), and
the user's credentials: ``token``, ``tokenFile``, or a client certificate
(``client-certificate``/``client-key``, as paths or ``-data``).  Exec plugins and auth providers
would mean running arbitrary commands from the daemon, so they are refused with a clear message;
a kubeconfig for mxfs names a service account token or a client certificate.

Secrets (tokens, keys) never appear in a message: a YAML parse error is reported by file and line
only, because PyYAML's own message quotes the offending text.  Everything here blocks on files,
so the caller runs :func:`load_config` in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mxfs.registry.base import RegistryError

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_KUBECONFIG = "~/.kube/config"


@dataclass
class ClusterConfig:
    """How to reach one API server.  The ``repr`` shows no secret."""

    server: str
    """``https://host:port`` (or ``http://`` for a local proxy), without a trailing slash."""
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    """A bearer token given inline."""
    token_file: Path | None = None
    """A bearer token to read (and re-read: service account tokens are rotated) from a file."""
    namespace: str | None = None
    """The namespace the source suggests (the pod's own, or the context's)."""
    source: str = ""
    """Where this came from, for logs: ``in-cluster service account`` or ``kubeconfig PATH (context C)``."""

    @property
    def auth(self) -> str:
        """How requests authenticate, for logs (never the credential itself)."""
        if self.token is not None:
            return "bearer token"
        if self.token_file is not None:
            return f"bearer token from {self.token_file}"
        return "client certificate or none"


def load_config(
    context: str | None = None,
    environ: Mapping[str, str] | None = None,
    service_account_dir: Path | None = None,
) -> ClusterConfig:
    """The configuration to use, from the first source that exists (see the module docstring).

    ``environ`` defaults to the process's environment and ``service_account_dir`` to
    :data:`SERVICE_ACCOUNT_DIR` (looked up at call time, so tests can move it).
    """
    env = os.environ if environ is None else environ
    if env.get("KUBECONFIG"):
        paths = [Path(p).expanduser() for p in env["KUBECONFIG"].split(os.pathsep) if p]
        return load_kubeconfig(paths, context)
    if context is None and env.get("KUBERNETES_SERVICE_HOST"):
        return load_in_cluster(env, service_account_dir or SERVICE_ACCOUNT_DIR)
    default = Path(DEFAULT_KUBECONFIG).expanduser()
    if default.is_file():
        return load_kubeconfig([default], context)
    if context is not None:
        raise RegistryError(f"a kubeconfig context ({context!r}) was asked for, but there is no kubeconfig")
    raise RegistryError(
        "no Kubernetes configuration: not in a pod (KUBERNETES_SERVICE_HOST is unset), KUBECONFIG is unset"
        f" and {DEFAULT_KUBECONFIG} does not exist"
    )


# -- in-cluster ----------------------------------------------------------------------------------


def load_in_cluster(environ: Mapping[str, str], service_account_dir: Path) -> ClusterConfig:
    """The pod's service account: the API server's service address, its CA and a rotated token."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise RegistryError("in-cluster configuration needs KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT")
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    token_file = service_account_dir / "token"
    ca_file = service_account_dir / "ca.crt"
    for path in (token_file, ca_file):
        if not path.is_file():
            raise RegistryError(f"in-cluster configuration: {path} is missing (is a service account token mounted?)")
    namespace_file = service_account_dir / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.is_file() else None
    return ClusterConfig(
        server=f"https://{host}:{port}",
        ssl_context=_ssl_context(ca_file=ca_file),
        token_file=token_file,
        namespace=namespace or None,
        source="in-cluster service account",
    )


# -- kubeconfig ----------------------------------------------------------------------------------


@dataclass
class _Named:
    """One cluster, user or context entry, with the directory its relative paths are relative to."""

    body: dict[str, Any]
    base: Path


@dataclass
class _Kubeconfig:
    clusters: dict[str, _Named] = field(default_factory=dict)
    users: dict[str, _Named] = field(default_factory=dict)
    contexts: dict[str, _Named] = field(default_factory=dict)
    current_context: str = ""


def load_kubeconfig(paths: list[Path], context: str | None = None) -> ClusterConfig:
    """The cluster and user of ``context`` (default: ``current-context``) in the merged files.

    Files merge as kubectl merges them: the first file to name a cluster, user or context wins,
    and so does the first ``current-context``.  Files that do not exist are skipped, unless none
    does.
    """
    merged = _Kubeconfig()
    existing = [p for p in paths if p.is_file()]
    if not existing:
        raise RegistryError(f"kubeconfig: none of {', '.join(map(str, paths))} exists")
    for path in existing:
        _merge(merged, path, _read_yaml(path))
    shown = ":".join(map(str, existing))
    name = context or merged.current_context
    if not name:
        raise RegistryError(f"kubeconfig {shown}: no current-context; name one with kubernetes://NS?context=NAME")
    ctx = _lookup(merged.contexts, "context", name, shown).body
    cluster = _lookup(merged.clusters, "cluster", str(ctx.get("cluster", "")), shown)
    user = _lookup(merged.users, "user", str(ctx.get("user", "")), shown) if ctx.get("user") else _Named({}, Path())
    where = f"kubeconfig {shown}, context {name!r}"
    server = str(cluster.body.get("server", "")).rstrip("/")
    if not server.startswith(("https://", "http://")):
        raise RegistryError(f"{where}: cluster server must be an https:// URL")
    token, token_file = _user_token(user, where)
    ssl_context = None
    if server.startswith("https://"):
        ssl_context = _cluster_ssl_context(cluster, where)
        _load_client_certificate(ssl_context, user, where)
    elif _has_client_certificate(user.body):
        raise RegistryError(f"{where}: a client certificate needs an https:// server")
    namespace = ctx.get("namespace")
    return ClusterConfig(
        server=server,
        ssl_context=ssl_context,
        token=token,
        token_file=token_file,
        namespace=str(namespace) if namespace else None,
        source=where,
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    """The kubeconfig document at ``path``; a parse error names the line but never quotes it."""
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise RegistryError(f"kubeconfig {path}: not valid YAML{at}") from None
    except OSError as exc:
        raise RegistryError(f"kubeconfig {path}: {exc.strerror or exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise RegistryError(f"kubeconfig {path}: not a kubeconfig (the document is not a mapping)")
    return doc


def _merge(merged: _Kubeconfig, path: Path, doc: dict[str, Any]) -> None:
    base = path.parent
    for key, inner, target in (
        ("clusters", "cluster", merged.clusters),
        ("users", "user", merged.users),
        ("contexts", "context", merged.contexts),
    ):
        for item in doc.get(key) or []:
            if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"] not in target:
                body = item.get(inner) or {}
                target[item["name"]] = _Named(body if isinstance(body, dict) else {}, base)
    if not merged.current_context and isinstance(doc.get("current-context"), str):
        merged.current_context = doc["current-context"]


def _lookup(items: dict[str, _Named], what: str, name: str, shown: str) -> _Named:
    if name not in items:
        raise RegistryError(f"kubeconfig {shown}: no {what} named {name!r}")
    return items[name]


def _path(named: _Named, key: str) -> Path | None:
    """The file ``named.body[key]`` names, relative to its kubeconfig's directory."""
    value = named.body.get(key)
    if not value:
        return None
    return named.base / Path(str(value)).expanduser()


def _data(named: _Named, key: str, where: str) -> bytes | None:
    value = named.body.get(key)
    if not value:
        return None
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise RegistryError(f"{where}: {key} is not valid base64") from None


def _user_token(user: _Named, where: str) -> tuple[str | None, Path | None]:
    body = user.body
    for unsupported, hint in (
        ("exec", "exec credential plugins"),
        ("auth-provider", "auth providers"),
        ("username", "basic authentication"),
    ):
        if body.get(unsupported):
            raise RegistryError(
                f"{where}: {hint} are not supported; give the user a token, tokenFile or client certificate"
            )
    token = body.get("token")
    if token:
        return str(token).strip(), None
    return None, _path(user, "tokenFile")


def _cluster_ssl_context(cluster: _Named, where: str) -> ssl.SSLContext:
    if cluster.body.get("insecure-skip-tls-verify"):
        log.warning("%s: insecure-skip-tls-verify is set; the API server's certificate is not checked", where)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    ca_data = _data(cluster, "certificate-authority-data", where)
    ca_file = _path(cluster, "certificate-authority")
    try:
        return _ssl_context(ca_file=ca_file, ca_data=ca_data)
    except RegistryError as exc:
        raise RegistryError(f"{where}: {exc}") from None


def _ssl_context(ca_file: Path | None = None, ca_data: bytes | None = None) -> ssl.SSLContext:
    """Trust ``ca_data``, else ``ca_file``, else the system's trust store."""
    try:
        if ca_data is not None:
            return ssl.create_default_context(cadata=ca_data.decode("ascii", errors="replace"))
        if ca_file is not None:
            return ssl.create_default_context(cafile=str(ca_file))
        return ssl.create_default_context()
    except (ssl.SSLError, OSError, ValueError) as exc:
        source = "certificate-authority-data" if ca_data is not None else str(ca_file)
        raise RegistryError(f"cannot load the CA certificate from {source}: {_reason(exc)}") from None


def _has_client_certificate(body: dict[str, Any]) -> bool:
    return any(body.get(k) for k in ("client-certificate", "client-certificate-data", "client-key", "client-key-data"))


def _load_client_certificate(context: ssl.SSLContext, user: _Named, where: str) -> None:
    """Load the user's client certificate and key (paths or inline data) into ``context``, if any.

    ``ssl`` loads keys only from files, so inline data goes through a private temporary directory
    that is removed as soon as the key is loaded.
    """
    if not _has_client_certificate(user.body):
        return
    cert_file, key_file = _path(user, "client-certificate"), _path(user, "client-key")
    cert_data, key_data = _data(user, "client-certificate-data", where), _data(user, "client-key-data", where)
    if (cert_file is None and cert_data is None) or (key_file is None and key_data is None):
        raise RegistryError(f"{where}: a client certificate needs both the certificate and its key")
    with tempfile.TemporaryDirectory(prefix="mxfs-kube-") as tmp:
        if cert_data is not None:
            cert_file = _private_file(Path(tmp) / "client.crt", cert_data)
        if key_data is not None:
            key_file = _private_file(Path(tmp) / "client.key", key_data)
        try:
            context.load_cert_chain(str(cert_file), str(key_file))
        except (ssl.SSLError, OSError) as exc:
            raise RegistryError(f"{where}: cannot load the client certificate: {_reason(exc)}") from None


def _private_file(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _reason(exc: BaseException) -> str:
    """A short reason that cannot echo file contents (ssl errors name the failing step only)."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__
