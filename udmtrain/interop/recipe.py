"""The reference config (rev_udm / DUO ``algo`` section, or MDLM's top level) <-> a udmtrain recipe.

``algo_of(config)`` normalises the two config styles into an ``Algo``; ``recipe_from_config`` turns it
into a complete recipe dict (the table in docs/interop.md "Algorithms"); ``config_from_recipe`` is the
inverse used by the export. Nothing is guessed: an algorithm, backbone, noise schedule or flag the
table does not cover is a ``ReferenceConfigError`` naming the config key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from udmtrain.interop.errors import InteropError

ALGORITHMS = ("udlm", "max_coupling", "mdlm", "remdlm", "audm", "reaudm")
"""Reference ``algo.name`` values that have a udmtrain equivalent."""

MASKED, UNIFORM, ABSORBING = "masked", "uniform", "absorbing_uniform"

PROCESS_OF = {"udlm": UNIFORM, "max_coupling": UNIFORM, "mdlm": MASKED, "remdlm": MASKED, "audm": ABSORBING,
              "reaudm": ABSORBING}
SAMPLER_OF = {"udlm": "ancestral", "max_coupling": "max_coupling", "mdlm": "ancestral", "remdlm": "remdm",
              "audm": "ancestral", "reaudm": "reaudm"}
NELBO_OF = {"udlm": "plugin_nelbo", "max_coupling": "max_coupling_nelbo", "mdlm": "mdlm_nelbo",
            "remdlm": "mdlm_nelbo", "audm": "audm_nelbo", "reaudm": "audm_nelbo"}
PREDICTION_TO_PARAM = {"mean_loo": "loo", "mean": "denoiser"}


class ReferenceConfigError(InteropError):
    """A reference config that udmtrain cannot map exactly (names the key and the supported values)."""


@dataclass(frozen=True)
class Algo:
    """The parts of a reference config that decide the udmtrain components."""

    name: str
    """One of ``ALGORITHMS``."""
    model_prediction: str
    """``mean_loo`` (LOO network) or ``mean`` (denoiser network)."""
    loss_fn: str
    """``elbo`` or ``cross_entropy``."""
    time_conditioning: bool
    fusion: str
    """AUDM input fusion: ``separate_linear`` / ``shared_mlp``; ``none`` for the other algorithms."""

    @property
    def process(self) -> str:
        return PROCESS_OF[self.name]


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def _get(config: dict, dotted: str, default: Any = KeyError, kind: type | None = None, _depth: int = 0) -> Any:
    """``config[a][b]...`` for ``dotted = "a.b"``, following OmegaConf ``${x.y}`` references (the
    pickled config keeps them unresolved); ``kind`` (bool / int / float / str) is checked, not coerced
    from another type (a float may be written as a string, e.g. ``"1e-3"``)."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is KeyError:
                raise ReferenceConfigError(f"reference config has no {dotted!r}; cannot derive the recipe")
            return default
        node = node[part]
    if isinstance(node, str) and "${" in node:
        match = _INTERPOLATION.fullmatch(node)
        if match is None or _depth > 8:
            raise ReferenceConfigError(f"reference config {dotted}={node!r}: only plain ${{key}} references resolve")
        return _get(config, match.group(1), default, kind, _depth + 1)
    if kind is None or node is default:
        return node
    ok = isinstance(node, kind) and not (kind is not bool and isinstance(node, bool))
    if kind is float and not ok and not isinstance(node, bool):
        try:
            return float(node)
        except (TypeError, ValueError):
            pass
    if not ok:
        raise ReferenceConfigError(f"reference config {dotted}={node!r} is not a {kind.__name__}")
    return kind(node)


def algo_of(config: dict) -> Algo:
    """Normalise ``config`` (``algo:`` section, or MDLM's top-level ``parameterization``/``diffusion``)."""
    if "algo" in config:
        name = _get(config, "algo.name", kind=str)
        if name not in ALGORITHMS:
            raise ReferenceConfigError(f"algo.name={name!r} has no udmtrain equivalent; supported: {list(ALGORITHMS)}")
        backbone = _get(config, "algo.backbone", "dit", kind=str)
        causal = _get(config, "algo.causal_attention", False, kind=bool)
        loss_fn = _get(config, "algo.loss_fn", "elbo", kind=str)
        time_cond = _get(config, "algo.time_conditioning", kind=bool)
        if name in ("mdlm", "remdlm"):
            prediction = "mean"
            param = _get(config, "algo.parameterization", "subs", kind=str)
            if param != "subs":
                raise ReferenceConfigError(f"algo.parameterization={param!r}: only 'subs' MDLM networks are supported")
        elif name in ("audm", "reaudm"):
            prediction = "mean"  # AUDM always predicts p(x | z, n)
        else:
            prediction = _get(config, "algo.model_prediction", "mean_loo" if name == "udlm" else "mean", kind=str)
    else:  # MDLM's own config: top-level diffusion / parameterization / time_conditioning
        diffusion, param = config.get("diffusion"), config.get("parameterization")
        if diffusion != "absorbing_state" or param != "subs":
            raise ReferenceConfigError(f"config has no 'algo' section and diffusion={diffusion!r}, parameterization="
                                       f"{param!r}: only MDLM's absorbing_state + subs is recognised without 'algo'")
        name, prediction, loss_fn = "mdlm", "mean", "elbo"
        backbone = _get(config, "backbone", "dit", kind=str)
        causal = False
        time_cond = _get(config, "time_conditioning", kind=bool)
    if backbone != "dit":
        raise ReferenceConfigError(f"backbone {backbone!r}: only the DiT backbone ('dit') can be imported")
    if causal:
        raise ReferenceConfigError("algo.causal_attention=True: causal (autoregressive) models cannot be imported")
    if prediction not in PREDICTION_TO_PARAM:
        raise ReferenceConfigError(f"algo.model_prediction={prediction!r}; supported: {sorted(PREDICTION_TO_PARAM)}")
    if loss_fn not in ("elbo", "cross_entropy"):
        raise ReferenceConfigError(f"algo.loss_fn={loss_fn!r}; supported: elbo, cross_entropy")
    fusion = "none"
    if name in ("audm", "reaudm"):
        if not _get(config, "algo.condition_on_uniform_noise", True, kind=bool):
            raise ReferenceConfigError("algo.condition_on_uniform_noise=False: udmtrain's AUDM network always "
                                       "sees the noise tokens")
        fusion = _get(config, "algo.conditioning_fusion", "separate_linear", kind=str)
        if fusion not in ("separate_linear", "shared_mlp"):
            raise ReferenceConfigError(f"algo.conditioning_fusion={fusion!r}; supported: separate_linear, shared_mlp")
    return Algo(name, prediction, loss_fn, time_cond, fusion)


def model_section(config: dict, algo: Algo) -> dict[str, Any]:
    """udmtrain ``model:`` section from the reference ``model:`` config (sizes, dropout) and ``algo``."""
    kind = _get(config, "model.type", "ddit", kind=str)
    if kind != "ddit":
        raise ReferenceConfigError(f"model.type={kind!r}: only the DiT ('ddit') can be imported")
    if _get(config, "model.scale_by_sigma", False, kind=bool):
        raise ReferenceConfigError("model.scale_by_sigma=True (SEDD score output) is not supported")
    return {"name": "dit", "hidden_size": _get(config, "model.hidden_size", kind=int),
            "num_blocks": _get(config, "model.n_blocks", kind=int),
            "num_heads": _get(config, "model.n_heads", kind=int),
            "cond_dim": _get(config, "model.cond_dim", kind=int), "mlp_ratio": 4,
            "dropout": _get(config, "model.dropout", 0.1, kind=float), "attn_backend": "auto",
            "noise_conditioning": algo.fusion, "time_conditioning": algo.time_conditioning}


def recipe_from_config(config: dict, *, name: str, output_root: str, tokenizer: dict[str, Any],
                       data_dir: str, precision: str = "fp32") -> dict[str, Any]:
    """A complete recipe dict for the reference ``config`` (see the module docstring).

    Training sections get the paper's defaults (docs/theory.md §6) so that ``checkpoint.resume``
    fine-tunes the import; ``data.*`` points at ``data_dir`` (``train-*.tar`` / ``valid-*.tar``).
    """
    algo = algo_of(config)
    noise = _get(config, "noise.type", "loglinear")
    if noise != "loglinear":
        raise ReferenceConfigError(f"noise.type={noise!r}: only the log-linear schedule is supported")
    eps = _get(config, "training.sampling_eps", kind=float)
    loss = NELBO_OF[algo.name] if algo.loss_fn == "elbo" else "cross_entropy"
    sampler: dict[str, Any] = {"name": SAMPLER_OF[algo.name]}
    if algo.process == MASKED:
        sampler["cache"] = not algo.time_conditioning
    return {
        "run": {"name": name, "output_root": output_root, "seed": 1},
        "engine": {"zero_stage": 1, "precision": precision, "micro_batch_size": 16, "global_batch_size": 512},
        "optim": {"name": "adamw", "lr": 3.0e-4, "betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": 0.0},
        "lr_schedule": {"name": "constant_warmup", "warmup_steps": 2500},
        "train": {"max_steps": 1_000_000, "ema_decay": _get(config, "training.ema", 0.9999, kind=float)},
        "checkpoint": {"every": 5000, "keep_last": 3, "resume": "auto"},
        "eval": {"every": 5000, "num_batches": 100},
        "data": {"train_shards": f"{data_dir}/train-*.tar", "valid_shards": f"{data_dir}/valid-*.tar",
                 "seq_len": _get(config, "model.length", kind=int)},
        "tokenizer": tokenizer,
        "model": model_section(config, algo),
        "process": {"name": algo.process},
        "schedule": {"name": "loglinear", "eps": eps},
        "parameterization": {"name": PREDICTION_TO_PARAM[algo.model_prediction]},
        "loss": {"name": loss},
        "sampler": sampler,
    }


def config_from_recipe(cfg: Any) -> dict[str, Any]:
    """The reference config (plain dict: ``algo``, ``data``, ``model``, ``training``, ``noise``) of a udmtrain
    ``RunConfig`` whose components have a reference equivalent; ``ReferenceConfigError`` otherwise."""
    if cfg.model.name != "dit" or cfg.process is None:
        raise ReferenceConfigError(f"model {cfg.model.name!r}: only diffusion DiT runs can be exported to rev_udm")
    m, process, loss = cfg.model.cfg, cfg.process.name, cfg.loss.name
    sampler = cfg.sampler.name if cfg.sampler is not None else "ancestral"
    if cfg.schedule.name != "loglinear":
        raise ReferenceConfigError(f"schedule {cfg.schedule.name!r}: the reference has only the log-linear schedule")
    if m.mlp_ratio != 4:
        raise ReferenceConfigError(f"model.mlp_ratio={m.mlp_ratio}: the reference DiT has mlp_ratio 4")
    prediction = {v: k for k, v in PREDICTION_TO_PARAM.items()}[cfg.parameterization.name]
    loss_fn = "cross_entropy" if loss == "cross_entropy" else "elbo"
    if process == MASKED:
        name = "remdlm" if sampler == "remdm" else "mdlm"
    elif process == ABSORBING:
        name = "reaudm" if sampler == "reaudm" else "audm"
    elif loss == "max_coupling_nelbo" or (loss == "cross_entropy" and sampler == "max_coupling"):
        name = "max_coupling"
    else:
        name = "udlm"
    if loss_fn == "elbo" and NELBO_OF[name] != loss:
        raise ReferenceConfigError(f"loss {loss!r} with process {process!r}: no reference algorithm trains this")
    algo: dict[str, Any] = {"name": name, "backbone": "dit", "model_prediction": prediction, "loss_fn": loss_fn,
                            "time_conditioning": bool(m.time_conditioning), "causal_attention": False}
    if process == MASKED:
        algo["parameterization"] = "subs"
    if process == ABSORBING:
        if m.noise_conditioning not in ("separate_linear", "shared_mlp"):
            raise ReferenceConfigError(f"model.noise_conditioning={m.noise_conditioning!r} has no reference "
                                       "equivalent (separate_linear, shared_mlp)")
        algo.update(condition_on_uniform_noise=True, conditioning_fusion=m.noise_conditioning)
    hidden, blocks, heads = m.dims()
    data = {"tokenizer_name_or_path": cfg.tokenizer.cfg.path} if cfg.tokenizer.name == "gpt2" else {}
    return {"algo": algo, "data": data,
            "model": {"type": "ddit", "hidden_size": hidden, "cond_dim": m.cond_dim, "length": cfg.data.seq_len,
                      "n_blocks": blocks, "n_heads": heads, "dropout": m.dropout, "scale_by_sigma": False},
            "training": {"ema": cfg.train.ema_decay, "sampling_eps": cfg.schedule.cfg.eps},
            "noise": {"type": "loglinear"}}
