#!/usr/bin/env bash
# The one-command demo: install (if needed), build the offline demo data and tokenizer, train a tiny
# AUDM model and an AR judge through the deepspeed launcher, then eval_ppl and gen_ppl.
#
#   bash tools/quickstart.sh                 # ~5 minutes on 2 CPU cores (fresh clone, install included), no network but PyPI
#   NUM_PROCS=2 bash tools/quickstart.sh     # the same with two data-parallel CPU ranks (gloo)
#
# Everything lands in data/demo/ and runs/quickstart-*/; re-running skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export PYTHONUNBUFFERED=1
NUM_PROCS="${NUM_PROCS:-1}"

step() { printf '\n=== %s\n' "$*"; }

if ! python3 -c 'import udmtrain, deepspeed, webdataset, sentencepiece' 2>/dev/null; then
  step "install (virtualenv .venv, CPU torch first, then udmtrain[dev])"
  [[ -d .venv ]] || python3 -m venv .venv
  . .venv/bin/activate
  python -m pip install -q --upgrade pip
  python -c 'import torch' 2>/dev/null || python -m pip install -q torch==2.13.0
  python -m pip install -q -e '.[dev]'
fi

step "tokenizer: sentencepiece BPE (V=2048) on the offline demo corpus"
[[ -f data/demo/tokenizer.model ]] || \
  python tools/train_tokenizer.py --source demo --vocab-size 2048 --out data/demo/tokenizer.model

step "shards: webdataset, seq_len 128, wrap packing"
python tools/prepare_data.py --source demo --tokenizer data/demo/tokenizer.model --seq-len 128 --out data/demo

step "train AUDM (absorbing-state uniform diffusion) through the deepspeed launcher"
deepspeed --num_gpus "$NUM_PROCS" launch/pretrain.py --recipe recipes/quickstart.yaml

step "train the AR baseline (the offline judge LM for gen_ppl)"
deepspeed --num_gpus "$NUM_PROCS" launch/pretrain.py --recipe recipes/quickstart_ar.yaml

step "eval_ppl: NELBO perplexity bound on the validation shards (EMA weights)"
python tools/eval_ppl.py --ckpt runs/quickstart-audm --num-t-samples 4 --out runs/quickstart-audm/eval_ppl.json

step "gen_ppl: 32 samples, 64 steps, judged by the AR baseline"
python tools/gen_ppl.py --ckpt runs/quickstart-audm --num-samples 32 --steps 64 \
  --judge runs/quickstart-ar --out runs/quickstart-audm/gen_ppl.json

step "done: runs/quickstart-audm/{metrics.jsonl,tensorboard,checkpoints,eval_ppl.json,gen_ppl.json}"
