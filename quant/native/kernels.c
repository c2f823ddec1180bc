/* dsmoe native kernels for the decode step: 8-bit weights times int8-quantized activations; one
 * call per SwiGLU MLP (8-bit here, 4-bit through bitsandbytes' own CPU kernel) and per token's set
 * of routed experts; and attention for one new token.
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
 * A 4-bit version of the same scheme was measured twice (the codebook times 127 in a vpshufb
 * table, on the standard layout and on bitsandbytes' CPU layout): on one thread with the weight in
 * cache it ran 1.8x bitsandbytes' kernel, but from memory on two threads both read ~26 GB/s (per
 * MLP) to ~30 GB/s (lm_head-sized), so it bought nothing and would have changed the numbers;
 * 4-bit MLPs call bitsandbytes' kernel, whose address the caller passes in.
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

/* Activations rounded to int8: q and a scale per block of 64. */
typedef struct {
    int8_t *q;
    float *scale;
} qacts;

/* 8 bf16 -> 8 fp32. */
__attribute__((target("avx2,fma"))) static inline __m256 load8_bf16(const uint16_t *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* One row of k fp32 values into q and a scale per block of 64: q = round(x * 127 / absmax),
 * rounding half to even (the CPU's default mode, as nearbyintf). Vectorised: on the decode path
 * this runs before every matmul, and the scalar loop cost ~10 us per 2048 values. */
__attribute__((target("avx2,fma"))) static void quantize_row(const float *x, int64_t k, int8_t *xq, float *scale) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < k / QBLOCK; b++) {
        const float *v = x + b * QBLOCK;
        __m256 top = _mm256_setzero_ps();
        for (int i = 0; i < QBLOCK; i += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(v + i)));
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float amax = _mm_cvtss_f32(m);
        scale[b] = amax / 127.0f;
        const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        for (int i = 0; i < QBLOCK; i += 32) {
            __m256i q[4];
            for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + i + 8 * j), inv));
            const __m256i bytes = _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);
            /* |x| * 127 / absmax <= 127 up to rounding, so only -128 needs clamping. */
            const __m256i clamped = _mm256_max_epi8(bytes, _mm256_set1_epi8(-127));
            _mm256_storeu_si256((__m256i *)(xq + b * QBLOCK + i), clamped);
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
#define XQ(a, h) _mm256_loadu_si256((const __m256i *)((a).q + (h)))
/* |q| from q rather than a second array: with k = 10944 two arrays pushed each other out of L1
 * and the kernel read 19 GB/s from memory instead of 28. */
#define XABS(a, h) _mm256_abs_epi8(XQ(a, h))

#define DEFINE_ROWS(SUFFIX, TARGET, DOT)                                                             \
    /* out[i, n] for rows n0..n1 of the weight and m activation rows, fp32, before scale[n]. */        \
    __attribute__((target(TARGET))) static void rows_##SUFFIX(int64_t n0, int64_t n1, int64_t k,       \
                                                               int64_t m, const qacts *xs,              \
                                                               const int8_t *w, float *out, int64_t ld) { \
        for (int64_t n = n0; n < n1; n++) {                                                             \
            const int8_t *row = w + n * k;                                                              \
            for (int64_t i = 0; i < m; i++) {                                                           \
                const qacts a = {xs->q + i * k, xs->scale + i * (k / QBLOCK)};                          \
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
    a->q = malloc((size_t)(m * k));
    a->scale = malloc((size_t)(m * (k / QBLOCK)) * sizeof(float));
    return a->q && a->scale;
}

static void free_acts(qacts *a) { free(a->q), free(a->scale); }

__attribute__((target("avx2,fma"))) static void quantize_bf16_rows(const uint16_t *x, int64_t m, int64_t k,
                                                                   qacts *a, float *tmp) {
    for (int64_t i = 0; i < m; i++) {
        for (int64_t j = 0; j < k; j += 8) _mm256_storeu_ps(tmp + j, load8_bf16(x + i * k + j));
        quantize_row(tmp, k, a->q + i * k, a->scale + i * (k / QBLOCK));
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
            quantize_row(gu, inter, ha.q, ha.scale);
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

/* The routed experts of one token: for each expert e in order, out = out + y_e * mix[e], y_e its
 * MLP's output (dsmoe_bnb4_mlp with `kernel`, or dsmoe_int8_mlp when kernel is NULL), with
 * PyTorch's bf16 roundings of `out += expert(x) * weight`, so it gives the per-expert loop's bits.
 * weights holds 6 pointers per expert, in the MLP functions' order (gate, its scales, up, its
 * scales, down, its scales); mix holds the bf16-rounded routing weights. */
int dsmoe_experts(const void *kernel, int64_t count, int64_t hidden, int64_t inter, int64_t blocksize,
                  const uint16_t *x, const void *const *weights, const float *mix, uint16_t *out) {
    uint16_t *y = malloc((size_t)hidden * sizeof(uint16_t));
    if (!y) return -2;
    for (int64_t e = 0; e < count; e++) {
        const void *const *w = weights + 6 * e;
        const int status = kernel ? dsmoe_bnb4_mlp(kernel, hidden, inter, blocksize, x, w[0], w[1], w[2], w[3], w[4], w[5], y)
                                  : dsmoe_int8_mlp(hidden, inter, x, w[0], w[1], w[2], w[3], w[4], w[5], y);
        if (status != 0) {
            free(y);
            return status;
        }
        for (int64_t j = 0; j < hidden; j++) {
            const float scaled = bf16_to_f32(f32_to_bf16(bf16_to_f32(y[j]) * mix[e]));
            out[j] = f32_to_bf16(bf16_to_f32(out[j]) + scaled);
        }
    }
    free(y);
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
