"""Import a released reference / MDLM-family checkpoint as a udmtrain run (nothing in it is executed).

    python tools/import_ckpt.py --from rev_udm udlm_owt.ckpt --out runs/udlm-owt-paper
    python tools/import_ckpt.py --from mdlm mdlm_owt.ckpt --out runs/mdlm-owt --tokenizer gpt2
    python tools/import_ckpt.py --from hub ./mdlm-owt-hub --out runs/mdlm-owt-hub   # model.safetensors + config.json
    python tools/import_ckpt.py --from rev_udm tests/data/rev_udm/mdlm.ckpt --out runs/fixture --tokenizer none

``--from``: ``rev_udm`` (the paper's Lightning checkpoints, DiT under ``diffusion.model.backbone.``),
``mdlm`` (MDLM / UDLM / DUO Lightning checkpoints, DiT under ``backbone.``), ``hub`` (a directory
with MDLM's published ``model.safetensors`` + ``config.json``). The file is read with a restricted
unpickler: tensors and plain data only, every class it names becomes an inert placeholder.

``--out RUN_DIR`` receives a normal run (``checkpoints/step_0000000000`` with recipe.yaml, DeepSpeed
shards, the raw weights and the EMA) that every tool accepts (``sample.py``, ``eval_ppl.py``,
``gen_ppl.py``, ``loo_probe.py``, ``inspect_ckpt.py``, ``export_ckpt.py``) and that
``checkpoint.resume: RUN_DIR`` fine-tunes with ``--world-size`` ranks (default 1). The recipe is
derived from the checkpoint's config (algorithm, prediction, loss, time conditioning, sizes, eps,
length, AUDM fusion); see docs/interop.md. ``--tokenizer``: ``auto`` (GPT-2 when the config names
it), ``gpt2`` or a GPT-2 directory, a sentencepiece ``.model``, ``ids:V``, or ``none`` (token ids with
V from the checkpoint; the ``ids`` tokenizer). ``--precision bf16`` keeps the exact fp32 master
weights. A report is printed as JSON; progress lines go to stderr.

An existing ``--out`` is refused unless ``--force``, and ``--force`` replaces only an empty directory
or an earlier import that nothing has been added to (a trained run, a directory holding the source or
anything else is refused with what it holds). The run is written beside ``--out`` and renamed into
place once it has been read back and compared, so a failed import leaves the previous one as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from udmtrain.train import inference as inf  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="CHECKPOINT", help="a Lightning .ckpt file (--from hub: a directory)")
    p.add_argument("--from", dest="layout", required=True, choices=["rev_udm", "mdlm", "hub"],
                   help="layout of CHECKPOINT")
    p.add_argument("--out", required=True, help="run directory to create (refused if it exists, unless --force)")
    p.add_argument("--tokenizer", default="auto",
                   help="auto | none | ids:V | gpt2 | GPT-2 directory | sentencepiece .model (default: auto)")
    p.add_argument("--data", default=None, help="shard directory written into data.* of the recipe "
                   "(default: data/owt for GPT-2, else data/<run name>)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="engine.precision of the recipe")
    p.add_argument("--eps", type=float, default=None, help="--from hub only: schedule eps (default 1e-3, MDLM's)")
    p.add_argument("--world-size", type=int, default=1,
                   help="ranks of the fine-tuning run that will resume this checkpoint (spawns that many CPU "
                        "processes to write per-rank shards; default 1)")
    p.add_argument("--force", action="store_true", help="replace an existing --out: an empty directory or an earlier "
                                                         "import (anything else is refused)")
    return p


def main(argv: list[str] | None = None) -> int:
    from udmtrain.interop.errors import InteropError
    from udmtrain.interop.importer import import_checkpoint

    args = build_parser().parse_args(argv)
    try:
        report = import_checkpoint(args.path, args.out, layout=args.layout, tokenizer=args.tokenizer,
                                   precision=args.precision, data_dir=args.data, eps=args.eps,
                                   world_size=args.world_size, force=args.force)
    except InteropError as err:
        raise inf.InferenceError(str(err)) from err
    print(json.dumps(report, indent=2, default=str))
    print(f"udmtrain: imported {args.path} ({report['algo']}: {report['process']} + {report['parameterization']}, "
          f"{report['num_parameters']:,} parameters, EMA: {report['ema']}) -> {report['checkpoint']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(inf.run_cli(main))
