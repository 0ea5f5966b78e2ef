#!/usr/bin/env bash
# Attend's quick start. Installs what is missing (Debian packages; Halide 21,
# CMake and ninja from PyPI into ./.venv), builds the kernels for this machine,
# then:
#   ./build.sh demo    run `attend demo`: every kernel against the double-precision
#                      reference on a naturalspeech2-like batch, with its speed
#   ./build.sh test    run the whole test suite (ctest), then again with the runtime,
#                      CLI and tests built under AddressSanitizer + UBSan (build-sanitize/),
#                      then under ThreadSanitizer with the kernels too (build-tsan/)
#   ./build.sh bench   run the CPU benchmark (GFLOP/s and fraction of the FMA peak)
#   ./build.sh tune [ARGS]  search the CPU schedule knobs for this machine (tools/tune.py;
#                      --help for its flags) and write tuning/cpu.json; then ./build.sh
#                      rebuilds the kernels with the tuned parameters
#   ./build.sh fuzz [SECONDS]  build the libFuzzer harnesses with clang (build-fuzz/), replay
#                      their saved corpus, then fuzz each for SECONDS (default 600)
#   ./build.sh         just build
# Every step is idempotent: a second run installs nothing and rebuilds only what changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
BUILD="${ATTEND_BUILD_DIR:-$ROOT/build}"
# pocl-opencl-icd: an OpenCL device on the CPU, so the GPU schedule is tested without a GPU.
APT_PACKAGES=(g++ python3 python3-venv doctest-dev libdlpack-dev nlohmann-json3-dev libcli11-dev libbenchmark-dev
              ocl-icd-opencl-dev pocl-opencl-icd clang libclang-rt-dev clang-16 libclang-rt-16-dev llvm)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

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

install_python_tools() {
    [ -x "$VENV/bin/python" ] || { say "creating $VENV"; python3 -m venv "$VENV"; }
    local stamp="$VENV/.attend-requirements"
    if ! cmp -s "$ROOT/requirements.txt" "$stamp"; then
        say "installing Halide 21, CMake and ninja into $VENV"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt"
        cp "$ROOT/requirements.txt" "$stamp"
    fi
}

# build DIR [cmake options...]: configure once, then build what changed.
build() {
    local dir="$1"
    shift
    if [ ! -f "$dir/build.ninja" ]; then
        local halide_dir
        halide_dir="$("$VENV/bin/python" -c 'import halide; print(halide.install_dir())')/lib64/cmake/Halide"
        say "configuring $dir"
        "$VENV/bin/cmake" -S "$ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
            -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" -DHalide_DIR="$halide_dir" "$@"
    fi
    say "building $dir (the kernels take a few minutes the first time)"
    "$VENV/bin/cmake" --build "$dir"
}

# fuzz SECONDS: the saved corpus as regression inputs, then SECONDS of fuzzing per
# harness (new inputs go to a scratch copy; the saved corpus stays as it is).
run_fuzz() {
    local seconds="$1" fuzz="$ROOT/build-fuzz"
    CC=clang CXX=clang++ build "$fuzz" -DATTEND_FUZZ=ON -DATTEND_SANITIZE=address,undefined,fuzzer-no-link \
        -DATTEND_OPENCL=OFF -DATTEND_BUILD_TESTS=OFF -DATTEND_BUILD_BENCH=OFF -DATTEND_CROSS_TARGETS=
    for harness in forward npy; do
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

run_tests() {
    "$VENV/bin/ctest" --test-dir "$BUILD" --output-on-failure -j "$(nproc)"
    # The same suite with the project's own code under ASan + UBSan. The consumer
    # example links the installed library without sanitizers, so it runs above only.
    local sanitize="$ROOT/build-sanitize"
    build "$sanitize" -DATTEND_SANITIZE=address,undefined -DATTEND_BUILD_BENCH=OFF -DATTEND_CROSS_TARGETS=
    say "test suite under AddressSanitizer + UndefinedBehaviorSanitizer"
    # (The tuner's search and the install check run above only: neither is the project's C++.)
    "$VENV/bin/ctest" --test-dir "$sanitize" --output-on-failure -j "$(nproc)" -E "install_and_consume|tune_search"
    # Again under ThreadSanitizer, the kernels and their Halide runtime (thread pool
    # included) instrumented too (Halide's tsan feature). clang 16: Halide 21's
    # instrumentation calls __tsan_memcpy, which gcc 12's TSan runtime lacks.
    local tsan="$ROOT/build-tsan"
    CC=clang-16 CXX=clang++-16 build "$tsan" -DATTEND_SANITIZE=thread -DATTEND_BUILD_BENCH=OFF -DATTEND_CROSS_TARGETS=
    say "test suite under ThreadSanitizer"
    TSAN_OPTIONS="halt_on_error=1 external_symbolizer_path=$(command -v llvm-symbolizer)" \
        "$VENV/bin/ctest" --test-dir "$tsan" --output-on-failure -j "$(nproc)" -E "install_and_consume|tune_search"
    # A short bounded fuzzing run of the API and the .npy reader (ASan + UBSan).
    run_fuzz 30
}

install_debian_packages
install_python_tools
build "$BUILD"

case "${1:-build}" in
    build) say "built: $BUILD/bin/attend, $BUILD/runtime/libattend.so" ;;
    demo) "$BUILD/bin/attend" demo ;;
    test) run_tests ;;
    bench)
        shift
        "$BUILD/bench/attend_bench" --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true \
            --benchmark_report_aggregates_only=true "$@" ;;
    tune)
        shift
        "$VENV/bin/python" "$ROOT/tools/tune.py" --build "$BUILD" "$@" ;;
    fuzz) run_fuzz "${2:-600}" ;;
    *) echo "usage: $0 [build|demo|test|bench|tune [ARGS]|fuzz [SECONDS]]" >&2; exit 2 ;;
esac
