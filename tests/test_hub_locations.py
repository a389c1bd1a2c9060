"""Range requests go straight to the CDN once the Hub has redirected a file there.

On the real Hub each range of an LFS file would otherwise cost a round trip to huggingface.co
(answered with a redirect) before the CDN's; a file is downloaded as many ranges.  The test Hub
redirects LFS files to a CDN on another port, as the real one does.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from mxfs.errors import HubUnavailable, NotFound
from mxfs.hub import HubClient
from tests.hubserver import FakeHub

DATA = os.urandom(3_000_000)


def read(client: HubClient, repo: str, commit: str, start: int, end: int) -> bytes:
    with client.open_range(repo, commit, "model.safetensors", start, end) as body:
        return b"".join(body.chunks())


def kinds(hub: FakeHub) -> list[str]:
    return [r.kind for r in hub.requests() if r.filename == "model.safetensors"]


@pytest.fixture
def repo(hub: FakeHub, new_repo_id: Callable[[], str]) -> tuple[str, str]:
    repo = new_repo_id()
    commit = hub.add_repo(repo, {"config.json": b"{}", "model.safetensors": DATA})
    return repo, commit


def test_later_ranges_skip_the_hub_and_carry_no_token(hub: FakeHub, repo: tuple[str, str]) -> None:
    hub.valid_tokens.add("hf_secret")
    client = HubClient(endpoint=hub.endpoint, token="hf_secret", offline=False)
    assert read(client, *repo, 0, 1000) == DATA[:1000]
    assert kinds(hub) == ["resolve", "cdn"]
    hub.reset_log()
    assert read(client, *repo, 1_000_000, 2_000_000) == DATA[1_000_000:2_000_000]
    assert read(client, *repo, 2_999_000, 3_000_000) == DATA[2_999_000:]
    assert kinds(hub) == ["cdn", "cdn"]
    # The CDN is another origin: the Hub's token never goes there, remembered or redirected.
    assert [r.auth for r in hub.requests()] == [None, None]


def test_a_refused_location_is_forgotten_and_the_hub_asked_again(hub: FakeHub, repo: tuple[str, str]) -> None:
    client = HubClient(endpoint=hub.endpoint, offline=False)
    assert read(client, *repo, 0, 10) == DATA[:10]
    hub.reset_log()
    # A signed CDN URL that expired: 403 from the CDN.
    with hub.inject("error", status=403, on="cdn", times=1) as fault:
        assert read(client, *repo, 500, 600) == DATA[500:600]
    assert fault.hits == 1
    assert kinds(hub) == ["cdn", "resolve", "cdn"]
    hub.reset_log()
    assert read(client, *repo, 700, 800) == DATA[700:800]
    assert kinds(hub) == ["cdn"]


def test_a_location_that_fails_is_forgotten(hub: FakeHub, repo: tuple[str, str]) -> None:
    client = HubClient(endpoint=hub.endpoint, offline=False)
    assert read(client, *repo, 0, 10) == DATA[:10]
    with hub.inject("error", status=500, on="cdn", times=1), pytest.raises(HubUnavailable):
        read(client, *repo, 10, 20)
    hub.reset_log()
    assert read(client, *repo, 10, 20) == DATA[10:20]
    assert kinds(hub) == ["resolve", "cdn"]


def test_files_served_by_the_hub_itself_are_always_asked_of_it(
    hub: FakeHub, repo: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mirror that serves the bytes on /resolve (no redirect): nothing to remember.
    monkeypatch.setattr(hub, "lfs_redirect", False)
    client = HubClient(endpoint=hub.endpoint, offline=False)
    for start in (0, 100, 200):
        assert read(client, *repo, start, start + 10) == DATA[start : start + 10]
    assert kinds(hub) == ["resolve", "resolve", "resolve"]


def test_a_missing_file_is_still_an_error(hub: FakeHub, repo: tuple[str, str]) -> None:
    client = HubClient(endpoint=hub.endpoint, offline=False)
    with pytest.raises(NotFound), client.open_range(repo[0], repo[1], "nope.bin", 0, 10):
        pass
