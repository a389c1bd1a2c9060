"""A forward HTTP proxy on loopback that counts what it forwards, for the proxy tests.

What a corporate proxy or a caching data plane (Dragonfly's dfdaemon) looks like to mxfs:

- plain ``http://`` requests arrive in absolute-URI form (``GET http://host:port/path``) and
  are forwarded to that origin;
- ``https://`` requests arrive as ``CONNECT host:port``.  With ``tls`` given, the proxy
  re-signs: it answers the TLS handshake itself with a certificate for the host signed by its
  own CA (what a TLS-inspecting proxy or a dfdaemon with its own CA does), reads the requests
  inside, and forwards them to the origin in plain HTTP (the test Hub speaks plain HTTP).
  Without ``tls`` a CONNECT is refused (405): these tests never need a blind tunnel.

Every request forwarded is recorded in :attr:`ForwardProxy.requests` as ``(scheme, method,
host:port, path)``.  One request per client connection (``Connection: close`` both ways) keeps
the forwarding simple and the counting exact.  Threads of the test process; a helper for tests
only.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

TIMEOUT = 30.0
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "upgrade"}


@dataclass(frozen=True)
class ProxyCa:
    """A CA (``ca_file`` is what clients must trust) and a server certificate for 127.0.0.1."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_proxy_ca(directory: Path) -> ProxyCa:
    """A fresh CA and a certificate for ``127.0.0.1`` signed by it, made with the ``openssl`` command."""
    ca = ProxyCa(directory / "proxy-ca.pem", directory / "proxy-server.pem", directory / "proxy-server.key")
    ca_key = directory / "proxy-ca.key"

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(ca_key),
        "-out", str(ca.ca_file), "-subj", "/CN=mxfs-test-proxy-ca")  # fmt: skip
    csr, ext = directory / "proxy-server.csr", directory / "proxy-server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca.key_file), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca.ca_file), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "1", "-out", str(ca.cert_file), "-extfile", str(ext))  # fmt: skip
    return ca


class ForwardProxy:
    """Listens on ``127.0.0.1:<port>``; ``url`` is what ``HTTP_PROXY``/``HTTPS_PROXY`` take."""

    def __init__(self, tls: ProxyCa | None = None) -> None:
        self.requests: list[tuple[str, str, str, str]] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        if tls is not None:
            self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="forward-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._listener.close()

    def __enter__(self) -> ForwardProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(TIMEOUT)
            threading.Thread(target=self._serve, args=(conn,), name="forward-proxy-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn, conn.makefile("rb") as reader:
                head = _read_head(reader)
                if head is None:
                    return
                method, target, headers = head
                if method != "CONNECT":
                    self._forward(conn, reader, "http", method, target, headers, None)
                    return
                if self._context is None:
                    conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                with self._context.wrap_socket(conn, server_side=True) as tunnel, tunnel.makefile("rb") as inner:
                    head = _read_head(inner)
                    if head is not None:
                        self._forward(tunnel, inner, "https", head[0], head[1], head[2], target)
        except (OSError, ssl.SSLError, ValueError) as exc:
            with self._lock:
                self.errors.append(exc)

    def _forward(
        self,
        client: socket.socket,
        reader: BinaryIO,
        scheme: str,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        tunnel_to: str | None,
    ) -> None:
        """Send one request to its origin and its answer back, both with ``Connection: close``."""
        if tunnel_to is None:
            parts = urlsplit(target)
            origin, path = parts.netloc, parts.path + (f"?{parts.query}" if parts.query else "")
        else:
            origin, path = tunnel_to, target
        with self._lock:
            self.requests.append((scheme, method, origin, path))
        length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0") or 0)
        body = reader.read(length) if length else b""
        host, _, port = origin.rpartition(":")
        with socket.create_connection((host.strip("[]"), int(port)), timeout=TIMEOUT) as upstream:
            kept = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
            lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in kept), "Connection: close", "", ""]
            upstream.sendall("\r\n".join(lines).encode("latin-1") + body)
            with upstream.makefile("rb") as answer:
                status = answer.readline()
                response = [status]
                while (line := answer.readline()) not in (b"\r\n", b"\n", b""):
                    if line.split(b":", 1)[0].strip().lower() not in (b"connection", b"keep-alive"):
                        response.append(line)
                response.append(b"Connection: close\r\n\r\n")
                client.sendall(b"".join(response))
                while chunk := answer.read1(1 << 16):
                    client.sendall(chunk)


def _read_head(reader: BinaryIO) -> tuple[str, str, list[tuple[str, str]]] | None:
    """The request line and headers, or None if the client closed first."""
    line = reader.readline()
    if not line:
        return None
    method, target, _version = line.decode("latin-1").split(" ", 2)
    headers = []
    for _ in range(200):  # bounded: a client sending endless headers is an error
        raw = reader.readline()
        if raw in (b"\r\n", b"\n", b""):
            return method, target, headers
        name, _, value = raw.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    raise ValueError("too many headers")
