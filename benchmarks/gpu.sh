#!/usr/bin/env bash
# One command on a GPU machine: the offline and online comparisons of the README's Performance
# section, on one GPU, in about 10 minutes; prints the same tables at the end.
#
#   pip install -e ".[gpu,bench,test]" && bash benchmarks/gpu.sh
#
# Model: `gpt2` if it is in the Hugging Face cache (real text), else the built-in
# `gpt2-small-random` (the same 124M shape, random weights, built locally). Override any size
# with the environment: MODEL, ROWS, MAX_TOKENS, HF_ROWS, CONCURRENCY, DURATION.
#
# Time budget (one GPU, nothing measured on a GPU yet: an estimate to check on the first run):
#   offline, 4 systems one after the other, each from a cold start. Start-up measured on the
#     2-core CPU box: 27-60 s per system (Ray + engine); on a GPU add ~20 s of CUDA-graph capture.
#     Work: ROWS x MAX_TOKENS = 2000 x 128 = 256k tokens; vLLM decodes GPT-2 124M at >= 10k tok/s
#     on one A10G-class GPU at 256 sequences, so <= 30 s per vLLM-based system; HF generate
#     (batches of 64) does ~2k tok/s, so HF_ROWS = 256 prompts (33k tokens, ~20 s).
#     => ours ~90 s + raw ~70 s + Ray Data LLM ~110 s + HF ~30 s = ~300 s.
#   online, 3 servers (vllm serve, ours direct, ours via Serve's proxy): start-up ~40-60 s each,
#     10 s warm-up, 3 levels x DURATION 10 s (+ drain) => ~100 s each = ~300 s.
#   float32 offline (ours, raw vLLM with our settings): ~160 s more.
#   Total ~760 s; the script prints the elapsed time at the end so the estimate can be checked.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "error: $*" >&2; exit 2; }

# ---- fail fast without a GPU ---------------------------------------------------------------------
command -v nvidia-smi >/dev/null 2>&1 \
  || fail "no GPU visible: nvidia-smi is not on PATH (no NVIDIA driver). Run this on a GPU machine; on CPU use benchmarks/offline.py and benchmarks/online.py directly."
nvidia-smi -L 2>/dev/null | grep -q '^GPU ' \
  || fail "no GPU visible: nvidia-smi lists no GPU ($(nvidia-smi -L 2>&1 | head -1))."
python - <<'PY' || fail "no GPU visible to torch (torch.cuda.is_available() is False): install the CUDA build (pip install -e \".[gpu,bench,test]\")."
import sys
import torch
sys.exit(0 if torch.cuda.is_available() else 1)
PY

# ---- sizes -----------------------------------------------------------------------------------------
if [ -z "${MODEL:-}" ]; then
  if HF_HUB_OFFLINE=1 python -c "from pipeline.models import resolve_model; resolve_model('gpt2')" >/dev/null 2>&1; then
    MODEL=gpt2
  else
    MODEL=gpt2-small-random
  fi
fi
ROWS=${ROWS:-2000}
MAX_TOKENS=${MAX_TOKENS:-128}
HF_ROWS=${HF_ROWS:-256}
CONCURRENCY=${CONCURRENCY:-1,32,128}
DURATION=${DURATION:-10}
OFFLINE_NAME="offline-gpu-$MODEL"
ONLINE_NAME="online-gpu-$MODEL"

echo "GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1); model $MODEL"
echo "offline: $ROWS prompts x $MAX_TOKENS tokens (HF: $HF_ROWS); online: streams $CONCURRENCY, ${DURATION}s per level"
start=$SECONDS

python benchmarks/offline.py --model "$MODEL" --rows "$ROWS" --max-tokens "$MAX_TOKENS" \
  --gpus-per-replica 1 --hf-rows "$HF_ROWS" --hf-batch-size 64 \
  --wait-idle 5 --timeout 300 --name "$OFFLINE_NAME"

# the same comparison in float32 (dtype auto above: half precision, as vLLM's own auto)
python benchmarks/offline.py --model "$MODEL" --rows "$ROWS" --max-tokens "$MAX_TOKENS" \
  --gpus-per-replica 1 --systems ours,raw_vllm_1proc --dtype float32 --no-bound \
  --wait-idle 5 --timeout 300 --name "$OFFLINE_NAME-float32"

python benchmarks/online.py --model "$MODEL" --gpus-per-replica 1 --concurrency "$CONCURRENCY" \
  --duration "$DURATION" --max-tokens 64 --wait-idle 5 --startup-timeout 300 --name "$ONLINE_NAME"

echo
python benchmarks/readme_tables.py --offline "benchmarks/results/$OFFLINE_NAME.json" \
  --online "benchmarks/results/$ONLINE_NAME.json"
echo
echo "elapsed: $((SECONDS - start)) s (budget: 760 s)"
