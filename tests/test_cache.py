"""HubCache on a real directory, checked against huggingface_hub's own reading of the layout."""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import LocalEntryNotFoundError

from mxfs.cache import HubCache, repo_folder_name
from mxfs.tree import HubFile, RepoTree

REPO = "org/model"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def record(path: str, data: bytes, *, lfs: bool = False) -> HubFile:
    lfs_sha256 = hashlib.sha256(data).hexdigest() if lfs else None
    return HubFile(path=path, size=len(data), blob_id=git_blob_sha1(data), lfs_sha256=lfs_sha256)


def tree_of(repo_id: str, commit: str, files: list[HubFile]) -> RepoTree:
    return RepoTree(repo_id, commit, datetime(2024, 1, 1, tzinfo=UTC), tuple(files))


def store(cache: HubCache, repo_id: str, commit: str, rec: HubFile, data: bytes, writer: str = "w1") -> Path:
    """Download the way mxfs does: private partial file, publish, then link."""
    partial, fd = cache.create_incomplete(repo_id, rec.etag, writer)
    try:
        os.write(fd, data)
        blob = cache.publish_blob(repo_id, rec.etag, partial, fd)
    finally:
        os.close(fd)
    cache.link_snapshot(repo_id, commit, rec.path, rec.etag)
    return blob


def populate(cache: HubCache, repo_id: str, commit: str, files: dict[str, bytes], lfs: set[str] = frozenset()):
    records = [record(path, data, lfs=path in lfs) for path, data in files.items()]
    for rec in records:
        store(cache, repo_id, commit, rec, files[rec.path])
    cache.write_tree(tree_of(repo_id, commit, records))
    return records


FILES = {
    "config.json": b'{"hidden_size": 8}\n',
    "model.safetensors": b"\x00" * 3000 + b"weights",
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}\n',
    "tokenizer.json": b'{"version": "1.0"}',
}
LFS = {"model.safetensors"}


def blob_sizes(files: dict[str, bytes]) -> int:
    """Bytes on disk of the distinct blobs of ``files`` (same content, same blob)."""
    return sum(len(d) for d in {git_blob_sha1(d): d for d in files.values()}.values())


@pytest.fixture
def cache(tmp_path: Path) -> HubCache:
    c = HubCache(tmp_path / "hub")
    c.ensure_root()
    return c


def no_temp_files(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def snapshot_reads_back(cache: HubCache, repo_id: str, commit: str, files: dict[str, bytes]) -> bool:
    """Every file reads back through its snapshot link with the bytes it was stored with."""
    return all(cache.snapshot_file(repo_id, commit, path).read_bytes() == data for path, data in files.items())


# -- the layout, end to end ----------------------------------------------------------------------


def test_layout_end_to_end(cache: HubCache) -> None:
    rec = record("config.json", FILES["config.json"])

    partial, fd = cache.create_incomplete(REPO, rec.etag, "node1-abc")
    try:
        assert partial == cache.repo_dir(REPO) / "blobs" / f"{rec.etag}.node1-abc.incomplete"
        assert partial.exists()
        assert not cache.has_blob(REPO, rec)
        os.write(fd, FILES["config.json"])
        blob = cache.publish_blob(REPO, rec.etag, partial, fd)
    finally:
        os.close(fd)
    assert blob == cache.blob_path(REPO, rec.etag)
    assert not partial.exists()
    assert blob.read_bytes() == FILES["config.json"]
    assert cache.has_blob(REPO, rec)

    # The snapshot link appears only now, as a relative symlink into ../../blobs.
    link = cache.snapshot_file(REPO, COMMIT_A, "config.json")
    assert not link.exists()
    cache.link_snapshot(REPO, COMMIT_A, "config.json", rec.etag)
    assert link.is_symlink()
    assert os.readlink(link) == f"../../blobs/{rec.etag}"
    assert link.read_bytes() == FILES["config.json"]

    records = [rec] + [record(p, d, lfs=p in LFS) for p, d in FILES.items() if p != "config.json"]
    for r in records[1:]:
        store(cache, REPO, COMMIT_A, r, FILES[r.path])
    nested = cache.snapshot_file(REPO, COMMIT_A, "1_Pooling/config.json")
    assert os.readlink(nested) == f"../../../blobs/{records[2].etag}"
    assert nested.resolve() == cache.blob_path(REPO, records[2].etag).resolve()
    # LFS files are stored under their sha256, others under the git blob sha1.
    lfs_rec = next(r for r in records if r.path == "model.safetensors")
    assert lfs_rec.etag == hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    assert cache.blob_path(REPO, lfs_rec.etag).read_bytes() == FILES["model.safetensors"]

    cache.write_tree(tree_of(REPO, COMMIT_A, records))
    cache.write_ref(REPO, "main", COMMIT_A)
    assert cache.ref_path(REPO, "main").read_bytes() == COMMIT_A.encode()  # no newline, as HF writes it
    assert cache.read_ref(REPO, "main") == COMMIT_A

    tree = json.loads(cache.tree_path(REPO, COMMIT_A).read_text())
    assert tree["format_version"] == 1
    assert set(tree["files"]) == set(FILES)
    assert tree["files"]["config.json"] == {"size": len(FILES["config.json"]), "blob_id": rec.blob_id}
    assert tree["files"]["model.safetensors"] == {
        "size": len(FILES["model.safetensors"]),
        "blob_id": lfs_rec.blob_id,
        "lfs_sha256": lfs_rec.lfs_sha256,
        "lfs_size": len(FILES["model.safetensors"]),
    }

    assert cache.cached_repos() == [REPO]
    assert cache.cached_commits(REPO) == [COMMIT_A]
    assert snapshot_reads_back(cache, REPO, COMMIT_A, FILES)
    assert all(cache.has_blob(REPO, r) for r in records)
    assert cache.snapshot_size(REPO, COMMIT_A) == blob_sizes(FILES)
    no_temp_files(cache.root)

    # huggingface_hub reads the same cache without a single warning.
    info = scan_cache_dir(cache.root)
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == REPO
    assert repo.repo_type == "model"
    assert repo.size_on_disk == blob_sizes(FILES)
    assert info.size_on_disk == blob_sizes(FILES)
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT_A
    assert revision.refs == frozenset({"main"})
    assert revision.nb_files == len(FILES)
    assert {str(f.file_path.relative_to(revision.snapshot_path)) for f in revision.files} == set(FILES)
    assert not getattr(info, "incomplete_files", frozenset())


def test_snapshot_download_offline_returns_the_snapshot(cache: HubCache) -> None:
    populate(cache, REPO, COMMIT_A, FILES, LFS)
    cache.write_ref(REPO, "main", COMMIT_A)
    snapshot = cache.snapshot_dir(REPO, COMMIT_A).resolve()

    path = snapshot_download(REPO, cache_dir=cache.root, local_files_only=True)
    assert Path(path).resolve() == snapshot
    path = snapshot_download(REPO, revision=COMMIT_A, cache_dir=cache.root, local_files_only=True)
    assert Path(path).resolve() == snapshot
    for name, data in FILES.items():
        assert (Path(path) / name).read_bytes() == data

    cached = try_to_load_from_cache(REPO, "1_Pooling/config.json", cache_dir=cache.root)
    assert isinstance(cached, str)
    assert Path(cached).read_bytes() == FILES["1_Pooling/config.json"]


def test_snapshot_download_offline_refuses_an_incomplete_snapshot(cache: HubCache) -> None:
    records = populate(cache, REPO, COMMIT_A, FILES, LFS)
    # The tree lists one more file than the snapshot has: huggingface_hub must not return it.
    cache.write_tree(tree_of(REPO, COMMIT_A, [*records, record("extra.bin", b"never downloaded")]))
    cache.write_ref(REPO, "main", COMMIT_A)
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(REPO, cache_dir=cache.root, local_files_only=True)


def test_cachedir_tag_does_not_upset_scan(cache: HubCache) -> None:
    tag = cache.root / "CACHEDIR.TAG"
    assert tag.read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    cache.ensure_root()  # idempotent
    assert tag.read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    info = scan_cache_dir(cache.root)
    assert info.warnings == []
    assert info.repos == frozenset()

    populate(cache, REPO, COMMIT_A, FILES, LFS)
    info = scan_cache_dir(cache.root)
    assert info.warnings == []
    assert len(info.repos) == 1
    assert cache.cached_repos() == [REPO]


def test_ensure_root_is_not_world_writable(tmp_path: Path) -> None:
    cache = HubCache(tmp_path / "a" / "b")
    cache.ensure_root()
    mode = cache.root.stat().st_mode
    assert not mode & 0o022
    assert cache.root.is_dir()


def test_repo_folder_name() -> None:
    assert (
        repo_folder_name("sentence-transformers/all-MiniLM-L6-v2") == "models--sentence-transformers--all-MiniLM-L6-v2"
    )
    assert repo_folder_name("org/model") == huggingface_hub.file_download.repo_folder_name(
        repo_id="org/model", repo_type="model"
    )


# -- publishing ----------------------------------------------------------------------------------


def test_publish_of_existing_blob_drops_the_partial(cache: HubCache) -> None:
    data = FILES["config.json"]
    rec = record("config.json", data)
    first = store(cache, REPO, COMMIT_A, rec, data, writer="w1")
    inode = first.stat().st_ino

    # A second writer (another commit with the same file) downloads it too, into its own partial.
    partial, fd = cache.create_incomplete(REPO, rec.etag, "w2")
    try:
        assert partial.name == f"{rec.etag}.w2.incomplete"
        os.write(fd, data)
        blob = cache.publish_blob(REPO, rec.etag, partial, fd)
    finally:
        os.close(fd)
    assert blob == first
    assert not partial.exists()
    assert blob.stat().st_ino == inode
    assert blob.read_bytes() == data
    assert sorted(p.name for p in (cache.repo_dir(REPO) / "blobs").iterdir()) == [rec.etag]


def test_two_writers_never_share_a_partial(cache: HubCache) -> None:
    p1, fd1 = cache.create_incomplete(REPO, "e" * 40, "w1")
    p2, fd2 = cache.create_incomplete(REPO, "e" * 40, "w2")
    try:
        assert p1 != p2
        os.write(fd1, b"one")
        os.write(fd2, b"two")
        assert p1.read_bytes() == b"one"
        assert p2.read_bytes() == b"two"
    finally:
        os.close(fd1)
        os.close(fd2)


def test_create_incomplete_truncates(cache: HubCache) -> None:
    p, fd = cache.create_incomplete(REPO, "e" * 40, "w1")
    os.write(fd, b"stale bytes")
    os.close(fd)
    p2, fd = cache.create_incomplete(REPO, "e" * 40, "w1")
    os.close(fd)
    assert p2 == p
    assert p.read_bytes() == b""


def test_link_snapshot_is_idempotent_and_replaces(cache: HubCache) -> None:
    old = record("config.json", b"old")
    new = record("config.json", b"new")
    store(cache, REPO, COMMIT_A, old, b"old")
    cache.link_snapshot(REPO, COMMIT_A, "config.json", old.etag)
    link = cache.snapshot_file(REPO, COMMIT_A, "config.json")
    assert link.read_bytes() == b"old"
    store(cache, REPO, COMMIT_A, new, b"new")
    assert os.readlink(link) == f"../../blobs/{new.etag}"
    assert link.read_bytes() == b"new"
    no_temp_files(cache.root)


def test_write_ref_replaces_atomically(cache: HubCache) -> None:
    cache.write_ref(REPO, "main", COMMIT_A)
    cache.write_ref(REPO, "main", COMMIT_B)
    assert cache.read_ref(REPO, "main") == COMMIT_B
    cache.write_ref(REPO, "refs/pr/1", COMMIT_A)
    assert cache.ref_path(REPO, "refs/pr/1") == cache.repo_dir(REPO) / "refs" / "refs" / "pr" / "1"
    assert cache.read_ref(REPO, "refs/pr/1") == COMMIT_A
    no_temp_files(cache.root)


# -- reading -------------------------------------------------------------------------------------


def test_read_ref(cache: HubCache) -> None:
    assert cache.read_ref(REPO, "main") is None  # no repo at all
    cache.ref_path(REPO, "main").parent.mkdir(parents=True)
    assert cache.read_ref(REPO, "main") is None
    cache.ref_path(REPO, "main").write_text(COMMIT_A + "\n")
    assert cache.read_ref(REPO, "main") == COMMIT_A
    cache.ref_path(REPO, "main").write_text("not a commit")
    assert cache.read_ref(REPO, "main") is None
    cache.ref_path(REPO, "main").write_text("")
    assert cache.read_ref(REPO, "main") is None
    # A directory where a ref file would be, or a ref used as a directory: not a ref.
    cache.write_ref(REPO, "refs/pr/1", COMMIT_A)
    assert cache.read_ref(REPO, "refs/pr") is None
    assert cache.read_ref(REPO, "main/x") is None


def test_cached_repos(cache: HubCache) -> None:
    assert HubCache(cache.root / "missing").cached_repos() == []
    assert cache.cached_repos() == []
    populate(cache, "zorg/b", COMMIT_A, {"a": b"1"})
    populate(cache, "aorg/c", COMMIT_A, {"a": b"1"})
    (cache.root / "datasets--org--data").mkdir()
    (cache.root / "spaces--org--space").mkdir()
    (cache.root / ".locks").mkdir()
    assert cache.cached_repos() == ["aorg/c", "zorg/b"]


def test_cached_commits(cache: HubCache) -> None:
    assert cache.cached_commits(REPO) == []
    populate(cache, REPO, COMMIT_B, {"a": b"1"})
    populate(cache, REPO, COMMIT_A, {"a": b"1"})
    (cache.repo_dir(REPO) / "snapshots" / "not-a-commit").mkdir()
    (cache.repo_dir(REPO) / "snapshots" / ("A" * 40)).mkdir()
    assert cache.cached_commits(REPO) == [COMMIT_A, COMMIT_B]


def test_has_blob(cache: HubCache) -> None:
    data = b"some bytes"
    rec = record("f.bin", data)
    assert not cache.has_blob(REPO, rec)
    store(cache, REPO, COMMIT_A, rec, data)
    assert cache.has_blob(REPO, rec)
    # The blob exists but is not the size the tree says: not cached.
    wrong = HubFile(path=rec.path, size=rec.size + 1, blob_id=rec.blob_id)
    assert not cache.has_blob(REPO, wrong)
    # A partial file is never a cached file.
    _partial, fd = cache.create_incomplete(REPO, "f" * 40, "w1")
    os.write(fd, b"x" * 5)
    os.close(fd)
    assert not cache.has_blob(REPO, HubFile("g", 5, "f" * 40))


# -- deleting ------------------------------------------------------------------------------------


def test_delete_revision_frees_only_unshared_blobs(cache: HubCache) -> None:
    shared = {"config.json": FILES["config.json"], "model.safetensors": FILES["model.safetensors"]}
    files_a = {**shared, "only_a.bin": b"A" * 1111, "sub/only_a.txt": b"a" * 77}
    files_b = {**shared, "only_b.bin": b"B" * 2222}
    populate(cache, REPO, COMMIT_A, files_a, LFS)
    populate(cache, REPO, COMMIT_B, files_b, LFS)
    cache.write_ref(REPO, "main", COMMIT_B)
    cache.write_ref(REPO, "v1.0", COMMIT_A)
    cache.write_ref(REPO, "refs/pr/1", COMMIT_A)
    info = scan_cache_dir(cache.root)
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.size_on_disk == 1111 + 77 + 2222 + len(FILES["config.json"]) + len(FILES["model.safetensors"])
    assert {r.commit_hash: r.refs for r in repo.revisions} == {
        COMMIT_A: frozenset({"v1.0", "refs/pr/1"}),
        COMMIT_B: frozenset({"main"}),
    }
    shared_size = len(FILES["config.json"]) + len(FILES["model.safetensors"])
    assert cache.snapshot_size(REPO, COMMIT_A) == 1111 + 77 + shared_size

    freed = cache.delete_revision(REPO, COMMIT_A)

    assert freed == 1111 + 77
    assert cache.read_ref(REPO, "v1.0") is None
    assert cache.read_ref(REPO, "refs/pr/1") is None
    assert cache.read_ref(REPO, "main") == COMMIT_B
    assert not cache.snapshot_dir(REPO, COMMIT_A).exists()
    assert not cache.tree_path(REPO, COMMIT_A).exists()
    assert cache.tree_path(REPO, COMMIT_B).exists()
    assert cache.cached_commits(REPO) == [COMMIT_B]
    assert not cache.blob_path(REPO, git_blob_sha1(b"A" * 1111)).exists()
    assert not cache.blob_path(REPO, git_blob_sha1(b"a" * 77)).exists()
    assert cache.blob_path(REPO, git_blob_sha1(FILES["config.json"])).exists()
    assert cache.blob_path(REPO, hashlib.sha256(FILES["model.safetensors"]).hexdigest()).exists()
    assert snapshot_reads_back(cache, REPO, COMMIT_B, files_b)

    info = scan_cache_dir(cache.root)
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.size_on_disk == 2222 + len(FILES["config.json"]) + len(FILES["model.safetensors"])
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT_B
    assert revision.refs == frozenset({"main"})
    assert Path(snapshot_download(REPO, cache_dir=cache.root, local_files_only=True)).resolve() == (
        cache.snapshot_dir(REPO, COMMIT_B).resolve()
    )

    # The last revision: everything goes, the repo folder included.
    freed = cache.delete_revision(REPO, COMMIT_B)
    assert freed == 2222 + len(FILES["config.json"]) + len(FILES["model.safetensors"])
    assert not cache.repo_dir(REPO).exists()
    assert cache.cached_repos() == []
    assert cache.read_ref(REPO, "main") is None
    info = scan_cache_dir(cache.root)
    assert info.warnings == []
    assert info.repos == frozenset()
    assert info.size_on_disk == 0


def test_delete_revision_returns_real_bytes_freed(cache: HubCache) -> None:
    # The same content under two paths of one commit is one blob: freed once.
    populate(cache, REPO, COMMIT_A, {"a.txt": b"x" * 500, "copy/a.txt": b"x" * 500, "b.txt": b"y" * 10})
    assert cache.snapshot_size(REPO, COMMIT_A) == 510
    assert cache.delete_revision(REPO, COMMIT_A) == 510
    assert not cache.repo_dir(REPO).exists()


def test_delete_revision_keeps_repo_with_partial_downloads(cache: HubCache) -> None:
    populate(cache, REPO, COMMIT_A, {"a.txt": b"x" * 10})
    cache.write_ref(REPO, "main", COMMIT_A)
    partial, fd = cache.create_incomplete(REPO, "e" * 64, "w9")
    os.write(fd, b"half")
    os.close(fd)
    assert cache.delete_revision(REPO, COMMIT_A) == 10
    # Someone is downloading into this repo: its partial file and folder stay.
    assert partial.read_bytes() == b"half"
    assert cache.cached_commits(REPO) == []
    info = scan_cache_dir(cache.root)
    assert info.warnings == []


def test_delete_revision_of_unknown_commit(cache: HubCache) -> None:
    populate(cache, REPO, COMMIT_A, {"a.txt": b"x"})
    assert cache.delete_revision(REPO, COMMIT_B) == 0
    assert cache.cached_commits(REPO) == [COMMIT_A]
    assert scan_cache_dir(cache.root).warnings == []


def test_delete_revision_of_other_repo_keeps_blobs(cache: HubCache) -> None:
    # Blobs are per repo: the same bytes in another repo are another blob.
    populate(cache, "org/one", COMMIT_A, {"a.txt": b"same"})
    populate(cache, "org/two", COMMIT_A, {"a.txt": b"same"})
    assert cache.delete_revision("org/one", COMMIT_A) == 4
    assert cache.cached_repos() == ["org/two"]
    assert snapshot_reads_back(cache, "org/two", COMMIT_A, {"a.txt": b"same"})
    assert scan_cache_dir(cache.root).warnings == []


# -- stale partial files -------------------------------------------------------------------------


def test_remove_stale_incomplete(cache: HubCache) -> None:
    assert cache.remove_stale_incomplete(REPO, 60) == []  # no repo yet
    old, fd = cache.create_incomplete(REPO, "1" * 64, "dead")
    os.close(fd)
    fresh, fd = cache.create_incomplete(REPO, "2" * 64, "live")
    os.close(fd)
    rec = record("a.txt", b"blob")
    blob = store(cache, REPO, COMMIT_A, rec, b"blob")
    long_ago = time.time() - 3600
    os.utime(old, (long_ago, long_ago))
    os.utime(blob, (long_ago, long_ago))  # an old blob is not a partial file

    removed = cache.remove_stale_incomplete(REPO, 600)

    assert removed == [old]
    assert not old.exists()
    assert fresh.exists()
    assert blob.exists()
    assert cache.remove_stale_incomplete(REPO, 600) == []
    # With a zero age, every partial file not written to since "now" goes.
    later = time.time() - 1
    os.utime(fresh, (later, later))
    assert cache.remove_stale_incomplete(REPO, 0) == [fresh]
    assert blob.exists()


def test_a_partial_file_of_a_dead_writer_goes_at_once(cache: HubCache) -> None:
    writers = {"p.b.1.2.3.abc-2": "gone", "p.b.1.2.4.def": "runs", "plain": "runs"}
    made = {}
    for i, writer in enumerate(writers):
        made[writer], fd = cache.create_incomplete(REPO, str(i) * 64, writer)
        os.close(fd)
    asked: list[str] = []

    def is_dead(writer: str) -> bool:
        asked.append(writer)
        return writers[writer] == "gone"

    # Just written: only the age would keep it; the writer's death says it goes.
    assert cache.remove_stale_incomplete(REPO, 600, writer_is_dead=is_dead) == [made["p.b.1.2.3.abc-2"]]
    assert sorted(asked) == sorted(writers)  # the writer id, as the file's name carries it
    assert [p.exists() for p in made.values()] == [False, True, True]
    # The caller's own claim is never asked about.
    asked.clear()
    assert cache.remove_stale_incomplete(REPO, 600, keep="plain", writer_is_dead=is_dead) == []
    assert "plain" not in asked
