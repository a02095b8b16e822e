"""Load a trained udmtrain checkpoint for sampling and evaluation (no engine, no optimizer state).

    loaded = load_for_inference("runs/quickstart-audm", overrides=["sampler.num_steps=32"])
    loaded.model            # eval mode, EMA weights (use_ema=False: the raw fp32 weights)
    loaded.components       # process / schedule / parameterization / loss / sampler / objective
    judge = judge_from_spec("runs/quickstart-ar")   # a udmtrain AR run as an offline gen-PPL judge

A checkpoint is ``runs/<name>/checkpoints/step_<010d>/`` (see ``udmtrain.train.checkpoint``); a run
directory or its ``checkpoints/`` directory resolves through ``latest``. The recipe is the one saved
beside the weights (``recipe.yaml``), with optional dotted overrides (e.g. ``sampler.*`` or
``data.valid_shards``) validated by the recipe system.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from udmtrain.train.build import Components, NetworkCall, build_components, build_sampler
from udmtrain.train.checkpoint import LATEST, is_complete


class CheckpointNotFound(FileNotFoundError):
    """A ``--ckpt`` path that is not a run, checkpoints or complete step directory."""


class InferenceError(ValueError):
    """A checkpoint that cannot serve the request (no EMA, wrong process, wrong model kind, ...)."""


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The step directory named by ``path``.

    ``path`` may be a complete ``step_XXXXXXXXXX`` directory (returned as is), a run directory or its
    ``checkpoints/`` directory (resolved through ``latest``, falling back to the newest complete step
    when ``latest`` is missing). Anything else raises ``CheckpointNotFound`` naming the path.
    """
    from udmtrain.train.checkpoint import complete_checkpoints

    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointNotFound(f"checkpoint {os.fspath(path)!r} does not exist")
    from udmtrain.train.exports import is_export

    if is_complete(p) or is_export(p):
        return p
    for ckpt_dir in (p, p / "checkpoints"):
        latest = ckpt_dir / LATEST
        if latest.is_file():
            candidate = ckpt_dir / latest.read_text().strip()
            if is_complete(candidate):
                return candidate
        complete = complete_checkpoints(ckpt_dir)
        if complete:
            return complete[-1]
    raise CheckpointNotFound(
        f"checkpoint {os.fspath(path)!r} is not a udmtrain run directory, checkpoints directory or complete "
        "step_XXXXXXXXXX directory (with meta.json and ds/)")


@dataclass
class Loaded:
    """A checkpoint ready for inference."""

    cfg: Any
    """The saved ``RunConfig`` with the caller's overrides applied."""
    components: Components
    """Built from ``cfg``; ``components.model`` is ``model``."""
    model: torch.nn.Module
    """The network, in eval mode, on ``device``, with EMA (or raw) fp32 weights."""
    tokenizer: Any
    """``udmtrain.data.tokenizers.Tokenizer`` of the run."""
    step_dir: Path
    """The resolved step directory."""
    meta: dict
    """meta.json (step, tokens_seen, world_size, vocab_size, ...)."""
    vocab_size: int = 0
    """V the network was trained with (meta.json's, else the tokenizer's)."""
    use_ema: bool = True
    """Whether ``model`` holds the EMA weights."""
    device: torch.device = torch.device("cpu")
    """Where ``model`` lives."""

    @property
    def step(self) -> int:
        return int(self.meta.get("step", -1))

    def network(self) -> NetworkCall:
        """The model under the recipe's autocast (``(xt_BL, sigma_B, noise_BL) -> logits`` or ``x -> logits``)."""
        return NetworkCall(self.model, self.cfg.engine.precision, self.device)

    def protocol(self) -> dict:
        """JSON-able identity of the weights (recorded by every tool)."""
        return {"checkpoint": os.fspath(self.step_dir), "step": self.step, "ema": self.use_ema,
                "run_name": self.meta.get("run_name"), "precision": self.cfg.engine.precision,
                "vocab_size": self.vocab_size}


def load_ema_shadow(step_dir: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The EMA shadow ``{name: fp32 tensor}`` stored in ``rank0_state.pt``, or None without EMA."""
    from udmtrain.train.checkpoint import load_rank_state

    state = load_rank_state(step_dir, 0)
    ema = state.get("ema")
    return None if ema is None else dict(ema["shadow"])


def load_for_inference(ckpt: str | os.PathLike, overrides: Sequence[str] = (), use_ema: bool = True,
                       device: str | torch.device = "cpu", raw_weights_flag: str = "--no-ema") -> Loaded:
    """Resolve ``ckpt``, rebuild the run's components from its recipe and load the weights.

    Weights: the EMA shadow of rank 0's TrainState when ``use_ema`` (an error if the run kept no EMA),
    else the full fp32 weights merged from the DeepSpeed shards (``load_fp32_state_dict``: any ZeRO
    stage, fp32 or bf16). The vocabulary size is the one the run trained with (meta.json), checked
    against the tokenizer's. ``ConfigError`` for bad overrides; ``CheckpointNotFound`` for bad paths.
    ``raw_weights_flag``: the caller's option for raw weights, named when the run kept no EMA.
    """
    from udmtrain.config import load_recipe
    from udmtrain.data.tokenizers import load_tokenizer
    from udmtrain.engine.deepspeed_engine import load_fp32_state_dict

    from udmtrain.train.checkpoint import read_meta
    from udmtrain.train.exports import is_export, load_export

    step_dir = resolve_checkpoint(ckpt)
    if is_export(step_dir):
        return load_export(step_dir, overrides, use_ema, device)
    meta = read_meta(step_dir)
    recipe = step_dir / "recipe.yaml"
    if not recipe.is_file():
        raise CheckpointNotFound(f"{step_dir} has no recipe.yaml; it was not written by udmtrain's Checkpointer")
    cfg = load_recipe(os.fspath(recipe), list(overrides))
    tokenizer = load_tokenizer(cfg.tokenizer)
    vocab_size = int(meta.get("vocab_size") or tokenizer.vocab_size)
    if int(tokenizer.vocab_size) != vocab_size:
        raise InferenceError(f"{step_dir} was trained with V={vocab_size} but the tokenizer {tokenizer.spec()!r} has "
                         f"V={tokenizer.vocab_size}; point tokenizer.path at the run's tokenizer")
    trained_with = meta.get("tokenizer_sha256")
    if trained_with is not None and tokenizer.identity().get("sha256") != trained_with:
        raise InferenceError(f"{step_dir} was trained with another tokenizer than {tokenizer.spec()!r} (its files' "
                             "sha256 differs: retrained or replaced since); decoded text would be wrong. Point "
                             "tokenizer.path at the tokenizer the run was trained with")
    try:
        components = build_components(cfg, vocab_size)
    except ValueError as err:  # e.g. a sampler setting its constructor rejects
        raise InferenceError(f"{step_dir}: cannot build the recipe's components: {err}") from err
    model = components.model
    if use_ema:
        shadow = load_ema_shadow(step_dir)
        if shadow is None:
            raise InferenceError(f"{step_dir} holds no EMA weights (train.ema_decay was 0); use {raw_weights_flag} "
                             "(use_ema=False) to load the raw weights")
        wanted = set(model.state_dict())
        state = dict(shadow)
        if not wanted <= set(state):  # buffers are not averaged: take them from the raw weights
            raw = load_fp32_state_dict(step_dir)
            state.update({k: v for k, v in raw.items() if k not in state})
    else:
        state = load_fp32_state_dict(step_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InferenceError(f"{step_dir}: weights do not match the recipe's model (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    device = torch.device(device)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Loaded(cfg=cfg, components=components, model=model, tokenizer=tokenizer, step_dir=step_dir,
                  meta=meta, vocab_size=vocab_size, use_ema=use_ema, device=device)


class ARJudge:
    """A udmtrain AR checkpoint as a ``udmtrain.eval.gen_ppl.Judge`` (an offline judge).

    ``tokenize``: the AR run's tokenizer with BOS prepended (as in its training data);
    ``nll``: ``-log p(s_{j+1} | s_{<=j})`` from the AR model, float64 ``[B, Lmax - 1]`` on right-padded
    batches (causal attention: padding after a sequence never changes its scores).
    """

    def __init__(self, loaded: Loaded) -> None:
        if loaded.components.is_diffusion:
            raise InferenceError(f"judge checkpoint {loaded.step_dir} is a diffusion model; a judge must be an "
                             "autoregressive run (model ar_transformer)")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.eos_id = int(self.tokenizer.eos_id)
        self.bos_id = int(self.tokenizer.bos_id)
        self.pad_id = int(self.tokenizer.pad_id)
        self.max_len = int(loaded.cfg.data.seq_len)
        self.network = loaded.network()

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """``[BOS] + encode(text)`` for each text (no truncation)."""
        return [[self.bos_id] + list(ids) for ids in self.tokenizer.encode_batch(list(texts))]

    @torch.no_grad()
    def nll(self, token_batch: Sequence[Sequence[int]]) -> torch.Tensor:
        """Next-token NLL ``[B, Lmax - 1]`` float64: entry (b, j) = ``-log p(s_b[j+1] | s_b[:j+1])``."""
        L = max([len(ids) for ids in token_batch] + [1])
        x_BL = torch.full((len(token_batch), L), self.pad_id, dtype=torch.long)
        for b, ids in enumerate(token_batch):
            x_BL[b, :len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        if L < 2:
            return torch.zeros(len(token_batch), 0, dtype=torch.float64)
        x_BL = x_BL.to(self.loaded.device)
        logp_BLV = torch.log_softmax(self.network(x_BL)[:, :-1].float(), dim=-1)
        return -logp_BLV.gather(-1, x_BL[:, 1:, None]).squeeze(-1).double().cpu()

    def identity(self) -> dict:
        p = next(self.loaded.model.parameters())
        return {"kind": "udmtrain_ar", "name_or_path": os.fspath(self.loaded.step_dir), **self.loaded.protocol(),
                "class": type(self.loaded.model).__name__, "dtype": str(p.dtype).replace("torch.", ""),
                "device": str(p.device), "num_parameters": sum(q.numel() for q in self.loaded.model.parameters()),
                "tokenizer": self.tokenizer.identity(), "eos_id": self.eos_id, "bos_id": self.bos_id,
                "max_len": self.max_len}


def is_udmtrain_checkpoint(spec: Any) -> bool:
    """True when ``spec`` is a path that ``resolve_checkpoint`` accepts."""
    if not isinstance(spec, (str, os.PathLike)) or not os.path.isdir(spec):
        return False
    try:
        resolve_checkpoint(spec)
    except CheckpointNotFound:
        return False
    return True


def judge_from_spec(spec: Any, device: str | torch.device = "cpu", use_ema: bool = True, **judge_kwargs: Any):
    """``ARJudge`` for a udmtrain AR run/step directory; otherwise ``udmtrain.eval.gen_ppl.load_judge``
    (a Hugging Face hub id, a local Hugging Face directory, or a ``Judge`` object)."""
    if is_udmtrain_checkpoint(spec):
        return ARJudge(load_for_inference(spec, use_ema=use_ema, device=device, raw_weights_flag="--judge-no-ema"))
    if isinstance(spec, (str, os.PathLike)) and os.path.exists(spec) and not os.path.isfile(
            os.path.join(spec, "config.json")):  # a local path is never looked up on the hub
        raise InferenceError(f"--judge {os.fspath(spec)!r} is neither a udmtrain run/step directory (with "
                             "checkpoints/latest or meta.json + ds/) nor a Hugging Face model directory (with "
                             "config.json); give one of those, or a hub id such as gpt2-large")
    from udmtrain.eval.gen_ppl import load_judge

    return load_judge(spec, device=device, **judge_kwargs)


# ---------------------------------------------------------------------------- shared by the tools/ CLIs
def add_sampler_arguments(parser: Any) -> None:
    """The sampler flags of ``tools/sample.py`` and ``tools/gen_ppl.py`` (each becomes a ``sampler.*``
    override; unset flags keep the recipe's value)."""
    parser.add_argument("--sampler", help="registered sampler name (default: the recipe's sampler)")
    from udmtrain.utils.argtypes import positive_int

    parser.add_argument("--steps", type=positive_int, help="sampler.num_steps (network evaluations per sample)")
    parser.add_argument("--temperature", type=float, help="sampler.temperature")
    parser.add_argument("--top-p", type=float, help="sampler.top_p (nucleus mass)")
    parser.add_argument("--temperature-on", choices=["loo", "denoiser", "logits", "auto"],
                        help="sampler.temperature_on")


def sampler_overrides(args: Any, extra: Sequence[str] = ()) -> list[str]:
    """Recipe overrides from the sampler flags, then the user's dotted overrides (``extra``).

    ``sampler.name`` comes first: naming another sampler replaces the whole section (the recipe
    merge rule), so the other ``sampler.*`` settings then apply to the new sampler.
    """
    from udmtrain.config.loader import FlagOverride

    out = [FlagOverride(f"sampler.name={args.sampler}", "--sampler")] if getattr(args, "sampler", None) else []
    for flag, key in (("steps", "num_steps"), ("temperature", "temperature"), ("top_p", "top_p"),
                      ("temperature_on", "temperature_on")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(FlagOverride(f"sampler.{key}={value}", f"--{flag.replace('_', '-')}"))
    return out + list(extra)


def split_overrides(unknown: Sequence[str]) -> list[str]:
    """Dotted ``section.key=value`` overrides left over by argparse; anything else is a usage error."""
    bad = [a for a in unknown if a.startswith("-") or "=" not in a]
    if bad:
        raise SystemExit(f"udmtrain: unrecognised argument(s) {' '.join(bad)}; options are listed by --help, "
                         "recipe overrides look like sampler.num_steps=32")
    return list(unknown)


def encode_prefix(loaded: Loaded, text: str | None, batch_size: int) -> tuple[torch.Tensor | None, int]:
    """``[BOS] + encode(text)`` repeated over the batch (``[B, P]``) and ``P``; (None, 0) without text."""
    if not text:
        return None, 0
    ids = [int(loaded.tokenizer.bos_id)] + list(loaded.tokenizer.encode(text))
    seq_len = int(loaded.cfg.data.seq_len)
    if len(ids) > seq_len:
        raise InferenceError(f"--prefix is {len(ids)} tokens (with BOS) but sequences are {seq_len} long")
    return torch.tensor(ids, dtype=torch.long).repeat(batch_size, 1).to(loaded.device), len(ids)


@torch.no_grad()
def draw_samples(loaded: Loaded, num_samples: int, batch_size: int, seed: int,
                 prefix_text: str | None = None, network: Any = None) -> dict:
    """``num_samples`` sequences of ``data.seq_len`` tokens from the recipe's sampler.

    Batch ``i`` uses a generator seeded with ``udmtrain.utils.seed.batch_seed(seed, i)`` (recorded, so any
    sample is reproducible; runs with different seeds share no batch); the last batch may be smaller.
    Returns ``{"tokens": [N, L] LongTensor, "nfe":
    [per batch], "seeds": [per batch], "batch_sizes": [...]}``.
    """
    sampler = loaded.components.sampler
    if not loaded.components.is_diffusion:
        raise InferenceError(f"{loaded.step_dir} is an autoregressive run; sampling needs a diffusion checkpoint")
    if sampler is None:
        raise InferenceError(f"{loaded.step_dir} has no sampler: its recipe "
                             "names none (pass --sampler NAME)")
    if num_samples < 1 or batch_size < 1:
        raise InferenceError(f"--num-samples ({num_samples}) and --batch-size ({batch_size}) must be >= 1")
    network = network if network is not None else loaded.network()
    from udmtrain.utils.seed import batch_seed

    tokens, nfes, seeds, sizes = [], [], [], []
    for i, start in enumerate(range(0, num_samples, batch_size)):
        B = min(batch_size, num_samples - start)
        seeds.append(batch_seed(seed, i))
        generator = torch.Generator(device=loaded.device).manual_seed(seeds[-1])
        prefix_BL, prefix_len = encode_prefix(loaded, prefix_text, B)
        out = sampler.sample(network, B, int(loaded.cfg.data.seq_len), generator, prefix_BL=prefix_BL,
                             prefix_len=prefix_len)
        tokens.append(out.tokens_BL.cpu())
        nfes.append(int(out.nfe))
        sizes.append(B)
    return {"tokens": torch.cat(tokens), "nfe": nfes, "seeds": seeds, "batch_sizes": sizes}


def sampler_settings(loaded: Loaded) -> dict:
    """The resolved sampler section (name + every config field) for the JSON records."""
    return loaded.cfg.sampler.to_dict() if loaded.cfg.sampler is not None else {}


def run_cli(main: Any, argv: Sequence[str] | None = None) -> int:
    """Run a tool's ``main``: recipe problems -> the config report, bad paths/checkpoints/data -> one
    ``udmtrain: ...`` line; exit code 2, no traceback (``UDMTRAIN_DEBUG=1`` keeps tracebacks)."""
    import sys

    from udmtrain.config import ConfigError, report_and_exit
    from udmtrain.data.errors import DataError
    from udmtrain.engine.deepspeed_engine import RendezvousError
    from udmtrain.train.checkpoint import CheckpointError
    from udmtrain.utils.io import OutputError, UnsafeFileError

    try:
        return int(main(argv) or 0)
    except ConfigError as err:
        if os.environ.get("UDMTRAIN_DEBUG") == "1":
            raise
        report_and_exit(err)
    except (FileNotFoundError, DataError, InferenceError, UnsafeFileError, OutputError, CheckpointError,
            RendezvousError) as err:
        if os.environ.get("UDMTRAIN_DEBUG") == "1":
            raise
        if int(os.environ.get("RANK", "0") or 0) == 0:
            print(f"udmtrain: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


def with_sampler(loaded: Loaded, overrides: Sequence[str]) -> Loaded:
    """``loaded`` with its sampler rebuilt from the saved recipe + ``overrides`` (weights shared, not
    reloaded): a sweep changes ``sampler.*`` per setting at the cost of one recipe validation."""
    import dataclasses

    from udmtrain.config import load_recipe

    cfg = load_recipe(os.fspath(loaded.step_dir / "recipe.yaml"), list(overrides))
    c = loaded.components
    if cfg.sampler is None or not c.is_diffusion:
        raise InferenceError(f"{loaded.step_dir}: no sampler to rebuild (autoregressive run or no sampler section)")
    try:
        sampler = build_sampler(cfg.sampler, c)
    except ValueError as err:
        raise InferenceError(f"sampler {cfg.sampler.name!r}: {err}") from err
    return dataclasses.replace(loaded, cfg=cfg, components=dataclasses.replace(c, sampler=sampler))


def is_autoregressive_run(ckpt: str | os.PathLike) -> bool:
    """Whether ``ckpt``'s saved recipe has no ``process`` (an AR run), read before any override is applied
    (``--steps`` would otherwise fail on the AR recipe's empty ``sampler`` section with a confusing
    message). False when the recipe is missing: ``load_for_inference`` reports that."""
    from udmtrain.config import load_recipe

    step_dir = resolve_checkpoint(ckpt)
    if not (step_dir / "recipe.yaml").is_file():
        return False
    return load_recipe(os.fspath(step_dir / "recipe.yaml")).process is None


def require_diffusion_run(ckpt: str | os.PathLike, tool: str) -> None:
    """``InferenceError`` naming the real problem when ``ckpt`` is an autoregressive run."""
    if is_autoregressive_run(ckpt):
        raise InferenceError(f"{os.fspath(ckpt)} is an autoregressive run (its recipe has no process); {tool} needs "
                             "a diffusion run, e.g. runs/quickstart-audm or runs/quickstart-udlm")


def sampling_progress(loaded: Loaded, num_samples: int, batch_size: int, desc: str = "sampling"):
    """A ``udmtrain.utils.progress`` display for ``draw_samples``, counting network evaluations:
    ``sampler.num_steps`` per batch (a sampler that skips evaluations finishes below the total)."""
    from udmtrain.utils.progress import progress

    steps = getattr(loaded.cfg.sampler.cfg, "num_steps", None) if loaded.cfg.sampler is not None else None
    batches = -(-num_samples // batch_size)
    return progress(steps * batches if steps else None, f"{desc} ({num_samples} samples, {batches} batch(es))",
                    unit="nfe")

