#!/usr/bin/env bash
# Attend's quick start. Installs what is missing (Debian packages; Halide 21,
# CMake and ninja from PyPI into ./.venv), builds the kernels for this machine,
# then:
#   ./build.sh demo    build what `attend demo` needs and run it: every kernel, forward
#                      and backward, against the double-precision reference on a
#                      naturalspeech2-like batch, with its speed
#   ./build.sh test    build the rest (tests, benchmarks, every GPU variant, the arm-64
#                      cross-generated kernels) and run the whole test suite (ctest), then
#                      again with the runtime, CLI and tests built under AddressSanitizer
#                      + UBSan (build-sanitize/), then under ThreadSanitizer with kernels
#                      of its own (build-tsan/), then a short fuzzing run (build-fuzz/)
#   ./build.sh bench   run the CPU benchmark (GFLOP/s and fraction of the FMA peak)
#   ./build.sh tune [ARGS]  search the CPU schedule knobs for this machine (tools/tune.py;
#                      --help for its flags) and write tuning/cpu.json; then ./build.sh
#                      rebuilds the kernels with the tuned parameters
#   ./build.sh fuzz [SECONDS]  build the libFuzzer harnesses with clang (build-fuzz/), replay
#                      their saved corpus, then fuzz each for SECONDS (default 600)
#   ./build.sh         just build
# Every step is idempotent: a second run installs nothing and rebuilds only what
# changed; kernels come from the kernel cache (.cache/kernels) whenever they can.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
BUILD="$(realpath -m "${ATTEND_BUILD_DIR:-$ROOT/build}")"  # absolute: other trees name it
# pocl-opencl-icd: an OpenCL device on the CPU, so the GPU schedule is tested without a GPU.
# Open MPI: attend_dist (ring attention) and its tests under mpirun.
APT_PACKAGES=(g++ python3 python3-venv doctest-dev libdlpack-dev nlohmann-json3-dev libcli11-dev libbenchmark-dev
              ocl-icd-opencl-dev pocl-opencl-icd clang libclang-rt-dev clang-16 libclang-rt-16-dev llvm
              libopenmpi-dev openmpi-bin)

STARTED=$SECONDS
say() { printf '\033[1m==> [%d:%02d] %s\033[0m\n' $(((SECONDS - STARTED) / 60)) $(((SECONDS - STARTED) % 60)) "$*"; }

install_debian_packages() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    # python3-venv is only needed when the python3 on PATH cannot make a venv.
    if python3 -m venv --help >/dev/null 2>&1; then
        missing=("${missing[@]/python3-venv}")
    fi
    missing=(${missing[@]})
    [ ${#missing[@]} -eq 0 ] && return
    say "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# ensure_venv DIR REQUIREMENTS WHAT: DIR is a venv with REQUIREMENTS installed
# (installed again only when that file changed).
ensure_venv() {
    local dir="$1" requirements="$2" what="$3"
    [ -x "$dir/bin/python" ] || { say "creating $dir"; python3 -m venv "$dir"; }
    local stamp="$dir/.attend-requirements"
    if ! cmp -s "$requirements" "$stamp"; then
        say "installing $what into $dir"
        "$dir/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
        cp "$requirements" "$stamp"
    fi
}

install_python_tools() { ensure_venv "$VENV" "$ROOT/requirements.txt" "Halide 21, CMake, ninja and nanobind"; }

# Every tree's kernels go through one kernel cache in the checkout (.cache/kernels,
# tools/kernel_cache.py): a kernel generated once is copied, not generated, by
# the other trees and by later builds. It keeps the most recently used 2 GiB.
KERNEL_CACHE_MAX_MIB=2048

# cmake_cache_value DIR NAME: the value of NAME in DIR's CMake cache.
cmake_cache_value() { sed -n "s/^$2:[A-Z]*=//p" "$1/CMakeCache.txt" 2>/dev/null; }

# build DIR "WHAT" CORE_MINUTES [-DNAME=VALUE...] [--target T]: configures DIR the
# first time (CORE_MINUTES: roughly how long its first build takes on one core
# with an empty kernel cache, measured on a 2-core AMD EPYC), again when one of
# the options differs from its cache, then builds what changed (T only, if given).
build() {
    local dir="$1" what="$2" core_minutes="$3"
    shift 3
    local options=() target="" option
    while [ $# -gt 0 ]; do
        if [ "$1" = --target ] && [ $# -ge 2 ]; then target="$2" && shift 2; else options+=("$1") && shift; fi
    done
    local configure=0
    if [ ! -f "$dir/build.ninja" ]; then
        configure=1
        say "configuring $dir: $what; its first build takes about $(( (core_minutes + $(nproc) - 1) / $(nproc) )) min" \
            "on this machine's $(nproc) cores, less when the kernel cache has its kernels"
    else
        local changed=()
        for option in "${options[@]}"; do
            local name="${option#-D}" && name="${name%%=*}"
            [ "$(cmake_cache_value "$dir" "$name")" = "${option#*=}" ] || changed+=("$option")
        done
        if [ ${#changed[@]} -gt 0 ]; then
            configure=1
            say "reconfiguring $dir: $what (${changed[*]})"
        fi
    fi
    if [ $configure -eq 1 ]; then
        mkdir -p "$ROOT/.cache"
        local halide_dir
        halide_dir="$("$VENV/bin/python" -c 'import halide; print(halide.install_dir())')/lib64/cmake/Halide"
        "$VENV/bin/cmake" -S "$ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
            -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" -DHalide_DIR="$halide_dir" \
            -DPython3_EXECUTABLE="$VENV/bin/python" "${options[@]}" >"$ROOT/.cache/configure.log" 2>&1 ||
            { cat "$ROOT/.cache/configure.log" >&2; return 1; }
    fi
    say "building $dir${target:+ (what $target needs)}"
    rm -f "$dir/kernel_cache.log"
    "$VENV/bin/cmake" --build "$dir" ${target:+--target "$target"}
    say "$dir: $("$VENV/bin/python" "$ROOT/tools/kernel_cache.py" summary "$dir/kernel_cache.log")"
}

# The best of the main tree's CPU targets that this CPU runs (the tuner's rule),
# and the baseline (last).
host_cpu_targets() {
    PYTHONPATH="$ROOT/tools" "$VENV/bin/python" -c 'import sys, tune
targets = sys.argv[1].split(";")
print(";".join(dict.fromkeys([t for t in targets if tune.runs_here(t)][:1] + targets[-1:])))' \
        "$(cmake_cache_value "$BUILD" ATTEND_CPU_TARGETS)"
}

# fuzz SECONDS: the saved corpus as regression inputs, then SECONDS of fuzzing per
# harness (new inputs go to a scratch copy; the saved corpus stays as it is).
run_fuzz() {
    local seconds="$1" fuzz="$ROOT/build-fuzz"
    CC=clang CXX=clang++ build "$fuzz" "the libFuzzer harnesses (clang, ASan + UBSan), the main tree's kernels" 2 \
        "${USE_MAIN_GENERATOR[@]}" -DATTEND_FUZZ=ON -DATTEND_SANITIZE=address,undefined,fuzzer-no-link \
        -DATTEND_OPENCL=OFF -DATTEND_BUILD_TESTS=OFF -DATTEND_BUILD_BENCH=OFF
    for harness in attention npy; do
        local corpus="$ROOT/tests/fuzz/corpus/$harness" scratch="$fuzz/corpus/$harness"
        mkdir -p "$scratch"
        say "fuzz_$harness: replaying $(ls "$corpus" | wc -l) saved inputs, then fuzzing ${seconds} s"
        "$fuzz/tests/fuzz/fuzz_$harness" -runs=0 "$corpus" >"$fuzz/replay_$harness.log" 2>&1 ||
            { tail -n 40 "$fuzz/replay_$harness.log" >&2; return 1; }
        local log="$fuzz/fuzz_$harness.log"
        if ! "$fuzz/tests/fuzz/fuzz_$harness" -max_total_time="$seconds" -print_final_stats=1 \
            -artifact_prefix="$fuzz/" "$scratch" "$corpus" >"$log" 2>&1; then
            tail -n 40 "$log" >&2
            echo "fuzz_$harness found a problem: the input is saved as $fuzz/crash-* (log: $log)" >&2
            return 1
        fi
        grep -E '^(Done|stat::number_of_executed_units)' "$log"
    done
}

# The Python package's tests run in a venv of their own with numpy, torch and
# pytest (tests/python/requirements.txt; torch's wheel is large, so only `test`
# installs it), against the package the main tree built.
PYTHON_TEST_VENV="$ROOT/.venv-python"
run_python_tests() {
    ensure_venv "$PYTHON_TEST_VENV" "$ROOT/tests/python/requirements.txt" \
        "numpy, torch and pytest (torch's wheel is large: minutes)"
    say "Python package tests (tests/python)"
    PYTHONPATH="$BUILD/python" "$PYTHON_TEST_VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests/python"
}

run_tests() {
    say "test suite"
    "$VENV/bin/ctest" --test-dir "$BUILD" --output-on-failure -j "$(nproc)"
    run_python_tests
    # The same suite with the project's own code under ASan + UBSan, with the main
    # tree's kernels (the kernels are not instrumented). The consumer example links
    # the installed library without sanitizers, so it runs above only.
    local sanitize="$ROOT/build-sanitize"
    build "$sanitize" "the runtime, CLI and tests under ASan + UBSan, the main tree's kernels" 3 \
        "${USE_MAIN_GENERATOR[@]}" -DATTEND_SANITIZE=address,undefined -DATTEND_BUILD_BENCH=OFF
    say "test suite under AddressSanitizer + UndefinedBehaviorSanitizer"
    # (The tuner's search and the install check run above only: neither is the project's C++.)
    "$VENV/bin/ctest" --test-dir "$sanitize" --output-on-failure -j "$(nproc)" -E "install_and_consume|tune_search"
    # Again under ThreadSanitizer, the kernels and their Halide runtime (thread pool
    # included) instrumented too (Halide's tsan feature), so this tree generates
    # kernels of its own: only those its tests need (one specialised head dim and
    # the generic kernel, float32 and float16, this CPU's best target and the
    # baseline; the test names end with that subset). clang 16: Halide 21's
    # instrumentation calls __tsan_memcpy, which gcc 12's TSan runtime lacks.
    local tsan="$ROOT/build-tsan"
    CC=clang-16 CXX=clang++-16 build "$tsan" "the runtime, CLI, tests and a subset of the kernels under TSan" 2 \
        "${USE_MAIN_GENERATOR[@]}" -DATTEND_SANITIZE=thread -DATTEND_BUILD_BENCH=OFF \
        -DATTEND_HEAD_DIMS=64 "-DATTEND_DTYPES=float32;float16" "-DATTEND_CPU_TARGETS=$(host_cpu_targets)"
    say "test suite under ThreadSanitizer"
    TSAN_OPTIONS="halt_on_error=1 external_symbolizer_path=$(command -v llvm-symbolizer)" \
        "$VENV/bin/ctest" --test-dir "$tsan" --output-on-failure -j "$(nproc)" -E "install_and_consume|tune_search"
    # A short bounded fuzzing run of the API and the .npy reader (ASan + UBSan).
    run_fuzz 30
}

install_debian_packages
install_python_tools

# The sanitizer and fuzz trees run the main tree's generator (Halide's import of
# a host-built generator), so their kernels are the main tree's, from the cache.
USE_MAIN_GENERATOR=("-DAttend-halide_generators_DIR=$BUILD/cmake")
# The main tree also builds the Python package (build/python/attend) for .venv's Python.
PYTHON_OPTIONS=(-DATTEND_PYTHON=ON "-DPython_EXECUTABLE=$VENV/bin/python")
MAIN="the kernels select_kernel can pick, the library, the CLI, tests and benchmarks"
# What test adds to the main tree: every GPU schedule variant (bench/gpu_check.sh
# compares them; tests/test_gpu_check.py runs its flow) and the CPU kernels
# cross-generated for arm-64-linux (a check that every kernel generates for it).
CHECK_OPTIONS=(-DATTEND_ALL_GPU_VARIANTS=ON -DATTEND_CROSS_TARGETS=arm-64-linux)

case "${1:-build}" in
    build)
        build "$BUILD" "$MAIN" 16 "${PYTHON_OPTIONS[@]}"
        say "built: $BUILD/bin/attend, $BUILD/runtime/libattend.so" ;;
    demo)
        build "$BUILD" "$MAIN" 15 --target attend_cli
        "$BUILD/bin/attend" demo ;;
    test)
        build "$BUILD" "$MAIN, every GPU variant and the arm-64 cross-generated kernels" 19 "${CHECK_OPTIONS[@]}" \
            "${PYTHON_OPTIONS[@]}"
        run_tests ;;
    bench)
        shift
        build "$BUILD" "$MAIN" 16
        "$BUILD/bench/attend_bench" --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true \
            --benchmark_report_aggregates_only=true "$@" ;;
    tune)
        shift
        build "$BUILD" "$MAIN" 16
        "$VENV/bin/python" "$ROOT/tools/tune.py" --build "$BUILD" "$@" ;;
    fuzz)
        build "$BUILD" "$MAIN" 16
        run_fuzz "${2:-600}" ;;
    *) echo "usage: $0 [build|demo|test|bench|tune [ARGS]|fuzz [SECONDS]]" >&2; exit 2 ;;
esac
KERNEL_CACHE="$(cmake_cache_value "$BUILD" ATTEND_KERNEL_CACHE)"
[ -z "$KERNEL_CACHE" ] || "$VENV/bin/python" "$ROOT/tools/kernel_cache.py" prune "$KERNEL_CACHE" "$KERNEL_CACHE_MAX_MIB"
