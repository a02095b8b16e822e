"""Shared by the interop tests: the rev_udm fixtures (tests/data/rev_udm, produced by the reference code
itself, see its README) and re-keyed variants of them written with plain ``torch.save``."""

from __future__ import annotations

from pathlib import Path

import torch

from udmtrain.interop.reference import read_checkpoint

DATA = Path(__file__).resolve().parents[2] / "data" / "rev_udm"
FIXTURES = ["udlm_mean_loo", "udlm_mean", "mdlm", "audm_separate_linear", "audm_shared_mlp"]


def fixture(name: str) -> Path:
    return DATA / f"{name}.ckpt"


def expected(name: str) -> dict:
    return torch.load(DATA / f"{name}.expected.pt", weights_only=True)


def logits(model: torch.nn.Module, exp: dict) -> torch.Tensor:
    """The udmtrain network's fp32 eval-mode logits on the fixture's inputs."""
    model.eval()
    with torch.no_grad():
        return model(exp["x"], exp["sigma"], exp.get("conditioning_tokens"))


def rekeyed(name: str, out: Path, prefix: str = "backbone.", config: dict | None = None,
            edit=None, with_ema: bool = True) -> Path:
    """The fixture re-saved as a plain Lightning-style dict with the DiT under ``prefix`` (MDLM family:
    ``backbone.``), optionally another ``config``, an ``edit(state_dict)`` applied, without the EMA."""
    ref = read_checkpoint(fixture(name), "rev_udm")
    state = {prefix + k: v for k, v in ref.backbone.items()}
    if edit is not None:
        edit(state)
    names = [k for k in ref.backbone if k != "rotary_emb.inv_freq"]
    obj = {"state_dict": state, "global_step": 7,
           "hyper_parameters": {"config": config if config is not None else ref.config},
           "ema": {"decay": ref.ema_decay, "num_updates": ref.ema_num_updates,
                   "shadow_params": [ref.ema_shadow[n] for n in names], "collected_params": None}
           if with_ema else None}
    torch.save(obj, out)
    return out


def ids_shards(root: Path, num_docs: int, doc_len: int, valid_fraction: float, seed: int) -> Path:
    """``root/shards``: train/valid shards (seq_len 12) of random documents over ids 1..49, written by the
    project's own pipeline (``prepare`` with the ``ids:50`` tokenizer) from text files of ids."""
    from udmtrain.data.prepare import prepare
    from udmtrain.data.sources import SourceSpec

    docs = root / "docs"
    docs.mkdir()
    gen = torch.Generator().manual_seed(seed)
    for i in range(num_docs):
        (docs / f"{i}.txt").write_text(" ".join(map(str, torch.randint(1, 50, (doc_len,), generator=gen).tolist())))
    prepare(SourceSpec(kind="files", inputs=[str(docs)], valid_fraction=valid_fraction), "ids:50", 12,
            str(root / "shards"), samples_per_shard=4, progress=False)
    return root / "shards"
