"""Unit tests: one in-process gloo group (world size 1) per session (engine and train tests);
DeepSpeed's JIT-built ops cached in .cache/."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def dist_group():
    """Initialise (or reuse) a single-rank gloo process group; torn down at session end."""
    import torch.distributed as tdist

    from udmtrain.engine import deepspeed_engine as dse

    created = not (tdist.is_available() and tdist.is_initialized())
    yield dse.init_distributed("gloo")
    if created:
        dse.teardown()
