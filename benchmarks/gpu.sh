#!/usr/bin/env bash
# One-command GPU comparison: llama4dpo vs transformers/TRL at the ~100M-active-parameter preset, in bf16.
#
#   bash benchmarks/gpu.sh            # one CUDA GPU (H100/H200): about 6 minutes, hard limit 7.5 minutes
#   bash benchmarks/gpu.sh --smoke    # CPU smoke mode, tiny preset, ~1 minute (CI keeps the script working)
#
# Runs, on one set of checkpoints (the 100m preset, src/llama4dpo/configs/llama4-100m.toml, at 16 experts):
#   * benchmarks/dpo_speed.py: the card's bf16 matmul peak; a DPO training step, 8 pairs x 512 tokens, bf16
#     autocast: `llama4dpo dpo`'s recipe (eager with a frozen reference; train.compile +
#     train.compile_mode=reduce-overhead, the compiled graphs replayed as CUDA graphs, with a frozen reference and
#     with precomputed reference log-probs) vs transformers' model with a hand-written DPO step (frozen reference)
#     and vs TRL's DPOTrainer (bf16, no gradient checkpointing; frozen reference, and with its
#     precompute_ref_log_probs); tokens/s, CUDA peak memory, MFU; each llama4dpo setting's losses step by step
#   * benchmarks/fwd_bwd.py: the model's forward+backward alone, against transformers'
#   * benchmarks/generation.py: greedy generation at batch 1 (64 new tokens, KV cache, bf16 weights): ours eager
#     and with torch.compile(model.decode) as CUDA graphs, against transformers' generate
# and joins the three reports into BENCHMARKS.md's GPU section (`## GPU: ...`), which it also prints.
#
# The GPU machine has no network: packages it lacks (trl, datasets and their needs; transformers at the version
# used on CPU) travel as wheels in .whl, made here by `make gpu-wheels` and carried along; when .whl exists
# they are installed into a temporary folder first.
# With $OUT set (the device runner's output folder) the reports are also written there: gpu_dpo_speed.{md,json},
# gpu_fwd_bwd.md, gpu_generation.md and the joined section gpu.md; put that into BENCHMARKS.md here with
# `python benchmarks/report.py install gpu.md`. Extra arguments are passed to dpo_speed.py (e.g. --steps 5);
# --no-write leaves BENCHMARKS.md alone.
#
# Python: $PYTHON if set, else the first of python3, python, .venv/bin/python whose torch sees a GPU (for
# --smoke: the first that imports torch at all). Missing packages are reported by name; transformers/trl are
# optional (only llama4dpo is measured without them).
set -u -o pipefail
cd "$(dirname "$0")/.."

SMOKE=0
WRITE=1
ARGS=()
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1; WRITE=0 ;;
    --no-write) WRITE=0 ;;
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

WORK="$(mktemp -d "${TMPDIR:-/tmp}/llama4dpo-gpu.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
DEST="$WORK"
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then DEST="$OUT"; fi
HEADING='## GPU: llama4dpo vs transformers/TRL at the 100m preset (`bash benchmarks/gpu.sh`)'
INTRO="One CUDA GPU, the 100m preset (llama4-100m.toml, 16 experts), bf16: the three parts below are one run"
INTRO+=" of gpu.sh on one set of checkpoints; ratios are side by side within each part."
# every part: the same checkpoints (--workdir), its report as markdown for the joined section
COMMON=(--no-write --workdir "$WORK/ckpt")

if [ "$SMOKE" = 1 ]; then
  # tiny preset on CPU: the same code paths (checkpoint + export, both DPO sides, fwd+bwd, generation, peak)
  COMMON+=(--quick --device cpu --threads 1)
  timeout 150 "$PY" benchmarks/dpo_speed.py "${COMMON[@]}" --settings ours-bf16,trl-bf16 \
    --json "$DEST/gpu_dpo_speed.json" --md "$DEST/gpu_dpo_speed.md" ${ARGS[@]+"${ARGS[@]}"}
  rc_dpo=$?
  timeout 60 "$PY" benchmarks/fwd_bwd.py "${COMMON[@]}" --precisions bf16 --md "$DEST/gpu_fwd_bwd.md"
  rc_fb=$?
  timeout 60 "$PY" benchmarks/generation.py "${COMMON[@]}" --batches 1 --md "$DEST/gpu_generation.md"
  rc_gen=$?
else
  # The whole run must end within 7.5 minutes: 320 s for the DPO settings (none starts after 300 s, each process
  # at most 150 s; the most telling ones first; where TRL is missing, trl-bf16 becomes hf-bf16 and is run once),
  # 45 s for forward+backward, 75 s for generation (its compiled variant records CUDA graphs first).
  COMMON+=(--device cuda --preset 100m --experts 16)
  timeout -k 10 320 "$PY" benchmarks/dpo_speed.py "${COMMON[@]}" \
    --settings ours-bf16-preref-cgraphs,trl-bf16,trl-bf16-preref,ours-bf16,hf-bf16,ours-bf16-cgraphs \
    --extra-settings "" --timeout 150 --budget 300 \
    --json "$DEST/gpu_dpo_speed.json" --md "$DEST/gpu_dpo_speed.md" ${ARGS[@]+"${ARGS[@]}"}
  rc_dpo=$?
  timeout -k 5 45 "$PY" benchmarks/fwd_bwd.py "${COMMON[@]}" --md "$DEST/gpu_fwd_bwd.md"
  rc_fb=$?
  timeout -k 5 75 "$PY" benchmarks/generation.py "${COMMON[@]}" --batches 1 --md "$DEST/gpu_generation.md"
  rc_gen=$?
fi
for part in "dpo_speed.py $rc_dpo" "fwd_bwd.py $rc_fb" "generation.py $rc_gen"; do
  set -- $part
  if [ "$2" = 124 ] || [ "$2" = 137 ]; then
    echo "gpu.sh: $1 stopped at its time limit; the lines above hold what it measured." >&2
  elif [ "$2" != 0 ]; then
    echo "gpu.sh: $1 failed (exit $2)." >&2
  fi
done

WRITEARG=()
[ "$WRITE" = 1 ] && WRITEARG=(--write)
"$PY" benchmarks/report.py combine --heading "$HEADING" --intro "$INTRO" --out "$DEST/gpu.md" \
  ${WRITEARG[@]+"${WRITEARG[@]}"} "$DEST/gpu_dpo_speed.md" "$DEST/gpu_fwd_bwd.md" "$DEST/gpu_generation.md"
echo
cat "$DEST/gpu.md"
for rc in $rc_dpo $rc_fb $rc_gen; do
  [ "$rc" != 0 ] && exit "$rc"
done
exit 0
