#!/usr/bin/env bash
# One prepared GPU measurement for certification: ViT-B/16 and ViT-L/16 at 224 px in bf16, the engine
# (eager and compiled) against the reference loop: noisy forward passes per second and MFU.
# Usage: bash benchmarks/gpu_certify.sh [OUTDIR]
set -u
OUTDIR=${1:-${OUT:-/tmp/dmae-gpu}}
mkdir -p "$OUTDIR"
export PYTHONPATH=$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
B=dmae_vit_base_patch16_dec512d8b
L=dmae_vit_large_patch16_dec512d8b
run() { echo "== $*"; timeout 200 $PY benchmarks/certify_throughput.py --device cuda --json --num-classes 1000 "$@" | tee -a "$OUTDIR/certify.jsonl"; }
run --model $B --batch 1000 --images 4 --n 10000
run --model $B --batch 1000 --images 4 --n 10000 --compile --skip-reference
run --model $L --batch 500 --images 2 --n 10000
run --model $L --batch 500 --images 2 --n 10000 --compile --skip-reference
