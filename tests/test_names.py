"""Which path components may name a model: repo-id rules, git ref rules, ``name@rev`` parsing."""

from __future__ import annotations

import errno
import os
import string

import pytest
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from hypothesis import given, settings
from hypothesis import strategies as st

from mxfs.errors import InvalidName, NameTooLong, errno_for
from mxfs.names import (
    EntryName,
    ModelRef,
    check_component_length,
    entry_label,
    model_dir_name,
    parse_model_arg,
    parse_model_dir,
    repo_folder,
    repo_id_of_folder,
    short_commit,
    validate_repo_part,
    validate_revision,
)

COMMIT = "3f2a9c" + "0" * 34


# -- org and model names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "part",
    [
        "a",
        "0",
        "_",
        "sentence-transformers",
        "all-MiniLM-L6-v2",
        "Foo-BAR_foo.bar123",
        "gpt2",
        "v1.0",
        "a.b-c_d",
        "x" * 96,
        "_private_",
        "model.gitx",
        "git",
    ],
)
def test_valid_repo_parts(part: str) -> None:
    assert validate_repo_part(part) == part
    # The same name is accepted by huggingface_hub, as the org and as the model.
    validate_repo_id(f"{part}/model")
    validate_repo_id(f"org/{part}")


@pytest.mark.parametrize(
    "part",
    [
        "",
        ".git",
        "model.git",
        "a--b",
        "a---b",
        "a..b",
        ".hidden",
        "-dash",
        "dash-",
        "dot.",
        "x" * 97,
        "with space",
        "slash/inside",
        "at@sign",
        "percent%2F",
        "café",
        "文件夹",
        "tab\tname",
        "desktop.ini.",
        ".",
        "..",
        "-",
        "name\n",
        "name\r",
        "\nname",
    ],
)
def test_invalid_repo_parts(part: str) -> None:
    with pytest.raises(InvalidName):
        validate_repo_part(part)


def test_invalid_names_are_enoent() -> None:
    with pytest.raises(InvalidName) as info:
        validate_repo_part("a--b")
    assert errno_for(info.value) == errno.ENOENT


def test_org_ending_in_git_is_rejected_like_huggingface_hub_would_for_the_name() -> None:
    with pytest.raises(HFValidationError):
        validate_repo_id("org/model.git")
    with pytest.raises(InvalidName):
        parse_model_dir("org", "model.git", "main")


# -- revisions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "revision",
    [
        "main",
        "v1.0",
        "v1.0.0-rc1",
        "release_2024",
        "feature/new-tokenizer",
        "refs/pr/1",
        "refs/convert/parquet",
        "c++",
        COMMIT,
        "a" * 255,
        "1",
    ],
)
def test_valid_revisions(revision: str) -> None:
    assert validate_revision(revision) == revision


@pytest.mark.parametrize(
    "revision",
    [
        "",
        "a..b",
        "..",
        "a//b",
        "branch/",
        "branch.",
        "branch.lock",
        "refs/heads/.hidden",
        ".hidden",
        "/leading",
        "-leading-dash",
        "with space",
        "tilde~1",
        "caret^",
        "colon:x",
        "question?",
        "star*",
        "bracket[",
        "back\\slash",
        "at@{1}",
        "@",
        "ctrl\x01",
        "a" * 256,
        "main\n",
        "main\r",
        "ré",
    ],
)
def test_invalid_revisions(revision: str) -> None:
    with pytest.raises(InvalidName):
        validate_revision(revision)


# -- name@rev ------------------------------------------------------------------------------------


def test_plain_name_uses_default_revision() -> None:
    ref = parse_model_dir("sentence-transformers", "all-MiniLM-L6-v2", "main")
    assert ref == ModelRef("sentence-transformers/all-MiniLM-L6-v2", "main")
    assert not ref.revision_is_commit
    assert str(ref) == "sentence-transformers/all-MiniLM-L6-v2@main"
    assert parse_model_dir("org", "name", "v2").revision == "v2"


def test_name_at_tag() -> None:
    assert parse_model_dir("org", "name@v1.0", "main") == ModelRef("org/name", "v1.0")


def test_name_at_commit_names_a_commit() -> None:
    ref = parse_model_dir("org", f"name@{COMMIT}", "main")
    assert ref == ModelRef("org/name", COMMIT)
    assert ref.revision_is_commit


@pytest.mark.parametrize(
    "revision",
    [
        COMMIT[:39],  # too short
        COMMIT + "0",  # too long
        COMMIT.upper(),  # a 40-char branch name, not a commit
        "g" * 40,
        "main",
    ],
)
def test_not_a_commit(revision: str) -> None:
    assert not ModelRef("org/name", revision).revision_is_commit


@pytest.mark.parametrize("component", ["name@refs%2Fpr%2F1", "name@refs%2fpr%2f1"])
def test_escaped_slash_in_revision(component: str) -> None:
    assert parse_model_dir("org", component, "main") == ModelRef("org/name", "refs/pr/1")


@pytest.mark.parametrize(
    ("org", "component"),
    [
        ("org", "name@"),
        ("org", "@main"),
        ("org", "name@a..b"),
        ("org", "name@refs%2F%2Fpr"),
        ("org", "name@%2Fmain"),
        ("org", "name@main%2F"),
        ("org", "name@a@b"),
        ("org", "name.git"),
        ("org", "na--me@main"),
        (".git", "name"),
        ("org", ".git"),
        ("org", "name@main\n"),
        ("org", "name\n"),
        ("org\n", "name"),
    ],
)
def test_invalid_model_dirs(org: str, component: str) -> None:
    with pytest.raises(InvalidName):
        parse_model_dir(org, component, "main")


def test_name_too_long_component() -> None:
    with pytest.raises(NameTooLong) as info:
        parse_model_dir("org", "a" * 256, "main")
    assert errno_for(info.value) == errno.ENAMETOOLONG
    # 255 bytes is allowed by the kernel; it is merely not a valid repo name.
    with pytest.raises(InvalidName):
        parse_model_dir("org", "a" * 255, "main")


def test_name_too_long_counts_bytes_not_characters() -> None:
    check_component_length("é" * 127)  # 254 bytes
    with pytest.raises(NameTooLong):
        check_component_length("é" * 128)  # 256 bytes, only 128 characters
    with pytest.raises(NameTooLong):
        parse_model_dir("org", "é" * 128, "main")


def test_name_too_long_revision_part() -> None:
    with pytest.raises(NameTooLong):
        parse_model_dir("org", "name@" + "a" * 251, "main")
    assert parse_model_dir("org", "name@" + "a" * 250, "main").revision == "a" * 250


def test_name_too_long_org() -> None:
    with pytest.raises(NameTooLong):
        parse_model_dir("o" * 256, "name", "main")


def test_undecodable_bytes_are_invalid_not_a_crash() -> None:
    # pyfuse3 hands over names as bytes; os.fsdecode keeps bad bytes as lone surrogates.
    with pytest.raises(InvalidName):
        parse_model_dir("org", os.fsdecode(b"name\xff"), "main")
    with pytest.raises(NameTooLong):
        parse_model_dir("org", os.fsdecode(b"\xff" * 256), "main")


# -- CLI arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("org/name", ModelRef("org/name", "main")),
        ("org/name@v1.0", ModelRef("org/name", "v1.0")),
        ("org/name@refs/pr/1", ModelRef("org/name", "refs/pr/1")),
        ("org/name@refs%2Fpr%2F1", ModelRef("org/name", "refs/pr/1")),
        (f"org/name@{COMMIT}", ModelRef("org/name", COMMIT)),
        ("sentence-transformers/all-MiniLM-L6-v2", ModelRef("sentence-transformers/all-MiniLM-L6-v2", "main")),
    ],
)
def test_parse_model_arg(text: str, ref: ModelRef) -> None:
    assert parse_model_arg(text, "main") == ref


@pytest.mark.parametrize(
    "text",
    ["name", "", "/name", "org/", "org/name/extra", "org/name@", "org/na--me", "org/name@a..b", "@main", "org@x/name"],
)
def test_parse_model_arg_invalid(text: str) -> None:
    with pytest.raises(InvalidName):
        parse_model_arg(text, "main")


def test_parse_model_arg_default_revision() -> None:
    assert parse_model_arg("org/name", "dev").revision == "dev"


# -- model_dir_name ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        (ModelRef("org/name", "main"), "name"),
        (ModelRef("org/name", "v1.0"), "name@v1.0"),
        (ModelRef("org/name", "refs/pr/1"), "name@refs%2Fpr%2F1"),
        (ModelRef("org/name", COMMIT), f"name@{COMMIT}"),
    ],
)
def test_model_dir_name(ref: ModelRef, name: str) -> None:
    assert model_dir_name(ref, "main") == name
    assert "/" not in name
    assert parse_model_dir("org", name, "main") == ref


def test_model_dir_name_with_other_default() -> None:
    assert model_dir_name(ModelRef("org/name", "main"), "dev") == "name@main"
    assert model_dir_name(ModelRef("org/name", "dev"), "dev") == "name"


_PART_CHARS = string.ascii_letters + string.digits + "_.-"
_REV_CHARS = string.ascii_letters + string.digits + "_.+/-"

valid_parts = st.text(_PART_CHARS, min_size=1, max_size=40).filter(
    lambda p: validate_part_ok(p)  # keep only names that pass, so round trips have input
)
revisions = st.one_of(
    st.just("main"),
    st.text("0123456789abcdef", min_size=40, max_size=40),
    st.text(_REV_CHARS, min_size=1, max_size=40),
)


def validate_part_ok(part: str) -> bool:
    try:
        validate_repo_part(part)
    except InvalidName:
        return False
    return True


@given(org=valid_parts, name=valid_parts, revision=revisions, default=st.sampled_from(["main", "dev"]))
def test_model_dir_name_round_trip(org: str, name: str, revision: str, default: str) -> None:
    try:
        validate_revision(revision)
    except InvalidName:
        return
    ref = ModelRef(f"{org}/{name}", revision)
    dirname = model_dir_name(ref, default)
    assert "/" not in dirname
    assert parse_model_dir(org, dirname, default) == ref
    assert parse_model_arg(f"{org}/{name}@{revision}", default) == ref


# -- property: nothing invalid reaches the Hub ---------------------------------------------------

# Text built from pieces that matter: valid names and revisions, the separators, escapes,
# whitespace and control characters, plus arbitrary code points and undecodable bytes.
# Lone surrogates only arrive the way os.fsdecode makes them (U+DC80..U+DCFF): FUSE names are
# decoded as strict UTF-8 and argv with surrogateescape, so other surrogates cannot reach names.py.
_char = st.characters(exclude_categories=["Cs"])
_interesting = st.sampled_from(
    ["@", "/", "%2F", "%2f", ".", "-", "--", "..", ".git", ".lock", "\n", "\r", "\t", " ", "\x00", "é"]
)
_piece = st.one_of(
    st.text(_PART_CHARS, min_size=1, max_size=12),
    _interesting,
    _char,
    st.binary(min_size=1, max_size=4).map(os.fsdecode),
    st.just("a" * 97),
)
# A regex anchored with ``$`` also matches before a final newline: line ends get their own branch.
_line_end = st.sampled_from(["\n", "\r", "\r\n", "\x0b", "\x0c", "\x85", "\u2028"])
_suffix = st.one_of(_interesting, _line_end, _char)
_rev = st.one_of(st.sampled_from(["main", "v1.0", "refs%2Fpr%2F1", COMMIT]), revisions)
# Almost-valid names: a valid name (and revision) with something appended, or not.
near_valid_org = st.one_of(valid_parts, st.tuples(valid_parts, _suffix).map("".join))
near_valid_component = st.one_of(
    valid_parts,
    st.tuples(valid_parts, _suffix).map("".join),
    st.tuples(valid_parts, st.just("@"), _rev).map("".join),
    st.tuples(valid_parts, st.just("@"), _rev, _suffix).map("".join),
    st.tuples(valid_parts, _suffix, st.just("@"), _rev).map("".join),
)
arbitrary_text = st.one_of(
    st.lists(_piece, max_size=8).map("".join),
    st.text(max_size=300),
    st.binary(max_size=300).map(os.fsdecode),
)


@settings(max_examples=500)
@given(org=st.one_of(near_valid_org, arbitrary_text), component=st.one_of(near_valid_component, arbitrary_text))
def test_parse_model_dir_never_accepts_an_invalid_repo_id(org: str, component: str) -> None:
    try:
        ref = parse_model_dir(org, component, "main")
    except (InvalidName, NameTooLong):
        return
    validate_repo_id(ref.repo_id)  # raises HFValidationError if mxfs let a bad name through
    assert ref.repo_id.count("/") == 1
    assert validate_revision(ref.revision) == ref.revision
    # Git refs never contain whitespace or control characters.
    assert not any(c.isspace() or ord(c) < 0x20 for c in ref.revision)


# -- entry names and repo folders -----------------------------------------------------------------


def test_entry_name_is_modelexpress_model_name() -> None:
    name = EntryName("org/model", COMMIT)
    assert name.key == f"mx1:{COMMIT}:-:org/model"
    assert EntryName.parse(name.key) == name
    assert name.label == str(name) == f"org/model@{COMMIT[:12]}" == f"org/model@{short_commit(COMMIT)}"
    assert entry_label(name.key) == name.label


@pytest.mark.parametrize(
    "key",
    [
        "org/model",  # ModelExpress's own record
        f"mx1:{COMMIT}:subset:org/model",
        f"mx1:{COMMIT[:-1]}:-:org/model",
        f"mx1:{COMMIT.upper()}:-:org/model",
        f"mx1:{COMMIT}:-:model",
        f"mx1:{COMMIT}:-:org/model/extra",
        f"mx2:{COMMIT}:-:org/model",
    ],
)
def test_foreign_keys_are_not_entry_names(key: str) -> None:
    assert EntryName.parse(key) is None
    assert entry_label(key) == key


@pytest.mark.parametrize(
    ("folder", "repo_id"),
    [("org--model", "org/model"), ("o--m.v2", "o/m.v2"), ("model", None), ("a--b--c", None)],
)
def test_repo_folder(folder: str, repo_id: str | None) -> None:
    assert repo_id_of_folder(folder) == repo_id
    if repo_id is not None:
        assert repo_folder(repo_id) == folder
