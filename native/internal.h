/* What the kernel files share with each other but not with Python: bf16 conversions, the int8
 * activations, the weight formats, and the matmul helpers layer_step.c calls. The functions
 * declared here are hidden: the library exports only what dsmoe_native.h declares. */
#ifndef DSMOE_NATIVE_INTERNAL_H
#define DSMOE_NATIVE_INTERNAL_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dsmoe_native.h"

#define DSMOE_HIDDEN __attribute__((visibility("hidden")))

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                         /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* This thread's scratch of n floats, inside a parallel region: NULL when out of memory, and then
 * *failed (shared by the team) is set, so the caller can skip its work and report -2. */
static inline float *thread_scratch(int64_t n, int *failed) {
    float *p = malloc((size_t)n * sizeof(float));
    if (!p) {
#pragma omp atomic write
        *failed = 1;
    }
    return p;
}

/* n fp32 values into bf16, each as f32_to_bf16 rounds it, 8 at a time (defined in matmul.c): the
 * scalar loop was 2-4% of a prefill, where every matmul's output goes through it. */
DSMOE_HIDDEN void floats_to_bf16(const float *src, int64_t n, uint16_t *dst);

/* Columns n0..n1 of the fp32 rows acc [m, n] into out [m, n], as fp32 (out_f32) or rounded to bf16. */
static inline void store_rows(void *out, int out_f32, const float *acc, int64_t m, int64_t n, int64_t n0, int64_t n1) {
    for (int64_t i = 0; i < m; i++) {
        if (out_f32)
            memcpy((float *)out + i * n + n0, acc + i * n + n0, (size_t)(n1 - n0) * sizeof(float));
        else
            floats_to_bf16(acc + i * n + n0, n1 - n0, (uint16_t *)out + i * n + n0);
    }
}

/* 8 bf16 -> 8 fp32. */
__attribute__((target("avx2,fma"))) static inline __m256 load8_bf16(const uint16_t *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Ask for the weight bytes PREFETCH_AHEAD past p, for the one-activation-row kernels whose work per
 * weight byte (unpacking 4-bit or 6-bit codes, widening bf16) keeps them from issuing reads early
 * enough to stream memory: with it, 2 Zen 3 cores read 36-45 GB/s in them instead of 29-39
 * (docs/PERFORMANCE.md; 4 to 16 KB ahead measured alike, 2 KB gained little). On Zen 4 the VNNI q6
 * kernel gained 3-9% from it and the VNNI one-row 4-bit one nothing (0.95-1.01x at 0.5-32 KB), so
 * only the former has it; the VNNI 4-bit rows kernel's first group of rows, which reads each tile
 * from memory in a short prefill, made 64-token prefills 1.11-1.16x faster with it (2-8 KB ahead;
 * every group prefetching, 1.06x). The int8 rows kernels stream at the memory's speed without it.
 * A prefetch never faults, so reading past the end of a weight is harmless; the address is formed
 * as an integer, outside any object. always_inline: gcc drops a call to it that it does not inline
 * (it sees no effect), which bf16.c's did. */
#define PREFETCH_AHEAD 8192
__attribute__((always_inline)) static inline void prefetch_ahead(const void *p) {
    _mm_prefetch((const char *)((uintptr_t)p + PREFETCH_AHEAD), _MM_HINT_T0);
}

/* Activations rounded to int8: q, and per block of DSMOE_ACT_BLOCK a scale and sum(q) (for the
 * 4-bit kernels). */
typedef struct {
    int8_t *q;
    float *scale;
    int32_t *sum;
} qacts;

/* What a weight is: LLM.int8 (lut NULL; scale = SCB / 127 per row) or 4-bit (lut and unit from the
 * codebook, scale = absmax_t). */
typedef struct {
    const uint8_t *lut;
    float unit;
    int64_t blocksize;
} wformat;

/* ---- matmul.c, for layer_step.c -------------------------------------------------------------- */

/* Room for m rows of k activations; 0 when out of memory (free_acts frees what was allocated). */
DSMOE_HIDDEN int alloc_acts(qacts *a, int64_t m, int64_t k);
DSMOE_HIDDEN void free_acts(qacts *a);

/* x [m, k] bf16 rounded into a; tmp is fp32 scratch of k values. */
DSMOE_HIDDEN __attribute__((target("avx2,fma"))) void quantize_bf16_rows(const uint16_t *x, int64_t m, int64_t k,
                                                                         qacts *a, float *tmp);

/* Whether the kernels take a weight [n, k] of format f on this CPU. */
DSMOE_HIDDEN int shape_ok(const wformat *f, int64_t n, int64_t k);

/* Rows of `count` (at most 4) weights of width k for one activation row as one task list, split
 * into contiguous runs per thread: y[i] gets weight i's n[i] outputs in bf16, as separate calls
 * would give them. An orphaned `omp for`: call it inside a parallel region. acc is fp32 scratch
 * of sum(n) values. */
DSMOE_HIDDEN void project_rows(const wformat *f, int64_t count, const void *const *w, const void *const *s,
                               const int64_t *n, int64_t k, const qacts *a, float *acc, uint16_t *const *y);

/* count SwiGLU MLPs on one bf16 token x (at most DSMOE_MAX_MLPS), the first `mixed` of them summed
 * into out with the weights mix, the others' outputs to y (matmul.c says how). */
DSMOE_HIDDEN int swiglu_batch(const wformat *f, int64_t count, int64_t hidden, const int64_t *inter,
                              const uint16_t *x, const void *const *weights, int64_t mixed, const float *mix,
                              uint16_t *out, uint16_t *y);

#endif
