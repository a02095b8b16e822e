"""Recipes: load YAML (with ``base:`` inheritance and dotted overrides), validate strictly, report all
problems at once.

    from udmtrain.config import load_recipe, ConfigError
    run_config = load_recipe("recipes/mdlm.yaml", ["optim.lr=1e-4"], world_size=8)

Entry points wrap ``main`` with ``exit_on_config_error`` (report on rank 0, exit code 2).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence

from udmtrain.config.errors import ConfigError, ConfigIssue, exit_on_config_error, report_and_exit
from udmtrain.config.loader import display_path, dump_yaml, load_tree
from udmtrain.config.schema import COMPONENT_SECTIONS, ComponentSpec, RunConfig
from udmtrain.config.validate import build_run_config
from udmtrain.utils.precision import AUTO, resolve_precision


def load_recipe(path: str, overrides: Sequence[str] = (), world_size: int = 1) -> RunConfig:
    """Load, merge, override and validate a recipe -> ``RunConfig`` (``ConfigError`` lists every issue).

    ``world_size`` is used for the batch arithmetic (global = micro x world x accumulation).
    ``engine.precision: auto`` is resolved here to bf16 or fp32 for this machine (``udmtrain.utils.precision``).
    """
    tree = load_tree(path, overrides)
    run_config = build_run_config(tree, display_path(path), world_size)
    if run_config.engine.precision == AUTO:  # decided once, here: everything downstream sees bf16 or fp32
        precision, why = resolve_precision(AUTO)
        if os.environ.get("RANK", "0") == "0":  # the choice is said once, on stderr (tools print JSON on stdout)
            print(f"udmtrain: engine.precision=auto -> {precision} ({why})", file=sys.stderr)
        run_config = dataclasses.replace(run_config, engine=dataclasses.replace(run_config.engine, precision=precision))
    return run_config


__all__ = [
    "COMPONENT_SECTIONS", "ComponentSpec", "ConfigError", "ConfigIssue", "RunConfig", "dump_yaml",
    "exit_on_config_error", "load_recipe", "report_and_exit",
]
