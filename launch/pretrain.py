"""Pretrain a discrete diffusion LM (or the AR baseline) from a YAML recipe.

    python launch/pretrain.py --recipe recipes/absorbing_udm.yaml --dry-run      # validate + print
    deepspeed launch/pretrain.py --recipe recipes/quickstart.yaml                # 1 process
    deepspeed --num_gpus 2 launch/pretrain.py --recipe recipes/quickstart.yaml engine.zero_stage=3
    torchrun --nproc_per_node 2 launch/pretrain.py --recipe recipes/quickstart.yaml
    python launch/pretrain.py --recipe recipes/quickstart.yaml optim.lr=1e-3 run.name=lr1e-3

Options:
  --recipe PATH      the YAML recipe (required); recipes/ holds the paper's and the quickstart's
  --dry-run          validate, print the resolved recipe, derived values, the parameter count and the
                     checkpoint it would resume from (checked against the recipe); exit 0, or 2 on a problem
  section.key=value  any number of overrides, applied in order (YAML scalars: ``1e-4`` is a float)
  -h, --help         this text

Every recipe key is documented in docs/recipes.md. A bad recipe is reported in full on rank 0 with
exit code 2 before any process group starts. ``checkpoint.resume: auto`` (the default) continues the
latest complete checkpoint of ``<run.output_root>/<run.name>`` (``runs/<run.name>`` by default); a run
already at ``train.max_steps`` says so and exits (raise ``train.max_steps`` to continue it). A run writes
``checkpoints/``, ``metrics.jsonl`` and ``tensorboard/`` there (``tensorboard --logdir runs``).
Exit codes: 0 done, 2 bad recipe or data, 3 stopped on non-finite losses.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udmtrain.config import ConfigError, load_recipe, report_and_exit  # noqa: E402
from udmtrain.config.cli import describe, parse_cli  # noqa: E402


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        recipe, overrides, dry_run = parse_cli(argv)
        cfg = load_recipe(recipe, overrides, world_size=world_size)
        from udmtrain.train.preflight import construction_issues

        issues = construction_issues(cfg)  # what building the run would reject, found without building it
        if issues:
            raise ConfigError(issues, recipe)
    except ConfigError as err:
        report_and_exit(err)
    if dry_run:
        # a plain `python` dry run of a recipe meant for a launcher has no world size to compare yet
        resume, problem = _check_resume(cfg, world_size if "WORLD_SIZE" in os.environ else None)
        if int(os.environ.get("RANK", "0")) == 0:
            print(describe(cfg, world_size), end="")
            print(_parameter_line(cfg))
            print(f"#   resume: {resume}")
            device_problem = _device_problem(cfg)
            if device_problem is not None:  # not an error here: dry runs of GPU recipes happen on CPU login nodes
                print(f"#   note: {device_problem}")
            if problem is not None:
                print(f"udmtrain: {problem}", file=sys.stderr)
        return 0 if problem is None else 2
    from udmtrain.data.errors import DataError
    from udmtrain.train.build import build_trainer
    from udmtrain.train.checkpoint import CheckpointError
    from udmtrain.engine.deepspeed_engine import RendezvousError
    from udmtrain.utils.io import OutputError, UnsafeFileError

    problem, manifest = _check_data(cfg)  # before any process group or JIT build: a missing corpus fails in seconds
    if problem is None:
        from udmtrain.utils.io import check_writable

        try:
            check_writable(os.path.join(cfg.run.output_root, cfg.run.name), "run.output_root/run.name", directory=True)
        except OutputError as err:
            problem = str(err)
    if problem is None:  # a checkpoint this run cannot resume from: refused before DeepSpeed starts
        problem = _check_resume(cfg, world_size, manifest)[1]
    if problem is None:
        problem = _device_problem(cfg)
    if problem is not None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"udmtrain: {problem}", file=sys.stderr)
        return 2
    try:
        run = build_trainer(cfg)
    except (DataError, CheckpointError, UnsafeFileError, RendezvousError, OutputError) as err:
        if world_size > 1:  # maybe this rank alone (its rank<r>_state.pt, its data cursor): say it, then leave
            _leave_now(f"udmtrain: rank {os.environ.get('RANK', '0')}: {err}", 2)
        print(f"udmtrain: {err}", file=sys.stderr)
        from udmtrain.engine.deepspeed_engine import teardown

        teardown()
        return 2
    if run.trainer.state.step >= run.trainer.max_steps and int(os.environ.get("RANK", "0")) == 0:
        print(f"udmtrain: {run.run_dir} is already at train.max_steps {run.trainer.max_steps} (step "
              f"{run.trainer.state.step}); nothing to do. Raise train.max_steps to continue it, e.g. "
              f"train.max_steps={2 * run.trainer.max_steps}, or set run.name for a new run", file=sys.stderr)
    try:
        reason = run.trainer.train()
    except DataError as err:  # a shard that turned out corrupt mid-run: one line, not a worker traceback
        if os.environ.get("UDMTRAIN_DEBUG") == "1":
            raise
        if world_size > 1:  # the other ranks wait in a collective: a teardown barrier would hang, so leave now
            _leave_now(f"udmtrain: rank {os.environ.get('RANK', '0')}: {err}", 2)
        print(f"udmtrain: {err}", file=sys.stderr, flush=True)
        return 2
    except Exception:  # anything else on one rank (a bug, a full disk): its traceback, then out, not a silent hang
        if world_size > 1:
            import traceback

            _leave_now(f"udmtrain: rank {os.environ.get('RANK', '0')} failed:\n{traceback.format_exc()}", 1)
        raise
    finally:  # not reached after _leave_now (os._exit)
        run.close()
    return 3 if reason == "nonfinite" else 0


def _leave_now(message: str, code: int) -> None:
    """Print ``message`` on this rank and exit at once, skipping the teardown barrier: with several ranks the
    others may wait in a collective that this rank will never join (the launcher then stops them)."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _check_data(cfg):
    """``(problem, manifest)``: the recipe's shards checked against their manifest; on a problem, the error
    plus the ``prepare_data`` command that builds shards matching this recipe (and no manifest)."""
    from udmtrain.data.errors import DataError
    from udmtrain.data.manifest import check_manifest

    try:
        return None, check_manifest(cfg.data, expected_tokenizer=cfg.tokenizer)
    except DataError as err:
        if not err.rebuild_fixes:  # its message already says what to do; new shards would not help
            return str(err), None
        return f"{err}\nBuild shards for this recipe with:\n  {_prepare_command(cfg)}", None


def _device_problem(cfg) -> str | None:
    """Why this machine cannot train the recipe as written (None if it can)."""
    import torch

    if cfg.engine.precision == "fp16" and not torch.cuda.is_available():
        return ("engine.precision=fp16 needs CUDA GPUs (DeepSpeed's fp16 optimizer and loss scaling) and this "
                "machine has none: use engine.precision=bf16 or fp32 here")
    return None


def _check_resume(cfg, world_size: int | None, manifest=None) -> tuple[str, str | None]:
    """What ``checkpoint.resume`` resolves to (``"fresh run"`` or ``"<step dir> (step N)"``) and the reason
    this recipe cannot resume from it (None if it can), from the checkpoint's recipe.yaml and meta.json.
    ``manifest``: the checked shards' manifest, whose tokenizer record spares loading the tokenizer again."""
    from udmtrain.train.build import run_dir_for, run_identity
    from udmtrain.train.checkpoint import CheckpointError, preflight_resume

    try:
        found = preflight_resume(run_dir_for(cfg), cfg.checkpoint.resume, cfg.to_dict(), world_size,
                                 run_identity(cfg, manifest))
    except CheckpointError as err:
        return "refused (the reason follows on stderr)", str(err)
    if found is None:
        return "fresh run", None
    step_dir, meta = found
    return f"{step_dir} (step {meta.get('step', '?')})", None


def _prepare_command(cfg) -> str:
    """The ``prepare_data`` command that writes this recipe's ``data.train_shards`` with its tokenizer and
    ``data.seq_len`` (``udmtrain.data.shards.prepare_command``)."""
    from udmtrain.data.shards import prepare_command

    tokenizer = getattr(cfg.tokenizer.cfg, "path", None) or cfg.tokenizer.name
    if cfg.tokenizer.name == "hf":  # the CLI spelling of a Hugging Face tokenizer
        tokenizer = f"hf:{tokenizer}"
    return prepare_command(str(cfg.data.train_shards), tokenizer, cfg.data.seq_len)


def _parameter_line(cfg) -> str:
    """``#   parameters: N`` counted on the meta device (no memory), when the vocabulary is known."""
    try:
        import torch

        from udmtrain.models.flops import num_params
        from udmtrain.train.build import build_components, resolve_vocab_size

        vocab = resolve_vocab_size(cfg, None)
        with torch.device("meta"):
            model = build_components(cfg, vocab, with_sampler=False).model
        return f"#   parameters: {num_params(model):,} (tokenizer vocabulary {vocab})"
    except Exception as err:  # noqa: BLE001 - a dry run must not fail on an optional count
        return f"#   parameters: not counted ({type(err).__name__}: {err})"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
