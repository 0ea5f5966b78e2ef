// mem_bw: the streaming read bandwidth of this machine's memory over all the
// OpenMP threads, in GB/s (1e9 bytes per second): the roofline of the
// bandwidth-bound shapes (decoding: a few queries over a long KV cache read
// every key and value once per call).
//
// The buffer (default 1024 MiB, far larger than any cache) is split into one
// contiguous slice per thread; each thread first writes its own slice (so on a
// NUMA machine its pages sit on its node) and then, in every timed pass, reads
// it once from start to end, summing 16-byte words into four independent
// accumulators: loads, not additions, are the bottleneck. The fastest of
// several passes is reported: noise only ever lowers a throughput measurement.
//
//   cc -O2 -fopenmp mem_bw.c -o mem_bw && OMP_NUM_THREADS=N ./mem_bw [MiB]
//
// Prints exactly one line, "<threads> threads read <GB/s> GB/s over <MiB> MiB".
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define PASSES 6

typedef uint64_t words __attribute__((vector_size(16)));  // SSE2 / NEON register

// Thread `t` of `count` owns blocks [first, end) of `blocks`.
static void slice(size_t blocks, int t, int count, size_t *first, size_t *end) {
    *first = blocks * (size_t)t / (size_t)count;
    *end = blocks * (size_t)(t + 1) / (size_t)count;
}

int main(int argc, char **argv) {
    const long mib = argc > 1 ? atol(argv[1]) : 1024;
    if (mib <= 0) {
        fprintf(stderr, "usage: %s [MiB]  (buffer size, default 1024)\n", argv[0]);
        return 1;
    }
    const size_t bytes = (size_t)mib << 20;
    const size_t blocks = bytes / (4 * sizeof(words));  // 64-byte blocks: one cache line each
    words *buffer = aligned_alloc(4096, bytes);
    if (!buffer) {
        fprintf(stderr, "mem_bw: cannot allocate %ld MiB\n", mib);
        return 1;
    }
    double best = 0;
    int threads = 1;
    uint64_t checksum = 0;
#pragma omp parallel reduction(+ : checksum)
    {
        const int t = omp_get_thread_num();
#pragma omp single
        threads = omp_get_num_threads();
        size_t first, end;
        slice(blocks, t, threads, &first, &end);
        for (size_t i = 4 * first; i < 4 * end; i++) buffer[i] = (words){i, i ^ 0x5555};
        for (int pass = 0; pass < PASSES; pass++) {
            static double start;  // shared: written by one thread between barriers
#pragma omp barrier
#pragma omp single
            start = omp_get_wtime();  // implicit barrier: everyone starts after this
            words a = {0, 0}, b = {0, 0}, c = {0, 0}, d = {0, 0};
            for (const words *p = buffer + 4 * first, *stop = buffer + 4 * end; p < stop; p += 4) {
                a += p[0];
                b += p[1];
                c += p[2];
                d += p[3];
            }
            a += b + c + d;
            checksum += a[0] + a[1];
#pragma omp barrier
#pragma omp single
            {
                double rate = (double)bytes / (omp_get_wtime() - start) * 1e-9;
                if (rate > best) best = rate;
            }
        }
    }
    printf("%d threads read %.1f GB/s over %ld MiB\n", threads, best, mib);
    free(buffer);
    return checksum == 42;  // the sums are used; (practically) never true
}
