"""A new process, sampler and model, each written and registered inside this test through the registry
alone (nothing else in udmtrain is edited), run end to end on CPU from a recipe: validation, build, a
few DeepSpeed train steps with a checkpoint, then sampling through the tools' loading path.

This is the contract of docs/architecture.md "Add a component": a process is one file (its forward
process, prior, reverse step, declared capabilities and its NELBO) plus a recipe; a sampler is one
file; a model is one file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import train_helpers as th
from udmtrain.diffusion.losses import DiffusionLoss
from udmtrain.diffusion.process import ForwardProcess, Noised
from udmtrain.diffusion.samplers.base import Sampler
from udmtrain.registry import LOSS, MODEL, PROCESS, SAMPLER


# ---------------------------------------------------------------------------- "toy_absorb.py" (a process)
class ToyAbsorbProcess(ForwardProcess):
    """Absorbing process with its own mask id V, written from its definition."""

    natural_nelbo = "toy_absorb_nelbo"
    capabilities = frozenset({"mask_state"})

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg=None, vocab_size: int = 0) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), vocab_size)
        self.mask_id = self.vocab_size

    @property
    def num_states(self) -> int:
        return self.vocab_size + 1

    def corrupt(self, x0_BL, alpha_B1, generator) -> Noised:
        keep = self._keep(x0_BL, alpha_B1, generator)
        return Noised(torch.where(keep, x0_BL, torch.full_like(x0_BL, self.mask_id)))

    def prior(self, batch_size, seq_len, generator, device="cpu") -> Noised:
        return Noised(torch.full((batch_size, seq_len), self.mask_id, dtype=torch.long, device=device))

    def ancestral_step(self, probs_BLV, xt_BL, noise_BL, alpha_t_B1, alpha_s_B1, generator) -> Noised:
        # a masked position is revealed w.p. (a_s - a_t) / (1 - a_t), to a token drawn from the prediction
        p = probs_BLV.double().clone()
        p[..., self.mask_id] = 0.0
        drawn = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=generator).reshape(xt_BL.shape)
        reveal = (alpha_s_B1 - alpha_t_B1) / (1 - alpha_t_B1)
        u = torch.rand(xt_BL.shape, generator=generator, dtype=torch.float64)
        return Noised(torch.where((xt_BL == self.mask_id) & (u < reveal), drawn, xt_BL))


class ToyAbsorbNelbo(DiffusionLoss):
    """Its NELBO: ``-a'/(1-a) log D(x | z)`` at masked positions."""

    requires = {"process": frozenset({"toy_absorb"})}

    @dataclass(kw_only=True, frozen=True)
    class Config:
        pass

    def __init__(self, cfg=None, process=None) -> None:
        super().__init__(cfg if cfg is not None else self.Config(), process)

    def per_token(self, param, logits_BLV, x0_BL, noised, alpha_B1, dalpha_B1):
        den = param.denoiser_logp(logits_BLV, noised.xt_BL, alpha_B1, noised.noise_BL)
        log_d = den.gather(-1, x0_BL[..., None]).squeeze(-1)
        masked = noised.xt_BL == self.process.mask_id
        return torch.where(masked, dalpha_B1 / (1 - alpha_B1) * log_d, torch.zeros_like(log_d))


# ---------------------------------------------------------------------------- "toy_argmax.py" (a sampler)
class ToyArgmaxSampler(Sampler):
    """Reveals masked positions like the ancestral step, but to the denoiser's argmax."""

    needs = frozenset({"mask_state"})

    def step(self, run, t, s):
        a_t, a_s = self.alpha_B1(t, run), self.alpha_B1(s, run)
        best = self.predict(run, t, "denoiser", alpha_B1=a_t).argmax(-1)
        reveal = ((a_s - a_t) / (1 - a_t)).expand(run.z_BL.shape)
        u = torch.rand(run.z_BL.shape, generator=run.generator, dtype=torch.float64)
        run.z_BL = torch.where((run.z_BL == self.mask_id) & (u < reveal), best, run.z_BL)


# ---------------------------------------------------------------------------- "toy_mlp.py" (a model)
class ToyMLP(nn.Module):
    """Per-position embedding -> MLP -> logits; ignores time (so it says so)."""

    @dataclass(kw_only=True, frozen=True)
    class Config:
        hidden: int = 16
        """Width of the hidden layer."""

    def __init__(self, cfg: Config, vocab_size: int, uses_noise_tokens: bool = False) -> None:
        super().__init__()
        self.time_conditioning = False
        self.embedding = nn.Embedding(vocab_size, cfg.hidden)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, vocab_size))

    def forward(self, xt_BL, sigma_B, noise_BL=None, doc_ids_BL=None):
        return self.mlp(self.embedding(xt_BL))

    def num_flops_per_token(self, seq_len: int) -> float:
        return 6.0 * sum(m.weight.numel() for m in self.mlp if isinstance(m, nn.Linear))


TOYS = [(PROCESS, "toy_absorb", ToyAbsorbProcess), (LOSS, "toy_absorb_nelbo", ToyAbsorbNelbo),
        (SAMPLER, "toy_argmax", ToyArgmaxSampler), (MODEL, "toy_mlp", ToyMLP)]


@pytest.fixture
def toys():
    """Register the toys through the registry; unregistered afterwards (other tests list the registries)."""
    for reg, name, cls in TOYS:
        reg.register(name)(cls)
    yield
    for reg, name, _ in TOYS:
        reg._classes.pop(name)


def test_toy_process_sampler_and_model_train_and_sample_from_a_recipe(toys, tiny_data, runs_root, monkeypatch):
    from udmtrain.config import load_recipe
    from udmtrain.train.build import build_trainer
    from udmtrain.train.inference import draw_samples, load_for_inference

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # init_distributed sets them: restored after the test
    name = "toys"
    overrides = [
        f"run.name={name}", f"run.output_root={runs_root}", f"data.seq_len={th.SEQ_LEN}",
        f"data.train_shards={tiny_data}/train-*.tar", f"data.valid_shards={tiny_data}/valid-*.tar",
        "data.num_workers=0", f"tokenizer={{name: sentencepiece, path: {tiny_data}/tokenizer.model}}",
        "engine.micro_batch_size=2", "engine.global_batch_size=4", "engine.precision=fp32",
        "lr_schedule.warmup_steps=2", "train.log_every=1", "train.max_steps=3", "eval.every=3",
        "eval.num_batches=1", "checkpoint.every=1000",
        "model={name: toy_mlp, hidden: 16}", "process={name: toy_absorb}", "loss={name: toy_absorb_nelbo}",
        "sampler={name: toy_argmax, num_steps: 4}",
    ]
    recipe = str(th.REPO / "recipes" / "quickstart.yaml")
    cfg = load_recipe(recipe, overrides)
    assert (cfg.process.name, cfg.model.name, cfg.sampler.name) == ("toy_absorb", "toy_mlp", "toy_argmax")

    run = build_trainer(cfg)
    try:
        assert run.trainer.train() == "done"
    finally:
        run.close()  # tears the process group down too
    rows = th.metrics(run.run_dir)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert any("val/nll" in r for r in rows)

    loaded = load_for_inference(run.run_dir, ["sampler.num_steps=4"])
    assert type(loaded.components.sampler) is ToyArgmaxSampler
    drawn = draw_samples(loaded, num_samples=3, batch_size=2, seed=0)
    tokens = drawn["tokens"]
    assert tokens.shape == (3, th.SEQ_LEN) and int(tokens.max()) < loaded.vocab_size  # no mask left
    assert drawn["nfe"] == [4, 4]

    # an unsupported pairing is refused at config time, naming the sampler, the process and the capability
    from udmtrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"sampler 'toy_argmax' needs process capabilities \['mask_state'\], "
                                          r"which process.name='uniform'"):
        load_recipe(recipe, overrides + ["process.name=uniform", "loss.name=plugin_nelbo"])
