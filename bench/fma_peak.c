// fma_peak: the fp32 fused multiply-add throughput of this machine over all
// the OpenMP threads, in GFLOP/s (one FMA = 2 flops per lane). It is the ceiling
// that the benchmarks state their figures against (attend_bench, compare_*.py,
// tools/tune.py), so they run it in the same session as the kernels.
//
// Each thread runs ACC independent accumulator chains, acc = acc * M + C, on
// the widest vector ISA the CPU reports at run time: AVX-512F (16 lanes) if
// present, else AVX2+FMA (8 lanes). Enough chains keep every FMA pipe busy in
// spite of the instruction latency; the values converge to C / (1 - M) = 1, so
// they never become denormal or infinite. The best of several timed rounds is
// reported: noise only ever lowers a throughput measurement.
//
//   cc -O2 -fopenmp fma_peak.c -o fma_peak && OMP_NUM_THREADS=N ./fma_peak
//
// Prints exactly one line, "<threads> <isa> <GFLOP/s>", e.g. "32 avx512 4012.5";
// <isa> is avx512, avx2 or generic (no x86 FMA: portable vector code).
#include <omp.h>
#include <stdio.h>

#define ROUNDS 5          // timed rounds; the fastest counts
#define STEPS 50000000L   // loop trips per thread and round (each: 2 FMAs per chain)

#define M_FACTOR 0.9990234375f  // 1 - 2^-10: exact in binary
#define C_ADDEND 0.0009765625f  // 2^-10

// Repeats a statement once per accumulator; ACC names the accumulator.
#define EACH12(S) S(0) S(1) S(2) S(3) S(4) S(5) S(6) S(7) S(8) S(9) S(10) S(11)
#define EACH16(S) EACH12(S) S(12) S(13) S(14) S(15)

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

// AVX2 has 16 ymm registers: 12 chains plus the two constants fit. At a
// latency of 4-5 cycles and two FMA pipes, 10 chains already saturate.
#define AVX2_INIT(i) __m256 acc##i = _mm256_set1_ps(0.5f + 0.01f * (i));
#define AVX2_STEP(i) acc##i = _mm256_fmadd_ps(acc##i, mul, add);
#define AVX2_KEEP(i) , "+x"(acc##i)
#define AVX2_FOLD(i) total = _mm256_add_ps(total, acc##i);

__attribute__((target("avx2,fma"))) static float chains_avx2(long steps) {
    __m256 mul = _mm256_set1_ps(M_FACTOR), add = _mm256_set1_ps(C_ADDEND);
    EACH12(AVX2_INIT)
    for (long s = 0; s < steps; s++) {
        EACH12(AVX2_STEP)
        EACH12(AVX2_STEP)
        // Opaque to the optimiser: the chains stay in registers, in this order.
        __asm__ volatile("" : "+x"(mul) EACH12(AVX2_KEEP));
    }
    __m256 total = _mm256_setzero_ps();
    EACH12(AVX2_FOLD)
    float lanes[8];
    _mm256_storeu_ps(lanes, total);
    return lanes[0] + lanes[7];
}

// AVX-512 has 32 zmm registers: 16 chains.
#define AVX512_INIT(i) __m512 acc##i = _mm512_set1_ps(0.5f + 0.01f * (i));
#define AVX512_STEP(i) acc##i = _mm512_fmadd_ps(acc##i, mul, add);
#define AVX512_KEEP(i) , "+v"(acc##i)
#define AVX512_FOLD(i) total = _mm512_add_ps(total, acc##i);

__attribute__((target("avx512f"))) static float chains_avx512(long steps) {
    __m512 mul = _mm512_set1_ps(M_FACTOR), add = _mm512_set1_ps(C_ADDEND);
    EACH16(AVX512_INIT)
    for (long s = 0; s < steps; s++) {
        EACH16(AVX512_STEP)
        EACH16(AVX512_STEP)
        // (Two statements: an asm takes at most 30 operands, "+" counts twice.)
        __asm__ volatile("" : "+v"(mul) AVX512_KEEP(0) AVX512_KEEP(1) AVX512_KEEP(2) AVX512_KEEP(3)
                         AVX512_KEEP(4) AVX512_KEEP(5) AVX512_KEEP(6) AVX512_KEEP(7));
        __asm__ volatile("" : "+v"(add) AVX512_KEEP(8) AVX512_KEEP(9) AVX512_KEEP(10) AVX512_KEEP(11)
                         AVX512_KEEP(12) AVX512_KEEP(13) AVX512_KEEP(14) AVX512_KEEP(15));
    }
    __m512 total = _mm512_setzero_ps();
    EACH16(AVX512_FOLD)
    float lanes[16];
    _mm512_storeu_ps(lanes, total);
    return lanes[0] + lanes[15];
}
#endif

// Elsewhere (no x86): 4-lane vectors in GCC's vector extension; a * b + c
// contracts to the target's FMA instruction (-ffp-contract=fast, GCC's default).
typedef float vec4 __attribute__((vector_size(16)));
#define GEN_INIT(i) vec4 acc##i = {0.5f + 0.01f * (i), 0.5f, 0.5f, 0.5f};
#define GEN_STEP(i) acc##i = acc##i * mul + add;
#define GEN_KEEP(i) , "+w"(acc##i)
#define GEN_FOLD(i) total += acc##i[0];

static float chains_generic(long steps) {
    vec4 mul = {M_FACTOR, M_FACTOR, M_FACTOR, M_FACTOR}, add = {C_ADDEND, C_ADDEND, C_ADDEND, C_ADDEND};
    EACH12(GEN_INIT)
    for (long s = 0; s < steps; s++) {
        EACH12(GEN_STEP)
        EACH12(GEN_STEP)
#if defined(__aarch64__)
        __asm__ volatile("" : "+w"(mul) EACH12(GEN_KEEP));
#endif
    }
    float total = 0;
    EACH12(GEN_FOLD)
    return total;
}

enum isa { GENERIC, AVX2, AVX512 };

static enum isa widest_isa(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
#endif
    return GENERIC;
}

// One thread's chains; returns the flops it did.
static double run_chains(enum isa isa, long steps, float *sink) {
    switch (isa) {
#if defined(__x86_64__) || defined(__i386__)
    case AVX512: *sink += chains_avx512(steps); return 2.0 * 2 * 16 * 16 * (double)steps;
    case AVX2: *sink += chains_avx2(steps); return 2.0 * 2 * 12 * 8 * (double)steps;
#endif
    default: *sink += chains_generic(steps); return 2.0 * 2 * 12 * 4 * (double)steps;
    }
}

int main(void) {
    const enum isa isa = widest_isa();
    static const char *const names[] = {"generic", "avx2", "avx512"};
    double best = 0;
    int threads = 1;
    float sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
#pragma omp single
        threads = omp_get_num_threads();
        run_chains(isa, STEPS / 50, &sink);  // warm-up: clocks, licence levels, page faults
        for (int round = 0; round < ROUNDS; round++) {
            static double start;  // shared: written by one thread between barriers
#pragma omp barrier
#pragma omp single
            start = omp_get_wtime();  // implicit barrier: everyone starts after this
            double flops = run_chains(isa, STEPS, &sink);
#pragma omp barrier
#pragma omp single
            {
                double rate = flops * threads / (omp_get_wtime() - start) * 1e-9;
                if (rate > best) best = rate;
            }
        }
    }
    printf("%d %s %.1f\n", threads, names[isa], best);
    return sink == -1.0f;  // the chains' results are used; never true
}
