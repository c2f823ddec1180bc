/* The decode step's kernels that are not matmuls: attention for one new token, RMSNorm and the
 * router, each with the bf16 roundings of the PyTorch module it replaces. Declared, with their
 * contracts, in dsmoe_native.h. They use AVX2 and FMA unconditionally: Python loads the library
 * only on a CPU that has them (dsmoe_native_isa). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

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

/* ---- the rest of a decode step: norms and the router ----------------------------------------- */

__attribute__((target("avx2,fma"))) int dsmoe_rmsnorm(int64_t n, float eps, const uint16_t *x, const uint16_t *weight,
                                                      uint16_t *out) {
    if (n % 8) return -1;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        const __m256 v = load8_bf16(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    const float inv = 1.0f / sqrtf(hsum256(acc) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) {
        const float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[i]) * inv));
        out[i] = f32_to_bf16(bf16_to_f32(weight[i]) * normed);
    }
    return 0;
}

__attribute__((target("avx2,fma"))) int dsmoe_router(int64_t n_experts, int64_t hidden, int64_t top_k, int norm_topk,
                                                     const uint16_t *x, const float *weight, int64_t *ids,
                                                     float *weights) {
    if (hidden % 8 || top_k > n_experts || top_k > DSMOE_MAX_TOP_K) return -1;
    float *scores = malloc((size_t)(n_experts + hidden) * sizeof(float));
    if (!scores) return -2;
    float *xf = scores + n_experts;
    for (int64_t i = 0; i < hidden; i += 8) _mm256_storeu_ps(xf + i, load8_bf16(x + i));
#pragma omp parallel for schedule(static)
    for (int64_t e = 0; e < n_experts; e++) {
        const float *row = weight + e * hidden;
        __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
        for (int64_t i = 0; i < hidden; i += 16) {
            a = _mm256_fmadd_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(xf + i), a);
            if (i + 8 < hidden) b = _mm256_fmadd_ps(_mm256_loadu_ps(row + i + 8), _mm256_loadu_ps(xf + i + 8), b);
        }
        scores[e] = hsum256(_mm256_add_ps(a, b));
    }
    float top = -INFINITY, total = 0.0f;
    for (int64_t e = 0; e < n_experts; e++) top = fmaxf(top, scores[e]);
    for (int64_t e = 0; e < n_experts; e++) total += scores[e] = expf(scores[e] - top);
    int64_t chosen[DSMOE_MAX_TOP_K];
    float picked = 0.0f;
    for (int64_t j = 0; j < top_k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < n_experts; e++) {
            int taken = 0;
            for (int64_t i = 0; i < j; i++) taken |= chosen[i] == e;
            if (!taken && (best < 0 || scores[e] > scores[best])) best = e;
        }
        chosen[j] = best;
        picked += scores[best] / total;
    }
    /* ids ascending, each with its probability (renormalised over the chosen ones). */
    for (int64_t j = 0; j < top_k; j++) {
        int64_t at = j;
        for (int64_t i = j + 1; i < top_k; i++)
            if (chosen[i] < chosen[at]) at = i;
        const int64_t id = chosen[at];
        chosen[at] = chosen[j];
        chosen[j] = id;
        const float p = scores[id] / total;
        ids[j] = id;
        weights[j] = norm_topk && top_k > 1 ? p / (picked + 1e-20f) : p;
    }
    free(scores);
    return 0;
}

