#!/usr/bin/env bash
# The one-command demo: install (if needed), build the offline demo data and tokenizer, train three
# tiny models through the deepspeed launcher (AUDM, the AR baseline that judges gen_ppl offline, and
# UDLM with the leave-one-out posterior for tools/loo_probe.py), then eval_ppl and gen_ppl.
#
#   bash tools/quickstart.sh                    # ~7 minutes on an idle 2-core CPU machine, install included (README)
#   NUM_PROCS=2 bash tools/quickstart.sh        # the same with two data-parallel CPU ranks (gloo)
#   QUICKSTART_STEPS=5 bash tools/quickstart.sh # smoke test (CI): 5 steps per run, 4 samples; not a model
#
# Python: when `python3` already imports the dependencies, or a virtualenv/conda environment is
# active, everything goes there. Otherwise the script creates .venv/ and installs into it; then run
#   source .venv/bin/activate
# in every new shell before the README's commands (the script prints this at the end).
#
# Everything lands in data/demo/ and runs/quickstart-*/; re-running skips what is already done
# (a finished run says "already at train.max_steps" and exits at once).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
NUM_PROCS="${NUM_PROCS:-1}"
SMOKE_STEPS="${QUICKSTART_STEPS:-}"
if [[ -n "$SMOKE_STEPS" && ! "$SMOKE_STEPS" =~ ^[1-9][0-9]*$ ]]; then
  echo "quickstart: QUICKSTART_STEPS must be a positive integer, got '$SMOKE_STEPS'" >&2
  exit 2
fi

STAGE_NAMES=()
STAGE_SECONDS=()
STAGE_START=$SECONDS
CURRENT=""
stage() {  # stage "name": closes the previous stage's timer, prints a header
  if [[ -n "$CURRENT" ]]; then STAGE_NAMES+=("$CURRENT"); STAGE_SECONDS+=($((SECONDS - STAGE_START))); fi
  CURRENT="$1"
  STAGE_START=$SECONDS
  [[ -n "$CURRENT" ]] && printf '\n=== %s  (%s elapsed)\n' "$CURRENT" "$(hms $SECONDS)"
  return 0
}
hms() { printf '%d:%02d:%02d' $(($1 / 3600)) $(($1 / 60 % 60)) $(($1 % 60)); }

DEPS='import deepspeed, webdataset, sentencepiece, yaml, tensorboard, matplotlib, torch'
ACTIVATE=""
if python3 -c "$DEPS" 2>/dev/null && command -v deepspeed >/dev/null; then
  command -v python >/dev/null || python() { python3 "$@"; }  # the current python has everything
elif [[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]]; then
  stage "install into the active environment ${VIRTUAL_ENV:-${CONDA_PREFIX:-}} (CPU torch first, then udmtrain[dev])"
  python -c 'import torch' 2>/dev/null || python -m pip install -q torch==2.13.0
  python -m pip install -q -e '.[dev]'
else
  [[ -d .venv ]] || { stage "install: virtualenv .venv (CPU torch first, then udmtrain[dev])"; python3 -m venv .venv; }
  # shellcheck disable=SC1091
  . .venv/bin/activate
  ACTIVATE="source .venv/bin/activate"
  if ! python -c "$DEPS" 2>/dev/null; then
    stage "install into .venv (CPU torch first, then udmtrain[dev])"
    python -m pip install -q --upgrade pip
    python -c 'import torch' 2>/dev/null || python -m pip install -q torch==2.13.0
    python -m pip install -q -e '.[dev]'
  fi
fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)}"

# Smoke mode: every run stops after QUICKSTART_STEPS steps (checkpoint and evaluation at the end).
TRAIN_ARGS=()
NUM_SAMPLES=32 SAMPLE_STEPS=64 T_SAMPLES=4
if [[ -n "$SMOKE_STEPS" ]]; then
  TRAIN_ARGS=("train.max_steps=$SMOKE_STEPS" "checkpoint.every=$SMOKE_STEPS" "eval.every=$SMOKE_STEPS"
              "train.log_every=$SMOKE_STEPS" "eval.num_batches=2")
  NUM_SAMPLES=4 SAMPLE_STEPS=$SMOKE_STEPS T_SAMPLES=1
fi
train() { deepspeed --num_gpus "$NUM_PROCS" launch/pretrain.py --recipe "$1" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; }

stage "tokenizer: sentencepiece BPE (V=2048) on the offline demo corpus"
[[ -f data/demo/tokenizer.model ]] || \
  python tools/train_tokenizer.py --source demo --vocab-size 2048 --out data/demo/tokenizer.model

stage "shards: webdataset, seq_len 128, wrap packing"
python tools/prepare_data.py --source demo --tokenizer data/demo/tokenizer.model --seq-len 128 --out data/demo

stage "train AUDM (absorbing-state uniform diffusion), recipes/quickstart.yaml"
train recipes/quickstart.yaml

stage "train the AR baseline (the offline judge LM for gen_ppl), recipes/quickstart_ar.yaml"
train recipes/quickstart_ar.yaml

stage "train UDLM with the leave-one-out posterior (for loo_probe), recipes/quickstart_udlm.yaml"
train recipes/quickstart_udlm.yaml

stage "eval_ppl: NELBO perplexity bound on the validation shards (EMA weights)"
python tools/eval_ppl.py --ckpt runs/quickstart-audm --num-t-samples "$T_SAMPLES" \
  --out runs/quickstart-audm/eval_ppl.json > /dev/null

stage "gen_ppl: $NUM_SAMPLES samples, $SAMPLE_STEPS steps, judged by the AR baseline"
python tools/gen_ppl.py --ckpt runs/quickstart-audm --num-samples "$NUM_SAMPLES" --steps "$SAMPLE_STEPS" \
  --judge runs/quickstart-ar --out runs/quickstart-audm/gen_ppl.json > /dev/null

stage ""
printf '\n=== done in %s' "$(hms $SECONDS)"
[[ -n "$SMOKE_STEPS" ]] && printf ' (smoke test: QUICKSTART_STEPS=%s)' "$SMOKE_STEPS"
printf '\n'
for i in "${!STAGE_NAMES[@]}"; do printf '  %s  %s\n' "$(hms "${STAGE_SECONDS[$i]}")" "${STAGE_NAMES[$i]}"; done
cat <<EOF

Results: runs/quickstart-audm/{eval_ppl.json,gen_ppl.json,metrics.jsonl,tensorboard/}
         runs/quickstart-ar/ (the judge), runs/quickstart-udlm/ (for tools/loo_probe.py)
TensorBoard: tensorboard --logdir runs   (then open http://localhost:6006)
Next steps: README.md, "After the quickstart".
EOF
if [[ -n "$ACTIVATE" ]]; then
  cat <<EOF

############################################################################
#  udmtrain is installed in .venv/. In this and every new shell, run      #
#                                                                          #
#      $ACTIVATE                                            #
#                                                                          #
#  before the README's commands (python, deepspeed, tensorboard).          #
############################################################################
EOF
fi
