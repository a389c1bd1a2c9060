"""What is particular to the Kubernetes registry: object names, the wire schema and deploy/*.yaml,
configuration (kubeconfig and in-cluster), lost races (409) between writers, credentials in
messages and logs, lease judgement on the local clock, locks as Leases, and one real mount.

The behaviour every backend shares is in test_registry_conformance.py.  These tests run against
the API-server stand-in (tests/kube_apiserver.py) and read what the registry wrote from its
store.  Time-dependent tests use pytest-trio's ``mock_clock`` (a frozen trio clock moved by
``jump``): the backend judges leases by trio's clock, and the HTTP calls never wait on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import re
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from hypothesis import given
from hypothesis import strategies as st
from trio.testing import MockClock

from mxfs.names import EntryName
from mxfs.registry import AlreadyExists, Claimed, RegistryError, Status, open_registry
from mxfs.registry.kubernetes import KubernetesRegistry
from mxfs.registry.kubernetes import api as kube_api
from mxfs.registry.kubernetes import config as kube_config
from mxfs.registry.kubernetes import registry as kube_registry
from mxfs.registry.kubernetes.config import load_config, load_kubeconfig
from mxfs.registry.kubernetes.registry import (
    COMPONENT_LABEL,
    CONFIG_MAPS,
    ENTRIES,
    HOLDERS_COMPONENT,
    HOLDERS_ENTRY_ANNOTATION,
    LEASES,
    LOCK_TTL_ANNOTATION,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PHASES,
    SHORT_NAME,
    LeaseObserver,
    entry_object_name,
    holder_key,
    holders_object_name,
    lock_object_name,
    object_name,
    parse_url,
)
from tests.kube_apiserver import (
    KubeApiServer,
    KubeTarget,
    kube_apiserver_fixture,  # noqa: F401
    kube_target_fixture,  # noqa: F401
    make_kube_apiserver_fixture,  # noqa: F401
)
from tests.mounting import MountedFs, requires_fuse

REPO_ROOT = Path(__file__).resolve().parent.parent
LONG_LEASE = 30.0
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
RFC3339_MS_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")

OpenKube = Callable[..., Awaitable[KubernetesRegistry]]


def _name(i: int = 0, repo: str = "org/model") -> str:
    return EntryName(f"{repo}-{i}", f"{i:040x}").key


@pytest.fixture
async def open_kube(kube_target: KubeTarget) -> AsyncIterator[OpenKube]:
    """Open clients (by default on the test's namespace); all closed at teardown."""
    registries: list[KubernetesRegistry] = []

    async def open_(url: str | None = None) -> KubernetesRegistry:
        registry = await open_registry(url or kube_target.url)
        assert isinstance(registry, KubernetesRegistry)
        registries.append(registry)
        return registry

    yield open_
    for registry in registries:
        await registry.aclose()


def _stored(target: KubeTarget, name: str) -> dict[str, Any]:
    return target.server.objects(ENTRIES.plural, target.namespace)[entry_object_name(name)]


# -- object names --------------------------------------------------------------------------------


def test_entry_object_name_is_sanitized_provider_and_name_then_hash() -> None:
    name = EntryName("Qwen/Qwen2.5-0.5B_Instruct", "ab" * 20).key
    digest = hashlib.sha256(f"HuggingFace/{name}".encode()).hexdigest()[:12]
    expected = f"mx-cache-huggingface-mx1-{'ab' * 20}-qwen-qwen2-5-0-5b-instruct-{digest}"
    assert entry_object_name(name) == expected


def test_names_that_sanitize_alike_stay_apart() -> None:
    upper, lower = EntryName("Org/Model", "0" * 40).key, EntryName("org/model", "0" * 40).key
    assert entry_object_name(upper) != entry_object_name(lower)
    assert entry_object_name(upper).rsplit("-", 1)[0] == entry_object_name(lower).rsplit("-", 1)[0]


def test_long_names_are_cut_to_253_and_stay_unique() -> None:
    a = EntryName("org/" + "x" * 300 + "a", "1" * 40).key
    b = EntryName("org/" + "x" * 300 + "b", "1" * 40).key
    for name in (a, b):
        cr = entry_object_name(name)
        assert len(cr) == 253
        assert DNS1123_SUBDOMAIN.fullmatch(cr)
        assert cr.endswith("-" + hashlib.sha256(f"HuggingFace/{name}".encode()).hexdigest()[:12])
    assert entry_object_name(a) != entry_object_name(b)


@given(st.text(max_size=400))
def test_any_name_gives_a_valid_dns1123_subdomain(original: str) -> None:
    for prefix in ("mx-cache-", "mxfs-lock-"):
        name = object_name(prefix, original)
        assert len(name) <= 253
        assert DNS1123_SUBDOMAIN.fullmatch(name), name
        assert name == object_name(prefix, original)


def test_lock_names() -> None:
    assert re.fullmatch(r"mxfs-lock-evict-[0-9a-f]{12}", lock_object_name("evict"))
    assert lock_object_name("evict") != lock_object_name("Evict")


# -- URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("kubernetes://mxfs", ("mxfs", None)),
        ("kubernetes://", (None, None)),
        ("kubernetes:///", (None, None)),
        ("kubernetes://team-a?context=prod", ("team-a", "prod")),
    ],
)
def test_parse_url(url: str, parsed: tuple[str | None, str | None]) -> None:
    assert parse_url(url) == parsed


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("kubernetes://MXFS", "not a valid namespace"),
        ("kubernetes://under_score", "not a valid namespace"),
        ("kubernetes://" + "n" * 64, "not a valid namespace"),
        ("kubernetes://ns/extra", "only a namespace"),
        ("kubernetes://ns#frag", "only a namespace"),
        ("kubernetes://ns:6443", "API server comes from"),
        ("kubernetes://ns?kubeconfig=/x", "unknown option"),
    ],
)
async def test_bad_urls_are_refused(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        await open_registry(url)


async def test_credentials_in_a_url_are_refused_and_not_echoed() -> None:
    with pytest.raises(ValueError, match="API server comes from") as raised:
        await open_registry("kubernetes://admin:hunter2@ns")
    assert "hunter2" not in str(raised.value)


# -- what lands in the API server ----------------------------------------------------------------


async def test_claim_and_finish_write_the_documented_object(kube_target: KubeTarget, open_kube: OpenKube) -> None:
    registry = await open_kube()
    name = _name()
    assert await registry.try_claim(name, "owner", LONG_LEASE) == Claimed()
    obj = _stored(kube_target, name)
    assert obj["apiVersion"] == "modelexpress.nvidia.com/v1alpha1"
    assert obj["kind"] == "ModelCacheEntry"
    assert obj["metadata"]["name"] == entry_object_name(name)
    assert obj["metadata"]["labels"] == {MANAGED_BY_LABEL: MANAGED_BY}
    assert obj["spec"] == {"modelName": name, "provider": "HuggingFace"}
    status = obj["status"]
    assert status["phase"] == "Downloading"
    assert status["claimId"] == "owner"
    assert status["leaseDurationSeconds"] == LONG_LEASE
    assert status["pinned"] is False
    for key in ("createdAt", "lastUsedAt", "leaseExpiresAt"):
        assert RFC3339_MS_Z.fullmatch(status[key]), status[key]
    assert "message" not in status and "sizeBytes" not in status

    assert await registry.finish_claim(name, "owner", Status.DOWNLOADED, message="done", size_bytes=1234)
    status = _stored(kube_target, name)["status"]
    assert status["phase"] == "Downloaded"
    assert status["sizeBytes"] == 1234
    assert status["message"] == "done"
    assert not {"claimId", "leaseExpiresAt", "leaseDurationSeconds"} & set(status)


async def test_records_of_other_providers_and_malformed_objects_are_skipped(
    kube_target: KubeTarget, open_kube: OpenKube, caplog: pytest.LogCaptureFixture
) -> None:
    registry = await open_kube()
    await registry.set_status(_name(0), Status.DOWNLOADED)
    good = _stored(kube_target, _name(0))
    other = {**good, "metadata": {"name": "mx-cache-other"}, "spec": {"modelName": "x", "provider": "NGC"}}
    broken = {**good, "metadata": {"name": "mx-cache-broken"}, "status": {"phase": "Exploded"}}
    kube_target.server.put_object(ENTRIES.plural, kube_target.namespace, other)
    kube_target.server.put_object(ENTRIES.plural, kube_target.namespace, broken)

    for _ in range(2):
        assert [r.model_name for r in await registry.list_by_last_used()] == [_name(0)]
    assert (await registry.status_counts()).downloaded == 1
    warnings = [r for r in caplog.records if "mx-cache-broken" in r.getMessage()]
    assert len(warnings) == 1, "a malformed object is reported once, not at every listing"


async def test_an_object_of_another_entry_under_our_name_is_an_error(
    kube_target: KubeTarget, open_kube: OpenKube
) -> None:
    registry = await open_kube()
    name = _name()
    await registry.set_status(_name(1), Status.DOWNLOADED)
    impostor = _stored(kube_target, _name(1))
    impostor["metadata"] = {"name": entry_object_name(name)}
    kube_target.server.put_object(ENTRIES.plural, kube_target.namespace, impostor)
    with pytest.raises(RegistryError, match="belongs to"):
        await registry.get_record(name)
    with pytest.raises(RegistryError, match="belongs to"):
        await registry.try_claim(name, "me", LONG_LEASE)


async def test_listing_pages_through_continue_tokens(
    kube_target: KubeTarget, open_kube: OpenKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mxfs.registry.kubernetes import api

    monkeypatch.setattr(api, "PAGE_SIZE", 2)
    registry = await open_kube()
    for i in range(5):
        await registry.set_status(_name(i), Status.DOWNLOADED)
    assert len(await registry.list_by_last_used()) == 5
    lists = [c for c in kube_target.server.calls if c.verb == "list" and c.namespace == kube_target.namespace]
    assert len(lists) >= 1 + 3  # the probe at open, then three pages


# -- deploy/*.yaml -------------------------------------------------------------------------------


def test_crd_matches_the_names_the_code_uses() -> None:
    crd = yaml.safe_load((REPO_ROOT / "deploy" / "crd.yaml").read_text())
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{ENTRIES.plural}.{ENTRIES.group}"
    assert spec["group"] == ENTRIES.group
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == ENTRIES.plural
    assert spec["names"]["kind"] == ENTRIES.kind
    assert SHORT_NAME in spec["names"]["shortNames"]
    [version] = spec["versions"]
    assert version["name"] == ENTRIES.version
    assert version["served"] and version["storage"]
    # Claims carry their status in the create: a status subresource would make the server drop it.
    assert "status" not in version.get("subresources", {})
    schema = version["schema"]["openAPIV3Schema"]
    status = schema["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == list(PHASES.values())
    assert {"createdAt", "lastUsedAt", "message", "claimId", "leaseExpiresAt", "pinned", "sizeBytes"} <= set(status)
    assert set(schema["properties"]["spec"]["properties"]) == {"modelName", "provider"}
    for column in version["additionalPrinterColumns"]:
        path = column["jsonPath"].strip(".").split(".")
        if path[0] != "metadata":
            node = schema
            for key in path:
                node = node["properties"][key]
            expected = {"date": "string", "integer": "integer", "boolean": "boolean", "string": "string"}
            assert expected[column["type"]] == node["type"], column


async def test_rbac_grants_exactly_the_verbs_the_backend_uses(kube_target: KubeTarget, open_kube: OpenKube) -> None:
    a, b = await open_kube(), await open_kube()
    name = _name()
    await a.get_status(name)
    assert await a.try_claim(name, "a", LONG_LEASE) == Claimed()
    assert await b.try_claim(name, "b", LONG_LEASE) == AlreadyExists(Status.DOWNLOADING)
    assert await a.refresh_claim(name, "a", LONG_LEASE)
    await a.set_status(name, Status.DOWNLOADING, "50%")
    assert await a.finish_claim(name, "a", Status.ERROR, "boom")
    assert await a.try_reset_error_for_retry(name, "c", LONG_LEASE)
    assert await a.finish_claim(name, "c", Status.DOWNLOADED, size_bytes=1)
    assert await a.try_retake(name, "d", LONG_LEASE, Status.DOWNLOADED)
    await a.set_status(name, Status.DOWNLOADED)
    await a.touch(name)
    assert await a.set_pinned(name, True)
    [record] = await a.list_by_last_used()
    await a.status_counts()
    assert await a.delete_if_unchanged(name, record.status, record.last_used_at)
    await a.delete(name)
    assert await a.try_lock("evict", "a", 30)
    assert await a.try_lock("evict", "a", 30)
    assert await a.unlock("evict", "a")
    await a.record_ref("org/model", "main", "a" * 40)
    await a.record_ref("org/model", "main", "b" * 40)
    await b.refs_since(await b.refs_version())
    await a.put_holder(name, "node-a", "http://a:7170", False, LONG_LEASE)
    await b.put_holder(name, "node-b", "http://b:7170", True, LONG_LEASE)
    assert len(await b.holders(name)) == 2
    await a.drop_holder(name, "node-a")
    await b.drop_holder(name, "node-b")  # the last one: the ConfigMap goes
    async with trio.open_nursery() as nursery:
        await nursery.start(b.listen_finished, lambda name: None)
        await _until(lambda: kube_target.server.open_watches() > 0)
        nursery.cancel_scope.cancel()

    used: dict[tuple[str, str], set[str]] = {}
    for group, plural, verb in kube_target.server.verbs(kube_target.namespace):
        used.setdefault((group, plural), set()).add(verb)
    documents = list(yaml.safe_load_all((REPO_ROOT / "deploy" / "rbac.yaml").read_text()))
    by_kind = {doc["kind"]: doc for doc in documents}
    granted = {
        (group, resource): set(rule["verbs"])
        for rule in by_kind["Role"]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert granted == used
    binding = by_kind["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "mxfs-registry"}
    account = by_kind["ServiceAccount"]["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    assert {doc["metadata"]["namespace"] for doc in documents} == {account["namespace"]}


# -- configuration -------------------------------------------------------------------------------


def _write_kubeconfig(
    path: Path, user: dict[str, Any], *, server: str = "https://k8s.example:6443", **extra: Any
) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u", "namespace": "from-context"}}],
        "current-context": "ctx",
        **extra,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def test_kubeconfig_token_server_and_namespace(tmp_path: Path) -> None:
    config = load_kubeconfig([_write_kubeconfig(tmp_path / "config", {"token": "tok-123"})])
    assert config.server == "https://k8s.example:6443"
    assert config.token == "tok-123"
    assert config.namespace == "from-context"
    assert "tok-123" not in repr(config)
    assert "context 'ctx'" in config.source


def test_kubeconfig_token_file_is_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    (tmp_path / "sa.token").write_text("tok\n")
    config = load_kubeconfig([_write_kubeconfig(tmp_path / "config", {"tokenFile": "sa.token"})])
    assert config.token_file == tmp_path / "sa.token"
    assert config.token is None


def test_kubeconfig_files_merge_first_wins(tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.write_text(yaml.safe_dump({"current-context": "ctx", "users": [{"name": "u", "user": {"token": "first"}}]}))
    second = _write_kubeconfig(tmp_path / "second", {"token": "second"}, **{"current-context": "other"})
    config = load_config(environ={"KUBECONFIG": f"{tmp_path / 'missing'}:{first}:{second}"})
    assert config.token == "first"
    assert config.server == "https://k8s.example:6443"


def test_kubeconfig_context_is_chosen_by_the_url(tmp_path: Path) -> None:
    path = _write_kubeconfig(tmp_path / "config", {"token": "t"})
    doc = yaml.safe_load(path.read_text())
    doc["contexts"].append({"name": "other", "context": {"cluster": "c", "user": "u", "namespace": "elsewhere"}})
    path.write_text(yaml.safe_dump(doc))
    assert load_kubeconfig([path], "other").namespace == "elsewhere"
    with pytest.raises(RegistryError, match="no context named 'nope'"):
        load_kubeconfig([path], "nope")


@pytest.mark.parametrize(
    ("user", "reason"),
    [
        ({"exec": {"command": "aws"}}, "exec credential plugins are not supported"),
        ({"auth-provider": {"name": "gcp"}}, "auth providers are not supported"),
        ({"username": "admin", "password": "hunter2"}, "basic authentication"),
        ({"client-certificate-data": "QUJD"}, "needs both the certificate and its key"),
        ({"client-certificate-data": "not base64!", "client-key-data": "QUJD"}, "not valid base64"),
    ],
)
def test_unsupported_or_broken_users_are_refused(tmp_path: Path, user: dict[str, Any], reason: str) -> None:
    with pytest.raises(RegistryError, match=reason) as raised:
        load_kubeconfig([_write_kubeconfig(tmp_path / "config", user)])
    assert "hunter2" not in str(raised.value)


def test_a_yaml_error_names_the_line_but_never_quotes_it(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("users:\n- name: u\n  user:\n    token: s3cr3t-token-value\n    : [unbalanced\n")
    with pytest.raises(RegistryError, match=r"not valid YAML at line \d") as raised:
        load_kubeconfig([path])
    assert "s3cr3t" not in str(raised.value)


def test_no_configuration_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(RegistryError, match="no Kubernetes configuration"):
        load_config(environ={})


def test_in_cluster_configuration(tmp_path: Path, make_kube_apiserver: Callable[..., KubeApiServer]) -> None:
    server = make_kube_apiserver(tls=True)
    assert server.tls is not None
    (tmp_path / "token").write_text("sa-token\n")
    shutil.copy(server.tls.ca_file, tmp_path / "ca.crt")
    (tmp_path / "namespace").write_text("pod-ns\n")
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"}
    config = load_config(environ=env, service_account_dir=tmp_path)
    assert config.server == "https://127.0.0.1:6443"
    assert config.token_file == tmp_path / "token"
    assert config.namespace == "pod-ns"
    assert config.source == "in-cluster service account"
    # KUBECONFIG, when set, wins even in a pod.
    kubeconfig = _write_kubeconfig(tmp_path / "config", {"token": "t"})
    assert load_config(environ={**env, "KUBECONFIG": str(kubeconfig)}, service_account_dir=tmp_path).token == "t"
    ipv6 = load_config(environ={**env, "KUBERNETES_SERVICE_HOST": "fd00::1"}, service_account_dir=tmp_path)
    assert ipv6.server == "https://[fd00::1]:6443"
    (tmp_path / "token").unlink()
    with pytest.raises(RegistryError, match="is a service account token mounted"):
        load_config(environ=env, service_account_dir=tmp_path)


async def test_in_cluster_end_to_end_with_token_rotation(
    tmp_path: Path, make_kube_apiserver: Callable[..., KubeApiServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_kube_apiserver(tls=True)
    assert server.tls is not None
    namespace = server.new_namespace()
    (tmp_path / "token").write_text(server.token)
    shutil.copy(server.tls.ca_file, tmp_path / "ca.crt")
    (tmp_path / "namespace").write_text(namespace)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", server.url.rsplit(":", 1)[1])
    monkeypatch.setattr(kube_config, "SERVICE_ACCOUNT_DIR", tmp_path)

    registry = await open_registry("kubernetes://")  # the pod's own namespace
    try:
        assert registry.url_for_logs == f"kubernetes://{namespace}"
        await registry.set_status(_name(), Status.DOWNLOADED)
        # The kubelet rotates the token: the old one stops working, the file holds the new one.
        (tmp_path / "token").write_text("rotated-token")
        server.tokens = {"rotated-token"}
        assert await registry.get_status(_name()) is Status.DOWNLOADED
    finally:
        await registry.aclose()
    assert server.objects(ENTRIES.plural, namespace)


@pytest.mark.parametrize("inline", [False, True], ids=["files", "inline-data"])
async def test_client_certificate_and_ca_from_kubeconfig(
    tmp_path: Path,
    make_kube_apiserver: Callable[..., KubeApiServer],
    monkeypatch: pytest.MonkeyPatch,
    inline: bool,
) -> None:
    server = make_kube_apiserver(tls=True)
    namespace = server.new_namespace()
    path = server.kubeconfig(tmp_path / "kubeconfig", namespace=namespace, auth="cert", inline=inline)
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where inline key material passes through
    tempfile.tempdir = None  # make tempfile read TMPDIR again
    try:
        registry = await open_registry("kubernetes://")  # the context's namespace
        try:
            assert await registry.try_claim(_name(), "me", LONG_LEASE) == Claimed()
        finally:
            await registry.aclose()
    finally:
        tempfile.tempdir = None
    assert set(server.cert_users) == {"mxfs-node"}
    left = await trio.to_thread.run_sync(lambda: list(tmp_path.iterdir()))
    assert left == [path], "inline key material must not be left on disk"


async def test_token_file_from_kubeconfig_over_tls(
    tmp_path: Path, make_kube_apiserver: Callable[..., KubeApiServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_kube_apiserver(tls=True)
    namespace = server.new_namespace()
    monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig", auth="token-file", inline=True)))
    registry = await open_registry(f"kubernetes://{namespace}")
    try:
        await registry.touch(_name())
    finally:
        await registry.aclose()
    assert not server.cert_users


async def test_an_untrusted_server_certificate_is_refused(
    tmp_path: Path, make_kube_apiserver: Callable[..., KubeApiServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_kube_apiserver(tls=True)
    path = server.kubeconfig(tmp_path / "kubeconfig")
    doc = yaml.safe_load(path.read_text())
    del doc["clusters"][0]["cluster"]["certificate-authority"]  # trust the system's CAs only
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("KUBECONFIG", str(path))
    with pytest.raises(RegistryError, match="cannot reach the API server") as raised:
        await open_registry(f"kubernetes://{server.new_namespace()}")
    assert server.token not in str(raised.value)


# -- errors and secrets --------------------------------------------------------------------------


async def test_a_rejected_token_is_reported_without_the_token(
    kube_target: KubeTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "wrong-" + "s3cr3t" * 4
    path = kube_target.server.kubeconfig(tmp_path / "wrong", token=wrong)
    monkeypatch.setenv("KUBECONFIG", str(path))
    with pytest.raises(RegistryError, match="401 Unauthorized") as raised:
        await open_registry(kube_target.url)
    assert "s3cr3t" not in str(raised.value)
    assert "rejected the credentials" in str(raised.value)


async def test_tokens_never_reach_logs_or_reprs(
    kube_target: KubeTarget, open_kube: OpenKube, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx2 and httpcore2 trace every request at this level
    registry, other = await open_kube(), await open_kube()
    name = _name()
    assert await registry.try_claim(name, "me", LONG_LEASE) == Claimed()
    await other.try_claim(name, "other", LONG_LEASE)
    assert await registry.finish_claim(name, "me", Status.DOWNLOADED)
    await registry.list_by_last_used()
    assert await registry.try_lock("evict", "me", 5)
    kube_target.server.forbid("delete", LEASES.plural, kube_target.namespace)
    with pytest.raises(RegistryError, match=r"deploy/rbac\.yaml") as raised:
        await registry.unlock("evict", "me")
    token = kube_target.server.token
    assert "send_request_headers" in caplog.text, "the transport's debug trace was captured"
    for text in (caplog.text, repr(registry), str(raised.value)):
        assert token not in text


async def test_a_password_in_the_server_url_is_not_echoed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = _write_kubeconfig(tmp_path / "config", {"token": "t"}, server=f"http://admin:hunter2@127.0.0.1:{port}")
    monkeypatch.setenv("KUBECONFIG", str(path))
    with pytest.raises(RegistryError, match="cannot reach the API server") as raised:
        await open_registry("kubernetes://ns")
    assert "hunter2" not in str(raised.value)
    assert "admin:***@" in str(raised.value)


async def test_a_missing_crd_is_reported_with_the_fix(
    make_kube_apiserver: Callable[..., KubeApiServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_kube_apiserver()
    server.unserve(ENTRIES.plural)
    monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig")))
    with pytest.raises(RegistryError, match=r"404 NotFound.*deploy/crd\.yaml"):
        await open_registry("kubernetes://ns")


async def test_a_missing_namespace_is_reported(kube_apiserver: KubeApiServer, open_kube: OpenKube) -> None:
    registry = await open_kube("kubernetes://no-such-namespace")
    assert await registry.get_record(_name()) is None  # reads of an absent namespace are empty
    with pytest.raises(RegistryError, match=r'namespaces "no-such-namespace" not found.*namespace exist'):
        await registry.try_claim(_name(), "me", LONG_LEASE)


async def test_an_unreachable_server(
    make_kube_apiserver: Callable[..., KubeApiServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_kube_apiserver()
    monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path / "kubeconfig")))
    registry = await open_registry(f"kubernetes://{server.new_namespace()}")
    try:
        server.stop()
        with pytest.raises(RegistryError, match="cannot reach the API server"):
            await registry.touch(_name())
    finally:
        await registry.aclose()
    with pytest.raises(RegistryError, match="is closed"):
        await registry.get_status(_name())


# -- an overloaded or failing API server: retried, bounded -----------------------------------------


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_api, "API_RETRY", dataclasses.replace(kube_api.API_RETRY, initial_delay=0.01))


def _requests(target: KubeTarget, verb: str) -> int:
    return sum(c.verb == verb and c.namespace == target.namespace for c in target.server.calls)


async def test_throttling_and_server_errors_are_retried(
    kube_target: KubeTarget, open_kube: OpenKube, quick_backoff: None
) -> None:
    registry = await open_kube()
    name = _name()
    kube_target.server.overload(2, 429, retry_after=0)
    kube_target.server.overload(1, 503, method="POST")
    assert await registry.try_claim(name, "owner", LONG_LEASE) == Claimed()
    assert _stored(kube_target, name)["status"]["claimId"] == "owner"
    kube_target.server.overload(1, 500, method="PUT")
    assert await registry.finish_claim(name, "owner", Status.DOWNLOADED, size_bytes=10)
    assert await registry.get_status(name) is Status.DOWNLOADED


async def test_retry_after_is_honoured(kube_target: KubeTarget, open_kube: OpenKube) -> None:
    registry = await open_kube()
    kube_target.server.overload(1, 429, retry_after=1)
    started = time.monotonic()
    assert await registry.get_record(_name()) is None
    assert time.monotonic() - started >= 0.9, "retried before the server's Retry-After"


async def test_a_write_applied_before_its_answer_was_lost_counts_as_done(
    kube_target: KubeTarget, open_kube: OpenKube, quick_backoff: None
) -> None:
    owner, other = await open_kube(), await open_kube()
    name = _name()
    # The create lands, its answer is lost, the retry meets our own object (409 AlreadyExists).
    kube_target.server.overload(1, 504, method="POST", after_apply=True)
    assert await owner.try_claim(name, "owner", LONG_LEASE) == Claimed()
    assert await other.try_claim(name, "other", LONG_LEASE) == AlreadyExists(Status.DOWNLOADING)
    # Same for a fenced update: the retry's 409 is our own write.
    kube_target.server.overload(1, 503, method="PUT", after_apply=True)
    assert await owner.refresh_claim(name, "owner", LONG_LEASE)
    kube_target.server.overload(1, 503, method="PUT", after_apply=True)
    assert await owner.finish_claim(name, "owner", Status.DOWNLOADED, size_bytes=10)
    status = _stored(kube_target, name)["status"]
    assert status["phase"] == "Downloaded" and status["sizeBytes"] == 10
    assert not await owner.finish_claim(name, "owner", Status.ERROR), "a finished claim cannot finish again"


async def test_a_server_that_stays_overloaded_is_an_error_after_bounded_retries(
    kube_target: KubeTarget, open_kube: OpenKube, quick_backoff: None
) -> None:
    registry = await open_kube()
    before = _requests(kube_target, "get")
    kube_target.server.overload(kube_api.API_RETRY.attempts, 503)
    with pytest.raises(RegistryError, match=r"503"):
        await registry.get_record(_name())
    assert _requests(kube_target, "get") == before  # every try was turned away before reaching the store
    assert await registry.get_record(_name()) is None  # and the next call works again


# -- lost races: 409 and re-read -----------------------------------------------------------------


async def test_touch_retries_after_another_writer_and_lands_after_it(
    kube_target: KubeTarget, open_kube: OpenKube
) -> None:
    registry = await open_kube()
    name = _name()
    await registry.set_status(name, Status.DOWNLOADED, "kept")
    theirs = datetime.now(UTC) + timedelta(seconds=5)  # a node whose clock runs ahead

    def other_touch(obj: dict[str, Any]) -> None:
        obj["status"]["lastUsedAt"] = theirs.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    kube_target.server.interfere(ENTRIES.plural, kube_target.namespace, entry_object_name(name), other_touch)
    await registry.touch(name)
    record = await registry.get_record(name)
    assert record is not None
    assert record.last_used_at > theirs - timedelta(milliseconds=1)
    assert record.message == "kept"
    updates = [c for c in kube_target.server.calls if c.verb == "update" and c.namespace == kube_target.namespace]
    assert len(updates) == 2, "one update lost the race (409), the retry on a fresh read won"


async def test_a_write_that_lost_the_race_does_not_overwrite_the_winner(
    kube_target: KubeTarget, open_kube: OpenKube
) -> None:
    registry = await open_kube()
    name = _name()
    await registry.set_status(name, Status.DOWNLOADED)
    kube_target.server.interfere(
        ENTRIES.plural,
        kube_target.namespace,
        entry_object_name(name),
        lambda obj: obj["status"].update(message="the winner's"),
    )
    assert await registry.set_pinned(name, True)
    record = await registry.get_record(name)
    assert record is not None and record.pinned and record.message == "the winner's"


async def test_finish_is_fenced_by_a_takeover_between_read_and_write(
    kube_target: KubeTarget, open_kube: OpenKube
) -> None:
    registry = await open_kube()
    name = _name()
    assert await registry.try_claim(name, "old", LONG_LEASE) == Claimed()
    kube_target.server.interfere(
        ENTRIES.plural, kube_target.namespace, entry_object_name(name), lambda obj: obj["status"].update(claimId="new")
    )
    assert await registry.finish_claim(name, "old", Status.DOWNLOADED) is False
    record = await registry.get_record(name)
    assert record is not None and record.status is Status.DOWNLOADING and record.claim_id == "new"


async def test_delete_if_unchanged_is_fenced_by_resource_version(kube_target: KubeTarget, open_kube: OpenKube) -> None:
    registry = await open_kube()
    name = _name()
    await registry.set_status(name, Status.DOWNLOADED)
    [record] = await registry.list_by_last_used()
    kube_target.server.interfere(
        ENTRIES.plural,
        kube_target.namespace,
        entry_object_name(name),
        lambda obj: obj["status"].update(lastUsedAt="2099-01-01T00:00:00.000Z"),
    )
    assert await registry.delete_if_unchanged(name, record.status, record.last_used_at) is False
    assert await registry.get_record(name) is not None


async def test_concurrent_touches_from_many_nodes_all_land(kube_target: KubeTarget, open_kube: OpenKube) -> None:
    clients = [await open_kube() for _ in range(8)]
    name = _name()
    await clients[0].set_status(name, Status.DOWNLOADED)
    before = await clients[0].get_record(name)
    async with trio.open_nursery() as nursery:
        for client in clients:
            for _ in range(3):
                nursery.start_soon(client.touch, name)
    after = await clients[0].get_record(name)
    assert before is not None and after is not None
    # Every touch moved lastUsedAt at least 1 ms past the one it replaced.
    assert after.last_used_at >= before.last_used_at + timedelta(milliseconds=24)


# -- leases on the local clock -------------------------------------------------------------------


async def test_lease_observer_counts_from_the_first_sighting(mock_clock: MockClock) -> None:
    observer = LeaseObserver()
    assert observer.unchanged_for("e", ("a", "t1")) == 0
    mock_clock.jump(5)
    assert observer.unchanged_for("e", ("a", "t1")) == 5
    assert observer.unchanged_for("e", ("a", "t2")) == 0  # the owner wrote: start again
    mock_clock.jump(3)
    assert observer.unchanged_for("e", ("a", "t2")) == 3
    observer.forget("e")
    assert observer.unchanged_for("e", ("a", "t2")) == 0


async def test_takeover_waits_for_a_whole_lease_of_silence_on_our_clock(
    mock_clock: MockClock, open_kube: OpenKube
) -> None:
    owner, watcher, latecomer = await open_kube(), await open_kube(), await open_kube()
    name = _name()
    assert await owner.try_claim(name, "owner", 60) == Claimed()
    assert await watcher.try_claim(name, "w", 60) == AlreadyExists(Status.DOWNLOADING)

    mock_clock.jump(59)
    assert await watcher.try_claim(name, "w", 60) == AlreadyExists(Status.DOWNLOADING)
    assert await owner.refresh_claim(name, "owner", 60)  # a heartbeat: the watcher starts again
    assert await watcher.get_status(name) is Status.DOWNLOADING  # ...from when it sees it
    mock_clock.jump(59)
    assert await watcher.try_claim(name, "w", 60) == AlreadyExists(Status.DOWNLOADING)
    mock_clock.jump(2)
    # The latecomer sees the record for the first time: for it the silence has only begun.
    assert await latecomer.try_claim(name, "late", 60) == AlreadyExists(Status.DOWNLOADING)
    assert await watcher.try_claim(name, "w", 60) == Claimed()
    assert await owner.refresh_claim(name, "owner", 60) is False


async def test_polling_the_status_counts_as_watching(mock_clock: MockClock, open_kube: OpenKube) -> None:
    owner, waiter = await open_kube(), await open_kube()
    name = _name()
    assert await owner.try_claim(name, "owner", 10) == Claimed()
    assert await waiter.get_status(name) is Status.DOWNLOADING  # how a node waits on a download
    mock_clock.jump(10)
    assert await waiter.try_claim(name, "waiter", 10) == Claimed()


@pytest.mark.parametrize("skew", [timedelta(days=-3650), timedelta(days=3650)], ids=["behind", "ahead"])
async def test_the_owners_clock_does_not_matter(
    mock_clock: MockClock, kube_target: KubeTarget, open_kube: OpenKube, skew: timedelta
) -> None:
    owner, other = await open_kube(), await open_kube()
    name = _name()
    assert await owner.try_claim(name, "owner", 30) == Claimed()

    def skewed(obj: dict[str, Any]) -> None:
        obj["status"]["leaseExpiresAt"] = (datetime.now(UTC) + skew).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    kube_target.server.interfere(ENTRIES.plural, kube_target.namespace, entry_object_name(name), skewed)
    await owner.touch(name)  # the interference lands first; the touch retries on top of it
    assert await other.try_claim(name, "other", 30) == AlreadyExists(Status.DOWNLOADING)
    mock_clock.jump(29)
    assert await other.try_claim(name, "other", 30) == AlreadyExists(Status.DOWNLOADING)
    mock_clock.jump(1)
    assert await other.try_claim(name, "other", 30) == Claimed()


async def test_two_takers_of_a_lapsed_lease_have_one_winner(mock_clock: MockClock, open_kube: OpenKube) -> None:
    owner, a, b = await open_kube(), await open_kube(), await open_kube()
    name = _name()
    assert await owner.try_claim(name, "owner", 5) == Claimed()
    for taker, claim_id in ((a, "a"), (b, "b")):
        assert await taker.try_claim(name, claim_id, 5) == AlreadyExists(Status.DOWNLOADING)
    mock_clock.jump(6)
    outcomes: dict[str, object] = {}

    async def take(taker: KubernetesRegistry, claim_id: str) -> None:
        outcomes[claim_id] = await taker.try_claim(name, claim_id, 5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, a, "a")
        nursery.start_soon(take, b, "b")
    assert sorted(outcomes.values(), key=repr) == [AlreadyExists(Status.DOWNLOADING), Claimed()]


async def test_downloading_without_a_lease_is_never_taken_over(mock_clock: MockClock, open_kube: OpenKube) -> None:
    registry = await open_kube()
    name = _name()
    await registry.set_status(name, Status.DOWNLOADING, "written by an operator")
    assert await registry.try_claim(name, "me", 1) == AlreadyExists(Status.DOWNLOADING)
    mock_clock.jump(3600)
    assert await registry.try_claim(name, "me", 1) == AlreadyExists(Status.DOWNLOADING)


async def test_a_lease_of_unknown_length_is_judged_by_the_callers_lease(
    mock_clock: MockClock, kube_target: KubeTarget, open_kube: OpenKube
) -> None:
    owner, other = await open_kube(), await open_kube()
    name = _name()
    assert await owner.try_claim(name, "owner", 1000) == Claimed()
    kube_target.server.interfere(
        ENTRIES.plural,
        kube_target.namespace,
        entry_object_name(name),
        lambda obj: obj["status"].pop("leaseDurationSeconds"),
    )
    await owner.touch(name)
    assert await other.try_claim(name, "other", 20) == AlreadyExists(Status.DOWNLOADING)
    mock_clock.jump(20)
    assert await other.try_claim(name, "other", 20) == Claimed()


async def test_locks_are_leases_taken_over_after_their_ttl_on_our_clock(
    mock_clock: MockClock, kube_target: KubeTarget, open_kube: OpenKube
) -> None:
    a, b = await open_kube(), await open_kube()
    assert await a.try_lock("evict", "node-a", 60.5)
    [lease] = kube_target.server.objects(LEASES.plural, kube_target.namespace).values()
    assert lease["metadata"]["name"] == lock_object_name("evict")
    assert lease["spec"]["holderIdentity"] == "node-a"
    assert lease["spec"]["leaseDurationSeconds"] == 61
    assert lease["metadata"]["annotations"][LOCK_TTL_ANNOTATION] == "60.5"
    assert not kube_target.server.objects(ENTRIES.plural, kube_target.namespace)

    assert not await b.try_lock("evict", "node-b", 60)
    mock_clock.jump(60)
    assert not await b.try_lock("evict", "node-b", 60)  # 60 s of silence, the ttl is 60.5
    mock_clock.jump(1)
    assert await b.try_lock("evict", "node-b", 60)
    [lease] = kube_target.server.objects(LEASES.plural, kube_target.namespace).values()
    assert lease["spec"]["holderIdentity"] == "node-b"
    assert lease["spec"]["leaseTransitions"] == 1
    assert not await a.unlock("evict", "node-a")
    assert await b.unlock("evict", "node-b")
    assert not kube_target.server.objects(LEASES.plural, kube_target.namespace)


# -- peer holders --------------------------------------------------------------------------------


def _holders_maps(target: KubeTarget) -> dict[str, dict[str, Any]]:
    maps = target.server.objects(CONFIG_MAPS.plural, target.namespace)
    return {name: obj for name, obj in maps.items() if name.startswith("mxfs-holders-")}


async def test_holders_live_in_a_labelled_config_map_per_entry_that_goes_with_the_last_holder(
    kube_target: KubeTarget, open_kube: OpenKube
) -> None:
    a, b = await open_kube(), await open_kube()
    name = _name()
    await a.put_holder(name, "http://10.0.0.5:7170", "http://10.0.0.5:7170", True, 60.5)
    await b.put_holder(name, "node-b", "http://10.0.0.6:7170", False, LONG_LEASE)
    [(cm_name, cm)] = _holders_maps(kube_target).items()
    assert cm_name == holders_object_name(name)
    assert DNS1123_SUBDOMAIN.fullmatch(cm_name) and len(cm_name) <= 253
    assert cm["metadata"]["labels"] == {MANAGED_BY_LABEL: MANAGED_BY, COMPONENT_LABEL: HOLDERS_COMPONENT}
    assert cm["metadata"]["annotations"] == {HOLDERS_ENTRY_ANNOTATION: name}
    assert set(cm["data"]) == {holder_key("http://10.0.0.5:7170"), holder_key("node-b")}
    stored = json.loads(cm["data"][holder_key("http://10.0.0.5:7170")])
    assert RFC3339_MS_Z.fullmatch(stored.pop("expiresAt"))
    assert stored == {
        "node": "http://10.0.0.5:7170",
        "address": "http://10.0.0.5:7170",
        "complete": True,
        "ttlSeconds": 60.5,
    }
    # Not entries: no ModelCacheEntry was written.
    assert not kube_target.server.objects(ENTRIES.plural, kube_target.namespace)

    await a.drop_holder(name, "http://10.0.0.5:7170")
    assert set(_holders_maps(kube_target)[cm_name]["data"]) == {holder_key("node-b")}
    await a.drop_holder(name, "node-b")
    assert _holders_maps(kube_target) == {}
    assert await b.holders(name) == []


async def test_holders_expire_after_their_ttl_of_silence_on_our_clock(
    mock_clock: MockClock, kube_target: KubeTarget, open_kube: OpenKube
) -> None:
    node, watcher, latecomer = await open_kube(), await open_kube(), await open_kube()
    name = _name()
    await node.put_holder(name, "node", "http://10.0.0.5:7170", True, 60)
    [seen] = await watcher.holders(name)
    assert seen.expires_at - datetime.now(UTC) > timedelta(seconds=58)
    mock_clock.jump(59)
    [still] = await watcher.holders(name)
    # What is left of the ttl in the watcher's eyes, on its wall clock.
    assert still.expires_at - datetime.now(UTC) < timedelta(seconds=2)
    await node.put_holder(name, "node", "http://10.0.0.5:7170", True, 60)  # a refresh: the watcher starts again
    assert len(await watcher.holders(name)) == 1
    mock_clock.jump(59)
    assert len(await watcher.holders(name)) == 1
    mock_clock.jump(2)
    # The latecomer sees the holder for the first time: for it the silence has only begun.
    assert len(await latecomer.holders(name)) == 1
    assert await watcher.holders(name) == []
    # The watcher removed it, and with it the ConfigMap.
    assert _holders_maps(kube_target) == {}
    assert await latecomer.holders(name) == []

    # The writer's own put is its first sighting: its ttl runs from the put.
    await node.put_holder(name, "node", "http://10.0.0.5:7170", True, 60)
    mock_clock.jump(61)
    assert await node.holders(name) == []


async def test_a_holder_refresh_within_the_same_millisecond_still_counts(
    mock_clock: MockClock, monkeypatch: pytest.MonkeyPatch, open_kube: OpenKube
) -> None:
    node, watcher = await open_kube(), await open_kube()
    name = _name()
    frozen = datetime(2026, 4, 22, 10, 0, 0, 123000, tzinfo=UTC)
    monkeypatch.setattr(kube_registry, "_now", lambda: frozen)  # both puts read one wall-clock millisecond
    await node.put_holder(name, "node", "http://10.0.0.5:7170", True, 60)
    assert len(await watcher.holders(name)) == 1
    mock_clock.jump(59)
    await node.put_holder(name, "node", "http://10.0.0.5:7170", True, 60)
    mock_clock.jump(2)
    assert len(await watcher.holders(name)) == 1


async def test_a_holders_map_of_another_entry_under_our_name_is_an_error(
    kube_target: KubeTarget, open_kube: OpenKube
) -> None:
    registry = await open_kube()
    name = _name()
    await registry.put_holder(name, "node", "http://10.0.0.5:7170", True, LONG_LEASE)
    kube_target.server.interfere(
        CONFIG_MAPS.plural,
        kube_target.namespace,
        holders_object_name(name),
        lambda obj: obj["metadata"]["annotations"].update({HOLDERS_ENTRY_ANNOTATION: "someone else"}),
    )
    # The refresh meets the change (409), reads again, and overwrites nothing it cannot vouch for.
    with pytest.raises(RegistryError, match="belongs to 'someone else'"):
        await registry.put_holder(name, "node", "http://10.0.0.5:7170", True, LONG_LEASE)
    with pytest.raises(RegistryError, match="belongs to 'someone else'"):
        await registry.holders(name)
    with pytest.raises(RegistryError, match="belongs to 'someone else'"):
        await registry.drop_holder(name, "node")


# -- a real mount --------------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@requires_fuse
def test_mount_serves_a_model_through_the_kubernetes_registry(
    hub: Any, new_repo_id: Callable[[], str], mxfs_mount: Callable[..., MountedFs], kube_target: KubeTarget
) -> None:
    repo = new_repo_id()
    files = {"config.json": b'{"registry": "kubernetes"}', "model.safetensors": random.Random(8).randbytes(1_500_000)}
    hub.add_repo(repo, files)
    mount = mxfs_mount("--registry", kube_target.url, env=kube_target.env)
    for name, data in files.items():
        assert _read(mount / repo / name) == data
    # The owner publishes the outcome once the whole entry is in the cache, maybe after the reads.
    deadline = time.monotonic() + 20
    while True:
        [obj] = kube_target.server.objects(ENTRIES.plural, kube_target.namespace).values()
        if obj["status"]["phase"] != "Downloading" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert obj["spec"]["modelName"].rsplit(":", 1)[1] == repo
    assert obj["status"]["phase"] == "Downloaded", mount.log()[-3000:]
    assert obj["status"]["sizeBytes"] >= sum(map(len, files.values()))
    assert kube_target.server.token not in mount.log()


# -- the watch -----------------------------------------------------------------------------------


async def test_the_stand_in_watch_streams_changes_in_order_and_expires(
    kube_target: KubeTarget, open_kube: OpenKube
) -> None:
    """The stand-in's watch, as a real server's: events after a version, in order; 410 once compacted."""
    registry, writer = await open_kube(), await open_kube()
    api = registry._api
    _, start = await api.list_at(ENTRIES)
    name = _name()
    assert await writer.try_claim(name, "a", LONG_LEASE) == Claimed()
    assert await writer.finish_claim(name, "a", Status.DOWNLOADED)
    await writer.delete(name)
    events = []
    with trio.fail_after(10):
        async for event in api.watch(ENTRIES, start, 1):
            events.append(event)
    kinds = [e["type"] for e in events]
    assert kinds == ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and len(set(versions[:3])) == 3
    assert events[1]["object"]["status"]["phase"] == PHASES[Status.DOWNLOADED]

    kube_target.server.expire_watches()
    with trio.fail_after(10):
        [gone] = [event async for event in api.watch(ENTRIES, start, 30)]
    assert gone["type"] == "ERROR" and gone["object"]["code"] == 410


async def _listen(registry: KubernetesRegistry, nursery: trio.Nursery) -> list[str]:
    """Start ``listen_finished``; the list of names it reports, as it reports them."""
    heard: list[str] = []
    await nursery.start(registry.listen_finished, heard.append)
    return heard


async def _until(condition: Callable[[], bool], seconds: float = 20) -> None:
    """Wait (a bounded while, on the real clock: the watch runs over real HTTP) until ``condition``.

    Polled: part of what it looks at is the stand-in's state, changed by its threads.
    """
    with trio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_waiters_hear_a_finish_through_the_watch_not_by_polling(
    kube_target: KubeTarget, open_kube: OpenKube
) -> None:
    listener, owner = await open_kube(), await open_kube()
    server = kube_target.server
    done, failed, running = _name(1), _name(2), _name(3)
    assert await owner.try_claim(done, "o", LONG_LEASE) == Claimed()
    assert await owner.finish_claim(done, "o", Status.DOWNLOADED)  # before the listener: the listing says so
    async with trio.open_nursery() as nursery:
        heard = await _listen(listener, nursery)
        await _until(lambda: done in heard and server.open_watches() == 1)
        calls_before = len(server.calls)

        assert await owner.try_claim(failed, "o", LONG_LEASE) == Claimed()
        assert await owner.try_claim(running, "o", LONG_LEASE) == Claimed()
        assert await owner.refresh_claim(running, "o", LONG_LEASE)
        assert await owner.finish_claim(failed, "o", Status.ERROR, "boom")
        await _until(lambda: failed in heard)
        assert running not in heard  # claimed and renewed, never finished
        # The listener made no request of its own meanwhile: the one open watch brought the news.
        assert [c for c in server.calls[calls_before:] if c.verb in ("list", "watch")] == []
        nursery.cancel_scope.cancel()
    assert heard.count(failed) == 1


async def test_an_expired_watch_is_resumed_and_a_compacted_one_relisted(
    kube_target: KubeTarget, open_kube: OpenKube
) -> None:
    listener, owner = await open_kube(), await open_kube()
    server = kube_target.server
    first, second, third = _name(1), _name(2), _name(3)
    async with trio.open_nursery() as nursery:
        heard = await _listen(listener, nursery)
        await _until(lambda: server.open_watches() == 1)
        started = server.watches_started

        # The server ends the watch without forgetting history: resumed from the last version.
        server.expire_watches(compact=False)
        assert await owner.try_claim(first, "o", LONG_LEASE) == Claimed()
        assert await owner.finish_claim(first, "o", Status.DOWNLOADED)
        await _until(lambda: first in heard)
        assert server.watches_started > started

        # Compacted while the listener was between watches: its version is gone (410), so it
        # lists again, and the listing reports the finish it would otherwise have missed.
        def count(verb: str) -> int:
            return sum(1 for c in server.calls if c.verb == verb and c.namespace == kube_target.namespace)

        lists, watches = count("list"), count("watch")
        refused = ("watch", ENTRIES.plural, kube_target.namespace)
        server.forbid(*refused)  # the next watch is refused: the listener backs off
        server.expire_watches(compact=False)
        await _until(lambda: count("watch") > watches)
        assert await owner.try_claim(second, "o", LONG_LEASE) == Claimed()
        assert await owner.finish_claim(second, "o", Status.DOWNLOADED)
        server.expire_watches(compact=True)
        server.forbidden.discard(refused)
        await _until(lambda: second in heard)
        assert count("list") > lists

        assert await owner.try_claim(third, "o", LONG_LEASE) == Claimed()
        assert await owner.finish_claim(third, "o", Status.ERROR, "boom")
        await _until(lambda: third in heard)
        nursery.cancel_scope.cancel()
