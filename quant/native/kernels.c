/* dsmoe native kernels for the decode step: 8-bit weights times int8-quantized activations, and
 * one call per SwiGLU MLP (8-bit here, 4-bit through bitsandbytes' own CPU kernel).
 *
 *   y[m, n] = scale[n] * sum_b xscale[m, b] * sum_{k in block b} xq[m, k] * w[n, k]
 *
 * 8-bit weights are LLM.int8's, int8 [n, k] with scale[n] = SCB / 127, the checkpoint's layout.
 * Activations are rounded to int8 in blocks of 64 with one fp32 scale per block (like llama.cpp's
 * Q8_0 activations), so integer dot products do the work: AVX512-VNNI's vpdpbusd where the CPU
 * has it, AVX2's vpmaddubsw otherwise. Both multiply unsigned by signed bytes, so the activation
 * goes in as |xq| and its sign moves onto the weight (vpsignb); |xq| <= 127 keeps vpmaddubsw's
 * 16-bit pair sums from saturating (2 * 127 * 127 < 32767), so both give the same integers.
 *
 * A 4-bit version of the same scheme (codebook times 127 in a vpshufb table) was measured: it was
 * no faster than bitsandbytes' kernel for one row and 2x slower for 16-64 rows, so 4-bit MLPs
 * call bitsandbytes' kernel, whose address the caller passes in.
 *
 * Plain C with no Python headers: dsmoe loads it with ctypes. Output rows are split across
 * OpenMP threads, which share libgomp with PyTorch, so torch.set_num_threads governs them too.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QBLOCK 64
#define ROWS_PER_TASK 16

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

/* 1 when the CPU can run the VNNI path, 2 for the AVX2 path, 0 for neither. */
static int detect_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return 1;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 2;
    return 0;
}

static int chosen_isa = -1;

/* The instruction set the kernels use (1 VNNI, 2 AVX2, 0 none). */
int dsmoe_native_isa(void) {
    if (chosen_isa < 0) chosen_isa = detect_isa();
    return chosen_isa;
}

/* Run the AVX2 path on a VNNI machine (isa = 2), so tests compare the two; -1 detects again.
 * Returns the instruction set now in use; asking for one the CPU lacks changes nothing. */
int dsmoe_native_use_isa(int isa) {
    const int best = detect_isa();
    chosen_isa = isa < 0 || (best == 2 && isa == 1) || best == 0 ? best : isa;
    return chosen_isa;
}

/* Activations rounded to int8: |q|, q and a scale per block of 64. */
typedef struct {
    uint8_t *abs;
    int8_t *q;
    float *scale;
} qacts;

/* One row of k fp32 values into |q|, q and a scale per block of 64. */
static void quantize_row(const float *x, int64_t k, uint8_t *xabs, int8_t *xq, float *scale) {
    for (int64_t b = 0; b < k / QBLOCK; b++) {
        const float *v = x + b * QBLOCK;
        float amax = 0.0f;
        for (int i = 0; i < QBLOCK; i++) amax = fmaxf(amax, fabsf(v[i]));
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        scale[b] = amax / 127.0f;
        for (int i = 0; i < QBLOCK; i++) {
            int q = (int)nearbyintf(v[i] * inv);
            q = q > 127 ? 127 : (q < -127 ? -127 : q);
            xq[b * QBLOCK + i] = (int8_t)q;
            xabs[b * QBLOCK + i] = (uint8_t)(q < 0 ? -q : q);
        }
    }
}

__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The row loop, written once per instruction set: DOT(acc32, |x|, signed w). One weight row at a
 * time reads the weight as one sequential stream, which measured fastest: 31 GB/s for lm_head
 * against 18-21 GB/s with 2-8 rows interleaved, with or without software prefetch. */
#define XABS(a, h) _mm256_loadu_si256((const __m256i *)((a).abs + (h)))
#define XQ(a, h) _mm256_loadu_si256((const __m256i *)((a).q + (h)))

#define DEFINE_ROWS(SUFFIX, TARGET, DOT)                                                             \
    /* out[i, n] for rows n0..n1 of the weight and m activation rows, fp32, before scale[n]. */        \
    __attribute__((target(TARGET))) static void rows_##SUFFIX(int64_t n0, int64_t n1, int64_t k,       \
                                                               int64_t m, const qacts *xs,              \
                                                               const int8_t *w, float *out, int64_t ld) { \
        for (int64_t n = n0; n < n1; n++) {                                                             \
            const int8_t *row = w + n * k;                                                              \
            for (int64_t i = 0; i < m; i++) {                                                           \
                const qacts a = {xs->abs + i * k, xs->q + i * k, xs->scale + i * (k / QBLOCK)};         \
                __m256 acc = _mm256_setzero_ps();                                                       \
                for (int64_t b = 0; b < k / QBLOCK; b++) {                                              \
                    const int64_t at = b * QBLOCK;                                                      \
                    const __m256i w0 = _mm256_loadu_si256((const __m256i *)(row + at));                 \
                    const __m256i w1 = _mm256_loadu_si256((const __m256i *)(row + at + 32));            \
                    __m256i d = DOT(_mm256_setzero_si256(), XABS(a, at), _mm256_sign_epi8(w0, XQ(a, at))); \
                    d = DOT(d, XABS(a, at + 32), _mm256_sign_epi8(w1, XQ(a, at + 32)));                 \
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(a.scale[b]), acc);      \
                }                                                                                       \
                out[i * ld + n] = hsum256(acc);                                                         \
            }                                                                                           \
        }                                                                                               \
    }

#define DOT_VNNI(acc, a, b) _mm256_dpbusd_epi32((acc), (a), (b))
#define DOT_AVX2(acc, a, b) \
    _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((a), (b)), _mm256_set1_epi16(1)))

DEFINE_ROWS(vnni, "avx512f,avx512bw,avx512vl,avx512vnni,fma", DOT_VNNI)
DEFINE_ROWS(avx2, "avx2,fma", DOT_AVX2)

/* Rows n0..n1 of y = x @ (w * scale).T into out (row stride ld), fp32. */
static void weight_rows(int isa, const int8_t *w, const float *scale, int64_t k, int64_t n0, int64_t n1,
                        int64_t m, const qacts *xs, float *out, int64_t ld) {
    if (isa == 1)
        rows_vnni(n0, n1, k, m, xs, w, out, ld);
    else
        rows_avx2(n0, n1, k, m, xs, w, out, ld);
    for (int64_t i = 0; i < m; i++)
        for (int64_t n = n0; n < n1; n++) out[i * ld + n] *= scale[n];
}

static int alloc_acts(qacts *a, int64_t m, int64_t k) {
    a->abs = malloc((size_t)(m * k));
    a->q = malloc((size_t)(m * k));
    a->scale = malloc((size_t)(m * (k / QBLOCK)) * sizeof(float));
    return a->abs && a->q && a->scale;
}

static void free_acts(qacts *a) { free(a->abs), free(a->q), free(a->scale); }

static void quantize_bf16_rows(const uint16_t *x, int64_t m, int64_t k, qacts *a, float *tmp) {
    for (int64_t i = 0; i < m; i++) {
        for (int64_t j = 0; j < k; j++) tmp[j] = bf16_to_f32(x[i * k + j]);
        quantize_row(tmp, k, a->abs + i * k, a->q + i * k, a->scale + i * (k / QBLOCK));
    }
}

#define TASKS(rows) (((rows) + ROWS_PER_TASK - 1) / ROWS_PER_TASK)
#define TASK_END(n0, rows) ((n0) + ROWS_PER_TASK < (rows) ? (n0) + ROWS_PER_TASK : (rows))

/* y [m, n] = x [m, k] bf16 @ (w [n, k] int8 * scale[n]).T, written as bf16 (out_f32 = 0) or fp32.
 * Returns 0; -1 when the CPU has neither instruction set or k is not a multiple of 64; -2 when out
 * of memory. */
int dsmoe_int8_gemv(int64_t m, int64_t n, int64_t k, const uint16_t *x, const int8_t *w, const float *scale,
                    void *out, int out_f32) {
    const int isa = dsmoe_native_isa();
    if (isa == 0 || k % QBLOCK) return -1;
    qacts a;
    float *tmp = malloc((size_t)k * sizeof(float));
    float *acc = malloc((size_t)(m * n) * sizeof(float));
    if (!alloc_acts(&a, m, k) || !tmp || !acc) {
        free_acts(&a), free(tmp), free(acc);
        return -2;
    }
    quantize_bf16_rows(x, m, k, &a, tmp);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < TASKS(n); t++) {
        const int64_t n0 = t * ROWS_PER_TASK, n1 = TASK_END(n0, n);
        weight_rows(isa, w, scale, k, n0, n1, m, &a, acc, n);
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = n0; j < n1; j++) {
                if (out_f32)
                    ((float *)out)[i * n + j] = acc[i * n + j];
                else
                    ((uint16_t *)out)[i * n + j] = f32_to_bf16(acc[i * n + j]);
            }
    }
    free_acts(&a), free(tmp), free(acc);
    return 0;
}

/* One SwiGLU MLP for one token, 8-bit: out = down(silu(gate(x)) * up(x)), bf16 in and out, in one
 * call and one thread team (the decode step runs ~7 per layer). gate and up are [inter, hidden],
 * down [hidden, inter]; silu(g) * u stays in fp32 until it is rounded to int8 for down. */
int dsmoe_int8_mlp(int64_t hidden, int64_t inter, const uint16_t *x, const int8_t *gate, const float *gate_scale,
                   const int8_t *up, const float *up_scale, const int8_t *down, const float *down_scale,
                   uint16_t *out) {
    const int isa = dsmoe_native_isa();
    if (isa == 0 || hidden % QBLOCK || inter % QBLOCK) return -1;
    qacts xa, ha;
    float *tmp = malloc((size_t)hidden * sizeof(float));
    float *gu = malloc((size_t)(2 * inter) * sizeof(float));
    float *y = malloc((size_t)hidden * sizeof(float));
    const int ok = alloc_acts(&xa, 1, hidden) & alloc_acts(&ha, 1, inter);
    if (!ok || !tmp || !gu || !y) {
        free_acts(&xa), free_acts(&ha), free(tmp), free(gu), free(y);
        return -2;
    }
    quantize_bf16_rows(x, 1, hidden, &xa, tmp);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < 2 * TASKS(inter); t++) {
            const int is_up = t >= TASKS(inter);
            const int64_t n0 = (t % TASKS(inter)) * ROWS_PER_TASK, n1 = TASK_END(n0, inter);
            weight_rows(isa, is_up ? up : gate, is_up ? up_scale : gate_scale, hidden, n0, n1, 1, &xa,
                        gu + (is_up ? inter : 0), inter);
        }
#pragma omp single
        {
            for (int64_t j = 0; j < inter; j++) gu[j] = gu[j] / (1.0f + expf(-gu[j])) * gu[inter + j];
            quantize_row(gu, inter, ha.abs, ha.q, ha.scale);
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < TASKS(hidden); t++) {
            const int64_t n0 = t * ROWS_PER_TASK, n1 = TASK_END(n0, hidden);
            weight_rows(isa, down, down_scale, inter, n0, n1, 1, &ha, y, hidden);
            for (int64_t j = n0; j < n1; j++) out[j] = f32_to_bf16(y[j]);
        }
    }
    free_acts(&xa), free_acts(&ha), free(tmp), free(gu), free(y);
    return 0;
}

/* ---- 4-bit weights ---------------------------------------------------------------------------- */

/* 8 bf16 -> 8 fp32. */
__attribute__((target("avx2,fma"))) static inline __m256 load8_bf16(const uint16_t *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* NF4/FP4 weights in bitsandbytes' CPU layout, times one row of int8 activations, for tiles
 * t0..t1 of 32 output rows. In a tile, byte j * 32 + r * 2 + c holds row r's column 2j + c in its
 * low nibble and row r + 16's in its high one; absmax_t is [k / 64, n] bf16. `lut` maps a code to
 * round(127 * codebook value), so the weight is lut[code] * absmax / 127.
 * Two byte columns j, j + 1 give each row four consecutive columns once their 16-bit pairs are
 * interleaved (vpunpck{l,h}wd), which is what one int32 lane of a dot product wants; the
 * activations' four matching bytes are broadcast. The interleave leaves rows in the lane order
 * {0-3, 8-11}, {4-7, 12-15}, {16-19, 24-27}, {20-23, 28-31}, and the block scales follow it. */
#define DEFINE_TILES4(SUFFIX, TARGET, DOT)                                                              \
    __attribute__((target(TARGET))) static void tiles4_##SUFFIX(                                        \
        int64_t t0, int64_t t1, int64_t n, int64_t k, const qacts *xs, const uint8_t *w,                \
        const uint16_t *absmax_t, const int8_t *lut, float *out) {                                      \
        const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)lut));       \
        const __m256i low4 = _mm256_set1_epi8(0x0f);                                                    \
        for (int64_t t = t0; t < t1; t++) {                                                             \
            const uint8_t *tile = w + t * 16 * k;                                                       \
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
            for (int64_t b = 0; b < k / QBLOCK; b++) {                                                  \
                __m256i dot[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), \
                                  _mm256_setzero_si256()};                                              \
                for (int64_t jj = 0; jj < QBLOCK / 2; jj += 2) {                                        \
                    const uint8_t *p = tile + (b * (QBLOCK / 2) + jj) * 32;                             \
                    const __m256i b0 = _mm256_loadu_si256((const __m256i *)p);                          \
                    const __m256i b1 = _mm256_loadu_si256((const __m256i *)(p + 32));                   \
                    const __m256i lo0 = _mm256_shuffle_epi8(table, _mm256_and_si256(b0, low4));         \
                    const __m256i lo1 = _mm256_shuffle_epi8(table, _mm256_and_si256(b1, low4));         \
                    const __m256i hi0 = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(b0, 4), low4)); \
                    const __m256i hi1 = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(b1, 4), low4)); \
                    int32_t xa4, xq4;                                                                   \
                    memcpy(&xa4, xs->abs + b * QBLOCK + 2 * jj, 4);                                     \
                    memcpy(&xq4, xs->q + b * QBLOCK + 2 * jj, 4);                                       \
                    const __m256i xa = _mm256_set1_epi32(xa4), xq = _mm256_set1_epi32(xq4);             \
                    dot[0] = DOT(dot[0], xa, _mm256_sign_epi8(_mm256_unpacklo_epi16(lo0, lo1), xq));    \
                    dot[1] = DOT(dot[1], xa, _mm256_sign_epi8(_mm256_unpackhi_epi16(lo0, lo1), xq));    \
                    dot[2] = DOT(dot[2], xa, _mm256_sign_epi8(_mm256_unpacklo_epi16(hi0, hi1), xq));    \
                    dot[3] = DOT(dot[3], xa, _mm256_sign_epi8(_mm256_unpackhi_epi16(hi0, hi1), xq));    \
                }                                                                                       \
                const uint16_t *am = absmax_t + b * n + t * 32;                                         \
                const __m256 r0 = load8_bf16(am), r1 = load8_bf16(am + 8);                              \
                const __m256 r2 = load8_bf16(am + 16), r3 = load8_bf16(am + 24);                        \
                const __m256 xscale = _mm256_set1_ps(xs->scale[b] / 127.0f);                            \
                const __m256 scales[4] = {_mm256_permute2f128_ps(r0, r1, 0x20), _mm256_permute2f128_ps(r0, r1, 0x31), \
                                          _mm256_permute2f128_ps(r2, r3, 0x20), _mm256_permute2f128_ps(r2, r3, 0x31)}; \
                for (int g = 0; g < 4; g++)                                                             \
                    acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[g]), _mm256_mul_ps(scales[g], xscale), acc[g]); \
            }                                                                                           \
            float lanes[32];                                                                            \
            for (int g = 0; g < 4; g++) _mm256_storeu_ps(lanes + 8 * g, acc[g]);                       \
            for (int g = 0; g < 4; g++)                                                                 \
                for (int i = 0; i < 8; i++) out[t * 32 + (g / 2) * 16 + (g % 2) * 4 + (i / 4) * 8 + i % 4] = lanes[8 * g + i]; \
        }                                                                                               \
    }

DEFINE_TILES4(vnni, "avx512f,avx512bw,avx512vl,avx512vnni,fma", DOT_VNNI)
DEFINE_TILES4(avx2, "avx2,fma", DOT_AVX2)

/* A 4-bit weight as the kernels see it. */
typedef struct {
    int64_t n, k;
    const uint8_t *w;
    const uint16_t *absmax_t;
    const int8_t *lut;
} weight4;

static void tiles4(int isa, const weight4 *w, int64_t t0, int64_t t1, const qacts *xs, float *out) {
    if (isa == 1)
        tiles4_vnni(t0, t1, w->n, w->k, xs, w->w, w->absmax_t, w->lut, out);
    else
        tiles4_avx2(t0, t1, w->n, w->k, xs, w->w, w->absmax_t, w->lut, out);
}

/* y [n] = x [k] bf16 @ W.T for one token, W 4-bit in bitsandbytes' CPU layout with blocksize 64;
 * n must be a multiple of 32 and k of 64. Output bf16 (out_f32 = 0) or fp32. */
int dsmoe_4bit_gemv(int64_t n, int64_t k, const uint16_t *x, const uint8_t *w, const uint16_t *absmax_t,
                    const int8_t *lut, void *out, int out_f32) {
    const int isa = dsmoe_native_isa();
    if (isa == 0 || k % QBLOCK || n % 32) return -1;
    const weight4 weight = {n, k, w, absmax_t, lut};
    qacts a;
    float *tmp = malloc((size_t)k * sizeof(float));
    float *acc = malloc((size_t)n * sizeof(float));
    if (!alloc_acts(&a, 1, k) || !tmp || !acc) {
        free_acts(&a), free(tmp), free(acc);
        return -2;
    }
    quantize_bf16_rows(x, 1, k, &a, tmp);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n / 32; t++) {
        tiles4(isa, &weight, t, t + 1, &a, acc);
        for (int64_t j = t * 32; j < t * 32 + 32; j++) {
            if (out_f32)
                ((float *)out)[j] = acc[j];
            else
                ((uint16_t *)out)[j] = f32_to_bf16(acc[j]);
        }
    }
    free_acts(&a), free(tmp), free(acc);
    return 0;
}

/* The 4-bit SwiGLU MLP for one token, one call and one thread team, as dsmoe_int8_mlp. */
int dsmoe_4bit_mlp(int64_t hidden, int64_t inter, const uint16_t *x, const uint8_t *gate, const uint16_t *gate_absmax,
                   const uint8_t *up, const uint16_t *up_absmax, const uint8_t *down, const uint16_t *down_absmax,
                   const int8_t *lut, uint16_t *out) {
    const int isa = dsmoe_native_isa();
    if (isa == 0 || hidden % QBLOCK || inter % QBLOCK || hidden % 32 || inter % 32) return -1;
    const weight4 gate_w = {inter, hidden, gate, gate_absmax, lut}, up_w = {inter, hidden, up, up_absmax, lut};
    const weight4 down_w = {hidden, inter, down, down_absmax, lut};
    qacts xa, ha;
    float *tmp = malloc((size_t)hidden * sizeof(float));
    float *gu = malloc((size_t)(2 * inter) * sizeof(float));
    float *y = malloc((size_t)hidden * sizeof(float));
    const int ok = alloc_acts(&xa, 1, hidden) & alloc_acts(&ha, 1, inter);
    if (!ok || !tmp || !gu || !y) {
        free_acts(&xa), free_acts(&ha), free(tmp), free(gu), free(y);
        return -2;
    }
    quantize_bf16_rows(x, 1, hidden, &xa, tmp);
    const int64_t up_tiles = inter / 32;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < 2 * up_tiles; t++) {
            if (t < up_tiles)
                tiles4(isa, &gate_w, t, t + 1, &xa, gu);
            else
                tiles4(isa, &up_w, t - up_tiles, t - up_tiles + 1, &xa, gu + inter);
        }
#pragma omp single
        {
            for (int64_t j = 0; j < inter; j++) gu[j] = gu[j] / (1.0f + expf(-gu[j])) * gu[inter + j];
            quantize_row(gu, inter, ha.abs, ha.q, ha.scale);
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < hidden / 32; t++) {
            tiles4(isa, &down_w, t, t + 1, &ha, y);
            for (int64_t j = t * 32; j < t * 32 + 32; j++) out[j] = f32_to_bf16(y[j]);
        }
    }
    free_acts(&xa), free_acts(&ha), free(tmp), free(gu), free(y);
    return 0;
}

/* ---- attention for one new token ------------------------------------------------------------ */

/* One head: softmax(q . K[0..len) * scale) . V into out, fp32; scores is scratch of len floats. */
__attribute__((target("avx2,fma"))) static void attend_one_head(const float *q, const uint16_t *keys,
                                                               const uint16_t *values, int64_t len, int64_t dim,
                                                               float scale, float *scores, float *out) {
    float top = -INFINITY;
    for (int64_t t = 0; t < len; t++) {
        const uint16_t *key = keys + t * dim;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < dim; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8_bf16(key + d), acc);
        scores[t] = hsum256(acc) * scale;
        top = fmaxf(top, scores[t]);
    }
    float total = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        scores[t] = expf(scores[t] - top);
        total += scores[t];
    }
    for (int64_t d = 0; d < dim; d++) out[d] = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        const __m256 p = _mm256_set1_ps(scores[t] / total);
        const uint16_t *value = values + t * dim;
        for (int64_t d = 0; d < dim; d += 8)
            _mm256_storeu_ps(out + d, _mm256_fmadd_ps(p, load8_bf16(value + d), _mm256_loadu_ps(out + d)));
    }
}

/* Rotary embedding as PyTorch computes x * cos + rotate_half(x) * sin in bf16: each product and
 * the sum rounded to bf16, so the cached keys are the prefill path's, bit for bit. */
static void rotate_bf16(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t dim, uint16_t *out) {
    const int64_t half = dim / 2;
    for (int64_t d = 0; d < dim; d++) {
        const float turned = d < half ? -bf16_to_f32(x[d + half]) : bf16_to_f32(x[d - half]);
        const float a = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[d]) * bf16_to_f32(cos[d])));
        const float b = bf16_to_f32(f32_to_bf16(turned * bf16_to_f32(sin[d])));
        out[d] = f32_to_bf16(a + b);
    }
}

/* The decode step's attention, batch 1, bf16: rotate q and k at position `pos`, store k and v at
 * `pos` in the caches ([n_kv, capacity, head_dim] each), attend over positions 0..pos, write
 * out [n_heads * head_dim]. Scores, softmax and the weighted sum are fp32, as in SDPA; query heads
 * share KV heads in groups of n_heads / n_kv. head_dim must be a multiple of 8. */
int dsmoe_attention_decode(int64_t n_heads, int64_t n_kv, int64_t head_dim, int64_t pos, int64_t capacity,
                           const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *cos,
                           const uint16_t *sin, uint16_t *k_cache, uint16_t *v_cache, uint16_t *out) {
    if (head_dim % 8 || n_heads % n_kv || pos >= capacity) return -1;
    const int64_t len = pos + 1, group = n_heads / n_kv;
    for (int64_t h = 0; h < n_kv; h++) {
        rotate_bf16(k + h * head_dim, cos, sin, head_dim, k_cache + (h * capacity + pos) * head_dim);
        memcpy(v_cache + (h * capacity + pos) * head_dim, v + h * head_dim, (size_t)head_dim * sizeof(uint16_t));
    }
    float *scratch = malloc((size_t)(n_heads * (len + 2 * head_dim)) * sizeof(float));
    uint16_t *rotated = malloc((size_t)(n_heads * head_dim) * sizeof(uint16_t));
    if (!scratch || !rotated) {
        free(scratch), free(rotated);
        return -2;
    }
    const float scale = 1.0f / sqrtf((float)head_dim);
#pragma omp parallel for schedule(static)
    for (int64_t h = 0; h < n_heads; h++) {
        float *scores = scratch + h * (len + 2 * head_dim), *qf = scores + len, *acc = qf + head_dim;
        rotate_bf16(q + h * head_dim, cos, sin, head_dim, rotated + h * head_dim);
        for (int64_t d = 0; d < head_dim; d++) qf[d] = bf16_to_f32(rotated[h * head_dim + d]);
        const int64_t kv = h / group;
        attend_one_head(qf, k_cache + kv * capacity * head_dim, v_cache + kv * capacity * head_dim, len, head_dim,
                        scale, scores, acc);
        for (int64_t d = 0; d < head_dim; d++) out[h * head_dim + d] = f32_to_bf16(acc[d]);
    }
    free(scratch), free(rotated);
    return 0;
}
