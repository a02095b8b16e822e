"""The typed recipe: ``RunConfig`` and its sections (docs/design.md §4-5, docs/architecture.md).

Plain sections are dataclasses defined here. Component sections (``model``, ``process``, ...) are a
``ComponentSpec(name, cfg)`` whose ``cfg`` is an instance of the registered class's nested ``Config``;
which registry each section draws from is the one table ``COMPONENT_SECTIONS``.
Every field carries an attribute docstring: ``tools/gen_config_docs.py`` turns them into docs/recipes.md.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any, Literal

# section -> registry family. Sections in OPTIONAL_COMPONENTS may be absent (the AR baseline has no
# process, schedule, parameterization or sampler).
COMPONENT_SECTIONS: dict[str, str] = {
    "model": "model",
    "process": "process",
    "schedule": "schedule",
    "parameterization": "parameterization",
    "loss": "loss",
    "sampler": "sampler",
    "tokenizer": "tokenizer",
    "optim": "optimizer",
    "lr_schedule": "lr_schedule",
}
OPTIONAL_COMPONENTS: frozenset[str] = frozenset({"process", "schedule", "parameterization", "sampler"})


@dataclasses.dataclass(kw_only=True, frozen=True)
class RunSection:
    """Run identity and output location."""

    name: str = "unnamed"
    """Run name; outputs go to ``<output_root>/<name>/``. A plain directory name: no ``/``, ``..`` or
    absolute path, so a run never writes outside ``output_root``."""
    output_root: str = "runs"
    """Directory holding one sub-directory per run."""
    seed: int = 1
    """Global seed; per-rank and per-step generators are derived from it."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class EngineSection:
    """DeepSpeed settings; these typed fields generate the DeepSpeed config dict."""

    zero_stage: int = 2
    """ZeRO stage 0-3 (0: plain data parallel, 1: optimizer states, 2: + gradients, 3: + parameters)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "bf16"
    """Training precision; log-probabilities in the losses stay fp32 regardless. 'auto': bf16 where this
    machine has bf16 units (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else fp32 (CPUs without
    them emulate bf16, ~4x slower); decided when the recipe is loaded and recorded in the run."""
    micro_batch_size: int = 16
    """Sequences per device per forward/backward."""
    global_batch_size: int = 512
    """Sequences per optimizer step over all devices; must be a multiple of micro_batch_size x world size
    (gradient accumulation steps = global / (micro x world), derived and printed)."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""
    offload_optimizer: bool = False
    """ZeRO-Offload the optimizer state to CPU memory."""
    offload_param: bool = False
    """ZeRO-Offload the parameters to CPU memory (stage 3 only)."""
    compile: bool = False
    """Wrap the model with torch.compile."""
    deepspeed_extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra DeepSpeed config keys merged into the generated dict. Only allow-listed top-level keys
    (see 'DeepSpeed escape hatch' below); keys udmtrain sets itself are refused with the field to use."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class TrainSection:
    """Length and cadence of training."""

    max_steps: int
    """Number of optimizer steps to train for (required)."""
    log_every: int = 10
    """Log metrics every this many optimizer steps."""
    ema_decay: float = 0.9999
    """EMA decay of the weights used for evaluation and sampling (warm-up min(decay, (1+n)/(10+n)));
    0 disables the EMA."""
    max_nonfinite_steps: int = 20
    """Abort after this many consecutive steps with a non-finite loss or gradient."""
    time_sampling: Literal["antithetic", "iid"] = "antithetic"
    """How one diffusion time per sequence is drawn: 'antithetic' (stratified over the global batch:
    one draw in each of its equal strata, lower variance) or 'iid'."""
    t_min: float = 1e-3
    """Smallest diffusion time drawn, t in [t_min, 1), for training and the validation NELBO; a
    trainer setting, separate from the schedule's eps (MDLM's training.sampling_eps)."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class CheckpointSection:
    """Checkpoint cadence, retention and resume."""

    every: int = 5000
    """Save a checkpoint every this many optimizer steps (and at the last step)."""
    keep_last: int = 3
    """Number of most recent checkpoints kept on disk (0 keeps all)."""
    resume: str = "auto"
    """'auto' (resume from the latest checkpoint of this run if any), 'never' (a fresh run; refused
    where run.name already holds checkpoints), or a path: a step_* checkpoint directory, a run directory
    or its checkpoints/ directory (their latest complete checkpoint). The checkpoint's architecture,
    tokenizer, number of ranks, engine.precision and ZeRO family (0, 1-2, 3) must match the run; a
    mismatch is refused before the run starts."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class EvalSection:
    """Periodic validation (NELBO perplexity bound)."""

    every: int = 5000
    """Evaluate every this many optimizer steps (0 disables)."""
    num_batches: int | None = 100
    """Validation batches per evaluation per rank; null evaluates the whole validation set."""
    num_t_samples: int = 1
    """Diffusion times sampled per validation sequence (more = lower-variance NELBO estimate)."""
    num_text_samples: int = 2
    """Samples decoded and logged as TensorBoard text ("samples") at each evaluation, to judge a run
    by eye; 0 disables. Diffusion recipes with a sampler only."""
    text_sample_steps: int = 32
    """Sampler steps of those text samples (a glance, not a measurement: see tools/sample.py)."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class DataSection:
    """Pre-tokenized webdataset shards (see tools/prepare_data.py)."""

    train_shards: str
    """Training shards: a directory, a glob (data/owt/train-*.tar) or a brace pattern
    (data/owt/train-{000000..000099}.tar) (required)."""
    valid_shards: str | None = None
    """Validation shards, same forms as train_shards; null disables validation."""
    seq_len: int = 1024
    """Tokens per training sequence; must match the shards' manifest."""
    shuffle_buffer: int = 1000
    """Samples in the per-worker shuffle buffer (0 disables shuffling)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    on_corrupt: Literal["fail", "skip"] = "fail"
    """What to do with an unreadable sample: stop with an error naming it, or skip and count it."""
    shuffle: bool = True
    """Shuffle shard order and samples (seeded by run.seed, epoch, rank, worker); false streams in order."""
    manifest: str | None = None
    """Local path of the shards' manifest.json; needed when the shards are remote URLs (pipe:, http:)."""
    allow_shell_urls: bool = False
    """Allow ``pipe:COMMAND`` shard locations, which run COMMAND in a shell (e.g. ``pipe:aws s3 cp
    s3://bucket/train-000000.tar -``). Off by default so that a recipe never runs code unless it says so."""
    document_attention: bool = False
    """Restrict attention (training and validation) to each token's own document, using the shards'
    per-token document ids. Meaningful with ``wrap`` packing, where a sequence concatenates several
    documents; the MDLM/UDLM papers' protocol is false (attention spans the whole sequence)."""


PLAIN_SECTIONS: dict[str, type] = {
    "run": RunSection,
    "engine": EngineSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "eval": EvalSection,
    "data": DataSection,
}
# Order of sections in the resolved recipe (to_dict, --dry-run, recipe.yaml).
SECTION_ORDER: tuple[str, ...] = (
    "run", "engine", "optim", "lr_schedule", "train", "checkpoint", "eval", "data", "tokenizer",
    "model", "process", "schedule", "parameterization", "loss", "sampler",
)


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """A chosen component: its registry ``name`` and its validated ``Config`` instance."""

    name: str
    """The registry name, as written in the recipe (``loglinear``)."""
    cfg: Any
    """An instance of the registered class's nested ``Config`` dataclass."""

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **fields}`` as plain YAML-able data."""
        return {"name": self.name, **_plain(self.cfg)}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The fully resolved, validated recipe. Build it with ``udmtrain.config.load_recipe``."""

    run: RunSection
    engine: EngineSection
    train: TrainSection
    checkpoint: CheckpointSection
    eval: EvalSection
    data: DataSection
    model: ComponentSpec
    loss: ComponentSpec
    tokenizer: ComponentSpec
    optim: ComponentSpec
    lr_schedule: ComponentSpec
    process: ComponentSpec | None = None
    schedule: ComponentSpec | None = None
    parameterization: ComponentSpec | None = None
    sampler: ComponentSpec | None = None
    origins: dict[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    """Dotted path -> ``file:line:col`` or ``command line arg N`` (not part of equality)."""

    def to_dict(self) -> dict[str, Any]:
        """Fully resolved plain dict in ``SECTION_ORDER``; absent optional components are omitted.

        ``load_recipe`` of its YAML (``loader.dump_yaml``) gives back an equal RunConfig.
        """
        out: dict[str, Any] = {}
        for section in SECTION_ORDER:
            value = getattr(self, section)
            if value is None:
                continue
            out[section] = value.to_dict() if isinstance(value, ComponentSpec) else _plain(value)
        return out


def _plain(value: Any) -> Any:
    """Dataclasses/tuples/dicts -> dicts/lists/scalars (YAML-able)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: ``{field: "text under the field"}`` (read with ``ast``).

    Inherited fields are looked up in the base classes. Missing docstrings are simply absent.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(source)
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs
