"""A real ``redis-server`` on loopback for the registry tests, and the fixtures that provide one.

Each server runs in its own temporary directory with persistence off, on a free port that it
keeps across :meth:`RedisServer.stop` and :meth:`RedisServer.start`, so a test can take Redis away
and bring it back at the same address.  Tests are skipped (with the reason) only when the
``redis-server`` binary is missing.

Expose the fixtures to a test module through ``tests/conftest.py``::

    from tests.redis_server import make_redis_server, redis_server  # noqa: F401
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from tests.scrape import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
STARTUP_TIMEOUT = 10.0


def redis_server_available() -> bool:
    return Path(REDIS_SERVER).is_file()


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``; a context manager that stops it at exit.

    With ``tls=True`` it speaks only TLS, with a self-signed certificate for 127.0.0.1 (made with
    the ``openssl`` command) at :attr:`ca_file`.
    """

    def __init__(self, password: str | None = None, tls: bool = False, also_bind: tuple[str, ...] = ()) -> None:
        self.password = password
        self.tls = tls
        # Addresses beyond loopback it listens on (a bridge that network namespaces reach it by).
        self.also_bind = also_bind
        self.port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="mxfs-redis-")
        self.dir = Path(self._tmp.name)
        self.ca_file = self.dir / "cert.pem"
        self._key_file = self.dir / "key.pem"
        self._proc: subprocess.Popen[bytes] | None = None
        if tls:
            cmd = [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                "-keyout", str(self._key_file), "-out", str(self.ca_file),
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            ]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True)

    def url(self, db: int = 0, password: str | None = None, host: str = "127.0.0.1") -> str:
        """URL of database ``db``, with this server's password unless another is given, at
        ``host`` (loopback, or one of ``also_bind``).

        A TLS server's URL is ``rediss://`` and names the certificate to trust.
        """
        password = self.password if password is None else password
        auth = f":{quote(password, safe='')}@" if password else ""
        if self.tls:
            return f"rediss://{auth}{host}:{self.port}/{db}?ssl_ca_certs={quote(str(self.ca_file))}"
        return f"redis://{auth}{host}:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        """A plain synchronous client, for setting up and inspecting what the registry wrote."""
        tls = {"ssl": True, "ssl_ca_certs": str(self.ca_file)} if self.tls else {}
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            db=db,
            password=self.password,
            decode_responses=True,
            socket_timeout=5,
            **tls,  # type: ignore[arg-type]
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until it answers PING."""
        if self.running:
            return
        cmd = [
            REDIS_SERVER,
            "--port", str(self.port), "--bind", "127.0.0.1", *self.also_bind, "--save", "", "--appendonly", "no",
            "--dir", str(self.dir), "--daemonize", "no", "--loglevel", "warning",
        ]  # fmt: skip
        if self.also_bind:
            cmd += ["--protected-mode", "no"]  # clients from the namespaces, with no password
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.tls:
            cmd += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            cmd += ["--tls-cert-file", str(self.ca_file), "--tls-key-file", str(self._key_file)]
        with open(self.dir / "redis.log", "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with self.client() as client:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {self.log()[-2000:]}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer within {STARTUP_TIMEOUT}s: {self.log()[-2000:]}")
                time.sleep(0.01)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait until it is gone."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _require_binary() -> None:
    if not redis_server_available():
        pytest.skip(f"redis-server not found (looked for {REDIS_SERVER}); install Redis to run the Redis tests")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One server for the whole session; tests share it and empty the databases they use."""
    _require_binary()
    with RedisServer() as server:
        yield server


@pytest.fixture
def make_redis_server() -> Iterator[Callable[..., RedisServer]]:
    """Start a private server (``make_redis_server(password=..., tls=...)``) that the test may stop and restart."""
    _require_binary()
    servers: list[RedisServer] = []

    def make(password: str | None = None, tls: bool = False) -> RedisServer:
        if tls and shutil.which("openssl") is None:
            pytest.skip("the openssl command is needed to make a certificate for the TLS test")
        server = RedisServer(password=password, tls=tls)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.close()
