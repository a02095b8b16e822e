"""Recipe validation against fake components: every issue kind, its structured fields and its text.

The fake registries (``install_fakes``) make these tests independent of the real component modules;
``python -m udmtrain.config`` is exercised in a subprocess that installs the same fakes.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest

import udmtrain.registry as reg
from udmtrain.config import ConfigError, ConfigIssue, dump_yaml, load_recipe
from udmtrain.config.cli import describe, parse_cli

ROOT = Path(__file__).resolve().parents[2]


def _config(**fields):
    """A frozen kw-only dataclass with the given ``name: (type, default)`` fields."""
    spec = [(name, tp, dataclasses.field(default=default)) for name, (tp, default) in fields.items()]
    return dataclasses.make_dataclass("Config", spec, kw_only=True, frozen=True)


class DiTModel:
    Config = _config(hidden_size=(int, 32), num_blocks=(int, 2), dropout=(float, 0.1),
                     attn_backend=(Literal["auto", "flash", "sdpa"], "auto"), time_conditioning=(bool, True))


class ARTransformerModel:
    Config = _config(hidden_size=(int, 32), num_blocks=(int, 2))


class MaskedProcess:
    Config = _config()
    capabilities = frozenset({"mask_state", "time_free_posterior"})


class UniformProcess:
    Config = _config()
    capabilities = frozenset({"loo_posterior"})


class LogLinearSchedule:
    Config = _config(eps=(float, 1e-3))


class CosineSchedule:
    Config = _config(eps=(float, 1e-3))


class GeometricSchedule:
    Config = _config(sigma_min=(float, 1e-4), sigma_max=(float, 20.0))


class DenoiserParameterization:
    Config = _config()


class LOOParameterization:
    Config = _config()
    requires = {"process": frozenset({"uniform"})}


class MdlmNelboLoss:
    Config = _config(time_sampling=(Literal["antithetic", "iid"], "antithetic"))


class ARNllLoss:
    Config = _config()


class AncestralSampler:
    Config = _config(num_steps=(int, 1000), cache=(bool, False), top_p=(float | None, None))

    @staticmethod
    def required_capabilities(cfg):
        return frozenset({"time_free_posterior"}) if cfg.cache else frozenset()


class GPT2Tokenizer:
    Config = _config(path=(str, "gpt2"))


@dataclasses.dataclass(kw_only=True, frozen=True)
class _AdamWConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    fused: bool = False


class AdamWOptimizer:
    Config = _AdamWConfig


class ConstantWarmupLR:
    Config = _config(warmup_steps=(int, 2500))


class CosineLR:
    Config = _config(warmup_steps=(int, 2500), min_lr=(float, 1e-6))


FAKES = {
    "model": {"dit": DiTModel, "ar_transformer": ARTransformerModel},
    "process": {"masked": MaskedProcess, "uniform": UniformProcess},
    "schedule": {"loglinear": LogLinearSchedule, "cosine": CosineSchedule, "geometric": GeometricSchedule},
    "parameterization": {"denoiser": DenoiserParameterization, "loo": LOOParameterization},
    "loss": {"mdlm_nelbo": MdlmNelboLoss, "ar_nll": ARNllLoss},
    "sampler": {"ancestral": AncestralSampler},
    "tokenizer": {"gpt2": GPT2Tokenizer},
    "optimizer": {"adamw": AdamWOptimizer},
    "lr_schedule": {"constant_warmup": ConstantWarmupLR, "cosine": CosineLR},
}


def fake_registries() -> dict[str, reg.Registry]:
    """Fresh registries holding the fakes (no lazy import of the real family modules)."""
    out = {}
    for family, classes in FAKES.items():
        registry = reg.Registry(family)
        registry._imported = True
        for name, cls in classes.items():
            registry.register(name)(cls)
        out[family] = registry
    return out


def install_fakes() -> None:
    """Point ``udmtrain.registry.registry()`` at the fakes for this process (subprocess use)."""
    reg.REGISTRIES = fake_registries()


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    monkeypatch.setattr(reg, "REGISTRIES", fake_registries())


GOOD = """\
run: {name: test}
engine:
  micro_batch_size: 4
  global_batch_size: 16
optim: {name: adamw, lr: 3e-4, betas: [0.9, 0.999]}
lr_schedule: {name: constant_warmup, warmup_steps: 10}
train: {max_steps: 1e6}
data: {train_shards: data/owt/train-*.tar, seq_len: 128}
tokenizer: gpt2
model: {name: dit, hidden_size: 64}
process: {name: masked}
schedule: {name: loglinear}
parameterization: {name: denoiser}
loss: {name: mdlm_nelbo}
sampler: {name: ancestral, cache: true}
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def at(path: str, line: int, needle: str) -> str:
    """``path:line:col`` of the first ``needle`` on 1-based ``line`` of the file."""
    text = Path(path).read_text().splitlines()[line - 1]
    assert needle in text, (needle, text)
    return f"{path}:{line}:{text.index(needle) + 1}"


def issues_of(path: str, overrides=(), world_size: int = 1) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides, world_size)
    return info.value.issues


def by_path(issues: list[ConfigIssue]) -> dict[str, ConfigIssue]:
    return {i.path: i for i in issues}


def test_good_recipe_loads_with_coercion_and_origins(tmp_path):
    path = write(tmp_path, "good.yaml", GOOD)
    rc = load_recipe(path)
    assert rc.train.max_steps == 1_000_000 and isinstance(rc.train.max_steps, int)
    assert rc.optim.name == "adamw" and rc.optim.cfg.betas == (0.9, 0.999) and rc.optim.cfg.lr == 3e-4
    assert rc.tokenizer.name == "gpt2" and rc.tokenizer.cfg.path == "gpt2"
    assert rc.sampler.cfg.cache is True and rc.model.cfg.hidden_size == 64
    assert rc.engine.precision == "bf16" and rc.eval.num_batches == 100  # schema defaults
    assert rc.origins["train.max_steps"] == at(path, 7, "1e6")
    assert rc.origins["model.hidden_size"] == at(path, 10, "64")


def test_done_when_misspelt_key_wrong_type_unknown_component(tmp_path):
    path = write(tmp_path, "bad.yaml", GOOD.replace("lr: 3e-4", "lrr: 3e-4")
                 .replace("max_steps: 1e6", "max_steps: 1.5").replace("name: loglinear", "name: log_linear"))
    issues = by_path(issues_of(path))
    assert set(issues) == {"optim.lrr", "train.max_steps", "schedule.name"}
    assert issues["optim.lrr"].origin == at(path, 5, "lrr")
    assert issues["optim.lrr"].message == (
        "not a field of optimizer 'adamw' (AdamWOptimizer.Config); did you mean 'lr'?")
    assert issues["optim.lrr"].hint == "valid keys: name, lr, betas, eps, weight_decay, fused"
    assert issues["train.max_steps"] == ConfigIssue("train.max_steps", at(path, 7, "1.5"),
                                                    "expected int, got 1.5 (float)")
    assert issues["schedule.name"].message == "'log_linear' is not a registered schedule; did you mean 'loglinear'?"
    assert issues["schedule.name"].hint == "registered: cosine, geometric, loglinear"
    assert issues["schedule.name"].origin == at(path, 12, "log_linear")


def test_done_when_through_python_m_exits_2_with_report(tmp_path):
    path = write(tmp_path, "bad.yaml", GOOD.replace("lr: 3e-4", "lrr: 3e-4")
                 .replace("max_steps: 1e6", "max_steps: 1.5").replace("name: loglinear", "name: log_linear"))
    code = ("import sys; sys.path.insert(0, 'tests/unit'); import test_config_errors as t; t.install_fakes();"
            "from udmtrain.config.__main__ import main; main(sys.argv[1:])")
    env = {**os.environ, "RANK": "0"}
    env.pop("UDMTRAIN_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", code, "--recipe", path, "engine.micro_batch_size=16x"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    err = proc.stderr
    assert err.startswith(f"udmtrain: recipe {path} has 4 problems\n\n")
    assert f"  {at(path, 5, 'lrr')}  optim.lrr\n      not a field of optimizer 'adamw' (AdamWOptimizer.Config); did you mean 'lr'?\n" in err
    assert f"  {at(path, 7, '1.5')}  train.max_steps\n      expected int, got 1.5 (float)\n" in err
    assert f"  {at(path, 12, 'log_linear')}  schedule.name\n      'log_linear' is not a registered schedule; did you mean" in err
    assert "  command line arg 1  engine.micro_batch_size=16x\n      expected int, got '16x' (str)\n" in err
    assert err.rstrip().endswith("every key is documented in docs/recipes.md.")
    # other ranks exit with the same code silently
    proc = subprocess.run([sys.executable, "-c", code, "--recipe", path], cwd=ROOT,
                          env={**env, "RANK": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == ""


def test_python_m_describes_a_good_recipe(tmp_path):
    path = write(tmp_path, "good.yaml", GOOD)
    code = ("import sys; sys.path.insert(0, 'tests/unit'); import test_config_errors as t; t.install_fakes();"
            "from udmtrain.config.__main__ import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "--recipe", path, "--dry-run", "--local_rank=0"],
                          cwd=ROOT, env={**os.environ, "WORLD_SIZE": "2"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "#   gradient_accumulation_steps: 2\n" in proc.stdout
    assert "#   tokens_per_optimizer_step: 2,048\n" in proc.stdout


def test_foreign_field_names_the_component_that_has_it(tmp_path):
    path = write(tmp_path, "r.yaml", GOOD.replace("name: loglinear", "name: cosine, sigma_max: 20"))
    (issue,) = issues_of(path)
    assert issue.path == "schedule.sigma_max"
    assert issue.message == "not a field of schedule 'cosine' (CosineSchedule.Config); valid keys: name, eps"
    assert issue.hint == "'sigma_max' is a field of schedule 'geometric'; set schedule.name to use it, or remove the key"
    assert issue.origin == at(path, 12, "sigma_max")  # points at the key


def test_component_key_typo_gets_did_you_mean(tmp_path):
    path = write(tmp_path, "r.yaml", GOOD.replace("hidden_size: 64", "hiden_size: 64"))
    (issue,) = issues_of(path)
    assert issue.message == "not a field of model 'dit' (DiTModel.Config); did you mean 'hidden_size'?"


def test_key_in_wrong_section_suggests_full_path(tmp_path):
    path = write(tmp_path, "r.yaml", GOOD.replace("max_steps: 1e6", "max_steps: 1e6, seq_len: 8"))
    (issue,) = issues_of(path)
    assert issue.path == "train.seq_len" and "did you mean 'data.seq_len'?" in issue.message


def test_unknown_section_literal_bool_and_str(tmp_path):
    text = GOOD + "optimizer: {}\ncheckpoint: {resume: 5}\n"
    path = write(tmp_path, "r.yaml", text.replace("micro_batch_size: 4",
                                                  "micro_batch_size: 4\n  precision: bf61\n  compile: yes"))
    issues = by_path(issues_of(path))
    assert issues["optimizer"].message == "unknown section 'optimizer'; did you mean 'optim'?"
    assert issues["engine.precision"].message == "'bf61' is not an allowed value; did you mean 'bf16'?"
    assert issues["engine.precision"].hint == "allowed: auto, fp32, bf16, fp16"
    assert issues["engine.compile"].message == "expected bool, got 'yes' (str)"
    assert issues["checkpoint.resume"].message == "expected str, got 5 (int)"
    assert issues["checkpoint.resume"].hint == "quote it: '5'"


def test_missing_required_fields_and_sections(tmp_path):
    text = GOOD.replace("train: {max_steps: 1e6}\n", "").replace("loss: {name: mdlm_nelbo}\n", "")
    path = write(tmp_path, "r.yaml", text.replace("data: {train_shards: data/owt/train-*.tar, seq_len: 128}",
                                                  "data: {seq_len: 128}"))
    issues = by_path(issues_of(path))
    assert issues["train"].message == "missing required key 'max_steps' (int)"
    assert issues["train"].hint == "add 'max_steps:' under 'train', or override train.max_steps=..."
    assert issues["data"].message == "missing required key 'train_shards' (str)"
    assert issues["data"].origin == f"{path}:7:1"
    assert issues["loss"].message == "missing required section 'loss' (a registered loss)"
    assert set(issues) == {"train", "data", "loss"}


def test_incompatible_components_name_both_paths_and_the_fix(tmp_path):
    path = write(tmp_path, "r.yaml", GOOD.replace("name: denoiser", "name: loo"))
    (issue,) = issues_of(path)
    assert issue.path == "parameterization.name" and issue.value == "loo"
    assert issue.origin == at(path, 13, "loo")
    assert issue.message == (f"parameterization 'loo' requires process 'uniform', but process.name='masked' "
                             f"({at(path, 11, 'masked')})")
    assert issue.hint == "Fix: set process.name=uniform, or choose another parameterization than 'loo'"


def test_config_dependent_requirement_and_override_origin(tmp_path):
    path = write(tmp_path, "r.yaml", GOOD)
    (issue,) = issues_of(path, ["process.name=uniform"])
    assert issue.path == "sampler.name"
    assert issue.message == ("sampler 'ancestral' needs process capabilities ['time_free_posterior'], which "
                             "process.name='uniform' (command line arg 1) does not declare (processes that do: "
                             "masked)")
    assert issue.hint == ("Fix: set process.name=masked, or choose another sampler than 'ancestral' or change "
                          "its settings")
    rc = load_recipe(path, ["process.name=uniform", "sampler.cache=false"])
    assert rc.process.name == "uniform" and rc.origins["sampler.cache"] == "command line arg 2"


def test_batch_arithmetic_gives_nearest_valid_values(tmp_path):
    path = write(tmp_path, "r.yaml", GOOD)
    (issue,) = issues_of(path, ["engine.global_batch_size=512", "engine.micro_batch_size=16"], world_size=6)
    assert issue.path == "engine.global_batch_size" and issue.value == "512"
    assert issue.message == ("not divisible by micro_batch_size 16 x world_size 6 = 96; "
                             "use a multiple of 96 or change micro_batch_size")
    assert issue.hint == "nearest valid values: engine.global_batch_size=480 or engine.global_batch_size=576"
    assert issue.format() == (
        "  command line arg 1  engine.global_batch_size=512\n"
        "      not divisible by micro_batch_size 16 x world_size 6 = 96; use a multiple of 96 or change "
        "micro_batch_size\n"
        "      nearest valid values: engine.global_batch_size=480 or engine.global_batch_size=576")
    assert load_recipe(path, ["engine.global_batch_size=576", "engine.micro_batch_size=16"], 6)


def test_ranges_and_offload(tmp_path):
    path = write(tmp_path, "r.yaml", GOOD)
    issues = by_path(issues_of(path, ["engine.zero_stage=4", "train.ema_decay=1", "engine.offload_param=true"]))
    assert issues["engine.zero_stage"].message == "4 must be 0, 1, 2 or 3"
    assert issues["train.ema_decay"].message == "1.0 must be in [0, 1) (0 disables the EMA)"
    assert issues["engine.offload_param"].hint == "Fix: set engine.zero_stage=3 or engine.offload_param=false"


def test_deepspeed_extra_allow_list(tmp_path):
    path = write(tmp_path, "r.yaml", GOOD)
    ok = load_recipe(path, ["engine.deepspeed_extra={wall_clock_breakdown: true, zero_optimization: "
                            "{overlap_comm: true}}"])
    assert ok.engine.deepspeed_extra == {"wall_clock_breakdown": True, "zero_optimization": {"overlap_comm": True}}
    issues = by_path(issues_of(path, ["engine.deepspeed_extra={train_batch_size: 8, wall_clock_breakdwn: true,"
                                      " zero_optimization: {stage: 3}}"]))
    assert issues["engine.deepspeed_extra.train_batch_size"].hint == "set engine.global_batch_size instead"
    assert issues["engine.deepspeed_extra.wall_clock_breakdwn"].message == (
        "not an allowed DeepSpeed key; did you mean 'wall_clock_breakdown'?")
    assert issues["engine.deepspeed_extra.zero_optimization.stage"].hint == "set engine.zero_stage instead"


def test_component_name_change_replaces_the_section(tmp_path):
    write(tmp_path, "base.yaml", GOOD.replace("name: loglinear", "name: geometric, sigma_max: 30"))
    child = write(tmp_path, "child.yaml", "base: base.yaml\nschedule: {name: cosine}\n")
    rc = load_recipe(child)
    assert rc.schedule.name == "cosine" and rc.schedule.cfg == CosineSchedule.Config()
    same = write(tmp_path, "same.yaml", "base: base.yaml\nschedule: {sigma_min: 0.5}\n")
    assert load_recipe(same).schedule.cfg == GeometricSchedule.Config(sigma_min=0.5, sigma_max=30.0)
    # the same rule on the command line
    rc = load_recipe(child, ["schedule={name: geometric}"])
    assert rc.schedule.cfg == GeometricSchedule.Config()


def test_absent_optional_components_and_null_override(tmp_path):
    text = "\n".join(line for line in GOOD.splitlines()
                     if not line.startswith(("process", "schedule", "parameterization", "sampler")))
    path = write(tmp_path, "ar.yaml", text.replace("name: dit", "name: ar_transformer")
                 .replace("mdlm_nelbo", "ar_nll"))
    rc = load_recipe(path)
    assert rc.process is None and rc.sampler is None and "process" not in rc.to_dict()
    issues = by_path(issues_of(path, ["loss=null"]))
    assert "loss" in issues


def test_resolved_recipe_round_trips(tmp_path):
    path = write(tmp_path, "good.yaml", GOOD)
    rc = load_recipe(path, ["run.name='1e3'", "data.valid_shards=data/owt/valid-*.tar", "eval.num_batches=null"])
    assert rc.run.name == "1e3" and rc.eval.num_batches is None
    dumped = write(tmp_path, "recipe.yaml", dump_yaml(rc.to_dict()))
    again = load_recipe(dumped)
    assert again == rc and again.to_dict() == rc.to_dict()
    assert describe(rc, 2).startswith("# resolved recipe\nrun:\n  name: '1e3'\n")


def test_report_format_is_exact(tmp_path):
    err = ConfigError([ConfigIssue("optim.lrr", "r.yaml:5:3", "unknown key in 'optim'; did you mean 'lr'?",
                                   "valid keys: name, lr"),
                       ConfigIssue("train.max_steps", "command line arg 1", "expected int, got 'x' (str)",
                                   value="x")], recipe="r.yaml")
    assert err.format() == (
        "udmtrain: recipe r.yaml has 2 problems\n\n"
        "  r.yaml:5:3  optim.lrr\n"
        "      unknown key in 'optim'; did you mean 'lr'?\n"
        "      valid keys: name, lr\n\n"
        "  command line arg 1  train.max_steps=x\n"
        "      expected int, got 'x' (str)\n\n"
        "Print the resolved recipe with --dry-run; every key is documented in docs/recipes.md.")


def test_parse_cli():
    assert parse_cli(["--local_rank=3", "--recipe", "r.yaml", "a.b=1", "--dry-run", "c=[1,2]"]) == (
        "r.yaml", ["a.b=1", "c=[1,2]"], True)
    assert parse_cli(["--recipe=r.yaml", "--local_rank", "2"]) == ("r.yaml", [], False)
    with pytest.raises(ConfigError) as info:
        parse_cli(["--recipee", "r.yaml", "oops"])
    assert [i.message for i in info.value.issues] == [
        "unknown option '--recipee'", "expected an override 'section.key=value', got 'r.yaml'",
        "expected an override 'section.key=value', got 'oops'"]
    assert info.value.format().startswith("udmtrain: the command line has 3 problems")


def test_cross_checks_run_alongside_key_errors(tmp_path):
    path = write(tmp_path, "r.yaml", GOOD.replace("name: denoiser", "name: loo"))
    issues = by_path(issues_of(path, ["model.sigma=1", "engine.global_batch_size=15"]))
    assert set(issues) == {"model.sigma", "parameterization.name", "engine.global_batch_size"}
