"""Two CPU ranks (torchrun + gloo) stream the same shards: per epoch no sample is lost or duplicated,
validation visits every sample exactly once, and a stop/resume on both ranks is exact."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = r'''
import json, os, sys
from dataclasses import dataclass
import torch.distributed as dist
from udmtrain.data import build_train_loader, build_valid_loader, check_manifest

@dataclass
class Cfg:
    train_shards: str; valid_shards: str; seq_len: int = 32; shuffle_buffer: int = 6
    num_workers: int = 0; on_corrupt: str = "fail"; tokenizer: str = "gpt2"

out, result = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
check_manifest(Cfg(out, out), expected_vocab_size=50257)
loader = build_train_loader(Cfg(out, out), 1, rank, world, seed=5)
epoch0 = []
while True:
    sid = next(loader)["sample_ids"][0]
    if loader.state_dict()["cursors"][0][0] > 0:
        break
    epoch0.append(sid)
valid, nbatches = [], 0
for batch in build_valid_loader(Cfg(out, out), 2, rank, world):
    nbatches += 1
    valid += [s for s in batch["sample_ids"] if s]
cfg2 = Cfg(out, out, num_workers=2)
straight = build_train_loader(cfg2, 2, rank, world, seed=9)
expected = [s for _ in range(12) for s in next(straight)["sample_ids"]]
first = build_train_loader(cfg2, 2, rank, world, seed=9)
got = [s for _ in range(5) for s in next(first)["sample_ids"]]
state = first.state_dict(); first.close()
again = build_train_loader(cfg2, 2, rank, world, seed=9); again.load_state_dict(state)
got += [s for _ in range(7) for s in next(again)["sample_ids"]]
gathered = [None] * world
dist.all_gather_object(gathered, {"epoch0": epoch0, "valid": valid, "nbatches": nbatches, "resume_ok": got == expected})
if rank == 0:
    json.dump(gathered, open(result, "w"))
straight.close(); again.close()
dist.barrier()
dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_gloo(tmp_path):
    sys.path.insert(0, ROOT)
    from udmtrain.data.prepare import prepare
    from udmtrain.data.sources import SourceSpec

    rng = random.Random(1)
    words = "alpha beta gamma delta river stone light paper music window garden".split()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(3, 90))))
    out = str(tmp_path / "shards")
    manifest = prepare(SourceSpec(kind="files", inputs=[str(corpus)], valid_fraction=0.2), "gpt2", 32, out,
                       samples_per_shard=8, progress=False)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), str(script), out, str(result)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(result.read_text())

    def ids(split):
        return sorted(f"{s['name'][:-4]}-{i:06d}" for s in manifest["splits"][split]["shards"]
                      for i in range(s["samples"]))

    epoch0 = ranks[0]["epoch0"] + ranks[1]["epoch0"]
    assert sorted(epoch0) == ids("train")  # no sample lost or duplicated in the epoch
    assert not set(ranks[0]["epoch0"]) & set(ranks[1]["epoch0"])
    assert sorted(ranks[0]["valid"] + ranks[1]["valid"]) == ids("valid")
    assert ranks[0]["nbatches"] == ranks[1]["nbatches"]
    assert ranks[0]["resume_ok"] and ranks[1]["resume_ok"]
