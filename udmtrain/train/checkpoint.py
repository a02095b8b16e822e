"""Checkpoint directory contract, atomic saves, retention, resume discovery and compatibility checks.

Layout (docs/design.md C14)::

    runs/<name>/checkpoints/
      latest                      "step_0000001000\\n", replaced atomically after the rename
      step_0000001000/
        ds/                       DeepSpeed shards (engine.save_checkpoint, tag "ds"; every rank)
        rank0_state.pt ...        each rank's TrainState (RNG + data cursor; EMA only in rank 0's)
        recipe.yaml               the resolved recipe (yaml.safe_dump)
        meta.json                 format_version, udmtrain version, git revision, world size, step, tokens

Atomicity: everything is written into ``step_X.tmp-<pid of rank 0>``, fsynced, renamed to ``step_X``,
and only then ``latest`` is replaced (write temp + ``os.replace``). A crash at any point leaves
``latest`` naming the previous complete checkpoint; ``*.tmp-*`` directories are never resumed from and
are deleted by the next Checkpointer on rank 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

import udmtrain
from udmtrain.engine import deepspeed_engine as dse
from udmtrain.train.state import FORMAT_VERSION, TrainState
from udmtrain.utils.dist import all_ranks_agree, broadcast_object, get_rank, get_world_size, print0
from udmtrain.utils.io import load_tensors
from udmtrain.utils.rng import capture_rng_state, restore_rng_state

_STEP_RE = re.compile(r"^step_(\d{10})$")
LATEST = "latest"

CHECKPOINTS = "checkpoints"
"""A run directory's subdirectory of ``step_<10 digits>`` checkpoints and the ``latest`` pointer."""

# Dotted recipe paths that change what the saved weights mean; a prefix ending in "." covers a section.
ARCH_FIELDS = ("model.", "process.name", "parameterization.name", "data.tokenizer", "data.seq_len",
               "data.vocab_size", "tokenizer.")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: incomplete, incompatible, or from another world size."""


def step_dir_name(step: int) -> str:
    """``step_<10-digit step>``, e.g. ``step_0000001000``."""
    return f"step_{step:010d}"


def is_complete(path: Path) -> bool:
    """True for a renamed (non-tmp) step directory holding meta.json and the DeepSpeed shards."""
    path = Path(path)
    return bool(_STEP_RE.match(path.name)) and (path / "meta.json").is_file() and (path / dse.CHECKPOINT_TAG).is_dir()


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (data first, then the directory entries)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain(obj: Any) -> Any:
    """Tuples -> lists (recursively) so ``yaml.safe_dump`` accepts the recipe dict."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def git_revision() -> str | None:
    """``git rev-parse HEAD`` of the udmtrain source tree, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(udmtrain.__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _flatten(d: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


ZERO_STATE_FAMILY = {0: "0", 1: "1-2", 2: "1-2", 3: "3"}
"""ZeRO stages whose optimizer checkpoints DeepSpeed can load into one another (1 and 2 share a layout)."""


def optimizer_state_layout(flat_recipe: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(ZeRO family, precision)`` of a flattened recipe: what decides the files and tensor layout of
    DeepSpeed's optimizer state (stage 0 keeps the torch optimizer's own state, stages 1-2 flat fp32
    partitions, stage 3 per-parameter partitions; bf16 adds its own optimizer wrapper and ``bf16_`` files).
    None when the recipe names no engine section (e.g. a bare test recipe)."""
    stage, precision = flat_recipe.get("engine.zero_stage"), flat_recipe.get("engine.precision")
    if stage is None or precision is None:
        return None
    return ZERO_STATE_FAMILY.get(int(stage), str(stage)), str(precision)


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], *, saved_world_size: int | None = None,
                     world_size: int | None = None, where: str = "checkpoint") -> None:
    """Raise CheckpointError naming every architecture field that differs, or a world-size change.

    Architecture fields (``ARCH_FIELDS``): ``model.*``, ``process.name``, ``parameterization.name``,
    the tokenizer and ``data.seq_len``. The optimizer state's layout (:func:`optimizer_state_layout`:
    ZeRO family and precision) must match too. Training knobs (``optim.lr``, ``train.max_steps``,
    offloading, ZeRO 1 <-> 2, ...) may change on resume. Sequences compare as lists (YAML turns tuples into lists).
    """
    a, b = _flatten(_plain(saved)), _flatten(_plain(current))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or (f.endswith(".") and key.startswith(f)) for f in ARCH_FIELDS) and a.get(key) != b.get(key):
            diffs.append(f"  {key}: saved {a.get(key)!r}, now {b.get(key)!r}")
    if diffs:
        raise CheckpointError(
            f"{where} was trained with a different architecture:\n" + "\n".join(diffs)
            + "\nResume with the saved recipe.yaml, or start a new run under another run.name."
        )
    saved_layout, layout = optimizer_state_layout(a), optimizer_state_layout(b)
    if saved_layout is not None and layout is not None and saved_layout != layout:
        raise CheckpointError(
            f"{where} holds DeepSpeed optimizer state for engine.zero_stage={a['engine.zero_stage']} and "
            f"engine.precision={a['engine.precision']}; this run has engine.zero_stage={b['engine.zero_stage']} "
            f"and engine.precision={b['engine.precision']}, whose state DeepSpeed stores in other files and shapes "
            "(a resume may change ZeRO 1 <-> 2 and the offload switches, not the precision or to/from stage 0 "
            f"or 3). Resume with engine.zero_stage={a['engine.zero_stage']} engine.precision={a['engine.precision']}, "
            "or start a new run under another run.name."
        )
    if saved_world_size is not None and world_size is not None and saved_world_size != world_size:
        raise CheckpointError(
            f"{where} was saved with world size {saved_world_size}, this run has {world_size}. Each rank's "
            "data cursor and RNG state are saved per rank, so an exact resume needs the same number of "
            f"processes: launch with {saved_world_size} ranks (or start a new run under another run.name)."
        )


def preflight_resume(run_dir: str | os.PathLike, resume: str, recipe_dict: Mapping[str, Any],
                     world_size: int | None, identity: Mapping[str, Any] | None = None
                     ) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a run in ``run_dir`` would resume from (``checkpoint.resume``) and its meta.json,
    checked against ``recipe_dict`` and ``identity`` without building anything; None for a fresh run.

    Raises CheckpointError on a resume path that is no checkpoint, on any mismatch, and on
    ``resume: never`` over a run directory that already holds checkpoints (the new run's checkpoints,
    pruning and metrics would interleave with the old run's).
    """
    checkpoints = Path(run_dir) / CHECKPOINTS
    if resume == "never":
        existing = complete_checkpoints(checkpoints)
        if existing:
            raise CheckpointError(
                f"checkpoint.resume=never, but {run_dir} already holds {len(existing)} checkpoint(s) of an earlier "
                f"run (newest {existing[-1].name}); a fresh run there would mix its checkpoints and metrics with "
                "them. Pick a new run.name, or delete that run directory first.")
        return None
    target = find_resume(checkpoints, resume)
    if target is None:
        return None
    return target, check_resume_target(target, recipe_dict, world_size, identity)


def _damaged(path: Path, err: Exception) -> CheckpointError:
    """The error for an unreadable meta.json / recipe.yaml / train state, naming an earlier checkpoint to use."""
    step_dir = path.parent
    earlier = [p for p in complete_checkpoints(step_dir.parent) if p.name < step_dir.name]
    fix = (f"resume from the previous one with checkpoint.resume={earlier[-1]}" if earlier
           else "start a new run under another run.name")
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CheckpointError(f"{path} is damaged or not udmtrain's ({reason}); {fix}")


def read_meta(step_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a step directory; a damaged one raises CheckpointError naming it and the way out."""
    path = Path(step_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise _damaged(path, err) from None
    if not isinstance(meta, dict):
        raise _damaged(path, ValueError("not a JSON object"))
    return meta


def read_saved_recipe(step_dir: str | os.PathLike) -> dict[str, Any]:
    """recipe.yaml of a step directory (plain YAML); a damaged one raises CheckpointError naming it."""
    path = Path(step_dir) / "recipe.yaml"
    try:
        recipe = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise _damaged(path, err) from None
    if not isinstance(recipe, dict):
        raise _damaged(path, ValueError("not a YAML mapping"))
    return recipe


RUN_IDENTITY = ("vocab_size", "tokenizer_sha256")
"""meta.json fields a resume must reproduce: the vocabulary and the tokenizer's file hash. The recipe names
the tokenizer's *path*; these catch a tokenizer retrained or replaced at the same path."""


def check_resume_target(step_dir: str | os.PathLike, recipe_dict: Mapping[str, Any] | None,
                        world_size: int | None, identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check that a run with ``recipe_dict`` (and ``world_size`` ranks; None skips that check) can resume
    from the complete checkpoint ``step_dir`` (:func:`check_compatible`); returns its meta.json.

    ``identity``: this run's :data:`RUN_IDENTITY` values (V, tokenizer sha256); each one the checkpoint
    also recorded must be equal. Called before anything starts (the launch preflight and ``--dry-run``)
    and again by :meth:`Checkpointer.load`, so a mismatch or a damaged file is a one-line error, never a
    DeepSpeed traceback.
    """
    step_dir = Path(step_dir)
    meta = read_meta(step_dir)
    saved_recipe = read_saved_recipe(step_dir) if recipe_dict is not None else None
    try:
        check_compatible(saved_recipe or {}, recipe_dict or {}, saved_world_size=meta.get("world_size"),
                         world_size=world_size, where=str(step_dir))
    except CheckpointError as err:
        if not meta.get("imported_from"):
            raise
        raise CheckpointError(f"{err}\nIt is an import (tools/import_ckpt.py): to keep its weights, import it "
                              "again with this run's --precision and --world-size.") from None
    changed = [f"{key} {meta[key]!r} -> {value!r}" for key, value in (identity or {}).items()
               if value is not None and meta.get(key) is not None and meta[key] != value]
    if changed:
        raise CheckpointError(
            f"{step_dir} was trained with another tokenizer than the one this run loads ({'; '.join(changed)}): "
            "the file behind tokenizer.path was retrained or replaced. Point tokenizer.path at the tokenizer the "
            "run was trained with, or start a new run (a new run.name).")
    return meta


def find_resume(checkpoint_dir: str | os.PathLike, resume: str) -> Path | None:
    """Resolve ``checkpoint.resume``: ``never`` -> None; ``auto`` -> the ``latest`` checkpoint (None
    for a fresh run); a path -> that step directory (a run or checkpoints directory resolves through
    its ``latest``). A path that is not a complete checkpoint raises CheckpointError.
    """
    if resume == "never":
        return None
    if resume == "auto":
        ckpt_dir = Path(checkpoint_dir)
        latest = _read_latest(ckpt_dir)
        if latest is not None and is_complete(latest):
            return latest
        complete = complete_checkpoints(ckpt_dir)
        if complete:
            print0(f"udmtrain: {ckpt_dir / LATEST} missing or stale; resuming from newest complete {complete[-1]}")
            return complete[-1]
        return None
    path = Path(resume).expanduser()
    for candidate in (path, path / CHECKPOINTS):
        if (candidate / LATEST).is_file():
            latest = _read_latest(candidate)
            if latest is not None and is_complete(latest):
                return latest
    if not is_complete(path):
        what = "does not exist" if not path.exists() else "is not a complete udmtrain checkpoint (a step_XXXXXXXXXX " \
            "directory with meta.json and ds/)"
        raise CheckpointError(f"checkpoint.resume={resume!r}: {path} {what}")
    return path


def _read_latest(ckpt_dir: Path) -> Path | None:
    try:
        name = (ckpt_dir / LATEST).read_text().strip()
    except OSError:
        return None
    return ckpt_dir / name if _STEP_RE.match(name) else None


def complete_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete step directories under ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if is_complete(p))


class Checkpointer:
    """Saves and restores ``runs/<name>/checkpoints/step_X/`` (see the module docstring).

    All ranks call ``save``/``load`` (DeepSpeed's save and load are collective); rank 0 alone writes
    the recipe, meta.json, renames and prunes.
    """

    def __init__(self, run_dir: str | os.PathLike, every: int, keep_last: int, resume: str = "auto") -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / CHECKPOINTS
        self.every, self.keep_last, self.resume = int(every), int(keep_last), resume
        if get_rank() == 0 and self.dir.is_dir():
            for stale in self.dir.glob("step_*.tmp-*"):  # left by a crash mid-save; never complete
                shutil.rmtree(stale, ignore_errors=True)

    def should_save(self, step: int, last: bool = False) -> bool:
        """True every ``every`` steps (``every <= 0`` disables cadence saves) and at the last step."""
        return step > 0 and (last or (self.every > 0 and step % self.every == 0))

    def find_resume(self) -> Path | None:
        """The step directory to resume from according to ``resume`` (see ``find_resume``)."""
        return find_resume(self.dir, self.resume)

    def save(self, engine, step: int, train_state: TrainState, recipe_dict: Mapping[str, Any],
             meta: Mapping[str, Any] | None = None) -> Path:
        """Collective atomic save of engine + per-rank train state; returns the step directory."""
        rank, world = get_rank(), get_world_size()
        name = step_dir_name(step)
        final = self.dir / name
        tmp = self.dir / f"{name}.tmp-{_rank0_pid()}"
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dse.barrier()
        ok, error = True, None
        try:
            train_state.rng = capture_rng_state()
            dse.save(engine, tmp, client_state={"step": step, "format_version": FORMAT_VERSION})
            state = train_state.state_dict()
            state["has_ema"] = state["ema"] is not None
            if rank != 0:
                state["ema"] = None  # identical on every rank: stored once, in rank 0's file
            torch.save(state, tmp / f"rank{rank}_state.pt")
        except BaseException as err:  # noqa: BLE001 - re-raised after the ranks agree
            ok, error = False, err
        if all_ranks_agree(ok) and rank == 0:
            try:
                self._finalize(tmp, final, step, train_state, recipe_dict, meta or {}, world)
            except BaseException as err:  # noqa: BLE001
                ok, error = False, err
        if not all_ranks_agree(ok):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if error is not None:
                raise error
            raise CheckpointError(f"saving {final} failed on another rank")
        return final

    def _finalize(self, tmp: Path, final: Path, step: int, train_state: TrainState,
                  recipe_dict: Mapping[str, Any], meta: Mapping[str, Any], world: int) -> None:
        """Rank 0: recipe + meta, fsync, rename to ``final``, then replace ``latest``, then prune."""
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(_plain(recipe_dict), sort_keys=False))
        _write_meta(tmp, {
            "format_version": FORMAT_VERSION, "udmtrain_version": udmtrain.__version__,
            "git_revision": git_revision(), "world_size": world, "step": step,
            "tokens_seen": train_state.tokens_seen, **dict(meta),
        })
        _fsync_tree(tmp)
        trash = None
        if final.exists():  # same step saved again (e.g. cadence save then exit save): replace it
            trash = final.with_name(f"{final.name}.old-{os.getpid()}")
            os.rename(final, trash)
        os.rename(tmp, final)
        _fsync_dir(self.dir)
        latest_tmp = self.dir / f"{LATEST}.tmp-{os.getpid()}"
        with open(latest_tmp, "w") as f:
            f.write(final.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest_tmp, self.dir / LATEST)
        _fsync_dir(self.dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        self.prune()

    def prune(self) -> list[Path]:
        """Delete complete checkpoints older than the newest ``keep_last`` (never ``latest``'s)."""
        if self.keep_last <= 0:
            return []
        latest = _read_latest(self.dir)
        complete = complete_checkpoints(self.dir)
        doomed = [p for p in complete[: -self.keep_last] if p != latest]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
        return doomed

    def load(self, engine, step_dir: str | os.PathLike, train_state: TrainState,
             recipe_dict: Mapping[str, Any] | None = None, identity: Mapping[str, Any] | None = None
             ) -> dict[str, Any]:
        """Collective: check compatibility (:func:`check_resume_target`), restore the engine, this rank's
        TrainState and its RNGs.

        Returns meta.json. The RNG snapshot is restored last, so the caller must draw nothing random
        between ``load`` and the first training step for a bit-exact continuation.
        """
        step_dir = Path(step_dir)
        meta = check_resume_target(step_dir, recipe_dict, get_world_size(), identity)
        dse.load(engine, step_dir)
        # ZeRO-3: after a load the parameter coordinator holds a stale fetch trace, and with the EMA's
        # gathers in the loop the second step after a resume dies with DeepSpeed's "tracing error ...
        # parameter fetch queue". Releasing every parameter resets it (a no-op below stage 3).
        release = getattr(engine, "empty_partition_cache", None)
        if release is not None:
            release()
        rank = get_rank()
        state = load_rank_state(step_dir, rank)
        if state.pop("has_ema", False) and rank != 0:
            state["ema"] = load_rank_state(step_dir, 0)["ema"]
        try:
            train_state.load_state_dict(state)
        except ValueError as err:  # unknown keys, a newer format: not a train state this udmtrain wrote
            raise _damaged(step_dir / f"rank{rank}_state.pt", err) from None
        if train_state.rng is not None:
            restore_rng_state(train_state.rng)
        return meta


def load_rank_state(step_dir: str | os.PathLike, rank: int) -> dict[str, Any]:
    """``rank{rank}_state.pt`` of ``step_dir`` loaded with ``weights_only=True`` (tensors and plain
    containers only; see :func:`udmtrain.utils.io.load_tensors`). A file holding anything else raises
    :class:`udmtrain.utils.io.UnsafeFileError`; nothing from it is executed."""
    path = Path(step_dir) / f"rank{rank}_state.pt"
    state = load_tensors(path)
    if not isinstance(state, dict) or "step" not in state:  # e.g. a model state dict copied over it
        raise _damaged(path, ValueError("not a udmtrain train state: no 'step'"))
    return state


def _write_meta(directory: Path, meta: Mapping[str, Any]) -> None:
    """meta.json; written last before the rename, so its presence marks a finished write."""
    (directory / "meta.json").write_text(json.dumps(dict(meta), indent=2, sort_keys=True) + "\n")


def _rank0_pid() -> int:
    """Rank 0's pid on every rank (names the shared tmp directory)."""
    return int(broadcast_object(os.getpid(), src=0))
