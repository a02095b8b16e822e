"""An imported reference checkpoint fine-tunes under a real launcher with several ranks:
``tools/import_ckpt.py --world-size 2`` (spawned gloo ranks write per-rank shards through the
Checkpointer), then ``torchrun --nproc_per_node 2 launch/pretrain.py checkpoint.resume=<import>``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import train_helpers as th

sys.path.insert(0, str(th.REPO / "tests" / "unit" / "interop"))
from interop_helpers import ids_shards  # noqa: E402  (the shard builder the unit tests use)

FIXTURE = th.REPO / "tests" / "data" / "rev_udm" / "mdlm.ckpt"


def test_two_rank_fine_tune_of_an_import(tmp_path):
    run = tmp_path / "imported"
    proc = subprocess.run([sys.executable, str(th.REPO / "tools" / "import_ckpt.py"), "--from", "rev_udm",
                           str(FIXTURE), "--out", str(run), "--tokenizer", "none", "--world-size", "2"],
                          env=th._env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = run / "checkpoints" / "step_0000000000"
    assert (step / "rank1_state.pt").is_file() and (step / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    shards = ids_shards(tmp_path, num_docs=8, doc_len=30, valid_fraction=0.25, seed=2)
    tuned = tmp_path / "ft"
    result = th.run(step / "recipe.yaml", [
        "run.name=ft", f"run.output_root={tmp_path}", f"checkpoint.resume={run}",
        f"data.train_shards={shards}/train-*.tar", f"data.valid_shards={shards}/valid-*.tar", "data.num_workers=0",
        "train.max_steps=2", "engine.micro_batch_size=2", "engine.global_batch_size=4", "eval.every=0",
        "train.log_every=1"], launcher="torchrun", nproc=2, timeout=300)
    th.check_ok(result, tuned, 2)
    assert f"resume from {step} at step 0" in result.stdout + result.stderr, th.describe(result)
    assert sorted(th.losses(tuned)) == [1, 2]
