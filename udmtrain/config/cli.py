"""Command-line parsing shared by launch/pretrain.py and ``python -m udmtrain.config``.

    python launch/pretrain.py --recipe recipes/mdlm.yaml --dry-run optim.lr=1e-4 engine.zero_stage=3

The deepspeed launcher appends ``--local_rank=N``; it is accepted and ignored (``LOCAL_RANK`` rules).
"""

from __future__ import annotations

from collections.abc import Sequence

from udmtrain.config.errors import ConfigError, ConfigIssue
from udmtrain.config.loader import dump_yaml
from udmtrain.config.schema import RunConfig

USAGE = "usage: --recipe RECIPE.yaml [--dry-run] [section.key=value ...]"


def parse_cli(argv: Sequence[str]) -> tuple[str, list[str], bool]:
    """``argv`` (without the program name) -> ``(recipe_path, overrides, dry_run)``.

    Overrides keep their order; ``ConfigError`` (origin ``command line``) on anything else. In later
    messages, ``command line arg N`` means the N-th override (options such as --recipe not counted).
    """
    recipe: str | None = None
    dry_run = False
    overrides: list[str] = []
    issues: list[ConfigIssue] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        origin = "command line"
        if arg == "--recipe" or arg.startswith("--recipe="):
            if "=" in arg:
                recipe = arg.split("=", 1)[1]
                if not recipe:
                    issues.append(ConfigIssue("--recipe", origin, "--recipe= is empty; it needs a path", USAGE))
            elif i + 1 < len(args):
                i += 1
                recipe = args[i]
            else:
                issues.append(ConfigIssue("--recipe", origin, "--recipe needs a path", USAGE))
        elif arg == "--dry-run":
            dry_run = True
        elif arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            if "=" not in arg and i + 1 < len(args) and args[i + 1].isdigit():
                i += 1  # "--local_rank 3": the value is the next token
        elif arg.startswith("-"):
            issues.append(ConfigIssue(arg, origin, f"unknown option {arg!r}", USAGE))
        elif "=" in arg:
            overrides.append(arg)
        else:
            issues.append(ConfigIssue(arg, origin, f"expected an override 'section.key=value', got {arg!r}",
                                      USAGE))
        i += 1
    if recipe is None and not issues:
        issues.append(ConfigIssue("--recipe", "command line", "no recipe given", USAGE))
    if issues:
        raise ConfigError(issues)
    return recipe, overrides, dry_run  # type: ignore[return-value]


def derived(run_config: RunConfig, world_size: int) -> dict[str, int]:
    """Values computed from the recipe (never written in it): accumulation, tokens per step."""
    engine = run_config.engine
    return {
        "world_size": world_size,
        "gradient_accumulation_steps": engine.global_batch_size // (engine.micro_batch_size * world_size),
        "tokens_per_optimizer_step": engine.global_batch_size * run_config.data.seq_len,
    }


def describe(run_config: RunConfig, world_size: int) -> str:
    """The resolved recipe as YAML (loads back to an equal RunConfig) plus derived values as comments."""
    lines = ["# resolved recipe", dump_yaml(run_config.to_dict()).rstrip(), "", "# derived"]
    lines += [f"#   {key}: {value:,}" for key, value in derived(run_config, world_size).items()]
    return "\n".join(lines) + "\n"
