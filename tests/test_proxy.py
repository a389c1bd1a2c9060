"""Downloads go through the standard proxy settings, and trust a CA bundle for a proxy that re-signs.

A fleet whose data plane is a caching proxy (Dragonfly's dfdaemon, a corporate gateway) gets
its P2P or its caching by pointing ``HTTPS_PROXY``/``HTTP_PROXY`` at it; every Hub request,
CDN redirects included, must then go through it.  The proxy here counts what it forwards and
the test Hub counts what it serves, so "every request went through the proxy" is checked
request by request, and the bytes read through the mount are compared with the model's.
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.forward_proxy import ForwardProxy, make_proxy_ca
from tests.hubserver import FakeHub
from tests.mounting import requires_fuse

pytestmark = requires_fuse

FILES = {
    "config.json": b'{"through": "a proxy"}',
    "model.safetensors": random.Random(16).randbytes(3_000_000),  # LFS: a redirect to the CDN
}


def proxy_env(proxy: ForwardProxy) -> dict[str, str]:
    # Both spellings: the lowercase ones win where both are set, and a default NO_PROXY often
    # names localhost, which would send these loopback requests around the proxy.
    env = {}
    for name in ("http_proxy", "https_proxy"):
        env[name] = env[name.upper()] = proxy.url
    env["no_proxy"] = env["NO_PROXY"] = ""
    return env


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    with ForwardProxy() as p:
        yield p
    assert not p.errors, p.errors


def assert_every_hub_request_went_through(hub: FakeHub, proxy: ForwardProxy, repo: str) -> None:
    served = Counter(r.path for r in hub.requests() if r.repo_id == repo or r.kind == "cdn")
    forwarded = Counter(path for _, _, _, path in proxy.requests)
    assert served, "the Hub served nothing"
    assert served - forwarded == Counter(), f"requests that bypassed the proxy: {served - forwarded}"
    kinds = {r.kind for r in hub.requests() if r.repo_id == repo or r.kind == "cdn"}
    assert {"resolve", "cdn"} <= kinds, kinds  # the file requests and the CDN redirect's target


def test_downloads_go_through_http_proxy(hub: FakeHub, new_repo_id, mxfs_mount, proxy: ForwardProxy) -> None:
    repo = new_repo_id()
    hub.add_repo(repo, FILES, lfs_patterns=["*.safetensors"])
    mount = mxfs_mount(env=proxy_env(proxy))
    for name, data in FILES.items():
        assert (mount / repo / name).read_bytes() == data
    assert {scheme for scheme, *_ in proxy.requests} == {"http"}
    assert_every_hub_request_went_through(hub, proxy, repo)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command makes the proxy's CA")
@pytest.mark.parametrize("trust", ["ca_bundle", "SSL_CERT_FILE"])
def test_a_proxy_that_re_signs_tls_is_trusted_through_a_ca_bundle(
    hub: FakeHub, new_repo_id, mxfs_mount, tmp_path: Path, trust: str
) -> None:
    """The Hub as ``https://``: the proxy answers CONNECT with its own certificate, which only
    the CA bundle (the ``ca_bundle`` setting, or OpenSSL's ``SSL_CERT_FILE``) makes the daemon
    trust (the CA is made by this test).  Without it the lookup fails: checked by hand."""
    ca = make_proxy_ca(tmp_path)
    repo = new_repo_id()
    hub.add_repo(repo, FILES, lfs_patterns=["*.safetensors"])
    with ForwardProxy(tls=ca) as proxy:
        env = {**proxy_env(proxy), "HF_ENDPOINT": f"https://127.0.0.1:{hub.port}"}
        if trust == "ca_bundle":
            mount = mxfs_mount("--ca-bundle", str(ca.ca_file), env=env)
        else:
            mount = mxfs_mount(env={**env, "SSL_CERT_FILE": str(ca.ca_file)})
        for name, data in FILES.items():
            assert (mount / repo / name).read_bytes() == data
        assert not proxy.errors, proxy.errors
    # Hub requests went through the re-signing tunnel; the CDN redirect (http) as a plain request.
    schemes = Counter(scheme for scheme, *_ in proxy.requests)
    assert schemes["https"] >= 2 and schemes["http"] >= 1, schemes
    assert_every_hub_request_went_through(hub, proxy, repo)
