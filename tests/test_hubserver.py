"""FakeHub must look like the Hub to the real huggingface_hub client, and its faults must be observable."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, hf_hub_download, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils import hf_raise_for_status

try:
    from tests.hubserver import FakeHub
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from hubserver import FakeHub  # type: ignore[no-redef]

TOKEN = "hf_valid_test_token"
CONFIG = json.dumps({"model_type": "bert", "hidden_size": 8}).encode()


@pytest.fixture
def hub():
    with FakeHub(valid_tokens={TOKEN}) as h:
        yield h
    assert h.server_errors == []


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


def blob(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d-%d" % (seed, i)).digest()
        i += 1
    return bytes(out[:n])


def nested_files() -> dict[str, bytes]:
    return {
        "config.json": CONFIG,
        "README.md": b"# test model\n",
        "model.safetensors": blob(50_000, 1),
        "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
        "tokenizer/vocab.txt": b"[PAD]\n[UNK]\nhello\n",
        "tokenizer/special tokens map.json": b"{}",
        "onnx/model.onnx": blob(3000, 2),
        "onnx/deep/er/notes.txt": b"deep",
    }


def dl(hub: FakeHub, cache: Path, repo_id: str, filename: str, **kw) -> bytes:
    kw.setdefault("token", False)
    path = hf_hub_download(repo_id, filename, cache_dir=cache, endpoint=hub.endpoint, **kw)
    return Path(path).read_bytes()


# --------------------------------------------------------------------------------------------------
# Hub API compatibility
# --------------------------------------------------------------------------------------------------


def test_model_info_and_repo_info(hub: FakeHub) -> None:
    files = nested_files()
    date = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    sha = hub.add_repo("org/info", files, commit_date=date)
    assert len(sha) == 40 and int(sha, 16) >= 0
    api = HfApi(endpoint=hub.endpoint, token=False)

    info = api.model_info("org/info")
    assert info.id == "org/info"
    assert info.sha == sha
    assert info.last_modified == date
    assert info.private is False and info.gated is False
    assert sorted(s.rfilename for s in info.siblings) == sorted(files)
    assert all(s.size is None for s in info.siblings)

    meta = {s.rfilename: s for s in api.model_info("org/info", files_metadata=True).siblings}
    for name, content in files.items():
        assert meta[name].size == len(content)
    st = meta["model.safetensors"]
    assert st.lfs is not None and st.lfs.sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert st.lfs.size == 50_000
    cfg = meta["config.json"]
    assert cfg.lfs is None
    assert cfg.blob_id == hashlib.sha1(b"blob %d\0" % len(CONFIG) + CONFIG).hexdigest()

    assert api.repo_info("org/info", revision="main").sha == sha
    assert api.repo_exists("org/info") and not api.repo_exists("org/nope")
    assert api.file_exists("org/info", "1_Pooling/config.json")
    assert not api.file_exists("org/info", "missing.bin")
    expanded = api.model_info("org/info", expand=["sha", "lastModified"])
    assert expanded.sha == sha and expanded.siblings is None


def test_list_repo_tree_paginates(hub: FakeHub) -> None:
    files = {f"d{i % 3}/sub{i % 2}/f{i}.txt": b"x" * i for i in range(12)}
    files["top.bin"] = blob(100)
    hub.add_repo("org/tree", files)
    hub.tree_page_size = 4
    api = HfApi(endpoint=hub.endpoint, token=False)

    entries = list(api.list_repo_tree("org/tree", recursive=True))
    file_paths = sorted(e.path for e in entries if isinstance(e, RepoFile))
    dir_paths = sorted(e.path for e in entries if isinstance(e, RepoFolder))
    assert file_paths == sorted(files)
    assert dir_paths == sorted({"d0", "d1", "d2"} | {f"d{i % 3}/sub{i % 2}" for i in range(12)})
    pages = hub.requests("GET", "api", "org/tree")
    assert len(pages) == -(-len(entries) // 4) > 3
    assert all("/tree/main" in r.path for r in pages)
    by_path = {e.path: e for e in entries}
    assert by_path["d1/sub0/f4.txt"].size == 4
    assert by_path["top.bin"].lfs is not None and by_path["top.bin"].lfs.size == 100

    top = list(api.list_repo_tree("org/tree"))
    assert sorted(e.path for e in top) == ["d0", "d1", "d2", "top.bin"]
    sub = list(api.list_repo_tree("org/tree", path_in_repo="d1"))
    assert sorted(e.path for e in sub) == ["d1/sub0", "d1/sub1"]
    assert sorted(api.list_repo_files("org/tree")) == sorted(files)
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("org/tree", path_in_repo="nope"))


def test_tree_expand_last_commit_and_paths_info(hub: FakeHub) -> None:
    first = hub.add_repo("org/exp", {"a.txt": b"a", "dir/b.txt": b"b"}, commit_date="2024-01-01T00:00:00Z")
    second = hub.commit("org/exp", {"a.txt": b"a2"}, message="update a", commit_date="2024-02-01T00:00:00Z")
    api = HfApi(endpoint=hub.endpoint, token=False)
    entries = {e.path: e for e in api.list_repo_tree("org/exp", recursive=True, expand=True)}
    assert entries["a.txt"].last_commit.oid == second
    assert entries["a.txt"].last_commit.title == "update a"
    assert entries["dir/b.txt"].last_commit.oid == first
    assert entries["dir"].last_commit.oid == first
    infos = api.get_paths_info("org/exp", ["a.txt", "dir", "missing"], revision=first)
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "a.txt"), ("RepoFolder", "dir")]
    refs = api.list_repo_refs("org/exp")
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", second)]


def test_hf_hub_download_small_and_lfs(hub: FakeHub, cache: Path) -> None:
    files = nested_files()
    sha = hub.add_repo("org/dl", files)
    assert dl(hub, cache, "org/dl", "config.json") == CONFIG
    assert dl(hub, cache, "org/dl", "model.safetensors") == files["model.safetensors"]
    assert dl(hub, cache, "org/dl", "tokenizer/special tokens map.json") == b"{}"

    storage = cache / "models--org--dl"
    assert (storage / "refs" / "main").read_text() == sha
    sha256 = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert (storage / "blobs" / sha256).is_file()  # LFS blobs are named by sha256 ...
    assert (storage / "blobs" / hub.file_info("org/dl", "config.json")["etag"]).is_file()  # ... others by oid

    # LFS: HEAD /resolve -> 302 (not followed), then GET on the CDN origin without Authorization.
    resolve = hub.requests(kind="resolve", filename="model.safetensors")
    assert [(r.method, r.status) for r in resolve] == [("HEAD", 302)]
    cdn = hub.requests(kind="cdn", filename="model.safetensors")
    assert [(r.method, r.status, r.server) for r in cdn] == [("GET", 200, "cdn")]
    assert hub.bytes_served("org/dl", "model.safetensors") == 50_000
    assert hub.bytes_served("org/dl", "config.json") == len(CONFIG)

    # A second download is served from the cache: a HEAD only, no body.
    hub.reset_log()
    assert dl(hub, cache, "org/dl", "model.safetensors") == files["model.safetensors"]
    assert [r.method for r in hub.requests()] == ["HEAD"]
    assert hub.bytes_served() == 0


def test_download_without_redirect_and_from_disk(hub: FakeHub, cache: Path, tmp_path: Path) -> None:
    big = tmp_path / "weights.bin"
    data = blob(3 * 1024 * 1024 + 17, 7)
    big.write_bytes(data)
    hub.add_files_from_dir("org/disk", tmp_path, lfs_patterns=["*.bin"])
    hub.lfs_redirect = False
    assert dl(hub, cache, "org/disk", "weights.bin") == data
    assert hub.count(kind="cdn") == 0
    assert [(r.method, r.status) for r in hub.requests(kind="resolve")] == [("HEAD", 200), ("GET", 200)]
    assert hub.bytes_served("org/disk", "weights.bin") == len(data)


def test_snapshot_download_nested_then_offline(hub: FakeHub, cache: Path) -> None:
    files = nested_files()
    sha = hub.add_repo("org/snap", files)
    hub.tree_page_size = 3
    folder = Path(snapshot_download("org/snap", cache_dir=cache, endpoint=hub.endpoint, token=False))
    assert folder == cache / "models--org--snap" / "snapshots" / sha
    for name, content in files.items():
        assert (folder / name).read_bytes() == content
        assert (folder / name).is_symlink()
    for name in files:
        assert hub.bytes_served("org/snap", name) == len(files[name])

    hub.reset_log()
    again = snapshot_download("org/snap", cache_dir=cache, endpoint=hub.endpoint, local_files_only=True)
    assert Path(again) == folder
    assert hub.requests() == []

    info = scan_cache_dir(cache)
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == "org/snap"
    assert repo.nb_files == len(files)
    assert repo.size_on_disk == sum(len(c) for c in files.values())
    assert {r.commit_hash for r in repo.revisions} == {sha}
    assert {ref for r in repo.revisions for ref in r.refs} == {"main"}


def test_revisions_branch_tag_sha_and_moving_branch(hub: FakeHub, cache: Path) -> None:
    first = hub.add_repo("org/rev", {"a.txt": b"v1", "w.safetensors": b"W1"}, tags=["v1.0"])
    second = hub.add_repo("org/rev", {"a.txt": b"v2", "w.safetensors": b"W2", "new.txt": b"n"})
    assert first != second
    api = HfApi(endpoint=hub.endpoint, token=False)
    assert api.model_info("org/rev").sha == second
    assert api.model_info("org/rev", revision="v1.0").sha == first
    assert api.model_info("org/rev", revision=first).sha == first
    assert hub.head("org/rev") == second and hub.head("org/rev", "v1.0") == first

    assert dl(hub, cache, "org/rev", "a.txt") == b"v2"
    assert dl(hub, cache, "org/rev", "a.txt", revision="v1.0") == b"v1"
    assert dl(hub, cache, "org/rev", "w.safetensors", revision=first) == b"W1"
    assert dl(hub, cache, "org/rev", "w.safetensors") == b"W2"
    assert (cache / "models--org--rev" / "refs" / "v1.0").read_text() == first
    with pytest.raises(RemoteEntryNotFoundError):
        dl(hub, cache, "org/rev", "new.txt", revision="v1.0")

    dev = hub.add_repo("org/rev", {"a.txt": b"dev"}, branch="feature/x")
    assert api.model_info("org/rev", revision="feature/x").sha == dev
    assert dl(hub, cache, "org/rev", "a.txt", revision="feature/x") == b"dev"
    assert hub.head("org/rev", "main") == second

    third = hub.commit("org/rev", {"b.txt": b"b"}, delete=["new.txt"])
    assert sorted(api.list_repo_files("org/rev")) == ["a.txt", "b.txt", "w.safetensors"]
    assert dl(hub, cache, "org/rev", "a.txt") == b"v2"
    assert (cache / "models--org--rev" / "refs" / "main").read_text() == third


def test_errors_map_to_huggingface_hub_exceptions(hub: FakeHub, cache: Path) -> None:
    sha = hub.add_repo("org/err", {"a.txt": b"a"})
    api = HfApi(endpoint=hub.endpoint, token=False)

    with pytest.raises(RepositoryNotFoundError) as exc:
        api.model_info("org/missing")
    assert type(exc.value) is RepositoryNotFoundError
    assert hub.requests()[-1].status == 401
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=TOKEN).model_info("org/missing")
    assert hub.requests()[-1].status == 404
    with pytest.raises(RepositoryNotFoundError):
        dl(hub, cache, "org/missing", "a.txt")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing", cache_dir=cache, endpoint=hub.endpoint, token=False)

    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/err", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        dl(hub, cache, "org/err", "a.txt", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        list(api.list_repo_tree("org/err", revision="0" * 40))

    with pytest.raises(RemoteEntryNotFoundError):
        dl(hub, cache, "org/err", "missing.txt")
    # huggingface_hub caches the miss under .no_exist/<X-Repo-Commit>/
    assert (cache / "models--org--err" / ".no_exist" / sha / "missing.txt").exists()


def test_gated_and_private_repos(hub: FakeHub, cache: Path) -> None:
    files = {"config.json": CONFIG, "model.safetensors": blob(2000, 3)}
    hub.add_repo("org/gated", files, gated=True)
    hub.add_repo("org/private", {"a.txt": b"secret"}, private=True)
    api = HfApi(endpoint=hub.endpoint, token=False)
    assert api.model_info("org/gated").gated == "auto"  # metadata stays public, like on the Hub
    assert len(list(api.list_repo_tree("org/gated"))) == 2

    with pytest.raises(GatedRepoError):
        dl(hub, cache, "org/gated", "config.json")
    with pytest.raises(GatedRepoError):
        dl(hub, cache, "org/gated", "config.json", token="hf_wrong")
    with pytest.raises(GatedRepoError):
        snapshot_download("org/gated", cache_dir=cache, endpoint=hub.endpoint, token=False)
    assert hub.requests(kind="resolve")[-1].status == 401

    hub.reset_log()
    assert dl(hub, cache, "org/gated", "model.safetensors", token=TOKEN) == files["model.safetensors"]
    (head,) = hub.requests(kind="resolve")
    (cdn,) = hub.requests(kind="cdn")
    assert head.auth == TOKEN and cdn.auth is None  # the client drops the token for the CDN

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/private")
    with pytest.raises(RepositoryNotFoundError):
        dl(hub, cache, "org/private", "a.txt")
    assert HfApi(endpoint=hub.endpoint, token=TOKEN).model_info("org/private").private is True
    assert dl(hub, cache, "org/private", "a.txt", token=TOKEN) == b"secret"


def test_resolve_headers_and_range_requests(hub: FakeHub) -> None:
    small = blob(1000, 4)
    weights = blob(5000, 5)
    sha = hub.add_repo("org/range", {"small.txt": small, "w.safetensors": weights})
    with httpx2.Client() as c:
        h = c.head(hub.url("org/range", "small.txt"))
        assert h.status_code == 200
        assert h.headers["X-Repo-Commit"] == sha
        assert h.headers["Content-Length"] == "1000"
        assert h.headers["Accept-Ranges"] == "bytes"
        assert h.headers["ETag"] == f'"{hub.file_info("org/range", "small.txt")["oid"]}"'

        h = c.head(hub.url("org/range", "w.safetensors"))
        assert h.status_code == 302
        assert h.headers["X-Linked-Size"] == "5000"
        assert h.headers["X-Linked-Etag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
        assert h.headers["Location"].startswith(hub.cdn_endpoint + "/cdn/")
        for resp in (h, c.get(h.headers["Location"])):
            assert not [k for k in resp.headers if k.lower().startswith("x-xet")]
            assert "link" not in resp.headers

        def get(name: str, rng: str) -> httpx2.Response:
            return c.get(hub.url("org/range", name), headers={"Range": rng}, follow_redirects=True)

        for name, data in (("small.txt", small), ("w.safetensors", weights)):
            n = len(data)
            r = get(name, "bytes=2-5")
            assert (r.status_code, r.content, r.headers["Content-Range"]) == (206, data[2:6], f"bytes 2-5/{n}")
            r = get(name, "bytes=10-")
            assert (r.status_code, r.content) == (206, data[10:])
            assert r.headers["Content-Range"] == f"bytes 10-{n - 1}/{n}"
            r = get(name, "bytes=-7")
            assert (r.status_code, r.content) == (206, data[-7:])
            r = get(name, f"bytes=0-{n * 2}")
            assert (r.status_code, r.content) == (206, data)
            r = get(name, f"bytes={n}-")
            assert (r.status_code, r.headers["Content-Range"]) == (416, f"bytes */{n}")
            r = get(name, "bytes=0-1,5-6")  # multi-range is ignored: full body
            assert (r.status_code, r.content) == (200, data)

        with pytest.raises(HfHubHTTPError) as exc:
            hf_raise_for_status(get("small.txt", "bytes=5000-"))
        assert exc.value.response.status_code == 416


def test_request_log_and_bytes_served(hub: FakeHub, cache: Path) -> None:
    files = nested_files()
    hub.add_repo("org/log", files)
    hub.add_repo("org/other", {"config.json": b"{}"})
    dl(hub, cache, "org/log", "config.json")
    dl(hub, cache, "org/log", "model.safetensors")
    dl(hub, cache, "org/other", "config.json")
    assert hub.count(kind="resolve", repo_id="org/log") == 3  # HEAD+GET small, HEAD LFS
    assert hub.count("GET", "cdn") == 1
    assert hub.count(repo_id="org/other", filename="config.json") == 2
    assert [r.filename for r in hub.requests("GET", repo_id="org/log")] == ["config.json", "model.safetensors"]
    assert hub.bytes_served("org/log", "*.safetensors") == len(files["model.safetensors"])
    assert hub.bytes_served("org/log") == len(CONFIG) + len(files["model.safetensors"])
    assert hub.bytes_served("org/other") == 2
    rec = hub.requests("GET", "resolve", "org/log", "config.json")[0]
    assert (rec.revision, rec.status, rec.bytes_sent, rec.complete) == ("main", 200, len(CONFIG), True)
    hub.reset_log()
    assert hub.requests() == [] and hub.bytes_served() == 0


# --------------------------------------------------------------------------------------------------
# Failure injection
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def frepo(hub: FakeHub) -> dict[str, bytes]:
    files = {"a.txt": blob(10_000, 8), "b.txt": b"bbbb", "w.safetensors": blob(20_000, 9)}
    hub.add_repo("org/f", files)
    return files


def test_fault_error_scoped_and_counted(hub: FakeHub, frepo: dict[str, bytes]) -> None:
    fault = hub.inject("error", status=503, filename="a.*", times=2)
    with httpx2.Client() as c:
        assert c.get(hub.url("org/f", "b.txt")).status_code == 200  # out of scope
        assert [c.get(hub.url("org/f", "a.txt")).status_code for _ in range(3)] == [503, 503, 200]
        assert fault.hits == 2 and not fault.active
        hub.inject("error", status=429, retry_after=7, on="api")
        r = c.get(f"{hub.endpoint}/api/models/org/f")
        assert (r.status_code, r.headers["Retry-After"]) == (429, "7")
        assert c.get(hub.url("org/f", "a.txt")).status_code == 200  # api-only fault
        hub.inject("error", status=404, error_code="EntryNotFound", repo_id="org/*")
        with pytest.raises(RemoteEntryNotFoundError):
            hf_raise_for_status(c.get(hub.url("org/f", "b.txt")))
        hub.clear_faults()
        assert c.get(hub.url("org/f", "b.txt")).status_code == 200
    assert [r.faults for r in hub.requests(filename="a.txt")] == [("error",), ("error",), (), ()]


def test_fault_error_is_retried_by_huggingface_hub(hub: FakeHub, frepo: dict[str, bytes], cache: Path) -> None:
    fault = hub.inject("error", status=503, method="HEAD", filename="a.txt", times=1)
    assert dl(hub, cache, "org/f", "a.txt") == frepo["a.txt"]
    assert fault.hits == 1
    assert [r.status for r in hub.requests("HEAD", filename="a.txt")] == [503, 200]


def test_fault_delay_and_threading(hub: FakeHub, frepo: dict[str, bytes]) -> None:
    with hub.inject("delay", seconds=2.0, filename="a.txt"), httpx2.Client() as c:
        t0 = time.monotonic()
        with pytest.raises(httpx2.ReadTimeout):
            c.get(hub.url("org/f", "a.txt"), timeout=0.3)
        assert c.get(hub.url("org/f", "b.txt"), timeout=1).content == b"bbbb"  # not blocked
        assert time.monotonic() - t0 < 1.5
    assert hub.faults == []
    # delay with after=: the body stalls mid-way (read timeout while streaming)
    hub.inject("delay", seconds=2.0, after=4000, filename="w.safetensors")
    with httpx2.Client(follow_redirects=True) as c, pytest.raises(httpx2.ReadTimeout):
        c.get(hub.url("org/f", "w.safetensors"), timeout=0.3)


def test_fault_slow_does_not_block_others(hub: FakeHub, frepo: dict[str, bytes]) -> None:
    hub.inject("slow", bytes_per_second=20_000, filename="a.txt")
    result: dict[str, object] = {}

    def slow_get() -> None:
        t0 = time.monotonic()
        result["body"] = httpx2.get(hub.url("org/f", "a.txt")).content
        result["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=slow_get)
    t.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    assert httpx2.get(hub.url("org/f", "b.txt")).content == b"bbbb"
    assert time.monotonic() - t0 < 0.3  # while the slow one takes 0.5 s
    t.join(5)
    assert result["body"] == frepo["a.txt"]
    assert 0.4 <= result["elapsed"] < 3  # 10 kB at 20 kB/s


def test_fault_cut_and_truncate(hub: FakeHub, frepo: dict[str, bytes], capfd: pytest.CaptureFixture) -> None:
    url = hub.url("org/f", "w.safetensors")
    hub.inject("cut", after=5000, filename="w.safetensors", times=1)
    with pytest.raises((httpx2.ReadError, httpx2.RemoteProtocolError)):
        httpx2.get(url, follow_redirects=True)
    (rec,) = hub.requests(kind="cdn")
    assert (rec.status, rec.bytes_sent, rec.complete, rec.faults) == (200, 5000, False, ("cut",))

    hub.inject("truncate", after=1234, filename="a.txt", times=1)
    with pytest.raises(httpx2.RemoteProtocolError):
        httpx2.get(hub.url("org/f", "a.txt"))
    assert hub.requests(filename="a.txt")[-1].bytes_sent == 1234
    # both faults are spent: everything works again
    assert httpx2.get(url, follow_redirects=True).content == frepo["w.safetensors"]
    assert httpx2.get(hub.url("org/f", "a.txt")).content == frepo["a.txt"]
    assert "Traceback" not in capfd.readouterr().err


def test_truncated_download_is_resumed_by_huggingface_hub(hub: FakeHub, cache: Path) -> None:
    # http_get hands bytes over in 10 MiB chunks: only a cut after one is resumed with a Range.
    mib = 1024 * 1024
    data = os.urandom(11 * mib)
    hub.add_repo("org/resume", {"big.safetensors": data})
    hub.inject("truncate", after=10 * mib + 5, on="cdn", times=1)
    assert dl(hub, cache, "org/resume", "big.safetensors") == data
    gets = hub.requests("GET", "cdn")
    assert [(r.range, r.bytes_sent) for r in gets] == [(None, 10 * mib + 5), (f"bytes={10 * mib}-", mib)]
    assert hub.bytes_served("org/resume", "big.safetensors") == 11 * mib + 5


def test_fault_ignore_range_and_corrupt(hub: FakeHub, frepo: dict[str, bytes]) -> None:
    data = frepo["a.txt"]
    url = hub.url("org/f", "a.txt")
    hub.inject("ignore_range", filename="a.txt", times=1)
    r = httpx2.get(url, headers={"Range": "bytes=100-199"})
    assert (r.status_code, r.content) == (200, data)
    r = httpx2.get(url, headers={"Range": "bytes=100-199"})
    assert (r.status_code, r.content) == (206, data[100:200])

    hub.inject("corrupt", offset=150, length=3, filename="a.txt")
    body = httpx2.get(url).content
    assert len(body) == len(data)
    assert [i for i in range(len(data)) if body[i] != data[i]] == [150, 151, 152]
    part = httpx2.get(url, headers={"Range": "bytes=140-159"}).content
    assert [i for i in range(20) if part[i] != data[140 + i]] == [10, 11, 12]


def test_corrupt_covering_hits_only_the_first_answer_that_carries_the_bytes(
    hub: FakeHub, frepo: dict[str, bytes]
) -> None:
    data = frepo["a.txt"]
    url = hub.url("org/f", "a.txt")
    fault = hub.inject("corrupt", offset=150, length=1, covering=True, times=1, filename="a.txt")
    assert httpx2.get(url, headers={"Range": "bytes=0-99"}).content == data[:100]  # no hit
    assert fault.hits == 0
    assert httpx2.get(url, headers={"Range": "bytes=100-199"}).content != data[100:200]
    assert httpx2.get(url, headers={"Range": "bytes=100-199"}).content == data[100:200]
    assert fault.hits == 1


def test_pace_per_connection_and_shared(tmp_path: Path) -> None:
    """A paced Hub (the CDN's shape): each answer takes at least size/pace, and with a shared cap
    two answers side by side take at least their total over the cap.  Lower bounds only: they
    come from sleeping, never from a fast machine."""
    data = os.urandom(400_000)
    with FakeHub(pace=1_000_000) as paced:
        paced.add_repo("org/p", {"a.bin": data})
        t0 = time.monotonic()
        assert httpx2.get(paced.url("org/p", "a.bin"), follow_redirects=True).content == data
        assert time.monotonic() - t0 >= 0.35
    with FakeHub(pace_total=2_000_000) as capped:
        capped.add_repo("org/p", {"a.bin": data})
        bodies: list[bytes] = []
        t0 = time.monotonic()
        threads = [
            threading.Thread(
                target=lambda: bodies.append(httpx2.get(capped.url("org/p", "a.bin"), follow_redirects=True).content)
            )
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert bodies == [data, data]
        assert time.monotonic() - t0 >= 0.35


def test_standalone_server_answers_sigusr1_with_the_bytes_served(tmp_path: Path) -> None:
    """``python -m tests.hubserver`` (how bench/ runs it) tells the bytes it has served on SIGUSR1."""
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    data = os.urandom(300_000)
    (repo_dir / "model.safetensors").write_bytes(data)
    (repo_dir / "config.json").write_bytes(CONFIG)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.hubserver", "--repo", f"org/standalone={repo_dir}"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    out = proc.stdout

    def next_line() -> str:
        # Bounded: a server that never answers fails the test instead of hanging it.
        readable, _, _ = select.select([out], [], [], 30)
        assert readable, "no line from the server within 30 s"
        return out.readline()

    try:
        ready = next_line()
        assert ready.startswith("READY "), ready
        endpoint = ready.split()[1]

        def served() -> int:
            proc.send_signal(signal.SIGUSR1)
            line = next_line()
            assert line.startswith("SERVED "), line
            return int(line.split()[1])

        assert served() == 0
        url = f"{endpoint}/org/standalone/resolve/main/model.safetensors"
        assert httpx2.get(url, follow_redirects=True).content == data
        assert httpx2.get(url, headers={"Range": "bytes=0-999"}, follow_redirects=True).content == data[:1000]
        assert served() == len(data) + 1000
    finally:
        proc.terminate()
        proc.wait(10)


def test_fault_down_and_restart(hub: FakeHub, frepo: dict[str, bytes]) -> None:
    url = hub.url("org/f", "b.txt")
    hub.inject("down", times=2)
    for _ in range(2):
        with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
            httpx2.get(url)
    assert httpx2.get(url).content == b"bbbb"
    assert [r.status for r in hub.requests()] == [0, 0, 200]

    port = hub.port
    hub.stop()
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(url)
    hub.start()
    assert hub.port == port
    assert httpx2.get(url).content == b"bbbb"


def test_faults_on_path_backed_file(hub: FakeHub, tmp_path: Path, cache: Path) -> None:
    data = os.urandom(2 * 1024 * 1024)
    (tmp_path / "model.safetensors").write_bytes(data)
    hub.add_repo("org/path", {"model.safetensors": tmp_path / "model.safetensors"})
    hub.inject("corrupt", offset=1_000_000, times=1)
    body = httpx2.get(hub.url("org/path", "model.safetensors"), follow_redirects=True).content
    assert body[:1_000_000] == data[:1_000_000] and body[1_000_001:] == data[1_000_001:]
    assert body[1_000_000] == data[1_000_000] ^ 0xFF
    assert dl(hub, cache, "org/path", "model.safetensors") == data


def test_invalid_inject_arguments(hub: FakeHub) -> None:
    with pytest.raises(ValueError):
        hub.inject("explode")
    with pytest.raises(TypeError):
        hub.inject("cut")
    with pytest.raises(TypeError):
        hub.inject("error", bogus=1)
