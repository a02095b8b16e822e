"""The DeepSpeed engine: the only module of udmtrain that imports ``deepspeed``.

One engine on every machine: NCCL on CUDA, gloo on CPU (where DeepSpeed's CPU accelerator supports
ZeRO 0-3 in fp32 and bf16). The typed ``engine:`` recipe section *generates* the DeepSpeed dict
(``build_ds_config``); ``deepspeed_extra`` (already allow-listed by the config validator) is merged in
last but may not contradict the derived batch arithmetic.

Facts this module relies on (measured, see ENVIRONMENT.md):
* ``deepspeed.initialize`` in a plain ``python`` process needs RANK/WORLD_SIZE/LOCAL_RANK/
  MASTER_ADDR/MASTER_PORT; ``init_distributed`` sets single-process defaults.
* Without ``barrier()`` + ``destroy_process_group()`` at exit, a gloo rank SIGABRTs in ~1 of 6 runs;
  ``teardown`` does both.
* Stage 0 in fp32 returns ``None`` from ``get_global_grad_norm``; ``step`` computes it itself.
* ``torch.compile`` must come after ``deepspeed.initialize`` (``engine.compile()``), or ZeRO-3 breaks.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import socket
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as tdist


def _ds():
    """Import deepspeed lazily (no import-time side effects, docs/design.md C15).

    ``DS_ACCELERATOR`` is defaulted first so CPU runs skip the accelerator probe and its warning.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    return deepspeed

CHECKPOINT_TAG = "ds"
"""Fixed DeepSpeed tag: shards live in ``<step_dir>/ds/``; our own files sit beside it."""

_NEVER_PRINT = 10**12


def build_ds_config(engine: Any, world_size: int, optim: Any = None) -> dict[str, Any]:
    """DeepSpeed config dict from the ``engine:`` section (duck-typed ``EngineSection``).

    Batch arithmetic: ``global_batch_size = micro_batch_size * world_size * accumulation``, with
    ``accumulation`` derived and required to be a positive integer. ``optim`` is accepted for the
    contract's signature and unused: the optimizer is a client ``torch.optim.AdamW``, never
    DeepSpeed's config optimizer (which JIT-builds FusedAdam).
    """
    del optim
    micro, global_ = int(engine.micro_batch_size), int(engine.global_batch_size)
    if micro <= 0 or world_size <= 0:
        raise ValueError(f"engine.micro_batch_size={micro} and world_size={world_size} must be positive")
    per_step = micro * world_size
    if global_ % per_step or global_ < per_step:
        raise ValueError(
            f"engine.global_batch_size={global_} is not a positive multiple of micro_batch_size {micro} "
            f"x world_size {world_size} = {per_step}; use a multiple of {per_step} or change micro_batch_size"
        )
    stage = int(engine.zero_stage)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage={stage} must be 0, 1, 2 or 3")
    if engine.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"engine.precision={engine.precision!r} must be fp32, bf16 or fp16")
    zero: dict[str, Any] = {"stage": stage}
    if engine.offload_optimizer:
        if stage == 0:
            raise ValueError("engine.offload_optimizer needs engine.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if engine.offload_param:
        if stage != 3:
            raise ValueError("engine.offload_param needs engine.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    clip = float(engine.grad_clip or 0.0)
    config: dict[str, Any] = {
        "train_batch_size": global_,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": global_ // per_step,
        "zero_optimization": zero,
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16"},
        "gradient_clipping": clip,
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
    }
    if engine.offload_optimizer or engine.offload_param:
        # Keep our torch AdamW instead of forcing DeepSpeedCPUAdam (a ~65 s JIT build).
        config["zero_force_ds_cpu_optimizer"] = False
    return _merge_extra(config, dict(getattr(engine, "deepspeed_extra", None) or {}))


_DERIVED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _merge_extra(config: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``engine.deepspeed_extra`` into ``config``; derived batch keys may not change."""
    for key in _DERIVED:
        if key in extra and extra[key] != config[key]:
            raise ValueError(
                f"engine.deepspeed_extra.{key}={extra[key]} contradicts the derived value {config[key]}; "
                "set engine.micro_batch_size / engine.global_batch_size instead"
            )

    def merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
        for k, v in src.items():
            if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = copy.deepcopy(v)

    merge(config, extra)
    return config


def check_ds_config(ds_config: dict[str, Any]) -> None:
    """Validate a DeepSpeed config dict against DeepSpeed's own schema without starting anything.

    Raises ValueError naming ``engine.deepspeed_extra`` and each rejected key (e.g. an unknown key under
    ``zero_optimization``, a value of the wrong type), which ``deepspeed.initialize`` would otherwise raise as a
    pydantic traceback after the process group is up. Batch sizes must be those of one rank.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(copy.deepcopy(ds_config))
    except (ValueError, AssertionError, TypeError) as err:
        errors = getattr(err, "errors", None)  # pydantic: one record per rejected field
        if callable(errors):
            where = getattr(err, "title", "config")
            detail = "; ".join(f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors())
        else:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"engine.deepspeed_extra is rejected by DeepSpeed's config schema: {detail}") from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STALE_LOCK_SECONDS = 600
"""A JIT-build lock older than this is left by a killed build (one takes 20-45 s on CPU)."""


def remove_stale_build_locks(max_age_s: float = STALE_LOCK_SECONDS) -> list[str]:
    """Delete torch-extension build locks abandoned by a killed process; returns what was removed.

    ``init_distributed`` JIT-builds DeepSpeed's shared-memory comm op under ``TORCH_EXTENSIONS_DIR``;
    torch guards the build with a ``lock`` file and waits for it *forever*, so one Ctrl-C during the
    first build would hang every later run silently. Only rank 0 (or a single process) removes.
    """
    import glob
    import time

    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return []
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import _get_build_directory

        root = os.path.dirname(_get_build_directory("deepspeed_shm_comm", verbose=False))
    removed = []
    for lock in glob.glob(os.path.join(root, "*", "lock")):
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(lock) > max_age_s:
                os.remove(lock)
                removed.append(lock)
                print(f"udmtrain: removed a stale JIT build lock {lock} (left by a killed build)", flush=True)
    return removed


class RendezvousError(RuntimeError):
    """The process group cannot start: its rendezvous port is taken."""


def check_rendezvous_port(addr: str, port: int) -> None:
    """Rank 0 hosts the rendezvous store on ``addr:port``: refuse a port another process listens on
    (a second run on this machine) with a :class:`RendezvousError` instead of a hang or a traceback."""
    if addr not in ("127.0.0.1", "localhost", "0.0.0.0", socket.gethostname()):
        return  # the store lives on another host; nothing to probe here
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store does: TIME_WAIT is fine
        try:
            probe.bind(("127.0.0.1" if addr == "localhost" else addr, port))
        except OSError:
            raise RendezvousError(
                f"rendezvous port {port} on {addr} is already in use (another run on this machine?); pick a free "
                f"one with `deepspeed --master_port N ...`, `torchrun --master_port N ...` or MASTER_PORT=N"
            ) from None


_OWN_PORT = False
"""True once this process chose its own MASTER_PORT (a plain single-process run): a fresh free port is then
picked for every (re)initialisation, and no collision check is needed."""


def init_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise the process group (idempotent) and return ``(rank, world_size, device)``.

    ``backend=None`` picks NCCL when CUDA is available, else gloo. For a plain single-process
    ``python`` run (no launcher) the launcher's variables get defaults: RANK=0, WORLD_SIZE=1,
    LOCAL_RANK=0, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT.
    """
    global _OWN_PORT
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        _OWN_PORT = _OWN_PORT or "MASTER_PORT" not in os.environ
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not (tdist.is_available() and tdist.is_initialized()):
        remove_stale_build_locks()
        if _OWN_PORT:
            # chosen here, free now (a port picked for an earlier group of this process may still be held
            # by its store, e.g. several in-process runs in one test session)
            os.environ["MASTER_PORT"] = str(_free_port())
        elif os.environ.get("RANK", "0") == "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            # (under torchrun the launcher's agent already serves the store on MASTER_PORT)
            check_rendezvous_port(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        _ds().init_distributed(dist_backend=backend)
        release_shm_workspace(backend)
    return tdist.get_rank(), tdist.get_world_size(), device_for(local_rank, backend)


SHM_DIR = "/dev/shm"
SHM_WORKSPACE_PREFIX = "deepspeed_allreduce_buffer"


def shm_workspace_path(rank: int, addr: str | None = None, port: str | None = None) -> str:
    """Where DeepSpeed's CPU comm op keeps rank ``rank``'s shared-memory all-reduce workspace.

    The name is ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (DeepSpeed 0.14-0.19,
    ``ops/csrc/cpu/comm/shm.cpp``): unique to this user and this rendezvous.
    """
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return os.path.join(SHM_DIR, f"{SHM_WORKSPACE_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}")


def release_shm_workspace(backend: str) -> bool:
    """Unlink this rank's shared-memory all-reduce workspace once every rank has mapped it; True if removed.

    On CPU, when every rank is on this machine (``LOCAL_SIZE == WORLD_SIZE``), DeepSpeed's comm op creates
    a 67 MB POSIX shared-memory file per rank and never unlinks it: each run, even a single-process one,
    would leave its files in ``/dev/shm`` (RAM) until reboot. The peers open every rank's file inside
    ``init_distributed`` and keep it mapped, so after a barrier the name can go: the memory stays valid
    for the mappings and is freed when the last process exits, however it exits (``kill -9`` included).
    """
    if backend != "gloo" or not (tdist.is_available() and tdist.is_initialized()):
        return False
    world = tdist.get_world_size()
    if os.environ.get("LOCAL_SIZE") != str(world):
        return False  # the op took its shared-memory path only when every rank is local
    if world > 1:
        tdist.barrier()  # every peer has opened (mapped) every rank's workspace by now
    try:
        os.unlink(shm_workspace_path(tdist.get_rank()))
    except FileNotFoundError:
        return False  # built without the op, or a re-initialisation in a process that already released it
    return True


def device_for(local_rank: int, backend: str) -> torch.device:
    """The device a rank trains on: ``cuda:<local_rank>`` under NCCL, else CPU."""
    return torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")


def create_engine(model: torch.nn.Module, optimizer: Any, lr_scheduler: Any, ds_config: dict[str, Any],
                  compile: bool = False):
    """``deepspeed.initialize`` with a client optimizer and LR scheduler; returns the engine.

    ``optimizer`` is a ``torch.optim.Optimizer`` or a callable ``params -> Optimizer`` (built after
    DeepSpeed has moved the model to its device); ``lr_scheduler`` an ``LRScheduler`` or a callable
    ``optimizer -> LRScheduler``. DeepSpeed steps the scheduler after every optimizer step and stores
    it in checkpoints. ``compile=True`` calls ``engine.compile()`` afterwards (never before: ZeRO-3).
    """
    engine, _, _, _ = _ds().initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=ds_config,
    )
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # Nothing to average over one data-parallel rank, but DeepSpeed's stage-0 path would still
        # flatten every gradient into buckets, all-reduce them and copy them back after each backward
        # (~6% of a small model's CPU step). Skipping it changes no value: the sum over one rank and the
        # division by a world size of 1 are the identity. (ZeRO >= 1 moves gradients into its
        # partitions in that call, so it stays.)
        engine.enable_backward_allreduce = False
    if compile:
        engine.compile()
    return engine


def step(engine) -> float | None:
    """``engine.step()`` returning the global L2 grad norm at an accumulation boundary, else None.

    The norm is the pre-clipping ``||g||_2`` of the data-parallel-averaged gradient. DeepSpeed
    reports it for ZeRO >= 1 and mixed precision; for stage 0 fp32 it returns None, so it is
    computed here from ``p.grad`` (already all-reduced at the boundary) before the step zeroes them.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    own_norm = None
    mixed = engine.bfloat16_enabled() or engine.fp16_enabled()  # then DeepSpeed's optimizer wrapper reports it
    if boundary and engine.zero_optimization_stage() == 0 and not mixed:
        # one fused per-tensor norm kernel (no float64 copy of every gradient), combined in float64
        grads = [p.grad.detach() for p in engine.module.parameters() if p.grad is not None]
        norms = [n.double() for n in torch._foreach_norm(grads)]  # per tensor; dtypes may differ
        own_norm = float(torch.stack(norms).pow(2).sum().sqrt()) if norms else 0.0
    engine.step()
    if not boundary:
        return None
    norm = engine.get_global_grad_norm()
    if norm is None:
        return own_norm
    return float(norm)


@contextlib.contextmanager
def gathered_parameters(module: torch.nn.Module, modifier_rank: int | None = None) -> Iterator[None]:
    """Inside the block every parameter of ``module`` is full-sized on every rank (ZeRO-3 gathers).

    With ``modifier_rank=r`` edits made on rank r are re-partitioned on exit (use for loading EMA
    weights into the model); with None the gathered values are read-only. A no-op below stage 3.
    """
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        with _ds().zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gathered parameters (and buffers) of ``module`` as fp32 CPU tensors, on every rank."""
    with gathered_parameters(module):
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def set_full_fp32_params(engine, state: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the fp32 master weights of every named parameter of ``engine.module`` with ``state``.

    With bf16/fp16 the engine builds its fp32 masters from the already rounded low-precision weights,
    so a model loaded before ``create_engine`` loses its exact fp32 values; this puts them back (ZeRO
    1-3, DeepSpeed's ``safe_set_full_fp32_param``). A no-op for parameters without masters (fp32 stage 0).
    """
    _ds()
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in engine.module.named_parameters():
        safe_set_full_fp32_param(param, state[name].to(param.device, torch.float32))


def save(engine, directory: str | os.PathLike, client_state: dict[str, Any] | None = None) -> None:
    """Collective: every rank writes its DeepSpeed shards into ``directory/<CHECKPOINT_TAG>/``."""
    engine.save_checkpoint(os.fspath(directory), tag=CHECKPOINT_TAG, client_state=client_state or {},
                           save_latest=False)


def _inert_deepspeed_classes() -> list:
    """The DeepSpeed classes its checkpoints hold besides tensors and containers: plain records
    (an enum, a dataclass, the loss scaler's attributes) whose unpickling runs no code."""
    _ds()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def check_checkpoint_files(directory: str | os.PathLike) -> None:
    """Refuse DeepSpeed shards under ``directory/<CHECKPOINT_TAG>/`` that hold foreign code.

    DeepSpeed's own loader (and ``zero_to_fp32``) unpickles its ``*.pt`` files with
    ``weights_only=False``. Before either touches them, every file is parsed here with
    ``weights_only=True`` (tensor data memory-mapped, not read) allowing only tensors, plain
    containers and the inert DeepSpeed records above; anything else raises
    :class:`udmtrain.utils.io.UnsafeFileError` naming the file, and nothing from it runs.
    """
    import glob

    from udmtrain.utils.io import load_tensors

    allow = tuple(_inert_deepspeed_classes())
    for path in sorted(glob.glob(os.path.join(os.fspath(directory), CHECKPOINT_TAG, "**", "*.pt"), recursive=True)):
        load_tensors(path, allow=allow, mmap=True)


def load(engine, directory: str | os.PathLike) -> dict[str, Any]:
    """Collective: restore module, optimizer and LR scheduler from ``directory``; returns client state.

    The shards are checked by :func:`check_checkpoint_files` first (DeepSpeed unpickles them).
    """
    if not os.path.isdir(os.path.join(directory, CHECKPOINT_TAG)):
        raise FileNotFoundError(f"no DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}) under {directory}")
    check_checkpoint_files(directory)
    path, client_state = engine.load_checkpoint(os.fspath(directory), tag=CHECKPOINT_TAG)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}) under {directory}")
    return client_state or {}


def barrier() -> None:
    """``dist.barrier()`` when a process group exists."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def teardown() -> None:
    """Barrier + ``destroy_process_group`` (cuts the gloo exit SIGABRT rate from ~18% to ~2%)."""
    if tdist.is_available() and tdist.is_initialized():
        with contextlib.suppress(Exception):
            tdist.barrier()
        tdist.destroy_process_group()
        _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """Drop the process groups DeepSpeed caches at module level (``deepspeed.utils.groups``, e.g. its
    clone of the world group): they belong to the destroyed group, and a later ``init_distributed`` in
    the same process (several in-process runs, e.g. a test session) would otherwise hand them to
    collectives ("Group ... is not registered")."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name, value in list(vars(groups).items()):
        if not (name.startswith("_") and name.isupper()):
            continue
        if isinstance(value, dict):
            value.clear()
        elif isinstance(value, tdist.ProcessGroup):
            setattr(groups, name, None)


def load_fp32_state_dict(step_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full fp32 CPU weights of the model saved under ``step_dir/<CHECKPOINT_TAG>/`` (no engine needed).

    ZeRO 1-3 and bf16/fp16 checkpoints store the fp32 master weights in per-rank optimizer shards;
    DeepSpeed's ``zero_to_fp32`` merges them (any saved world size). A stage-0 fp32 checkpoint has no
    such shards and its module weights are already full fp32: they are read from the model-states file.
    Returns ``{name: fp32 tensor}`` with the module's own parameter (and buffer) names.
    """
    import glob
    import sys

    tag_dir = os.path.join(os.fspath(step_dir), CHECKPOINT_TAG)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"no DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}) under {step_dir}")
    check_checkpoint_files(step_dir)  # zero_to_fp32 unpickles them
    if glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):
        _ds()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; keep stdout for tool output
            state = get_fp32_state_dict_from_zero_checkpoint(os.fspath(step_dir), tag=CHECKPOINT_TAG)
    else:
        files = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))
        if not files:
            raise FileNotFoundError(f"{tag_dir} holds neither ZeRO optimizer shards nor a model-states file")
        from udmtrain.utils.io import load_tensors

        state = load_tensors(files[0], allow=tuple(_inert_deepspeed_classes()))["module"]
    return {k: v.detach().float().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
