"""Data pipeline: tokenizers, document sources, packing, webdataset shards, resumable loaders.

Only ``udmtrain/data/webdataset.py`` imports webdataset; ``tokenizers.py`` owns the lazy
``tokenizers``/``transformers`` import for GPT-2. Importing this package is cheap: the public
entry points are re-exported lazily.
"""

from __future__ import annotations

from udmtrain.data.errors import DataError

__all__ = ["DataError", "build_train_loader", "build_valid_loader", "check_manifest"]


def __getattr__(name: str):
    # Lazy re-exports keep `import udmtrain.data` free of torch/webdataset imports.
    if name in ("build_train_loader", "build_valid_loader"):
        from udmtrain.data import loader

        return getattr(loader, name)
    if name == "check_manifest":
        from udmtrain.data import manifest

        return manifest.check_manifest
    raise AttributeError(name)
