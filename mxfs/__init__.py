"""mxfs: Hugging Face models as a lazy, read-only FUSE filesystem backed by a shared HF-layout cache."""

__version__ = "0.1.0"
