#!/usr/bin/env bash
# The GPU suite: SDXL UNet (real config, random weights), 1024² (latent 128), fp16, lorablend vs diffusers+PEFT,
# plus the svd merge of two SDXL LoRAs on the GPU. Writes its tables into OUTDIR. Budget: under 8 minutes on
# one H100/H200 (LoRA files are written first, on the CPU; the two systems then run one after the other).
#
#   benchmarks/gpu.sh OUTDIR                  # on a machine with a CUDA GPU
#   DEVICE=cpu DTYPE=float32 MODEL=sd15 RES=64 REPEATS=1 CYCLES=1 benchmarks/gpu.sh /tmp/out   # smoke test
set -euo pipefail
OUT=${1:?usage: benchmarks/gpu.sh OUTDIR}
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() or '${DEVICE:-cuda}'=='cpu' else 1)" 2>/dev/null; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float16}
MODEL=${MODEL:-sdxl}
RES=${RES:-1024}
REPEATS=${REPEATS:-5}
CYCLES=${CYCLES:-5}
LOADED=${LOADED:-50}
THREADS=${THREADS:-}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "# lorablend benchmarks — $DEVICE"
  echo
  "$PY" - <<EOF
import json, sys
sys.path.insert(0, "benchmarks")
import common as C
i = C.machine_info()
print(f"Machine: {i.get('gpu', 'no GPU')}; {i['nproc']} cores ({i['cpu']}). Versions: python {i['python']}, torch {i['torch']}, "
      f"diffusers {i['diffusers']}, peft {i['peft']}, transformers {i['transformers']}, safetensors {i['safetensors']}.")
EOF
  echo "Command: \`benchmarks/gpu.sh $OUT\` (DEVICE=$DEVICE DTYPE=$DTYPE MODEL=$MODEL RES=$RES REPEATS=$REPEATS CYCLES=$CYCLES LOADED=$LOADED)"
  echo
} > "$OUT/RESULTS-gpu.md"
start=$(date +%s)
"$PY" benchmarks/bench_runtime.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --resolution "$RES" \
  --repeats "$REPEATS" --cycles "$CYCLES" --loaded "$LOADED" ${THREADS:+--threads "$THREADS"} --outdir "$OUT" --cache "$OUT/lora-cache" --profile | tee -a "$OUT/RESULTS-gpu.md"
echo >> "$OUT/RESULTS-gpu.md"
"$PY" benchmarks/bench_merge.py --device "$DEVICE" ${THREADS:+--threads "$THREADS"} --dense sample --repeats 3 --outdir "$OUT" --cache "$OUT/lora-cache" \
  | tee -a "$OUT/RESULTS-gpu.md"
echo -e "\nTotal wall time: $(( $(date +%s) - start )) s." | tee -a "$OUT/RESULTS-gpu.md"
rm -rf "$OUT/lora-cache"  # ~1.5 GB of generated LoRA files; rebuilt from the seed on the next run
