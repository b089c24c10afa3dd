#!/usr/bin/env bash
# One prepared GPU measurement for pretraining: ViT-B/16 and ViT-L/16 at 224 px in bf16 (images/s, MFU, memory),
# eager and compiled, then a short real `dmae pretrain` run through the engine on Fashion-MNIST upsampled to 224.
# Usage: DATA_ROOT=dir-with-fashion-mnist-gz bash benchmarks/gpu_check.sh [OUTDIR]
set -u
OUTDIR=${1:-${OUT:-/tmp/dmae-gpu}}
mkdir -p "$OUTDIR"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
B=dmae_vit_base_patch16_dec512d8b
L=dmae_vit_large_patch16_dec512d8b
run() { echo "== $*"; timeout 240 $PY benchmarks/pretrain_throughput.py --device cuda --json "$@" | tee -a "$OUTDIR/throughput.jsonl"; }
run --model $B --batch 256 --steps 20
run --model $B --batch 256 --steps 30 --compile
run --model $L --batch 128 --steps 10
run --model $L --batch 128 --steps 20 --compile
echo "== engine: dmae pretrain ViT-B/16 on Fashion-MNIST (28 px noised, upsampled to 224 in the model)"
timeout 240 $PY -m dmae pretrain --model $B --data fashion-mnist --data-root "${DATA_ROOT:-.gpu_data}" \
  --train-subset 8192 --batch-size 256 --epochs 2 --warmup-epochs 0.5 --num-workers 4 --log-every 8 \
  --eval-images 256 --no-progress --output-dir "$OUTDIR/run" 2>&1 | tail -6
grep '"train"' "$OUTDIR/run/log.jsonl" | tail -3
rm -rf "$OUTDIR/run/checkpoint.pt" "$OUTDIR/run/model.safetensors" "$OUTDIR/run/tb"
