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

/* bitsandbytes' CPU 4-bit kernel (gemv_4bit_inference_cpu_{nf4,fp4}_bf16): x [m, k] bf16 times a
 * weight in its CPU layout with absmax_t [k / blocksize, n] bf16, into out [m, n] bf16. */
typedef void (*bnb_gemv4_fn)(int64_t m, int64_t n, int64_t k, const void *x, const void *w, const void *absmax_t,
                             void *out, int64_t blocksize, int64_t ldx, int64_t ldo);

/* One SwiGLU MLP for one token, 4-bit, with bitsandbytes' kernel at `kernel`: the same steps and
 * bf16 roundings as down(silu(gate(x)) * up(x)) in PyTorch, without a Python call between them. */
int dsmoe_bnb4_mlp(const void *kernel, int64_t hidden, int64_t inter, int64_t blocksize, const uint16_t *x,
                   const void *gate, const void *gate_absmax, const void *up, const void *up_absmax,
                   const void *down, const void *down_absmax, uint16_t *out) {
    const bnb_gemv4_fn gemv = (bnb_gemv4_fn)kernel;
    uint16_t *g = malloc((size_t)(2 * inter) * sizeof(uint16_t));
    if (!g) return -2;
    uint16_t *u = g + inter;
    gemv(1, inter, hidden, x, gate, gate_absmax, g, blocksize, hidden, inter);
    gemv(1, inter, hidden, x, up, up_absmax, u, blocksize, hidden, inter);
    for (int64_t j = 0; j < inter; j++) {
        const float v = bf16_to_f32(g[j]);
        const float silu = bf16_to_f32(f32_to_bf16(v / (1.0f + expf(-v))));
        g[j] = f32_to_bf16(silu * bf16_to_f32(u[j]));
    }
    gemv(1, hidden, inter, g, down, down_absmax, out, blocksize, inter, hidden);
    free(g);
    return 0;
}
