"""Write a reference checkpoint as a normal udmtrain run directory, through udmtrain's own save path.

``import_checkpoint(src, out, layout=...)``: read ``src`` safely, derive the recipe from its config,
build the model from that recipe, load the converted raw weights, create a DeepSpeed engine in-process
(one gloo rank, CPU), set the EMA shadow to the converted EMA weights and save with the
``Checkpointer`` -- so the run is exactly what training would have written (``recipe.yaml``, DeepSpeed
shards, ``rank0_state.pt`` with the EMA, ``meta.json``) and every tool reads it. The run is written to
the sibling ``out.tmp-<pid>``, its weights are read back with ``load_for_inference`` and compared bit
for bit, and only then is it renamed to ``out``. ``force`` replaces only an empty directory or an
earlier import (``is_imported_run``); an ``out`` at, around or inside ``src`` is always refused.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from udmtrain.interop import keys as K
from udmtrain.interop.errors import InteropError
from udmtrain.interop.recipe import MASKED, algo_of, recipe_from_config
from udmtrain.interop.reference import ReferenceCheckpoint, read_checkpoint


class ImportCheckpointError(InteropError):
    """An import that cannot proceed (existing output, vocabulary that does not fit the tokenizer, ...)."""


def tokenizer_section(spec: str, config: dict[str, Any], ref_vocab: int, masked: bool) -> dict[str, Any]:
    """The recipe's tokenizer for ``--tokenizer spec`` (``auto``, ``none``, ``ids:V``, ``gpt2``, a GPT-2
    dir, a sentencepiece ``.model``): ``none`` -> ``ids`` with V = the reference head (minus the mask
    row for a masked model, whose mask is then the last id); ``auto`` -> ``gpt2`` when the config names it."""
    if spec == "auto":
        named = str(config.get("data", {}).get("tokenizer_name_or_path", ""))
        if named != "gpt2":
            raise ImportCheckpointError(f"the checkpoint's tokenizer is {named or 'not recorded'!r}; pass --tokenizer "
                                        "gpt2, a GPT-2 directory, a sentencepiece .model, or none (token ids)")
        spec = "gpt2"
    if spec == "none":
        return {"name": "ids", "vocab_size": ref_vocab - 1 if masked else ref_vocab}
    if spec.startswith("ids:"):
        from udmtrain.data.tokenizers import load_tokenizer

        tok = load_tokenizer(spec)
        return {"name": "ids", "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                "pad_id": tok.pad_id}
    if spec.endswith(".model"):
        return {"name": "sentencepiece", "path": spec}
    return {"name": "gpt2", "path": spec}


def _check_vocab(ref_vocab: int, V: int, masked: bool, tokenizer: str) -> None:
    """A masked head must be V+1 wide (mask = id V); a uniform/AUDM head V or V+1 (the extra row dropped)."""
    ok = ref_vocab == V + 1 if masked else ref_vocab in (V, V + 1)
    if not ok:
        want = f"{V + 1} (V + the mask)" if masked else f"{V} or {V + 1}"
        raise ImportCheckpointError(f"the checkpoint's vocabulary has {ref_vocab} rows but tokenizer {tokenizer} has "
                                    f"V={V}: expected {want}; pass the tokenizer it was trained with, or "
                                    "--tokenizer none")


def derive(ref: ReferenceCheckpoint, out: Path, tokenizer: str = "auto", precision: str = "fp32",
           data_dir: str | None = None) -> tuple[Any, int, str]:
    """(validated RunConfig, tokenizer V, AUDM fusion) of the run ``out`` for ``ref``."""
    from udmtrain.config import dump_yaml, load_recipe
    from udmtrain.data.tokenizers import load_tokenizer

    algo = algo_of(ref.config)
    masked = algo.process == MASKED
    if "vocab_embed.embedding" not in ref.backbone:
        raise K.KeyMappingError(f"{ref.path}: the backbone has no vocab_embed.embedding (not a DiT?)")
    ref_vocab = int(ref.backbone["vocab_embed.embedding"].shape[0])
    if masked and str(ref.config.get("data", {}).get("tokenizer_name_or_path", "")).startswith("bert"):
        raise ImportCheckpointError(f"{ref.path}: a BERT-tokenized MDLM uses [MASK] (id 103) as its mask, udmtrain's "
                                    "masked process the extra id V; this layout cannot be imported exactly")
    tok = tokenizer_section(tokenizer, ref.config, ref_vocab, masked)
    V = int(tok["vocab_size"]) if tok["name"] == "ids" else int(load_tokenizer(tok["path"]).vocab_size)
    _check_vocab(ref_vocab, V, masked, tok.get("path") or f"ids:{V}")
    data_dir = data_dir or ("data/owt" if tok["name"] == "gpt2" else f"data/{out.name}")
    recipe = recipe_from_config(ref.config, name=out.name, output_root=os.fspath(out.parent), tokenizer=tok,
                                data_dir=data_dir, precision=precision)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "recipe.yaml")
        Path(path).write_text(dump_yaml(recipe))
        cfg = load_recipe(path)
    return cfg, V, algo.fusion


def convert(ref: ReferenceCheckpoint, model: torch.nn.Module, fusion: str, masked: bool
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(raw, EMA) udmtrain state dicts; a file with one set of weights gives it for both."""
    raw = K.to_udmtrain(ref.backbone, model, fusion, drop_extra_row=not masked, where=ref.path)
    if ref.ema_shadow is None:
        return raw, {k: v.clone() for k, v in raw.items()}
    ema = dict(ref.ema_shadow)
    if K.ROPE_BUFFER in ref.backbone:
        ema[K.ROPE_BUFFER] = ref.backbone[K.ROPE_BUFFER]
    return raw, K.to_udmtrain(ema, model, fusion, drop_extra_row=not masked, where=f"{ref.path} (EMA)")


def save_run(cfg: Any, model: torch.nn.Module, ema_state: dict[str, torch.Tensor], vocab_size: int,
             ema_num_updates: int, meta: dict[str, Any], world_size: int = 1, run_dir: Path | None = None) -> Path:
    """Save ``model`` (raw weights loaded) + EMA as step 0 of the run ``cfg`` via the Checkpointer, into
    ``run_dir`` (default: the recipe's own, ``run_dir_for(cfg)``; an import writes a temporary sibling).

    ``world_size == 1``: in-process as a single gloo rank (the group is created here if none exists,
    and torn down after). ``world_size > 1``: that many spawned CPU gloo ranks save together, so the
    checkpoint resumes under a launcher with ``world_size`` processes (per-rank optimizer shards and
    train states, like a checkpoint written by a training run of that size).
    """
    import torch.distributed as tdist

    from udmtrain.engine import deepspeed_engine as dse
    from udmtrain.train.build import run_dir_for

    run_dir = run_dir_for(cfg) if run_dir is None else Path(run_dir)
    if world_size > 1:
        return _spawn_save(cfg, model, ema_state, vocab_size, ema_num_updates, meta, world_size, run_dir)
    created = not (tdist.is_available() and tdist.is_initialized())
    if created:
        dse.init_distributed("gloo")
    try:
        if tdist.get_world_size() != 1:
            raise ImportCheckpointError("import_ckpt runs as a single process; use --world-size, not a launcher")
        return _save_collective(cfg, model, ema_state, vocab_size, ema_num_updates, meta, run_dir)
    finally:
        if created:
            dse.teardown()


def _save_collective(cfg: Any, model: torch.nn.Module, ema_state: dict[str, torch.Tensor], vocab_size: int,
                     ema_num_updates: int, meta: dict[str, Any], run_dir: Path) -> Path:
    """Every rank of the current process group: engine, exact fp32 masters, EMA, Checkpointer save into
    ``run_dir``."""
    from udmtrain.engine import deepspeed_engine as dse
    from udmtrain.engine.optim import build_lr_schedule, build_optimizer
    from udmtrain.models.ema import EMA
    from udmtrain.train.checkpoint import Checkpointer
    from udmtrain.train.state import TrainState
    from udmtrain.utils.dist import get_world_size

    exact = {k: p.detach().float().clone() for k, p in model.named_parameters()}
    engine = dse.create_engine(model, build_optimizer(cfg.optim.name, cfg.optim.cfg),
                               build_lr_schedule(cfg.lr_schedule.name, cfg.lr_schedule.cfg, cfg.train.max_steps),
                               dse.build_ds_config(cfg.engine, get_world_size()))
    if cfg.engine.precision != "fp32":  # the engine rounded the weights: restore the exact fp32 masters
        dse.set_full_fp32_params(engine, exact)
    with dse.gathered_parameters(engine.module):
        ema = EMA(engine.module, decay=cfg.train.ema_decay)
    ema.load_state_dict({"decay": cfg.train.ema_decay, "num_updates": ema_num_updates, "shadow": ema_state})
    state = TrainState(step=0, ema=ema.state_dict())
    saver = Checkpointer(run_dir, every=cfg.checkpoint.every, keep_last=0, resume="never")
    return saver.save(engine, 0, state, cfg.to_dict(), {"run_name": cfg.run.name, "vocab_size": vocab_size, **meta})


def _spawn_save(cfg: Any, model: torch.nn.Module, ema_state: dict[str, torch.Tensor], vocab_size: int,
                ema_num_updates: int, meta: dict[str, Any], world_size: int, run_dir: Path) -> Path:
    """``save_run`` with ``world_size`` spawned gloo ranks (each rebuilds the model from the recipe)."""
    import torch.multiprocessing as mp

    from udmtrain.config import dump_yaml
    from udmtrain.engine import deepspeed_engine as dse
    from udmtrain.train.checkpoint import CHECKPOINTS, step_dir_name

    dse.build_ds_config(cfg.engine, world_size)  # a batch size that does not divide fails here, not in N ranks
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        recipe = os.path.join(tmp, "recipe.yaml")
        Path(recipe).write_text(dump_yaml(cfg.to_dict()))
        port = str(_free_port())
        mp.start_processes(_spawned_rank, args=(world_size, port, recipe, vocab_size, raw, ema_state,
                                                ema_num_updates, meta, run_dir), nprocs=world_size,
                           start_method="spawn")
    return run_dir / CHECKPOINTS / step_dir_name(0)


def _free_port() -> int:
    """A TCP port that is free now (the spawned ranks' rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawned_rank(rank: int, world_size: int, port: str, recipe: str, vocab_size: int,
                  raw: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor], ema_num_updates: int,
                  meta: dict[str, Any], run_dir: Path) -> None:
    """One spawned rank of ``_spawn_save``."""
    from udmtrain.config import load_recipe
    from udmtrain.engine import deepspeed_engine as dse
    from udmtrain.train.build import build_components

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port, DS_ACCELERATOR="cpu")
    dse.init_distributed("gloo")
    try:
        cfg = load_recipe(recipe)
        model = build_components(cfg, vocab_size, with_sampler=False).model
        model.load_state_dict(raw)
        _save_collective(cfg, model, ema_state, vocab_size, ema_num_updates, meta, run_dir)
    finally:
        dse.teardown()
    # The checkpoint is complete and the group destroyed: leave without the interpreter's shutdown, where
    # gloo's threads occasionally abort the process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def is_imported_run(path: str | os.PathLike) -> bool:
    """True for a run directory that ``import_checkpoint`` wrote and nothing has added to since: only
    ``checkpoints/``, holding ``latest`` and complete step directories whose meta.json records
    ``imported_from``. What ``--force`` may replace; a trained or fine-tuned run is not one."""
    from udmtrain.train.checkpoint import CHECKPOINTS, LATEST, is_complete

    run = Path(path)
    ckpts = run / CHECKPOINTS
    if [c.name for c in run.iterdir()] != [CHECKPOINTS] or not ckpts.is_dir():
        return False
    steps = [c for c in ckpts.iterdir() if c.name != LATEST]
    if not steps or not all(is_complete(c) for c in steps):
        return False
    try:
        return all("imported_from" in json.loads((c / "meta.json").read_text()) for c in steps)
    except (OSError, ValueError, TypeError):
        return False


def _stage(t0: float, message: str) -> None:
    """One progress line on stderr (a 170M-parameter import takes tens of seconds)."""
    print(f"udmtrain: import [{time.perf_counter() - t0:6.1f}s] {message}", file=sys.stderr, flush=True)


def import_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, layout: str = "rev_udm",
                      tokenizer: str = "auto", precision: str = "fp32", data_dir: str | None = None,
                      eps: float | None = None, world_size: int = 1, force: bool = False) -> dict[str, Any]:
    """Import ``src`` into the run directory ``out`` (see the module docstring); returns a JSON-able report."""
    from udmtrain.train.build import build_components
    from udmtrain.train.exports import check_out_dir, swap_in
    from udmtrain.train.inference import load_for_inference

    out = Path(out).expanduser().absolute()
    if world_size < 1:
        raise ImportCheckpointError(f"--world-size must be >= 1, got {world_size}")
    check_out_dir(out, [src], force, is_imported_run, "an import of tools/import_ckpt.py")
    if not out.parent.is_dir():
        raise ImportCheckpointError(f"--out {out}: its parent directory {out.parent} does not exist")
    t0 = time.perf_counter()
    _stage(t0, f"reading {src} (--from {layout}, restricted unpickler)")
    ref = read_checkpoint(src, layout)
    if layout == "hub":
        ref.config.setdefault("training", {})["sampling_eps"] = 1e-3 if eps is None else eps
    elif eps is not None:
        raise ImportCheckpointError("--eps applies to --from hub only; a Lightning checkpoint records "
                                    "training.sampling_eps")
    cfg, V, fusion = derive(ref, out, tokenizer, precision, data_dir)
    masked = cfg.process.name == MASKED
    _stage(t0, f"recipe: {cfg.process.name} + {cfg.parameterization.name}, loss {cfg.loss.name}, V={V}; converting")
    torch.manual_seed(0)  # the initial weights are overwritten; keep the build deterministic anyway
    model = build_components(cfg, V, with_sampler=False).model
    raw, ema = convert(ref, model, fusion, masked)
    model.load_state_dict(raw)
    dropped = int(ref.backbone["vocab_embed.embedding"].shape[0]) - int(model.vocab_size)
    meta = {"imported_from": {**ref.info, "ema_in_source": ref.ema_shadow is not None,
                              "dropped_vocab_rows": dropped, "source_config": ref.config}}
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")  # the recipe names ``out``; the run moves there at the end
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _stage(t0, f"saving {out} through the Checkpointer")
        step_dir = save_run(cfg, model, ema, V, ref.ema_num_updates, meta, world_size, run_dir=tmp)
        _stage(t0, "reading the run back to compare the weights")
        for use_ema, want in ((False, raw), (True, ema)):  # read back through the tools' loader: bit-exact
            got = load_for_inference(tmp, use_ema=use_ema).model.state_dict()
            bad = [k for k in want if not torch.equal(got[k], want[k])]
            if bad:
                raise ImportCheckpointError(f"{out}: the saved {'EMA' if use_ema else 'raw'} weights differ "
                                            f"from the converted ones at {bad[:3]}")
        check_out_dir(out, [src], force, is_imported_run, "an import of tools/import_ckpt.py")  # changed meanwhile?
        swap_in(tmp, out)
    except BaseException:  # no half-written or wrong run is left, and a replaced run stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    step_dir = out / step_dir.relative_to(tmp)
    return {"run_dir": os.fspath(out), "checkpoint": os.fspath(step_dir), "algo": algo_of(ref.config).name,
            "process": cfg.process.name, "parameterization": cfg.parameterization.name, "loss": cfg.loss.name,
            "sampler": cfg.sampler.name, "vocab_size": V, "dropped_vocab_rows": dropped,
            "ema": "source EMA" if ref.ema_shadow is not None else "copy of the weights (the file holds one set)",
            "num_parameters": sum(p.numel() for p in model.parameters()), "source": ref.info}
