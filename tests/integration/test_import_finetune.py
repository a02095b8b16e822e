"""An imported reference checkpoint fine-tunes under a real launcher with several ranks:
``tools/import_ckpt.py --world-size 2`` (spawned gloo ranks write per-rank shards through the
Checkpointer), then ``torchrun --nproc_per_node 2 launch/pretrain.py checkpoint.resume=<import>``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import train_helpers as th

FIXTURE = th.REPO / "tests" / "data" / "rev_udm" / "mdlm.ckpt"


def _ids_shards(root: Path) -> Path:
    """Train/valid shards of random ids (V = 50, seq_len 12) written by the project's pipeline."""
    from udmtrain.data.prepare import prepare
    from udmtrain.data.sources import SourceSpec

    docs = root / "docs"
    docs.mkdir()
    gen = torch.Generator().manual_seed(2)
    for i in range(8):
        (docs / f"{i}.txt").write_text(" ".join(map(str, torch.randint(1, 50, (30,), generator=gen).tolist())))
    prepare(SourceSpec(kind="files", inputs=[str(docs)], valid_fraction=0.25), "ids:50", 12, str(root / "shards"),
            samples_per_shard=4, progress=False)
    return root / "shards"


def test_two_rank_fine_tune_of_an_import(tmp_path):
    run = tmp_path / "imported"
    proc = subprocess.run([sys.executable, str(th.REPO / "tools" / "import_ckpt.py"), "--from", "rev_udm",
                           str(FIXTURE), "--out", str(run), "--tokenizer", "none", "--world-size", "2"],
                          env=th._env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = run / "checkpoints" / "step_0000000000"
    assert (step / "rank1_state.pt").is_file() and (step / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    shards = _ids_shards(tmp_path)
    tuned = tmp_path / "ft"
    result = th.run(step / "recipe.yaml", [
        "run.name=ft", f"run.output_root={tmp_path}", f"checkpoint.resume={run}",
        f"data.train_shards={shards}/train-*.tar", f"data.valid_shards={shards}/valid-*.tar", "data.num_workers=0",
        "train.max_steps=2", "engine.micro_batch_size=2", "engine.global_batch_size=4", "eval.every=0",
        "train.log_every=1"], launcher="torchrun", nproc=2, timeout=300)
    th.check_ok(result, tuned, 2)
    assert f"resume from {step} at step 0" in result.stdout + result.stderr, th.describe(result)
    assert sorted(th.losses(tuned)) == [1, 2]
