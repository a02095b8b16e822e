"""Side-by-side CPU benchmark: the REFERENCE code's UDLM ancestral sampler (samsongourevitch/rev_udm), timed
the way ``tools/bench.py sample`` times udmtrain's, so the two NFE/s can be put next to each other.

    git clone https://github.com/samsongourevitch/rev_udm ~/rev_udm
    pip install --target ~/refsite --no-deps omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 hydra-core==1.3.2 \
        lightning lightning-utilities torchmetrics timm
    python tools/bench_reference.py --reference-repo ~/rev_udm --extra-path ~/refsite --out ref.json
    python tools/bench.py sample --recipe recipes/udlm_loo.yaml --vocab-size 4096 --batch-size 8 --seq-len 128 \
        --steps 8 --repeats 2 --warmup 1 --sampler ancestral model.hidden_size=256 model.num_blocks=8 \
        model.num_heads=8 model.dropout=0.0 engine.precision=fp32

THIS RUNS THE PYTHON CODE OF THE CHECKOUT YOU NAME (its ``src/`` and ``utils/``): only on your request,
for a measurement; nothing of it is copied into udmtrain. Results and their reading: docs/perf.md.

It builds the reference's own objects as its ``trainer.py`` does for ``algo=udlm``
(``lit_diffusion_base.resolve_diffusion_model("udlm")`` -> ``ddm.UDLM``, then ``lit_text_model.LitTextDDM``
with ``model_prediction=mean_loo``) from its ``configs/config.yaml`` + ``algo/udlm.yaml`` +
``model/tiny.yaml`` (hidden 256, 8 blocks, 8 heads, cond_dim 128) with ``model.length=--seq-len``,
dropout 0, EMA off, and times its sampling entry point ``LitTextDDM.generate_samples(num_samples=B,
nfes=N)`` (-> ``DiscreteDiffusion.sample`` -> ``UDLM._ancestral_step``). NFE = network calls, counted and
checked. A stand-in tokenizer of size --vocab-size has no mask token (the reference's GPT-2 / OWT rule:
the DiT gets V+1 outputs, UDLM K=V); ``--tokenizer-mask in-vocab`` gives the BERT/lm1b rule (V outputs).

Two stand-ins make the reference importable on a CPU machine, written to a temporary directory at start:
``flash_attn`` (CUDA-only; on the non-causal UDLM path the reference calls only its pure-PyTorch rotary
embedding, which the stand-in implements from the rotate-half formula below; the causal kernels raise)
and ``timm`` (its package ``__init__`` imports torchvision, which has no CPU wheel for every torch; the
stand-in serves ``timm.scheduler``, which the reference imports at load time, from the installed timm).

Precisions, interleaved round by round: ``fp32`` = the reference as written (its ``torch.cuda.amp``
autocast regions do nothing on CPU); ``bf16`` = ``--bf16-mode outer`` (default): CPU bf16 autocast around
the network call, as udmtrain's ``NetworkCall``; ``mapped``: the reference's own CUDA autocast regions
redirected to CPU autocast. The all-zero initial weights (adaLN, output layer) are redrawn N(0, 0.02) as
udmtrain's bench does (``--keep-zero-init`` keeps them). JSON: per precision ``nfe_per_s``, ``s_per_nfe``,
``network_s_per_nfe``, ``overhead_fraction`` (medians over --repeats), ``tokens_per_s`` and the raw runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udmtrain.utils.argtypes import nonnegative_int, positive_int  # noqa: E402
from udmtrain.utils.io import atomic_open, check_writable  # noqa: E402

FLASH_ATTN_STAND_IN = {
    "__init__.py": "from . import flash_attn_interface, layers  # noqa: F401\n__version__ = 'udmtrain-stand-in'\n",
    "layers/__init__.py": "from . import rotary  # noqa: F401\n",
    "layers/rotary.py": '''"""udmtrain stand-in: rotary position embedding, rotate-half convention.

For x [batch, seqlen, heads, head_dim] and cos, sin [seqlen, r/2] (r <= head_dim rotated channels):
out[..., :r] = x_r * C + rotate_half(x_r) * S with C = [cos, cos], S = [sin, sin] (broadcast over heads) and
rotate_half([a, b]) = [-b, a]; channels r: pass through unchanged.
"""
import torch


def apply_rotary_emb_torch(x, cos, sin, interleaved=False):
    if interleaved:
        raise NotImplementedError("udmtrain stand-in: only the rotate-half (non-interleaved) convention")
    r = 2 * cos.shape[-1]
    c = torch.cat([cos, cos], dim=-1)[: x.shape[1], None, :]
    s = torch.cat([sin, sin], dim=-1)[: x.shape[1], None, :]
    x_r = x[..., :r]
    half_a, half_b = x_r.chunk(2, dim=-1)
    rotated = torch.cat([-half_b, half_a], dim=-1)
    return torch.cat([x_r * c + rotated * s, x[..., r:]], dim=-1)


def apply_rotary_emb_qkv_(*args, **kwargs):
    raise NotImplementedError("udmtrain stand-in: the causal (flash) path is CUDA-only")
''',
    "flash_attn_interface.py": ("def flash_attn_varlen_qkvpacked_func(*args, **kwargs):\n"
                                "    raise NotImplementedError('udmtrain stand-in: the flash-attn kernel is CUDA-only')\n"),
}


def _git_revision(repo: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def setup_paths(repo: str, extra: list[str], stand_ins: str) -> None:
    """sys.path: the stand-ins, the reference (root for ``utils``, ``src/`` for ``ddm``, ``models``, ``lit_*``:
    its trainer runs with both), then ``--extra-path`` directories, then this environment."""
    timm_dir = next((os.path.join(p, "timm") for p in [*extra, *sys.path]
                     if os.path.isfile(os.path.join(p, "timm", "__init__.py"))), None)
    for name, text in FLASH_ATTN_STAND_IN.items():
        path = os.path.join(stand_ins, "flash_attn", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    if timm_dir is not None:  # serve timm's submodules without running its torchvision-importing __init__
        os.makedirs(os.path.join(stand_ins, "timm"), exist_ok=True)
        with open(os.path.join(stand_ins, "timm", "__init__.py"), "w", encoding="utf-8") as handle:
            handle.write(f"__path__.append({timm_dir!r})\n")
    for path in reversed([stand_ins, repo, os.path.join(repo, "src"), *extra]):
        sys.path.insert(0, os.path.abspath(path))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-repo", required=True, help="a checkout of samsongourevitch/rev_udm (its code is run)")
    p.add_argument("--extra-path", action="append", default=[],
                   help="a directory of the reference's extra packages (pip install --target); repeatable")
    p.add_argument("--steps", type=positive_int, default=8, help="sampling.nfes = network calls per call (default 8)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=128, help="model.length (default 128)")
    p.add_argument("--vocab-size", type=positive_int, default=4096, help="tokenizer size V (default 4096)")
    p.add_argument("--tokenizer-mask", choices=["none", "in-vocab"], default="none",
                   help="none: no mask token in the tokenizer (GPT-2/OWT; the DiT gets V+1 outputs); in-vocab: "
                        "the mask token inside V (BERT/lm1b; V outputs)")
    p.add_argument("--hidden-size", type=positive_int, default=256)
    p.add_argument("--n-blocks", type=positive_int, default=8)
    p.add_argument("--n-heads", type=positive_int, default=8)
    p.add_argument("--cond-dim", type=positive_int, default=128)
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    p.add_argument("--bf16-mode", choices=["outer", "mapped"], default="outer",
                   help="outer: CPU bf16 autocast around the network call (default); mapped: the reference's "
                        "torch.cuda.amp.autocast regions redirected to CPU autocast")
    p.add_argument("--repeats", type=positive_int, default=2, help="timed rounds (median reported; default 2)")
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-zero-init", action="store_true",
                   help="keep the reference's zero-initialised adaLN / output layer (uniform predictions)")
    p.add_argument("--tqdm", action="store_true", help="leave the reference's tqdm progress bar on")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    return p


class StubTokenizer:
    """What LitTextDDM reads from a tokenizer: vocab_size and mask_token_id (it sets mask_index itself)."""

    def __init__(self, vocab_size: int, mask_token_id):
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id


class NetworkCall:
    """Callable put in place of LitTextDDM.diffusion.model (the reference's Backbone): enters the chosen CPU
    autocast (bf16 outer mode) and times the forward. Exposes what DiscreteDiffusion.sample reads from its
    model: parameters() (device) and time_conditioning."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.time_conditioning = backbone.time_conditioning
        self.autocast = None  # a zero-arg factory of a context manager, or None
        self.seconds = 0.0
        self.calls = 0

    def parameters(self):
        return self.backbone.parameters()

    def __call__(self, *args, **kwargs):
        ctx = self.autocast() if self.autocast is not None else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx:
            out = self.backbone(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def cuda_autocast_to_cpu(torch):
    """A stand-in for torch.cuda.amp.autocast(enabled=True, dtype=torch.float16, cache_enabled=True) that
    applies the same region on CPU. dtype float32 (ddm._get_logits' outer region; CUDA autocast to fp32 is
    a no-op on fp32 inputs) and float16 defaults with enabled=False map to a disabled CPU autocast."""

    def factory(enabled=True, dtype=torch.float16, cache_enabled=True):
        if dtype not in (torch.bfloat16, torch.float16):
            return torch.autocast("cpu", dtype=torch.bfloat16, enabled=False, cache_enabled=cache_enabled)
        return torch.autocast("cpu", dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    return factory


def build_reference(args):
    """The reference's LitTextDDM for algo=udlm, built as its trainer.py does."""
    import omegaconf
    import torch

    import utils as ref_utils  # reference utils/ (sample_categorical, _register_resolvers)
    from lit_diffusion_base import resolve_diffusion_model
    from lit_text_model import LitTextDDM

    ref_utils._register_resolvers()  # trainer.py does this at import
    cfg = omegaconf.OmegaConf.load(os.path.join(args.reference_repo, "configs", "config.yaml"))
    cfg.pop("defaults")
    cfg.algo = omegaconf.OmegaConf.load(os.path.join(args.reference_repo, "configs", "algo", "udlm.yaml"))
    cfg.model = omegaconf.OmegaConf.load(os.path.join(args.reference_repo, "configs", "model", "tiny.yaml"))
    cfg.merge_with_dotlist([
        f"model.hidden_size={args.hidden_size}", f"model.n_blocks={args.n_blocks}", f"model.n_heads={args.n_heads}",
        f"model.cond_dim={args.cond_dim}", f"model.length={args.seq_len}", "model.dropout=0.0",
        "training.ema=0", f"loader.eval_batch_size={args.batch_size}", f"sampling.nfes={args.steps}",
    ])
    mask_id = None if args.tokenizer_mask == "none" else args.vocab_size - 1
    tokenizer = StubTokenizer(args.vocab_size, mask_id)
    diffusion_model = resolve_diffusion_model(cfg.algo.name)
    torch.manual_seed(args.seed)
    model = LitTextDDM(
        config=cfg,
        diffusion_model=diffusion_model,
        tokenizer=tokenizer,
        model_prediction=cfg.get("algo").get("model_prediction", None),
    )
    return cfg, model


def randomise_zero_init(module, seed: int) -> int:
    """Re-draw all-zero weights (adaLN modulations, output layer) N(0, 0.02), as udmtrain's bench does."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 1 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                n += 1
    return n


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions):
        raise SystemExit(f"--precision takes fp32 and/or bf16, got {args.precision!r}")
    missing = [f for f in ("src/ddm.py", "src/models/dit.py", "src/lit_text_model.py", "utils/utils.py",
                           "configs/config.yaml", "configs/algo/udlm.yaml", "configs/model/tiny.yaml")
               if not os.path.isfile(os.path.join(args.reference_repo, f))]
    if missing:
        print(f"udmtrain: --reference-repo {args.reference_repo} is not a checkout of samsongourevitch/rev_udm "
              f"(missing {', '.join(missing)}); clone it and pass its directory", file=sys.stderr)
        return 2
    if args.out:
        check_writable(args.out, "--out")
    if not args.tqdm:
        os.environ["TQDM_DISABLE"] = "1"  # read by tqdm when its classes are defined: set before any import
    stand_ins = tempfile.TemporaryDirectory(prefix="udm-refbench-")
    setup_paths(args.reference_repo, args.extra_path, stand_ins.name)

    import torch

    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("once", category=FutureWarning)  # torch.cuda.amp.autocast deprecation, per site

    t_build = time.perf_counter()
    cfg, lit = build_reference(args)
    redrawn = 0 if args.keep_zero_init else randomise_zero_init(lit.diffusion.model, args.seed)
    lit._eval_mode()  # what restore_model_and_sample does first (EMA off -> diffusion.eval())
    for p in lit.parameters():
        p.requires_grad_(False)
    backbone = lit.diffusion.model
    dit = backbone.backbone
    net = NetworkCall(backbone)
    # plain attribute swap (not an nn.Module child): DiscreteDiffusion reads self.model.parameters() and
    # self.model.time_conditioning, and calls self.model(x=..., t=..., conditioning_tokens=...).
    del lit.diffusion._modules["model"]
    lit.diffusion.model = net
    build_s = time.perf_counter() - t_build

    original_cuda_autocast = torch.cuda.amp.autocast
    cpu_bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    mapped = cuda_autocast_to_cpu(torch)

    @contextlib.contextmanager
    def precision_mode(prec):
        if prec == "bf16" and args.bf16_mode == "outer":
            net.autocast = cpu_bf16
        elif prec == "bf16":
            torch.cuda.amp.autocast = mapped
        try:
            yield
        finally:
            net.autocast = None
            torch.cuda.amp.autocast = original_cuda_autocast

    raw = {p: [] for p in precisions}
    checks = {}
    total = args.warmup + args.repeats
    t_start = time.perf_counter()
    for rnd in range(total):
        for prec in precisions:
            torch.manual_seed(args.seed + rnd)  # sampling.generator_seed is null: the reference uses the global RNG
            net.seconds, net.calls = 0.0, 0
            with precision_mode(prec):
                t0 = time.perf_counter()
                out = lit.generate_samples(num_samples=args.batch_size, nfes=args.steps)
                seconds = time.perf_counter() - t0
            if net.calls != args.steps:
                raise RuntimeError(f"expected {args.steps} network calls, counted {net.calls}")
            if tuple(out.shape) != (args.batch_size, args.seq_len):
                raise RuntimeError(f"sample shape {tuple(out.shape)} != {(args.batch_size, args.seq_len)}")
            checks[prec] = {"sample_dtype": str(out.dtype), "min_token": int(out.min()), "max_token": int(out.max())}
            if rnd >= args.warmup:
                raw[prec].append((seconds, net.seconds, net.calls))
        done = rnd + 1
        eta = (time.perf_counter() - t_start) / done * (total - done)
        print(f"[ref bench] round {done}/{total} ({'warmup' if rnd < args.warmup else 'timed'}), ETA {eta:.0f}s",
              file=sys.stderr, flush=True)

    # the dtype the network hands to the sampler, per precision (one extra, untimed call)
    logits_dtype = {}
    with torch.no_grad():
        x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))
        for prec in precisions:
            with precision_mode(prec):
                logits_dtype[prec] = str(lit.diffusion._get_logits(x, torch.tensor(0.5)).dtype)

    results = []
    for prec, runs in raw.items():
        per = [{"seconds": s, "network_s": n, "nfe": k, "nfe_per_s": k / s, "s_per_nfe": s / k,
                "network_s_per_nfe": n / k, "overhead_fraction": 1.0 - n / s} for s, n, k in runs]
        med = lambda key: statistics.median(r[key] for r in per)  # noqa: E731
        results.append({
            "precision": prec,
            "nfe_per_s": med("nfe_per_s"),
            "s_per_nfe": med("s_per_nfe"),
            "network_s_per_nfe": med("network_s_per_nfe"),
            "overhead_fraction": med("overhead_fraction"),
            "tokens_per_s": statistics.median(args.batch_size * args.seq_len / r["seconds"] for r in per),
            "nfe": args.steps,
            "network_output_dtype": logits_dtype[prec],
            "autocast": ("none (reference's torch.cuda.amp.autocast is inert on CPU)" if prec == "fp32" else
                         "torch.autocast('cpu', bfloat16) around the network call" if args.bf16_mode == "outer" else
                         "reference's torch.cuda.amp.autocast regions redirected to CPU autocast"),
            "check": checks[prec],
            "runs": per,
        })
    report = {
        "bench": "reference_udlm_sample",
        "reference": {"repo": os.path.abspath(args.reference_repo), "git_revision": _git_revision(args.reference_repo)},
        "entry_point": "LitTextDDM.generate_samples -> ddm.DiscreteDiffusion.sample -> ddm.UDLM._ancestral_step",
        "algo": cfg.algo.name, "model_prediction": lit.diffusion.model_prediction,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
        "tokenizer_vocab_size": args.vocab_size, "tokenizer_mask": args.tokenizer_mask,
        "dit_output_size": int(dit.vocab_size), "udlm_vocab_size": int(lit.diffusion.vocab_size),
        "hidden_size": args.hidden_size, "n_blocks": args.n_blocks, "n_heads": args.n_heads,
        "cond_dim": args.cond_dim, "dropout": float(cfg.model.dropout),
        "parameters": sum(p.numel() for p in dit.parameters()), "zero_init_tensors_redrawn": redrawn,
        "bf16_mode": args.bf16_mode, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "warmup": args.warmup, "build_s": build_s, "torch_version": torch.__version__,
        "results": results,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with atomic_open(args.out) as handle:
            handle.write(text + "\n")
    stand_ins.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
