#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one pass (GPU time is scarce: run it once),
# the correctness checks first, so that a run cut short loses figures, not them:
#   1. the registers and local (spill) bytes the driver compiled each CUDA kernel
#      function into (attend kernels --device cuda) beside ptxas's figures
#      (bench/cuda_kernel_report.py), then
#      the CUDA tests (tests/test_gpu.cpp --device=cuda: oracle, CPU dropout masks,
#      Halide device buffers, the caller's context and stream, device out of
#      memory), then the kernel-fault test in a process of its own, then the NCCL
#      ring on one rank (when Open MPI is installed here)
#   2. compute-sanitizer on one small shape: racecheck with the d=64 variants and
#      d=80's default (its head dim leaves some staging threads idle), memcheck
#      with the defaults for d=64, 80 and 128
#   3. the memory bound: b=1, h=4, n=m=131072, d=64, causal; its scores alone would
#      take 256 GiB, more than any GPU has
#   4. bench/compare_gpu.py: every CUDA variant against PyTorch SDPA fp32, then the
#      16-bit kernels; it starts no measurement after COMPARE_TIME_LIMIT_S seconds
#      (default 240, so that the whole script fits one GPU session) and lists what
#      it left out
#   5. where the time goes: the cost per call at a trivial size (calls batched as
#      attend bench does, so launches overlap), and Nsight Compute's
#      speed-of-light, occupancy, scheduler and warp-stall sections for the default
#      kernels at d=64, n=m=1024 and 16384, and d=128, n=m=4096 (their kernel time
#      against attend bench's)
#   6. the Python package's tests (tests/python; with a GPU its CUDA test: the
#      drop-in's forward and gradients on CUDA tensors under a non-default stream,
#      against float64 math) with this machine's python3, torch and pytest; when
#      the build's extension is for another Python (a build copied here), it is
#      rebuilt for this one first (python/standalone, with this python3's nanobind)
#
#   bench/gpu_check.sh [BUILD]        logs under $OUT (default bench/results/gpu)
#
# BUILD (default build/) is a build with every GPU schedule variant: made by
# ./build.sh test, or configured with -DATTEND_ALL_GPU_VARIANTS=ON, here or on
# another x86-64 machine (the kernels do not need libHalide at run time, so a
# build folder can be copied to a GPU machine that has no Halide: its runtime/,
# bin/, tests/attend_gpu_tests, tests/attend_dist_tests, dist/, python/ and
# CMakeCache.txt are what this script uses). Dry runs without a GPU:
#   ATTEND_GPU_DEVICE=opencl bench/gpu_check.sh    (OpenCL on PoCL, small shapes)
#   ATTEND_FAKE_CUDA=launch=noop LD_LIBRARY_PATH=build/tests/fake_cuda bench/gpu_check.sh
#       (the CUDA flow, every shape and variant, against the fake driver: its
#       launches do nothing, so the tests fail and the timings are host work only;
#       compute-sanitizer and ncu must be on PATH; tests/test_gpu_check.py runs
#       it so in CI, with stand-ins for them)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$(cd "${1:-$ROOT/build}" && pwd)"
OUT="${OUT:-$ROOT/bench/results/gpu}"
DEVICE="${ATTEND_GPU_DEVICE:-cuda}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$BUILD/runtime${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"  # a copied build's rpath points elsewhere
ATTEND="$BUILD/bin/attend"
TESTS="$BUILD/tests/attend_gpu_tests"
for f in "$ATTEND" "$TESTS"; do
    [ -x "$f" ] || { echo "missing $f: build first (./build.sh test)" >&2; exit 2; }
done
# The sanitizer runs and the comparison name the variants after the first.
if ! grep -qiE "^ATTEND_ALL_GPU_VARIANTS:BOOL=(ON|1|TRUE|YES|Y)$" "$BUILD/CMakeCache.txt"; then
    echo "$BUILD has only the GPU variants select_kernel picks; this check compares all of them:" \
         "build with ./build.sh test, or configure with -DATTEND_ALL_GPU_VARIANTS=ON" >&2
    exit 2
fi

step() { printf '\n==> %s\n' "$*" | tee -a "$OUT/summary.txt"; }
failures=0
check() {  # check NAME COMMAND...: runs it, logs to $OUT/NAME.log, records the status
    local name="$1"
    shift
    local start=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    [ $status -eq 0 ] || failures=$((failures + 1))
    return $status
}

: >"$OUT/summary.txt"
step "machine"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 || true; } | tee -a "$OUT/summary.txt"
"$ATTEND" kernels >"$OUT/kernels.txt" 2>&1

step "1. $DEVICE tests"
if [ "$DEVICE" = cuda ]; then
    # What the driver compiled each kernel function into (registers, local bytes:
    # spills show here, JIT register limit), next to what ptxas makes of the same PTX.
    check registers "$ATTEND" kernels --device cuda
    awk 'NR > 1 && $4 ~ /^[0-9]+$/ && $4 > 0 { spills++; print "  local memory: " $0 } END { print "functions with local memory (spills): " spills + 0 }' \
        "$OUT/registers.log" | tail -n 6 | tee -a "$OUT/summary.txt"
    # (needs the kernel objects, build/generators/attend_cuda_*.o, which a carried build may lack)
    if { command -v ptxas >/dev/null || [ -x /usr/local/cuda/bin/ptxas ]; } &&
        compgen -G "$BUILD/generators/attend_cuda_*.o" >/dev/null; then
        check ptxas python3 "$ROOT/bench/cuda_kernel_report.py" --build "$BUILD"
    fi
fi
check tests "$TESTS" --device="$DEVICE"
tail -n 4 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
if [ "$DEVICE" = cuda ]; then
    # A kernel fault breaks the process's CUDA context: its test runs alone.
    check fault "$TESTS" --device=cuda --no-skip --test-case="CUDA: a kernel fault*" --success
    grep -E "faulting call|unusable|test cases:" "$OUT/fault.log" | head -4 | tee -a "$OUT/summary.txt"
    # The NCCL ring (attend::dist on CUDA tensors) on one rank: needs Open MPI's
    # libraries on this machine (libopenmpi-dev openmpi-bin).
    DIST_TESTS="$BUILD/tests/attend_dist_tests"
    if [ -x "$DIST_TESTS" ] && ! ldd "$DIST_TESTS" | grep -q "not found"; then
        OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 check nccl_ring "$DIST_TESTS" --test-case="*NCCL*" --success
        grep -E "skipped|test cases:" "$OUT/nccl_ring.log" | head -3 | tee -a "$OUT/summary.txt"
    else
        echo "nccl_ring: not run ($DIST_TESTS missing, or Open MPI/NCCL libraries missing here)" | tee -a "$OUT/summary.txt"
    fi

    step "2. compute-sanitizer (small shape, causal)"
    SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
    for run in racecheck:attend_cuda_d64_lanes_k8 racecheck:attend_cuda_d64_lanes_k8_u16 racecheck:attend_cuda_d64_lanes \
        racecheck:attend_cuda_d64_threads racecheck:attend_cuda_d64_lanes_k8_qreg racecheck:attend_cuda_d80_lanes_k8 \
        memcheck:attend_cuda_d64_lanes_k8 memcheck:attend_cuda_d80_lanes_k8 memcheck:attend_cuda_d128_lanes_k8; do
        tool="${run%%:*}" kernel="${run#*:}"
        dim="${kernel#attend_cuda_d}" && dim="${dim%%_*}"
        check "${tool}_$kernel" "$SANITIZER" --tool "$tool" --error-exitcode 3 \
            "$ATTEND" bench --device cuda --kernel "$kernel" --b 1 --h 2 --n 70 --m 100 --d "$dim" --causal --repeats 1
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard" "$OUT/${tool}_$kernel.log" | head -3 | tee -a "$OUT/summary.txt"
    done

    step "3. memory bound: n=m=131072 (scores would need 256 GiB)"
    check memory_bound "$ATTEND" bench --device cuda --b 1 --h 4 --n 131072 --m 131072 --d 64 --causal --repeats 1 --json
    tail -n 2 "$OUT/memory_bound.log" | tee -a "$OUT/summary.txt"
fi

step "4. every $DEVICE variant against PyTorch SDPA"
quick=""
[ "$DEVICE" = cuda ] || quick="--quick"
check compare python3 "$ROOT/bench/compare_gpu.py" --build "$BUILD" --device "$DEVICE" --out "$OUT" $quick \
    --time-limit "${COMPARE_TIME_LIMIT_S:-240}"
sed -n "/best variant per shape/,\$p" "$OUT/compare.log" | tee -a "$OUT/summary.txt"

if [ "$DEVICE" = cuda ]; then
    step "5. where the time goes (default variants)"
    check overhead "$ATTEND" bench --device cuda --b 1 --h 1 --n 32 --m 32 --d 64 --repeats 50
    tail -n 1 "$OUT/overhead.log" | tee -a "$OUT/summary.txt"
    NCU="$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
    for shape in d64_n1024 d64_n16384 d128_n4096; do  # d=128: the furthest from SDPA in the last run
        dim="${shape%%_*}" && dim="${dim#d}" && n="${shape##*_n}"
        # The two kernels of the first warm-up call (the first call's, which load
        # the module, are skipped).
        check "profile_$shape" "$NCU" --clock-control none --launch-skip 2 --launch-count 2 \
            --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats --section WarpStateStats \
            "$ATTEND" bench --device cuda --b 2 --h 8 --n "$n" --m "$n" --d "$dim" --repeats 1
        grep -E "^  _kernel|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Throughput|Issue Slots|Waves Per SM" \
            "$OUT/profile_$shape.log" | tee -a "$OUT/summary.txt"
    done
fi

step "6. the Python package (tests/python) with this machine's python3"
PACKAGE="$BUILD/python"
if ! PYTHONPATH="$PACKAGE" python3 -c "import attend" >/dev/null 2>&1; then
    # The build's extension is for another Python: one for this python3, against
    # the same libattend (built outside $OUT, which comes back from a GPU machine).
    PACKAGE="$(mktemp -d)/python"
    check python_extension bash -c "cmake -S '$ROOT/python/standalone' -B '$PACKAGE' -DATTEND_BUILD='$BUILD' \
        -Dnanobind_ROOT=\"\$(python3 -m nanobind --cmake_dir)\" && cmake --build '$PACKAGE'"
fi
PYTHONPATH="$PACKAGE" check python python3 -m pytest -q -rs -p no:cacheprovider "$ROOT/tests/python"
tail -n 3 "$OUT/python.log" | tee -a "$OUT/summary.txt"

step "done: $failures failed step(s)"
exit $((failures > 0))
