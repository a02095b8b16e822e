"""Typed validation of a loaded recipe tree -> ``RunConfig``; every problem is collected, none raised early.

Values are converted by ``coerce.coerce`` (rules in ``coerce.COERCION_RULES``); unknown keys get
did-you-mean suggestions (keys at that level first, then every leaf path). Component sections are
checked against the registered class's ``Config``, its ``requires`` table (sibling names) and, for a
class with ``required_capabilities(cfg)`` (samplers), the capabilities the chosen process declares.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from udmtrain.config.coerce import _Bad, _MISSING, coerce, show, suggest, type_name, yaml_type
from udmtrain.config.errors import ConfigError, ConfigIssue
from udmtrain.config.loader import Tree
from udmtrain.config.schema import (
    COMPONENT_SECTIONS, OPTIONAL_COMPONENTS, PLAIN_SECTIONS, SECTION_ORDER, ComponentSpec, RunConfig,
)
from udmtrain.registry import UnknownComponentError, registry

# engine.deepspeed_extra: real top-level DeepSpeed keys a user may pass through unchanged.
DEEPSPEED_ALLOWED: frozenset[str] = frozenset({
    "communication_data_type", "seq_parallel_communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "wall_clock_breakdown", "memory_breakdown",
    "flops_profiler", "activation_checkpointing", "aio", "comms_logger", "zero_optimization",
    "data_types", "checkpoint", "steps_per_print", "dump_state", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "disable_allgather", "timers", "graph_harvesting",
    "use_data_before_expert_parallelism",
})
# Keys udmtrain generates itself -> the udmtrain field to set instead.
DEEPSPEED_OWNED: dict[str, str] = {
    "train_batch_size": "engine.global_batch_size",
    "train_micro_batch_size_per_gpu": "engine.micro_batch_size",
    "gradient_accumulation_steps": "engine.global_batch_size (accumulation is derived)",
    "bf16": "engine.precision", "fp16": "engine.precision", "amp": "engine.precision",
    "torch_autocast": "engine.precision",
    "optimizer": "the optim section", "scheduler": "the lr_schedule section",
    "gradient_clipping": "engine.grad_clip", "compile": "engine.compile",
}
ZERO_OWNED: dict[str, str] = {
    "stage": "engine.zero_stage", "offload_optimizer": "engine.offload_optimizer",
    "offload_param": "engine.offload_param",
}

# (path, predicate, requirement) range checks on plain sections.
_BOUNDS: tuple[tuple[str, Any, str], ...] = (
    ("engine.zero_stage", lambda v: 0 <= v <= 3, "must be 0, 1, 2 or 3"),
    ("engine.micro_batch_size", lambda v: v >= 1, "must be >= 1"),
    ("engine.global_batch_size", lambda v: v >= 1, "must be >= 1"),
    ("engine.grad_clip", lambda v: v >= 0, "must be >= 0 (0 disables clipping)"),
    ("train.max_steps", lambda v: v >= 1, "must be >= 1"),
    ("train.log_every", lambda v: v >= 1, "must be >= 1"),
    ("train.ema_decay", lambda v: 0 <= v < 1, "must be in [0, 1) (0 disables the EMA)"),
    ("train.max_nonfinite_steps", lambda v: v >= 1, "must be >= 1"),
    ("train.t_min", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("checkpoint.every", lambda v: v >= 1, "must be >= 1"),
    ("checkpoint.keep_last", lambda v: v >= 0, "must be >= 0 (0 keeps all)"),
    ("eval.every", lambda v: v >= 0, "must be >= 0 (0 disables evaluation)"),
    ("eval.num_batches", lambda v: v is None or v >= 1, "must be >= 1 or null"),
    ("eval.num_t_samples", lambda v: v >= 1, "must be >= 1"),
    ("eval.num_text_samples", lambda v: v >= 0, "must be >= 0 (0 disables the TensorBoard text samples)"),
    ("eval.text_sample_steps", lambda v: v >= 1, "must be >= 1"),
    ("data.seq_len", lambda v: v >= 1, "must be >= 1"),
    ("data.shuffle_buffer", lambda v: v >= 0, "must be >= 0"),
    ("data.num_workers", lambda v: v >= 0, "must be >= 0"),
    ("run.seed", lambda v: 0 <= v < 2**63, "must be in [0, 2**63): it seeds torch, NumPy and the data order"),
    ("run.name", lambda v: bool(v) and v not in (".", "..") and "/" not in v and "\\" not in v and "\0" not in v,
     "must be a plain directory name (no '/', '..' or absolute path): the run is written to "
     "<run.output_root>/<run.name>"),
)


class _Checker:
    """Walks a loaded ``Tree`` against the schema, appending ``ConfigIssue``s to ``self.issues``."""

    def __init__(self, tree: Tree, recipe: str):
        self.tree, self.recipe = tree, recipe
        self.issues: list[ConfigIssue] = []
        self.leaf_paths: list[str] = []

    def origin(self, path: str) -> str:
        return self.tree.origins.get(path) or self.tree.key_origins.get(path) or self.recipe

    def key_origin(self, path: str) -> str:
        return self.tree.key_origins.get(path) or self.origin(path)

    def add(self, path: str, message: str, hint: str | None = None, *, at_key: bool = False,
            value: Any = _MISSING) -> None:
        origin = self.key_origin(path) if at_key else self.origin(path)
        shown = None
        if value is not _MISSING and origin.startswith("command line"):
            shown = show(value).strip("'")
        self.issues.append(ConfigIssue(path, origin, message, hint, shown))

    def global_suggestion(self, key: str) -> str | None:
        """A leaf path anywhere in the schema whose last key is close to ``key``."""
        by_leaf: dict[str, str] = {}
        for p in self.leaf_paths:
            by_leaf.setdefault(p.rsplit(".", 1)[-1], p)
        close = suggest(key, by_leaf)
        return by_leaf[close] if close else None

    def dataclass(self, cls: type, data: Any, path: str, unknown_key) -> Any:
        """Instance of dataclass ``cls`` from mapping ``data`` (None after issues were recorded)."""
        if not isinstance(data, dict):
            self.add(path, f"expected a mapping, got {show(data)} ({yaml_type(data)})")
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        ok, kwargs = True, {}
        for key in data:
            if key not in fields and not (unknown_key is _component_key and key == "name"):
                unknown_key(self, path, key, list(fields))
                ok = False
        for name, field in fields.items():
            child = f"{path}.{name}"
            if name in data:
                try:
                    if dataclasses.is_dataclass(hints[name]):
                        kwargs[name] = self.dataclass(hints[name], data[name], child, _plain_key)
                        ok = ok and kwargs[name] is not None
                    else:
                        kwargs[name] = coerce(data[name], hints[name])
                except _Bad as bad:
                    self.add(child, bad.message, bad.hint, value=data[name])
                    ok = False
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                self.add(path, f"missing required key '{name}' ({type_name(hints[name])})",
                         f"add '{name}:' under '{path}', or override {child}=...", at_key=True)
                ok = False
        if not ok:
            return None
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:  # a Config.__post_init__ rejecting a combination
            self.add(path, str(err).splitlines()[0] if str(err) else type(err).__name__, at_key=True)
            return None


def _plain_key(checker: _Checker, path: str, key: str, valid: list[str]) -> None:
    close = suggest(key, valid)
    where = checker.global_suggestion(key) if close is None else None
    msg = f"unknown key in '{path}'" + (f"; did you mean {close!r}?" if close else "")
    if where:
        msg += f"; did you mean {where!r}?"
    checker.add(f"{path}.{key}", msg, "valid keys: " + ", ".join(valid), at_key=True)


def _component_key(checker: _Checker, path: str, key: str, valid: list[str]) -> None:
    section = path
    family = COMPONENT_SECTIONS[section]
    name = checker.current_names[section]
    cls = registry(family).get(name)
    keys = ["name", *valid]
    what = f"{family} {name!r} ({cls.__qualname__.rsplit('.', 1)[0]}.Config)"
    close = suggest(key, valid)
    if close:
        checker.add(f"{path}.{key}", f"not a field of {what}; did you mean {close!r}?",
                    "valid keys: " + ", ".join(keys), at_key=True)
        return
    owners = [other for other in registry(family).names() if other != name
              and key in {f.name for f in dataclasses.fields(registry(family).get(other).Config)}]
    hint = None
    if owners:
        hint = f"{key!r} is a field of {family} " + ", ".join(repr(o) for o in owners) + \
            f"; set {section}.name to use it, or remove the key"
    else:
        where = checker.global_suggestion(key)
        if where:
            hint = f"did you mean {where!r}?"
    checker.add(f"{path}.{key}", f"not a field of {what}; valid keys: {', '.join(keys)}", hint, at_key=True)


def _component_class(checker: _Checker, section: str, data: Any) -> tuple[type | None, str | None]:
    """Resolve the registered class of a component section (issues recorded on failure)."""
    family = COMPONENT_SECTIONS[section]
    if not isinstance(data, dict):
        checker.add(section, f"expected a mapping with 'name:' (a registered {family}), got {show(data)}",
                    "registered: " + ", ".join(registry(family).names()))
        return None, None
    name = data.get("name", _MISSING)
    if name is _MISSING:
        checker.add(section, f"missing 'name:' (which {family} to use)",
                    "registered: " + ", ".join(registry(family).names()), at_key=True)
        return None, None
    if not isinstance(name, str):
        checker.add(f"{section}.name", f"expected str, got {show(name)} ({yaml_type(name)})",
                    "registered: " + ", ".join(registry(family).names()), value=name)
        return None, None
    try:
        return registry(family).get(name), name
    except UnknownComponentError as err:
        checker.add(f"{section}.name", err.message(), "registered: " + ", ".join(err.registered), value=name)
        return None, None


def build_run_config(tree: Tree, recipe: str, world_size: int = 1) -> RunConfig:
    """Validate a loaded tree into a ``RunConfig``; ``ConfigError`` listing every issue otherwise."""
    checker = _Checker(tree, recipe)
    data = dict(tree.data)
    for section in COMPONENT_SECTIONS:  # shorthand `tokenizer: gpt2` == `tokenizer: {name: gpt2}`
        if isinstance(data.get(section), str):
            data[section] = {"name": data[section]}
            tree.origins.setdefault(f"{section}.name", checker.origin(section))
    checker.current_names = {}
    classes: dict[str, type] = {}
    # Resolve component classes first: their fields join the leaf paths used for suggestions.
    for section in COMPONENT_SECTIONS:
        if data.get(section) is not None:
            cls, name = _component_class(checker, section, data[section])
            if cls is not None:
                classes[section], checker.current_names[section] = cls, name
    for section, cls in PLAIN_SECTIONS.items():
        checker.leaf_paths += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    for section, cls in classes.items():
        checker.leaf_paths += [f"{section}.name"] + [f"{section}.{f.name}" for f in dataclasses.fields(cls.Config)]

    for key in data:
        if key not in SECTION_ORDER:
            close = suggest(key, SECTION_ORDER)
            msg = f"unknown section {key!r}" + (f"; did you mean {close!r}?" if close else "")
            checker.add(key, msg, "sections: " + ", ".join(SECTION_ORDER), at_key=True)

    built: dict[str, Any] = {}
    for section in SECTION_ORDER:
        value = data.get(section)
        if section in PLAIN_SECTIONS:
            built[section] = checker.dataclass(PLAIN_SECTIONS[section], {} if value is None else value,
                                               section, _plain_key)
        elif value is None:
            built[section] = None
            if section not in OPTIONAL_COMPONENTS:
                family = COMPONENT_SECTIONS[section]
                checker.add(section, f"missing required section '{section}' (a registered {family})",
                            f"add '{section}: {{name: ...}}'; registered: " + ", ".join(registry(family).names()))
        elif section in classes:
            fields = {k: v for k, v in value.items() if k != "name"}
            cfg = checker.dataclass(classes[section].Config, fields, section, _component_key)
            built[section] = ComponentSpec(checker.current_names[section], cfg) if cfg is not None else None
    cross_checks(built, classes, checker, world_size)
    if checker.issues:
        raise ConfigError(checker.issues, recipe)
    return RunConfig(**built, origins=dict(tree.origins))


def cross_checks(built: dict[str, Any], classes: dict[str, type], checker: _Checker,
                 world_size: int) -> list[ConfigIssue]:
    """Cross-field checks in one place: ranges, batch arithmetic, DeepSpeed extras, ``requires``.

    Sections that failed to build (None) are skipped, so these run alongside the per-key issues.
    Appends to ``checker.issues`` and returns the issues it added.
    """
    before = len(checker.issues)
    for path, ok, requirement in _BOUNDS:
        section, key = path.split(".")
        if built[section] is not None and not ok(value := getattr(built[section], key)):
            checker.add(path, f"{show(value)} {requirement}", value=value)
    _check_shell_urls(built.get("data"), checker)
    engine = built["engine"]
    if engine is None:
        _check_requires(built, classes, checker)
        _check_capabilities(built, classes, checker)
        return checker.issues[before:]
    if engine.zero_stage in range(4) and engine.micro_batch_size >= 1 and engine.global_batch_size >= 1:
        per_step = engine.micro_batch_size * world_size
        if engine.global_batch_size % per_step:
            lower = engine.global_batch_size // per_step * per_step
            near = [v for v in (lower, lower + per_step) if v > 0]
            checker.issues.append(ConfigIssue(
                "engine.global_batch_size", checker.origin("engine.global_batch_size"),
                f"not divisible by micro_batch_size {engine.micro_batch_size} x world_size {world_size} = "
                f"{per_step}; use a multiple of {per_step} or change micro_batch_size",
                "nearest valid values: " + " or ".join(f"engine.global_batch_size={v}" for v in near),
                str(engine.global_batch_size)))
    if engine.offload_param and engine.zero_stage != 3:
        checker.add("engine.offload_param", f"offload_param needs zero_stage 3, but zero_stage is {engine.zero_stage}",
                    "Fix: set engine.zero_stage=3 or engine.offload_param=false", value=True)
    _check_deepspeed_extra(engine.deepspeed_extra, checker)
    _check_requires(built, classes, checker)
    _check_capabilities(built, classes, checker)
    return checker.issues[before:]


SHELL_SCHEMES = ("pipe:",)
"""Shard URL schemes that run a shell command (webdataset's ``gopen``)."""


def _check_shell_urls(data: Any, checker: _Checker) -> None:
    """``pipe:`` shard locations run a shell command: only with ``data.allow_shell_urls: true``."""
    if data is None or data.allow_shell_urls:
        return
    for key in ("train_shards", "valid_shards", "manifest"):
        value = getattr(data, key)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and item.strip().startswith(SHELL_SCHEMES):
                checker.add(f"data.{key}", f"{item.split()[0]!r}... runs a shell command, and recipes run no code "
                            "unless they opt in", "set data.allow_shell_urls=true if you trust this command",
                            value=item)
                break


def _check_deepspeed_extra(extra: dict[str, Any], checker: _Checker) -> None:
    base = "engine.deepspeed_extra"
    for key, value in extra.items():
        path = f"{base}.{key}"
        if key in DEEPSPEED_OWNED:
            checker.add(path, f"'{key}' is set by udmtrain itself", f"set {DEEPSPEED_OWNED[key]} instead",
                        at_key=True)
        elif key not in DEEPSPEED_ALLOWED:
            close = suggest(key, DEEPSPEED_ALLOWED)
            checker.add(path, "not an allowed DeepSpeed key" + (f"; did you mean {close!r}?" if close else ""),
                        "allowed: " + ", ".join(sorted(DEEPSPEED_ALLOWED)), at_key=True)
        elif key == "zero_optimization":
            if not isinstance(value, dict):
                checker.add(path, f"expected a mapping, got {show(value)} ({yaml_type(value)})")
                continue
            for sub in value:
                if sub in ZERO_OWNED:
                    checker.add(f"{path}.{sub}", f"'zero_optimization.{sub}' is set by udmtrain itself",
                                f"set {ZERO_OWNED[sub]} instead", at_key=True)


def _check_requires(built: dict[str, Any], classes: dict[str, type], checker: _Checker) -> None:
    """Each component's ``requires`` ({family: allowed names}) against the chosen siblings."""
    for section, cls in classes.items():
        spec = built.get(section)
        if spec is None:
            continue
        for family, allowed in (getattr(cls, "requires", None) or {}).items():
            family_word = COMPONENT_SECTIONS[section]
            allowed_text = " or ".join(repr(a) for a in sorted(allowed))
            for other in (s for s, f in COMPONENT_SECTIONS.items() if f == family):
                chosen = built.get(other)
                subject = f"{family_word} {spec.name!r}"
                if chosen is None:
                    message = f"{subject} requires {family} {allowed_text}, but no '{other}' section is set"
                elif chosen.name not in allowed:
                    message = (f"{subject} requires {family} {allowed_text}, but {other}.name="
                               f"{chosen.name!r} ({checker.origin(f'{other}.name')})")
                else:
                    continue
                first = sorted(allowed)[0]
                checker.issues.append(ConfigIssue(
                    f"{section}.name", checker.origin(f"{section}.name"), message,
                    f"Fix: set {other}.name={first}, or choose another {family_word} than {spec.name!r}",
                    spec.name))


def _check_capabilities(built: dict[str, Any], classes: dict[str, type], checker: _Checker) -> None:
    """``cls.required_capabilities(cfg)`` (capability words, e.g. a sampler's) against the ``capabilities``
    the chosen process class declares: the same check the sampler's constructor makes, at config time."""
    process = built.get("process")
    process_cls = classes.get("process") if process is not None else None
    have = set(getattr(process_cls, "capabilities", ()))
    for section, cls in classes.items():
        spec = built.get(section)
        need_fn = getattr(cls, "required_capabilities", None)
        if spec is None or need_fn is None or section == "process":
            continue
        needed = set(need_fn(spec.cfg))
        missing = sorted(needed - have)
        if not missing:
            continue
        processes = registry("process")
        ok = [n for n in processes.names() if needed <= set(getattr(processes.get(n), "capabilities", ()))]
        subject = f"{COMPONENT_SECTIONS[section]} {spec.name!r} needs process capabilities {missing}"
        if process is None:
            message = f"{subject}, but no 'process' section is set"
        else:
            message = (f"{subject}, which process.name={process.name!r} ({checker.origin('process.name')}) "
                       f"does not declare")
        fix = f"Fix: set process.name={ok[0]}, or" if ok else "Fix:"
        checker.issues.append(ConfigIssue(
            f"{section}.name", checker.origin(f"{section}.name"),
            message + (f" (processes that do: {', '.join(ok)})" if ok else ""),
            f"{fix} choose another {COMPONENT_SECTIONS[section]} than {spec.name!r} or change its settings",
            spec.name))
