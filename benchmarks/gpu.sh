#!/usr/bin/env bash
# One-command GPU comparison: llama4dpo vs transformers/TRL at the ~100M-active-parameter preset, in bf16.
#
#   bash benchmarks/gpu.sh            # one CUDA GPU (H100/H200): about 4-5 minutes, hard limit 7 minutes
#   bash benchmarks/gpu.sh --smoke    # CPU smoke mode, tiny model, < 60 s (CI keeps the script working)
#
# Measures, in one run (benchmarks/dpo_speed.py --device cuda --preset 100m):
#   * the card's bf16 matmul peak (best of 4096^2 and 8192^2 matmuls)
#   * a DPO training step, 8 pairs x 512 tokens, bf16 autocast: llama4dpo's Trainer (eager with a frozen
#     reference; train.compile + train.compile_mode=reduce-overhead, the compiled graphs replayed as CUDA graphs,
#     with a frozen reference and with precomputed reference log-probs) vs transformers' model with a
#     hand-written DPO step (frozen reference) and vs TRL's DPOTrainer (bf16, no gradient checkpointing; frozen
#     reference, and with its precompute_ref_log_probs); tokens/s, CUDA peak memory, MFU; each llama4dpo
#     setting's losses step by step (the same batches in the same order)
#   * greedy generation at batch 1 (64 new tokens, KV cache, bf16 weights): ours eager and with
#     torch.compile(model.decode) as CUDA graphs, against transformers' generate; forward+backward alone
#
# The GPU machine has no network: packages it lacks (trl, datasets and their needs; transformers at the version
# used on CPU) travel as wheels in .whl, made here by `make gpu-wheels` and carried along; when .whl exists
# they are installed into a temporary folder first.
# Results print to stdout; with $OUT set (the device runner's output folder) they are also written to
# $OUT/gpu_dpo_speed.{md,json}. Extra arguments are passed to dpo_speed.py (e.g. --steps 5).
#
# Python: $PYTHON if set, else the first of python3, python, .venv/bin/python whose torch sees a GPU (for
# --smoke: the first that imports torch at all). Missing packages are reported by name; transformers/trl are
# optional (only llama4dpo is measured without them).
set -u -o pipefail
cd "$(dirname "$0")/.."

SMOKE=0
ARGS=()
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1 ;;
    *) ARGS+=("$a") ;;
  esac
done

candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
if [ "$SMOKE" = 1 ]; then
  candidates+=(.venv/bin/python python3 python)
else
  candidates+=(python3 python .venv/bin/python)
fi

PY=""
tried=""
for c in "${candidates[@]}"; do
  command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
  if [ "$SMOKE" = 1 ]; then
    probe='import torch'
  else
    probe='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'
  fi
  if "$c" -c "$probe" >/dev/null 2>&1; then PY="$c"; break; fi
  tried="$tried $c($("$c" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "no GPU visible")' 2>/dev/null || echo "no torch"))"
done

if [ -z "$PY" ]; then
  if [ "$SMOKE" = 1 ]; then
    echo "ERROR: no Python with torch found (tried:${tried:- none}). Install torch, e.g. 'make install' for .venv." >&2
  else
    echo "ERROR: no Python whose torch sees a CUDA GPU (tried:${tried:- none})." >&2
    echo "       Install a CUDA build of torch (pip install torch) and check nvidia-smi; or run with --smoke on CPU." >&2
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >&2
  fi
  exit 3
fi
echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

if [ "$SMOKE" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE="${TMPDIR:-/tmp}/llama4dpo-gpu-site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed from .whl: $(ls .whl | tr '\n' ' ')"
  else
    echo "WARNING: could not install the wheels in .whl; going on with what $PY has" >&2
  fi
fi

OUTARGS=()
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
  OUTARGS=(--json "$OUT/gpu_dpo_speed.json" --md "$OUT/gpu_dpo_speed.md")
fi

if [ "$SMOKE" = 1 ]; then
  # tiny model on CPU: the same code paths (checkpoint + export, both DPO sides, fwd+bwd, generation, peak)
  exec timeout 120 "$PY" benchmarks/dpo_speed.py --quick --device cpu --threads 1 --no-write --gen-batches 1 \
    --settings ours-bf16,trl-bf16 ${OUTARGS[@]+"${OUTARGS[@]}"} ${ARGS[@]+"${ARGS[@]}"}
fi

# The whole run must end within 7 minutes: 420 s for the script, each DPO process at most 150 s.
# (Where TRL is missing, trl-bf16 becomes hf-bf16 and is run once.)
timeout -k 10 420 "$PY" benchmarks/dpo_speed.py --device cuda --preset 100m --experts 16 \
  --settings ours-bf16,hf-bf16,trl-bf16,trl-bf16-preref,ours-bf16-cgraphs,ours-bf16-preref-cgraphs \
  --extra-settings "" \
  --gen-batches 1 --timeout 150 --no-write ${OUTARGS[@]+"${OUTARGS[@]}"} ${ARGS[@]+"${ARGS[@]}"}
rc=$?
if [ $rc = 124 ] || [ $rc = 137 ]; then
  echo "gpu.sh: stopped at the 420 s limit; the lines above hold what was measured." >&2
fi
exit $rc
