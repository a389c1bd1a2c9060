"""Mutual TLS between peers (mxfs.peers.tls): renewed certificates are taken up without a restart.
The handshakes are real (ssl over a socketpair); the fleet over TLS is in test_peers.py."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from mxfs.peers.tls import PeerTls


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path) -> tuple[Path, Path]:
    ca, key = directory / "ca.pem", directory / "ca.key"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key), "-out", str(ca),
            "-subj", "/CN=test-fleet")  # fmt: skip
    return ca, key


def sign(directory: Path, ca: tuple[Path, Path], name: str) -> tuple[Path, Path]:
    cert, key, csr = directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.csr"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial", "-days", "1",
            "-out", str(cert))  # fmt: skip
    return cert, key


def served_name(tls: PeerTls) -> str:
    """The CN of the certificate the server side presents to a client of the fleet."""
    left, right = socket.socketpair()
    seen: list[str] = []

    def serve() -> None:
        with tls.server.wrap_socket(left, server_side=True) as server:
            server.recv(1)

    thread = threading.Thread(target=serve)
    thread.start()
    with tls.client.wrap_socket(right) as client:
        der = client.getpeercert(binary_form=True)
        assert der is not None
        seen.append(ssl.DER_cert_to_PEM_cert(der))
        client.sendall(b"x")
    thread.join(10)
    return subprocess.run(["openssl", "x509", "-noout", "-subject"], input=seen[0], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_renewed_certificates_are_taken_up_and_broken_ones_refused(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    first = sign(tmp_path, ca, "first")
    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    shutil.copy(first[0], cert)
    shutil.copy(first[1], key)
    tls = PeerTls(cert, key, ca[0])
    assert served_name(tls).endswith("CN = first")
    assert tls.reload_if_changed() is False  # nothing changed

    # cert-manager renews: both files rewritten.
    second = sign(tmp_path, ca, "second")
    shutil.copy(second[0], cert)
    shutil.copy(second[1], key)
    assert tls.reload_if_changed() is True
    assert served_name(tls).endswith("CN = second")

    # Half a renewal (a certificate whose key is not there yet): refused, the loaded pair kept,
    # and taken up once the key follows.
    third = sign(tmp_path, ca, "third")
    shutil.copy(third[0], cert)
    with pytest.raises(ssl.SSLError):
        tls.reload_if_changed()
    assert served_name(tls).endswith("CN = second")
    shutil.copy(third[1], key)
    assert tls.reload_if_changed() is True
    assert served_name(tls).endswith("CN = third")
