#!/usr/bin/env bash
# The GPU suite: SDXL UNet (real config, random weights), 1024² (latent 128), fp16, lorablend vs diffusers+PEFT,
# plus the svd merge of two SDXL LoRAs on the GPU; then the whole FLUX.1-dev transformer (real config, 19 double +
# 38 single blocks, 11.9 B random weights) in bf16 at 1024² (4096 packed latent tokens + 512 T5 tokens) with
# kohya-Flux LoRAs at rank 16 (bench_flux.py). Writes its tables into OUTDIR. Budget: under 8 minutes on one
# H100/H200 for the SDXL part, about 4 more for Flux (LoRA files are written first, on the CPU; the systems then
# run one after the other). MODEL picks the parts: "sdxl flux" (default), or one of sdxl / sd15 / flux / flux-small.
#
#   benchmarks/gpu.sh OUTDIR                  # on a machine with a CUDA GPU
#   DEVICE=cpu DTYPE=float32 MODEL=sd15 RES=64 REPEATS=1 CYCLES=1 benchmarks/gpu.sh /tmp/out   # smoke test
#   DEVICE=cpu MODEL=flux-small DOUBLE=1 SINGLE=1 RES=64 TEXT_TOKENS=8 REPEATS=1 CYCLES=2 benchmarks/gpu.sh /tmp/out
#                                # Flux smoke test: bf16 as on the GPU, 1 + 1 real-width blocks, ~3 min on 2 cores
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
MODEL=${MODEL:-sdxl flux}
FLUX_DTYPE=${FLUX_DTYPE:-bfloat16}  # Flux.1's native dtype (DTYPE is the UNet's)
TEXT_TOKENS=${TEXT_TOKENS:-512}     # FLUX.1-dev's max_sequence_length
DOUBLE=${DOUBLE:-}                  # Flux blocks (default: the model's; the smoke test uses 1 and 1)
SINGLE=${SINGLE:-}
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
  echo "Command: \`benchmarks/gpu.sh $OUT\` (DEVICE=$DEVICE DTYPE=$DTYPE MODEL='$MODEL' RES=$RES REPEATS=$REPEATS CYCLES=$CYCLES LOADED=$LOADED FLUX_DTYPE=$FLUX_DTYPE TEXT_TOKENS=$TEXT_TOKENS${DOUBLE:+ DOUBLE=$DOUBLE}${SINGLE:+ SINGLE=$SINGLE})"
  echo
} > "$OUT/RESULTS-gpu.md"
start=$(date +%s)
merge=
for model in $MODEL; do
  case "$model" in
    flux*)
      "$PY" benchmarks/bench_flux.py --model "$model" --device "$DEVICE" --dtype "$FLUX_DTYPE" --resolution "$RES" \
        --text-tokens "$TEXT_TOKENS" --repeats "$REPEATS" --cycles "$CYCLES" ${DOUBLE:+--double "$DOUBLE"} \
        ${SINGLE:+--single "$SINGLE"} ${THREADS:+--threads "$THREADS"} --outdir "$OUT" --cache "$OUT/lora-cache" \
        | tee -a "$OUT/RESULTS-gpu.md"
      ;;
    *)
      "$PY" benchmarks/bench_runtime.py --model "$model" --device "$DEVICE" --dtype "$DTYPE" --resolution "$RES" \
        --repeats "$REPEATS" --cycles "$CYCLES" --loaded "$LOADED" ${THREADS:+--threads "$THREADS"} --outdir "$OUT" \
        --cache "$OUT/lora-cache" --profile | tee -a "$OUT/RESULTS-gpu.md"
      merge=1
      ;;
  esac
  echo >> "$OUT/RESULTS-gpu.md"
done
if [ -n "$merge" ]; then  # the svd merge of two SDXL LoRAs (no model needed), with the UNet part
  "$PY" benchmarks/bench_merge.py --device "$DEVICE" ${THREADS:+--threads "$THREADS"} --dense sample --repeats 3 --outdir "$OUT" --cache "$OUT/lora-cache" \
    | tee -a "$OUT/RESULTS-gpu.md"
fi
echo -e "\nTotal wall time: $(( $(date +%s) - start )) s." | tee -a "$OUT/RESULTS-gpu.md"
rm -rf "$OUT/lora-cache"  # ~2 GB of generated LoRA files; rebuilt from the seed on the next run
