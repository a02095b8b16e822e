#!/usr/bin/env bash
# GPU acceptance checks in one script (CUDA machine with torch; deepspeed/webdataset installed or
# carried as wheels in .whl/). Writes logs and JSON to ${OUT:-gpu_check_out}/.
#   bash tools/gpu_check.sh
# 1. pytest -m gpu (flash-attn parity when installed, CUDA samplers, CUDA model paths)
# 2. bf16 ZeRO-2 AUDM training of the small DiT (768/12/12) through the deepspeed launcher, with
#    eval; ZeRO-3 stop + resume
#    (ONLY=train runs just the two training checks)
# 3. tools/bench.py train (tokens/s, MFU) and eval_ppl / sample / gen_ppl on the trained run
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext PYTHONUNBUFFERED=1
if command -v deepspeed >/dev/null; then DS=deepspeed; else DS="python3 /tmp/site/bin/deepspeed"; fi
D=/tmp/udm_gpu_data; R=/tmp/udm_gpu_runs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' | tee -a "$OUT/gpu.txt"

echo "=== data"
[[ -f $D/tok.model ]] || python3 tools/train_tokenizer.py --source demo --vocab-size 8192 --out $D/tok.model > /dev/null
python3 tools/prepare_data.py --source demo --tokenizer $D/tok.model --seq-len 512 --out $D > /dev/null
COMMON="data.train_shards=$D/train-*.tar data.valid_shards=$D/valid-*.tar data.seq_len=512 data.num_workers=2
 tokenizer.name=sentencepiece tokenizer.path=$D/tok.model run.output_root=$R lr_schedule.warmup_steps=10
 engine.micro_batch_size=16 engine.global_batch_size=32 eval.num_batches=4"

if [[ "${ONLY:-all}" == all ]]; then
echo "=== pytest -m gpu"
python3 -m pytest -m gpu -q tests 2>&1 | tail -15 | tee "$OUT/pytest_gpu.txt"

fi
echo "=== AUDM small, bf16, ZeRO-2, 60 steps"
$DS --num_gpus 1 launch/pretrain.py --recipe recipes/absorbing_udm.yaml $COMMON run.name=z2 \
  engine.zero_stage=2 train.max_steps=60 train.log_every=20 checkpoint.every=30 eval.every=60 2>&1 \
  | grep -v '^\[20' | tail -12 | tee "$OUT/train_z2.txt"

echo "=== ZeRO-3: 20 steps, stop, resume to 40"
$DS --num_gpus 1 launch/pretrain.py --recipe recipes/udlm_loo.yaml $COMMON run.name=z3 \
  engine.zero_stage=3 train.max_steps=20 train.log_every=10 checkpoint.every=20 eval.every=0 2>&1 | grep -v '^\[20' | tail -4 | tee "$OUT/train_z3.txt"
$DS --num_gpus 1 launch/pretrain.py --recipe recipes/udlm_loo.yaml $COMMON run.name=z3 \
  engine.zero_stage=3 train.max_steps=40 train.log_every=10 checkpoint.every=20 eval.every=40 2>&1 | grep -v '^\[20' | tail -6 | tee -a "$OUT/train_z3.txt"

[[ "${ONLY:-all}" == all ]] || exit 0
echo "=== bench train (small DiT, bf16)"
python3 tools/bench.py train --recipe recipes/absorbing_udm.yaml $COMMON engine.zero_stage=2 \
  --steps 10 --warmup 3 --out "$OUT/bench_train.json" 2>&1 | tail -3
python3 tools/bench.py train --recipe recipes/mdlm.yaml $COMMON engine.zero_stage=2 \
  --steps 10 --warmup 3 --out "$OUT/bench_train_mdlm.json" 2>&1 | tail -3

echo "=== eval_ppl / sample on the trained run"
python3 tools/eval_ppl.py --ckpt $R/z2 --num-t-samples 2 --max-batches 4 --out "$OUT/eval_ppl.json" 2>&1 | tail -3
python3 tools/sample.py --ckpt $R/z2 --num-samples 16 --steps 128 --sampler reaudm --out "$OUT/samples.jsonl" 2>&1 | tail -3
ls -la "$OUT"
