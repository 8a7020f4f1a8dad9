#!/usr/bin/env bash
# The GPU work of a session, one phase per call of the device tool (each under its 10-minute
# limit; logs and results land in $OUT). The GPU image lacks diffusers and nvidia-ml-py:
# their Python 3.12 wheels travel in the ignored .whl/ folder, and ComfyUI (for the GPU
# eviction test) in .cache/comfyui, so a call carries [".whl", ".cache/comfyui"]:
#
#   run(kind="nvidia-h100-x1", carry=[".whl", ".cache/comfyui"], command="bash bench/gpu_session.sh small")
#
# Phases (the offload benchmark is split over calls; each later one resumes the JSON the
# earlier one wrote, copied into bench/results/ in between):
#   tests    GPU tests (-m gpu); the staged formats' decoding kernels (bench/dequant_kernels.py)
#   verify   GPU tests; then 1.5B, this project, without and with the frame extension (A/B, same machine)
#   small    GPU tests and the Large decoding kernels; if the tests pass, 1.5B, this project and every peer
#   large    Large, this project (150 frames)
#   peers    Large, every peer: diffusers, the seed design, accelerate and transformers' generate
#   planner  planner_accuracy (issue 4's table)
#   encoded  GPU tests; if they pass, 1.5B: this project bf16 and bf16-packed, and diffusers (resumes the JSON)
#   encoded-large  the same for Large
#   hostram  1.5B, this project, bf16: host RAM with and without the mapped libraries' pages
#   decode   GPU tests and both sizes' decoding kernels; if the tests pass, 1.5B, this project
#            and every peer (resumes the JSON)
#   rerun-1.5B  the fp8 error (GPU test and bench/fp8_error.py); 1.5B, this project and every
#            peer, into a new JSON under $OUT/1.5B
#   rerun-large, rerun-large-peers  the same for Large in two calls on one warm machine
#   repeat   SIZE BUDGET DTYPE [METHOD...] (default ours): those cases three times in turns;
#            Large 6 bf16-packed ours diffusers, 1.5B 4 bf16 ours
#   hostram-trimmed  this project, both sizes, 60 frames, the heap trimmed before each baseline
#   gpu-1.5B  GPU tests; if they pass, 1.5B, this project and every peer, into a new JSON under $OUT/1.5B
set -uo pipefail
phase=${1:?phase: tests | verify | small | large | peers | planner | hostram | encoded | encoded-large | decode | rerun-1.5B | rerun-large | rerun-large-peers | repeat | hostram-trimmed | gpu-1.5B}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 VIBEVOICE_COMFYUI_DIR="$PWD/.cache/comfyui"
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed -E 's/[^A-Za-z0-9]+/-/g; s/^-|-$//g')
RUN="bench/results/$card-$(date +%Y%m%d).json"  # the offload benchmark's JSON so far
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv
case $phase in
  tests)
    timeout 330 python3 -m pytest -q -p no:cacheprovider -m gpu -rs 2>&1 | tee "$OUT/gpu-tests.log"
    cp test-artifacts/gpu-*.json "$OUT/" 2>/dev/null
    for size in Large 1.5B; do timeout 120 python3 bench/dequant_kernels.py --size $size --out "$OUT" 2>&1 | tail -3; done
    ;;
  verify)
    timeout 280 python3 -m pytest -q -p no:cacheprovider -m gpu -rs 2>&1 | tee "$OUT/gpu-tests.log"
    cp test-artifacts/gpu-*.json "$OUT/" 2>/dev/null
    for variant in no-frame-extension frame-extension; do
      mkdir -p "$OUT/$variant"
      flag=$([ "$variant" = no-frame-extension ] && echo --no-frame-extension)
      timeout 140 python3 bench/offload_bench.py --models 1.5B --methods ours $flag --out "$OUT/$variant" \
        2>&1 | tee "$OUT/$variant/ours-1.5B.log"
      rm -f "$OUT/$variant"/*.png
    done
    ;;
  small)
    timeout 180 python3 -m pytest -q -p no:cacheprovider -m gpu -rs 2>&1 | tee "$OUT/gpu-tests.log"
    cp test-artifacts/gpu-vram-eviction-*.json "$OUT/" 2>/dev/null
    timeout 100 python3 bench/dequant_kernels.py --size Large --out "$OUT" 2>&1 | tail -3
    grep -qE "[0-9]+ passed" "$OUT/gpu-tests.log" && ! grep -qE "[0-9]+ (failed|error)" "$OUT/gpu-tests.log" || exit 1
    timeout 300 python3 bench/offload_bench.py --models 1.5B --all-slow --peer-frames 20 --slow-frames 5 \
      2>&1 | tee "$OUT/bench-1.5B.log"
    ;;
  large)  # after `small`: Large, this project (150 frames)
    timeout 560 python3 bench/offload_bench.py --resume "$RUN" --models Large --methods ours \
      2>&1 | tee "$OUT/bench-Large.log"
    ;;
  peers)  # after `large`: Large's peers and transformers' generate
    timeout 560 python3 bench/offload_bench.py --resume "$RUN" --models Large --methods diffusers seed accelerate generate \
      --all-slow --peer-frames 20 --slow-frames 5 2>&1 | tee "$OUT/bench-Large-peers.log"
    ;;
  encoded)  # bf16-packed with encoded residents against bf16 and diffusers, on one machine
    timeout 230 python3 -m pytest -q -p no:cacheprovider -m gpu -rs 2>&1 | tee "$OUT/gpu-tests.log"
    grep -qE "[0-9]+ passed" "$OUT/gpu-tests.log" && ! grep -qE "[0-9]+ (failed|error)" "$OUT/gpu-tests.log" || exit 1
    timeout 200 python3 bench/offload_bench.py --resume "$RUN" --models 1.5B --methods ours diffusers --dtypes bf16 bf16-packed \
      --peer-frames 20 2>&1 | tee "$OUT/bench-1.5B-encoded.log"
    ;;
  encoded-large)
    timeout 560 python3 bench/offload_bench.py --resume "$RUN" --models Large --methods ours diffusers --dtypes bf16 bf16-packed \
      --peer-frames 20 2>&1 | tee "$OUT/bench-Large-encoded.log"
    ;;
  decode)  # after a change to the decoding or its model: kernels, then the GPU-bound 1.5B rows
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -rs 2>&1 | tee "$OUT/gpu-tests.log"
    for size in Large 1.5B; do timeout 90 python3 bench/dequant_kernels.py --size $size --out "$OUT" 2>&1 | tail -3; done
    grep -qE "[0-9]+ passed" "$OUT/gpu-tests.log" && ! grep -qE "[0-9]+ (failed|error)" "$OUT/gpu-tests.log" || exit 1
    timeout 280 python3 bench/offload_bench.py --resume "$RUN" --models 1.5B --all-slow --peer-frames 20 --slow-frames 5 \
      2>&1 | tee "$OUT/bench-1.5B.log"
    ;;
  rerun-1.5B)  # every 1.5B row, every peer, into a JSON of its own ($OUT/1.5B); the fp8 error on the GPU
    timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_offload_gpu.py -k fp8_streaming_error 2>&1 | tee "$OUT/gpu-tests.log"
    timeout 90 python3 bench/fp8_error.py --out "$OUT" 2>&1 | tail -14
    timeout 360 python3 bench/offload_bench.py --models 1.5B --all-slow --peer-frames 20 --slow-frames 5 --out "$OUT/1.5B" \
      2>&1 | tee "$OUT/bench-1.5B.log"
    ;;
  rerun-large)  # Large, this project, into a JSON of its own ($OUT/Large)
    timeout 570 python3 bench/offload_bench.py --models Large --methods ours --out "$OUT/Large" 2>&1 | tee "$OUT/bench-Large.log"
    ;;
  rerun-large-peers)  # after rerun-large, its JSON copied to bench/results/rerun-Large.json: Large's peers
    timeout 570 python3 bench/offload_bench.py --resume bench/results/rerun-Large.json --models Large \
      --methods diffusers seed accelerate generate --all-slow --peer-frames 20 --slow-frames 5 --out "$OUT/Large" \
      2>&1 | tee "$OUT/bench-Large-peers.log"
    ;;
  repeat)  # repeat SIZE BUDGET DTYPE [METHOD...]: those cases three times in turns, one process
    size=${2:?size} budget=${3:?budget} dtype=${4:?stream dtype}; shift 4
    timeout 570 python3 bench/offload_bench.py --models "$size" --methods ${@:-ours} --dtypes "$dtype" --budgets "$budget" \
      --repeat 3 --peer-frames 20 --out "$OUT/repeat" 2>&1 | tee "$OUT/bench-$size-$budget-repeats.log"
    ;;
  hostram-trimmed)  # this project, both sizes, 60 frames: host RAM with glibc's heap trimmed before each baseline
    timeout 560 python3 bench/offload_bench.py --models 1.5B Large --methods ours --frames 60 --out "$OUT/hostram" \
      2>&1 | tee "$OUT/bench-host-ram-trimmed.log"
    ;;
  gpu-1.5B)  # after a change to the engine: its GPU tests, then every 1.5B row
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -rs 2>&1 | tee "$OUT/gpu-tests.log"
    cp test-artifacts/gpu-*.json "$OUT/" 2>/dev/null
    grep -qE "[0-9]+ passed" "$OUT/gpu-tests.log" && ! grep -qE "[0-9]+ (failed|error)" "$OUT/gpu-tests.log" || exit 1
    timeout 330 python3 bench/offload_bench.py --models 1.5B --all-slow --peer-frames 20 --slow-frames 5 --out "$OUT/1.5B" \
      2>&1 | tee "$OUT/bench-1.5B.log"
    ;;
  hostram)
    timeout 150 python3 bench/offload_bench.py --models 1.5B --methods ours --dtypes bf16 2>&1 | tee "$OUT/bench-1.5B-host-ram.log"
    ;;
  planner)
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_planner_engine.py -k cuda 2>&1 | tee "$OUT/planner-engine-gpu.log"
    timeout 440 python3 bench/planner_accuracy.py --out "$OUT" 2>&1 | tee "$OUT/planner-accuracy.log"
    ;;
esac
ls -la "$OUT"
