/* This CPU's int8 compute limit, the ceiling prefill is measured against (docs/PERFORMANCE.md,
 * "Prefill against the compute limit (AVX512-VNNI)" and "Fast by default on an AVX2-only CPU,
 * again").
 *
 * Two loops, each timed in thread CPU time:
 *   - the clock: a chain of dependent 64-bit adds (one cycle each on every x86 core since the
 *     Pentium 4), so adds per second is cycles per second. For a VM where `perf stat -e cycles`
 *     is not supported.
 *   - the limit: the kernels' integer dot product on register-resident operands with ACCS
 *     independent accumulators, enough to cover its latency, so only its throughput counts. With
 *     AVX512-VNNI, vpdpbusd zmm: 16 lanes x 4 byte products = 64 multiply-adds. With AVX2 alone,
 *     what the AVX2 kernels run instead (matmul.c): vpmaddubsw, then vpmaddwd by ones and vpaddd
 *     into the accumulator, 8 lanes x 4 = 32 multiply-adds (the kernels' vpsignb is left out).
 * The loop runs on 1 thread and on every OpenMP thread (OMP_NUM_THREADS), each thread its own
 * copy, and reports MACs per second and per cycle. With AVX2, a third loop, 1 thread, adds the
 * vpsignb that moves the activation's sign onto the weight (matmul.c, DOT4_AVX2): what the AVX2
 * kernels' own step can reach, the ceiling their share of the limit is up against.
 *
 *   gcc -O2 -fopenmp benchmarks/int8_peak.c -o /tmp/int8_peak
 *   OMP_NUM_THREADS=2 nice -n 10 /tmp/int8_peak
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define ACCS 12
#define MACS_PER_DPBUSD 64
#define MACS_PER_MADD_PAIR 32

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Cycles per second: `iters` dependent adds, unrolled 8 to a loop trip so the loop's own
 * increment and branch run beside the chain. */
static double clock_hz(int64_t iters) {
    uint64_t v = 0;
    const double t0 = now();
    for (int64_t i = 0; i < iters; i += 8)
        __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
                         "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0"
                         : "+r"(v));
    const double t1 = now();
    return (double)iters / (t1 - t0) + 0.0 * (double)v;
}

/* `iters` rounds of ACCS independent vpdpbusd zmm; returns seconds. The accumulators are named
 * variables, and the empty asm pins them to registers, so the loop is 12 vpdpbusd and a branch. */
#define DP(r) r = _mm512_dpbusd_epi32(r, a, b)
__attribute__((noinline, target("avx512f,avx512vnni"))) static double dpbusd_loop(int64_t iters, int32_t *sink) {
    __m512i r0 = _mm512_set1_epi32(0), r1 = _mm512_set1_epi32(1), r2 = _mm512_set1_epi32(2),
            r3 = _mm512_set1_epi32(3), r4 = _mm512_set1_epi32(4), r5 = _mm512_set1_epi32(5),
            r6 = _mm512_set1_epi32(6), r7 = _mm512_set1_epi32(7), r8 = _mm512_set1_epi32(8),
            r9 = _mm512_set1_epi32(9), r10 = _mm512_set1_epi32(10), r11 = _mm512_set1_epi32(11);
    const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
    const double t0 = now();
    for (int64_t it = 0; it < iters; it++) {
        DP(r0), DP(r1), DP(r2), DP(r3), DP(r4), DP(r5), DP(r6), DP(r7), DP(r8), DP(r9), DP(r10), DP(r11);
        __asm__ volatile("" : "+v"(r0), "+v"(r1), "+v"(r2), "+v"(r3), "+v"(r4), "+v"(r5), "+v"(r6), "+v"(r7),
                         "+v"(r8), "+v"(r9), "+v"(r10), "+v"(r11));
    }
    const double t1 = now();
    __m512i total = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(r0, r1), _mm512_add_epi32(r2, r3)),
                                     _mm512_add_epi32(_mm512_add_epi32(r4, r5), _mm512_add_epi32(r6, r7)));
    total = _mm512_add_epi32(total, _mm512_add_epi32(_mm512_add_epi32(r8, r9), _mm512_add_epi32(r10, r11)));
    *sink = _mm512_reduce_add_epi32(total);
    return t1 - t0;
}

/* The same for AVX2's pair: ACCS chains of vpmaddubsw, vpmaddwd by ones, vpaddd (STEP MADD), or
 * the AVX2 kernels' whole step (SIGNED_MADD): vpsignb(w, x) first, then vpmaddubsw(|x|, that) and
 * the rest. Each chain's operands are rewritten by an empty asm after every four, so no two
 * products are the same expression for the compiler to merge. */
#define MADD(r, x) r = _mm256_add_epi32(r, _mm256_madd_epi16(_mm256_maddubs_epi16(x, b), ones))
#define SIGNED_MADD(r, x) \
    r = _mm256_add_epi32(r, _mm256_madd_epi16(_mm256_maddubs_epi16(x, _mm256_sign_epi8(b, x)), ones))
#define DEFINE_AVX2_LOOP(NAME, STEP)                                                                              \
    __attribute__((noinline, target("avx2"))) static double NAME(int64_t iters, int32_t *sink) {                  \
        __m256i r0 = _mm256_set1_epi32(0), r1 = r0, r2 = r0, r3 = r0, r4 = r0, r5 = r0, r6 = r0, r7 = r0, r8 = r0, \
                r9 = r0, r10 = r0, r11 = r0;                                                                       \
        __m256i a0 = _mm256_set1_epi8(1), a1 = _mm256_set1_epi8(2), a2 = _mm256_set1_epi8(3),                      \
                a3 = _mm256_set1_epi8(4);                                                                          \
        const __m256i b = _mm256_set1_epi8(-2), ones = _mm256_set1_epi16(1);                                       \
        const double t0 = now();                                                                                   \
        for (int64_t it = 0; it < iters; it++) {                                                                   \
            __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3));                                         \
            STEP(r0, a0), STEP(r1, a1), STEP(r2, a2), STEP(r3, a3);                                                \
            __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3));                                         \
            STEP(r4, a0), STEP(r5, a1), STEP(r6, a2), STEP(r7, a3);                                                \
            __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3));                                         \
            STEP(r8, a0), STEP(r9, a1), STEP(r10, a2), STEP(r11, a3);                                              \
        }                                                                                                          \
        const double t1 = now();                                                                                   \
        __m256i total = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(r0, r1), _mm256_add_epi32(r2, r3)),     \
                                         _mm256_add_epi32(_mm256_add_epi32(r4, r5), _mm256_add_epi32(r6, r7)));    \
        total = _mm256_add_epi32(total, _mm256_add_epi32(_mm256_add_epi32(r8, r9), _mm256_add_epi32(r10, r11)));   \
        *sink = _mm256_extract_epi32(total, 0);                                                                    \
        return t1 - t0;                                                                                            \
    }
DEFINE_AVX2_LOOP(maddubs_loop, MADD)
DEFINE_AVX2_LOOP(signed_maddubs_loop, SIGNED_MADD)

/* The loop this CPU's kernels run, and the multiply-adds one of its ACCS steps does. */
static double int8_loop(int vnni, int64_t iters, int32_t *sink) {
    return vnni ? dpbusd_loop(iters, sink) : maddubs_loop(iters, sink);
}

int main(void) {
    const int64_t add_iters = 2000000000, dp_iters = 200000000;
    double hz = 0.0;
    for (int r = 0; r < 3; r++) {
        const double h = clock_hz(add_iters);
        hz = h > hz ? h : hz;
    }
    printf("clock (dependent adds): %.3f GHz\n", hz * 1e-9);
    __builtin_cpu_init();
    const int vnni = __builtin_cpu_supports("avx512vnni");
    printf("loop: %s\n", vnni ? "vpdpbusd zmm (AVX512-VNNI)" : "vpmaddubsw + vpmaddwd + vpaddd ymm (AVX2)");
    const double macs_per_run = (double)dp_iters * ACCS * (vnni ? MACS_PER_DPBUSD : MACS_PER_MADD_PAIR);
    int32_t sink = 0;
    double best1 = 1e30;
    for (int r = 0; r < 3; r++) {
        const double s = int8_loop(vnni, dp_iters, &sink);
        best1 = s < best1 ? s : best1;
    }
    printf("1 thread:  %.1f GMAC/s, %.1f MACs/cycle\n", macs_per_run / best1 * 1e-9, macs_per_run / best1 / hz);
    const int team = omp_get_max_threads();
    double worst = 0.0;
#pragma omp parallel reduction(max : worst)
    {
        int32_t mine = 0;
        double best = 1e30;
        for (int r = 0; r < 3; r++) {
#pragma omp barrier
            const double s = int8_loop(vnni, dp_iters, &mine);
            best = s < best ? s : best;
        }
        worst = best;
        sink += 0 * mine;
    }
    printf("%d threads: %.1f GMAC/s in all (%.1f MACs/cycle a core)\n", team, team * macs_per_run / worst * 1e-9,
           macs_per_run / worst / hz);
    if (!vnni) {
        double signed_best = 1e30;
        for (int r = 0; r < 3; r++) {
            const double s = signed_maddubs_loop(dp_iters, &sink);
            signed_best = s < signed_best ? s : signed_best;
        }
        printf("with vpsignb (the AVX2 kernels' step), 1 thread: %.1f GMAC/s, %.1f MACs/cycle\n",
               macs_per_run / signed_best * 1e-9, macs_per_run / signed_best / hz);
    }
    return sink == 12345 ? 1 : 0;
}
