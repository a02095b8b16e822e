"""Validate a recipe and print it resolved (exit 0), or print every problem (exit 2).

    python -m udmtrain.config --recipe recipes/mdlm.yaml optim.lr=1e-4
    WORLD_SIZE=16 python -m udmtrain.config --recipe recipes/mdlm.yaml   # batch math for 16 ranks
"""

from __future__ import annotations

import os
import sys

from udmtrain.config import exit_on_config_error, load_recipe
from udmtrain.config.cli import describe, parse_cli


@exit_on_config_error
def main(argv: list[str] | None = None) -> int:
    """Parse -> load + validate -> describe. ``--dry-run`` is accepted (this command never trains)."""
    recipe, overrides, _ = parse_cli(sys.argv[1:] if argv is None else argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    run_config = load_recipe(recipe, overrides, world_size=world_size)
    print(describe(run_config, world_size), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
