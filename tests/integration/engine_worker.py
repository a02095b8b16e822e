"""Worker for tests/integration/test_engine_resume.py, run by ``deepspeed --num_gpus 2`` on CPU (gloo).

First an all-reduce through DeepSpeed's shared-memory op, whose workspace names ``init_distributed`` has
already unlinked (``rank<r>_shm.json``). Then, for each ZeRO stage: train 4 steps straight; train 2, save with the Checkpointer, perturb the RNG,
build a fresh engine, load, train 2 more. Each rank writes ``rank<r>_stage<s>.json`` with both loss
sequences and whether the final parameters are bitwise equal; results are written *before* the
teardown, so the test tolerates the documented gloo exit SIGABRT flake.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for an uninstalled checkout

from udmtrain.engine import deepspeed_engine as dse  # noqa: E402
from udmtrain.engine.optim import AdamWBuilder, CosineLR, build_lr_schedule  # noqa: E402
from udmtrain.train.checkpoint import Checkpointer  # noqa: E402
from udmtrain.train.state import TrainState  # noqa: E402
from udmtrain.utils.seed import seed_everything  # noqa: E402


@dataclass(frozen=True)
class Eng:
    zero_stage: int
    precision: str = "fp32"
    micro_batch_size: int = 2
    global_batch_size: int = 8  # 2 ranks x micro 2 x accumulation 2
    grad_clip: float = 1.0
    offload_optimizer: bool = False
    offload_param: bool = False
    compile: bool = False
    deepspeed_extra: dict = field(default_factory=dict)


def make_engine(stage: int, world: int, init_seed: int):
    seed_everything(init_seed)  # same on every rank, so initial weights agree
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.GELU(), torch.nn.Linear(16, 4))
    sched = build_lr_schedule("cosine", CosineLR.Config(warmup_steps=1, decay_steps=6), max_steps=6)
    return dse.create_engine(model, AdamWBuilder(AdamWBuilder.Config(lr=1e-2)), sched,
                             dse.build_ds_config(Eng(zero_stage=stage), world))


def train(engine, state: TrainState, stop: int, rank: int) -> list[float]:
    losses = []
    while state.step < stop:
        for _ in range(engine.gradient_accumulation_steps()):
            pos = state.data_cursor.get("pos", 0)
            g = torch.Generator().manual_seed(10_000 * rank + pos)  # per-rank data stream
            x, y = torch.randn(2, 8, generator=g), torch.randn(2, 4, generator=g)
            loss = (engine(x) - y).pow(2).mean()
            engine.backward(loss)
            dse.step(engine)
            losses.append(loss.item())
            state.data_cursor = {"pos": pos + 1}
        state.step += 1
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--local_rank", type=int, default=None)  # appended by the deepspeed launcher
    args = parser.parse_args()
    rank, world, _ = dse.init_distributed()
    out = Path(args.out)
    # DeepSpeed's shared-memory all-reduce still works after init_distributed unlinked its workspace names
    import deepspeed.comm as dist

    summed = torch.full((4,), float(rank + 1))
    dist.inference_all_reduce(summed)
    (out / f"rank{rank}_shm.json").write_text(json.dumps({
        "workspace": dse.shm_workspace_path(rank), "workspace_left": os.path.exists(dse.shm_workspace_path(rank)),
        "summed": summed.tolist()}))
    for stage in map(int, args.stages.split(",")):
        straight, st = make_engine(stage, world, 0), TrainState()
        seed_everything(1, rank)
        want = train(straight, st, 4, rank)
        want_params = dse.full_state_dict(straight.module)

        first, s1 = make_engine(stage, world, 0), TrainState()
        seed_everything(1, rank)
        got = train(first, s1, 2, rank)
        saver = Checkpointer(out / f"run{stage}", every=2, keep_last=1)
        saver.save(first, 2, s1, {"model": {"name": "mlp"}})
        torch.rand(7)  # RNG drawn after the save must not matter
        second, s2 = make_engine(stage, world, 5), TrainState()
        saver.load(second, saver.find_resume(), s2, recipe_dict={"model": {"name": "mlp"}})
        got += train(second, s2, 4, rank)
        params = dse.full_state_dict(second.module)
        result = {"rank": rank, "world": world, "stage": stage, "straight": want, "resumed": got,
                  "params_equal": all(torch.equal(params[k], want_params[k]) for k in want_params),
                  "lr": [straight.get_lr()[0], second.get_lr()[0]],
                  "files": sorted(p.name for p in saver.find_resume().iterdir())}
        (out / f"rank{rank}_stage{stage}.json").write_text(json.dumps(result))
    dse.teardown()


if __name__ == "__main__":
    main()
