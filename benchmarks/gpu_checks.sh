#!/usr/bin/env bash
# Every check that needs a GPU, in one run, each stage under its own time limit, results in $OUT
# (default gpu-results/): the CUDA tests (Triton kernels, bf16 paths, the scripts under accelerate's
# FSDP; DeepSpeed ZeRO-3 as a stage of its own), full butterflies against LyCORIS at model scale, SDXL's UNet
# at 1024², torch.compile.
#
#   bash benchmarks/gpu_checks.sh                      # every stage (~12 min at most)
#   bash benchmarks/gpu_checks.sh tests sdxl           # some: ≤ 8 min, then `lycoris compile`: ≤ 6.5 min
#   bash benchmarks/gpu_checks.sh deepspeed            # not in the default list: the scripts under ZeRO-3
#
# On a machine whose Python has torch, transformers, accelerate and peft but not diffusers,
# lycoris-lora or deepspeed, put their wheels in .whl/ first; they are installed into /tmp/site:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1 \
#       lycoris-lora==4.1.3 importlib_metadata toml zipp hjson pydantic annotated-types typing-inspection \
#       --platform manylinux_2_17_x86_64 pydantic-core
#   pip wheel --no-deps -w .whl deepspeed==0.19.8     # PyPI has its source only; the wheel is pure Python
# Each stage's limit is below (seconds); its log and JSON numbers go to $OUT.
set -u
OUT=${OUT:-gpu-results}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests lycoris sdxl compile)

stage() {  # name, limit in seconds, command…
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s; last lines:"
    tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
}

$PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
for s in "${stages[@]}"; do
    case $s in
    tests) stage tests 300 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py \
        -k "not deepspeed" ;;
    deepspeed) stage deepspeed 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k deepspeed ;;
    lycoris) stage lycoris 240 $PY benchmarks/bench_models.py --models sd15 dinov2l --lycoris --no-peft \
        --only "BOFT" LyCORIS "ours LoRA" "ours OFT" --iters 5 --warmup 2 --json "$OUT/lycoris.json" ;;
    sdxl) stage sdxl 180 $PY benchmarks/bench_models.py --models sdxl --no-peft --gradient_checkpointing \
        --only "ours LoRA" "ours OFT" "ours BOFT m=2" --iters 5 --warmup 2 --json "$OUT/sdxl.json" ;;
    compile) stage compile 150 $PY benchmarks/bench_models.py --models dinov2l --no-peft --compile \
        --only "ours LoRA" "ours BOFT m=2" --iters 5 --warmup 3 --json "$OUT/compile.json" ;;
    *) echo "unknown stage $s (tests, lycoris, sdxl, compile, deepspeed)"; exit 2 ;;
    esac
done
