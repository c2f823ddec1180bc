/* Matmuls of 8- and 4-bit weights times int8-quantized activations, for the decode step and
 * prefill: one matmul, one SwiGLU MLP per call, a token's set of routed experts in one call, and
 * a MoE layer's routed experts over a prompt's tokens in two (prefill).
 *
 *   y[m, n] = scale[n] * sum_b xscale[m, b] * sum_{k in block b} xq[m, k] * w[n, k]
 *
 * 8-bit weights are LLM.int8's, int8 [n, k] with scale[n] = SCB / 127, the checkpoint's layout.
 * Activations are rounded to int8 in blocks of 64 with one fp32 scale per block (like llama.cpp's
 * Q8_0 activations), so integer dot products do the work: AVX512-VNNI's vpdpbusd where the CPU
 * has it, AVX2's vpmaddubsw otherwise. Both multiply unsigned by signed bytes, so the activation
 * goes in as |xq| and its sign moves onto the weight (vpsignb); |xq| <= 127 keeps vpmaddubsw's
 * 16-bit pair sums from saturating (2 * 127 * 127 < 32767), so both give the same integers.
 * 4-bit weights (bitsandbytes' NF4/FP4 codes, repacked at load) use the same activations; see below.
 *
 * Plain C with no Python headers: dsmoe loads it with ctypes. Output rows are split across
 * OpenMP threads, which share libgomp with PyTorch, so torch.set_num_threads governs them too.
 * The entry points are declared, with their contracts, in dsmoe_native.h.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Short names for the interface's constants, as the loops below use them. */
#define QBLOCK DSMOE_ACT_BLOCK
#define TILE_ROWS DSMOE_TILE_ROWS
#define ROWS_PER_TASK 16

/* The best instruction set this CPU can run the matmuls with. */
static int detect_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return DSMOE_ISA_VNNI;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return DSMOE_ISA_AVX2;
    return DSMOE_ISA_NONE;
}

static int chosen_isa = -1;

int dsmoe_native_isa(void) {
    if (chosen_isa < 0) chosen_isa = detect_isa();
    return chosen_isa;
}

int dsmoe_native_4bit(void) {
    static int known = -1;
    if (known < 0) known = detect_isa() != DSMOE_ISA_NONE;
    return known;
}

int dsmoe_native_use_isa(int isa) {
    const int best = detect_isa();
    chosen_isa = isa < 0 || (best == DSMOE_ISA_AVX2 && isa == DSMOE_ISA_VNNI) || best == DSMOE_ISA_NONE ? best : isa;
    return chosen_isa;
}

/* One row of k fp32 values into q, a scale and sum(q) per block of 64: q = round(x * 127 / absmax),
 * rounding half to even (the CPU's default mode, as nearbyintf). Vectorised: on the decode path
 * this runs before every matmul, and the scalar loop cost ~10 us per 2048 values. */
__attribute__((target("avx2,fma"))) static void quantize_row(const float *x, int64_t k, int8_t *xq, float *scale,
                                                             int32_t *sum) {
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
        __m256i total = _mm256_setzero_si256();
        for (int i = 0; i < QBLOCK; i += 32) {
            __m256i q[4];
            for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + i + 8 * j), inv));
            const __m256i bytes = _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);
            /* |x| * 127 / absmax <= 127 up to rounding, so only -128 needs clamping. */
            const __m256i clamped = _mm256_max_epi8(bytes, _mm256_set1_epi8(-127));
            _mm256_storeu_si256((__m256i *)(xq + b * QBLOCK + i), clamped);
            total = _mm256_add_epi32(total, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), clamped),
                                                              _mm256_set1_epi16(1)));
        }
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
        sum[b] = _mm_cvtsi128_si32(t);
    }
}

/* 8 fp32 values rounded to bf16 as f32_to_bf16 rounds them (to nearest even; a NaN stays a quiet
 * NaN), each left in the high half of its lane: as fp32, the bf16 values themselves. */
__attribute__((target("avx2,fma"))) static inline __m256i bf16_high8(__m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
    return _mm256_and_si256(_mm256_blendv_epi8(rounded, quiet, nan), _mm256_set1_epi32((int)0xffff0000u));
}

/* The bf16 halves of 8 lanes as 8 packed bf16 at dst. */
__attribute__((target("avx2,fma"))) static inline void store8_bf16(__m256i high, uint16_t *dst) {
    const __m256i h = _mm256_srli_epi32(high, 16);
    _mm_storeu_si128((__m128i *)dst, _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

__attribute__((target("avx2,fma"))) void floats_to_bf16(const float *src, int64_t n, uint16_t *dst) {
    const int64_t whole = n - n % 8;
    for (int64_t j = 0; j < whole; j += 8) store8_bf16(bf16_high8(_mm256_loadu_ps(src + j)), dst + j);
    for (int64_t j = whole; j < n; j++) dst[j] = f32_to_bf16(src[j]);
}

/* dst[j] += bf16(y[j]) * mix for j < n with PyTorch's bf16 roundings of out.index_add_(bf16(y) *
 * mix): the product rounded, then the sum. */
__attribute__((target("avx2,fma"))) static void add_mixed_bf16(const float *y, int64_t n, float mix, uint16_t *dst) {
    const __m256 w = _mm256_set1_ps(mix);
    const int64_t whole = n - n % 8;
    for (int64_t j = 0; j < whole; j += 8) {
        const __m256 yb = _mm256_castsi256_ps(bf16_high8(_mm256_loadu_ps(y + j)));
        const __m256 product = _mm256_castsi256_ps(bf16_high8(_mm256_mul_ps(yb, w)));
        store8_bf16(bf16_high8(_mm256_add_ps(load8_bf16(dst + j), product)), dst + j);
    }
    for (int64_t j = whole; j < n; j++) {
        const float product = bf16_to_f32(f32_to_bf16(bf16_to_f32(f32_to_bf16(y[j])) * mix));
        dst[j] = f32_to_bf16(bf16_to_f32(dst[j]) + product);
    }
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
                const qacts a = {xs->q + i * k, xs->scale + i * (k / QBLOCK), NULL};                    \
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
    if (isa == DSMOE_ISA_VNNI)
        rows_vnni(n0, n1, k, m, xs, w, out, ld);
    else
        rows_avx2(n0, n1, k, m, xs, w, out, ld);
    for (int64_t i = 0; i < m; i++)
        for (int64_t n = n0; n < n1; n++) out[i * ld + n] *= scale[n];
}

int alloc_acts(qacts *a, int64_t m, int64_t k) {
    a->q = malloc((size_t)(m * k));
    a->scale = malloc((size_t)(m * (k / QBLOCK)) * sizeof(float));
    a->sum = malloc((size_t)(m * (k / QBLOCK)) * sizeof(int32_t));
    return a->q && a->scale && a->sum;
}

void free_acts(qacts *a) { free(a->q), free(a->scale), free(a->sum); }

__attribute__((target("avx2,fma"))) void quantize_bf16_rows(const uint16_t *x, int64_t m, int64_t k, qacts *a,
                                                            float *tmp) {
    for (int64_t i = 0; i < m; i++) {
        for (int64_t j = 0; j < k; j += 8) _mm256_storeu_ps(tmp + j, load8_bf16(x + i * k + j));
        quantize_row(tmp, k, a->q + i * k, a->scale + i * (k / QBLOCK), a->sum + i * (k / QBLOCK));
    }
}

/* The set-up every matmul entry point shares: x [m, k] bf16 rounded into a (allocated here), and
 * an fp32 accumulator of m * n values, returned; NULL, with nothing left allocated, when out of
 * memory. */
static float *quantized_input(const uint16_t *x, int64_t m, int64_t k, int64_t n, qacts *a) {
    float *tmp = malloc((size_t)k * sizeof(float));
    float *acc = malloc((size_t)(m * n) * sizeof(float));
    if (!alloc_acts(a, m, k) || !tmp || !acc) {
        free_acts(a), free(tmp), free(acc);
        return NULL;
    }
    quantize_bf16_rows(x, m, k, a, tmp);
    free(tmp);
    return acc;
}

#define TASKS(rows) (((rows) + ROWS_PER_TASK - 1) / ROWS_PER_TASK)
#define TASK_END(n0, rows) ((n0) + ROWS_PER_TASK < (rows) ? (n0) + ROWS_PER_TASK : (rows))

int dsmoe_int8_gemv(int64_t m, int64_t n, int64_t k, const uint16_t *x, const int8_t *w, const float *scale,
                    void *out, int out_f32) {
    const int isa = dsmoe_native_isa();
    if (isa == DSMOE_ISA_NONE || k % QBLOCK) return -1;
    qacts a;
    float *acc = quantized_input(x, m, k, n, &a);
    if (!acc) return -2;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < TASKS(n); t++) {
        const int64_t n0 = t * ROWS_PER_TASK, n1 = TASK_END(n0, n);
        weight_rows(isa, w, scale, k, n0, n1, m, &a, acc, n);
        store_rows(out, out_f32, acc, m, n, n0, n1);
    }
    free_acts(&a), free(acc);
    return 0;
}

/* ---- 4-bit weights: bitsandbytes' NF4/FP4 codes in dsmoe's native layout ----------------------
 *
 * The layout (quant/kernels.py, pack_4bit) tiles 32 output rows like bitsandbytes' CPU layout, with
 * rows r (low nibble) and 16 + r (high nibble) in one byte, but each 4-byte word holds four
 * consecutive columns of one row pair: a 64-byte load is 16 row pairs x 4 columns, which vpdpbusd
 * takes as it is (on bitsandbytes' order a vpermw per load cost ~20% of the kernel's in-cache
 * speed). The block scales (absmax) are bf16 in tile-major order, [n / 32, k / blocksize, 32], so a
 * tile's scales are one contiguous run beside its weights (in bitsandbytes' [k / blocksize, n] a
 * tile reads 32 lines kilobytes apart; a decode step's experts read 10% slower that way in a
 * harness, though whole decode steps did not measurably move). Each code goes through a vpshufb
 * table to round(codebook value / unit) + 128, an unsigned byte, so vpdpbusd multiplies it by the
 * int8 activations directly; the +128 comes back out per block as 128 * sum(q), which depends on
 * the activations only. The caller picks unit (1/112 for NF4, 1/120 for FP4, whose values it then
 * holds exactly): the rounded codebook moves a weight by at most 0.4% of its block's absmax, far
 * below the 4-bit step. */

#define TARGET_4BIT "avx512f,avx512bw,avx512vl,avx512vnni,fma"

/* 16 bf16 -> 16 fp32. */
__attribute__((target(TARGET_4BIT))) static inline __m512 load16_bf16(const uint16_t *p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* out[0..32) = the 32 rows of one tile times the activations a, fp32; scales is the tile's. */
__attribute__((target(TARGET_4BIT))) static void tile_4bit_vnni(const uint8_t *tile, const uint16_t *scales, int64_t k,
                                                                int64_t blocksize, const uint8_t *lut, float unit,
                                                                const qacts *a, float *out) {
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)lut));
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    __m512 acc_lo = _mm512_setzero_ps(), acc_hi = _mm512_setzero_ps();
    for (int64_t b = 0; b < k / QBLOCK; b++) {
        const uint8_t *p = tile + b * (QBLOCK / 2) * TILE_ROWS;
        const int8_t *xb = a->q + b * QBLOCK;
        __m512i s_lo = _mm512_setzero_si512(), s_hi = _mm512_setzero_si512();
        for (int j = 0; j < QBLOCK / 2; j += 2) {
            const __m512i v = _mm512_loadu_si512(p + j * TILE_ROWS);
            int32_t four;
            memcpy(&four, xb + 2 * j, sizeof four);
            const __m512i xv = _mm512_set1_epi32(four);
            s_lo = _mm512_dpbusd_epi32(s_lo, _mm512_shuffle_epi8(table, _mm512_and_si512(v, low4)), xv);
            s_hi = _mm512_dpbusd_epi32(
                s_hi, _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4)), xv);
        }
        const __m512i offset = _mm512_set1_epi32(128 * a->sum[b]);
        const uint16_t *block = scales + (b * QBLOCK / blocksize) * TILE_ROWS;
        const __m512 step = _mm512_set1_ps(a->scale[b] * unit);
        acc_lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s_lo, offset)),
                                 _mm512_mul_ps(load16_bf16(block), step), acc_lo);
        acc_hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s_hi, offset)),
                                 _mm512_mul_ps(load16_bf16(block + 16), step), acc_hi);
    }
    _mm512_storeu_ps(out, acc_lo);
    _mm512_storeu_ps(out + 16, acc_hi);
}

/* The same for m activation rows (prefill): out[i * ld + r] for row i. The rows go in groups of
 * GROUP_VNNI: each 64-byte load of codes becomes its two byte vectors once and feeds all the
 * group's rows, 2 * GROUP_VNNI independent vpdpbusd chains, with the group's fp32 sums held in
 * registers across the blocks (24 of the 32 zmm at 6 rows; groups of 4 measured 3-16% slower, of
 * 8, which spill, no faster). Before, each block's codes were unpacked to the stack and each row
 * ran two dependent chains of 16 over them, its fp32 row loaded and stored per block: 1.07-1.9x
 * slower on the 16B expert shapes, 1 thread (docs/PERFORMANCE.md, "Prefill against the compute
 * limit (AVX512-VNNI)"); the grouped kernel reaches ~320 GMAC/s a core, 65% of vpdpbusd's
 * register-to-register rate. Each row's integer sums are exact and its fp32 steps are in the same
 * order as tile_4bit_vnni's, so a row's result does not depend on the group it runs in. */
#define GROUP_VNNI 6
_Static_assert(GROUP_VNNI == 6, "tile_4bit_rows_vnni names the remainders, 1 to 5 rows");
__attribute__((target(TARGET_4BIT), always_inline)) static inline void group_4bit_vnni(
    const uint8_t *tile, const uint16_t *scales, int64_t k, int64_t blocksize, __m512i table, float unit,
    const qacts *a, int64_t i0, const int rows, float *out, int64_t ld) {
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const int64_t blocks = k / QBLOCK;
    __m512 acc_lo[GROUP_VNNI], acc_hi[GROUP_VNNI];
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) acc_lo[r] = acc_hi[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *p = tile + b * (QBLOCK / 2) * TILE_ROWS;
        const int8_t *xb = a->q + i0 * k + b * QBLOCK;
        __m512i s_lo[GROUP_VNNI], s_hi[GROUP_VNNI];
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) s_lo[r] = s_hi[r] = _mm512_setzero_si512();
#pragma GCC unroll 16
        for (int j = 0; j < QBLOCK / 2; j += 2) {
            if (i0 == 0) prefetch_ahead(p + j * TILE_ROWS); /* the first group reads the tile from memory */
            const __m512i v = _mm512_loadu_si512(p + j * TILE_ROWS);
            const __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(v, low4));
            const __m512i hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
#pragma GCC unroll 8
            for (int r = 0; r < rows; r++) {
                int32_t four;
                memcpy(&four, xb + r * k + 2 * j, sizeof four);
                const __m512i xv = _mm512_set1_epi32(four);
                s_lo[r] = _mm512_dpbusd_epi32(s_lo[r], lo, xv);
                s_hi[r] = _mm512_dpbusd_epi32(s_hi[r], hi, xv);
            }
        }
        const uint16_t *block = scales + (b * QBLOCK / blocksize) * TILE_ROWS;
        const __m512 sc_lo = load16_bf16(block), sc_hi = load16_bf16(block + 16);
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            const int64_t at = (i0 + r) * blocks + b;
            const __m512i offset = _mm512_set1_epi32(128 * a->sum[at]);
            const __m512 step = _mm512_set1_ps(a->scale[at] * unit);
            acc_lo[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s_lo[r], offset)), _mm512_mul_ps(sc_lo, step),
                                        acc_lo[r]);
            acc_hi[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s_hi[r], offset)), _mm512_mul_ps(sc_hi, step),
                                        acc_hi[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) {
        _mm512_storeu_ps(out + (i0 + r) * ld, acc_lo[r]);
        _mm512_storeu_ps(out + (i0 + r) * ld + 16, acc_hi[r]);
    }
}

__attribute__((target(TARGET_4BIT))) static void tile_4bit_rows_vnni(const uint8_t *tile, const uint16_t *scales,
                                                                     int64_t k, int64_t blocksize, const uint8_t *lut,
                                                                     float unit, const qacts *a, int64_t m, float *out,
                                                                     int64_t ld) {
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)lut));
    int64_t i = 0;
    for (; i + GROUP_VNNI <= m; i += GROUP_VNNI)
        group_4bit_vnni(tile, scales, k, blocksize, table, unit, a, i, GROUP_VNNI, out, ld);
    switch (m - i) { /* constant row counts, so each group's loops unroll into registers */
#define REST_VNNI(r) \
    case r: group_4bit_vnni(tile, scales, k, blocksize, table, unit, a, i, r, out, ld); break;
    REST_VNNI(1) REST_VNNI(2) REST_VNNI(3) REST_VNNI(4) REST_VNNI(5)
#undef REST_VNNI
    default: break;
    }
}

/* The same two loops for AVX2, which has no vpdpbusd. vpmaddubsw multiplies unsigned by signed
 * bytes into 16-bit pair sums, and (code + 128) * x pairs would saturate them, so here the table
 * gives signed codes, round(codebook value / unit) (the VNNI table's bytes xor 0x80), and the
 * activation goes in as |x| with its sign moved onto the code (vpsignb), as in the 8-bit kernel:
 * 2 * 127 * 120 < 32767. The integer sums equal the VNNI kernel's after its 128 * sum(q)
 * correction, and the fp32 steps are the same, so both give the same bits. A 32-byte load is half
 * of the VNNI kernel's 64: row pairs 0-7 (rows 0-7 and 16-23) or 8-15 (rows 8-15 and 24-31).
 * The rows kernel unpacks a block's codes once for all rows and runs the rows in pairs: every
 * instruction of a dot product (vpsignb onward) depends on the row, so a pair shares only the
 * loads of the codes and the loop's overhead, but its 8 independent chains ran the 16B shapes
 * 1.03-1.23x faster than one row at a time (Zen 3, one thread, the same bits;
 * docs/PERFORMANCE.md), though gcc keeps 3 of its 8 sums on the stack: AVX2 has 16 ymm registers. */

/* The signed codes of the two halves of a 32-byte load: lo[0] the low nibbles (rows r), lo[1] the
 * high nibbles (rows 16 + r). */
__attribute__((target("avx2,fma"))) static inline void codes_avx2(__m256i table, const uint8_t *p, __m256i *low,
                                                                  __m256i *high) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *low = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low4));
    *high = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
}

/* acc += the 8 dot products of |x| and the codes signed by x (4 columns per 32-bit lane). */
#define DOT4_AVX2(acc, xabs, xv, codes) \
    ((acc) = _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((xabs), _mm256_sign_epi8((codes), (xv))), \
                                                       _mm256_set1_epi16(1))))

__attribute__((target("avx2,fma"))) static inline __m256i signed_table_avx2(const uint8_t *lut) {
    const __m128i table = _mm_xor_si128(_mm_loadu_si128((const __m128i *)lut), _mm_set1_epi8((char)0x80));
    return _mm256_broadcastsi128_si256(table);
}

/* acc[q] (rows 8q..8q+7) += s[q] * bf16 scales of those rows * step. */
__attribute__((target("avx2,fma"))) static inline void scale_add_avx2(const __m256i *s, const uint16_t *block,
                                                                      float step, __m256 *acc) {
    const __m256 st = _mm256_set1_ps(step);
    for (int q = 0; q < 4; q++)
        acc[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[q]), _mm256_mul_ps(load8_bf16(block + 8 * q), st), acc[q]);
}

__attribute__((target("avx2,fma"))) static void tile_4bit_avx2(const uint8_t *tile, const uint16_t *scales, int64_t k,
                                                               int64_t blocksize, const uint8_t *lut, float unit,
                                                               const qacts *a, float *out) {
    const __m256i table = signed_table_avx2(lut);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < k / QBLOCK; b++) {
        const uint8_t *p = tile + b * (QBLOCK / 2) * TILE_ROWS;
        const int8_t *xb = a->q + b * QBLOCK;
        /* s[0]: rows 0-7, s[1]: 8-15, s[2]: 16-23, s[3]: 24-31 */
        __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int j = 0; j < QBLOCK / 2; j += 2) {
            prefetch_ahead(p + j * TILE_ROWS);
            int32_t four;
            memcpy(&four, xb + 2 * j, sizeof four);
            const __m256i xv = _mm256_set1_epi32(four), xabs = _mm256_abs_epi8(xv);
            __m256i low, high;
            codes_avx2(table, p + j * TILE_ROWS, &low, &high);
            DOT4_AVX2(s[0], xabs, xv, low);
            DOT4_AVX2(s[2], xabs, xv, high);
            codes_avx2(table, p + j * TILE_ROWS + 32, &low, &high);
            DOT4_AVX2(s[1], xabs, xv, low);
            DOT4_AVX2(s[3], xabs, xv, high);
        }
        scale_add_avx2(s, scales + (b * QBLOCK / blocksize) * TILE_ROWS, a->scale[b] * unit, acc);
    }
    for (int q = 0; q < 4; q++) _mm256_storeu_ps(out + 8 * q, acc[q]);
}

/* Rows i0 .. i0 + rows (rows <= GROUP_AVX2, constant at each call) of one block: each code vector
 * of the block feeds every row of the group, GROUP_AVX2 x 4 independent chains. */
#define GROUP_AVX2 2
__attribute__((target("avx2,fma"), always_inline)) static inline void group_4bit_avx2(
    const __m256i (*codes)[4], const uint16_t *block, int64_t b, int64_t k, float unit, const qacts *a, int64_t i0,
    const int rows, float *out, int64_t ld) {
    __m256i s[GROUP_AVX2][4];
#pragma GCC unroll 2
    for (int r = 0; r < rows; r++)
        for (int q = 0; q < 4; q++) s[r][q] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int j = 0; j < QBLOCK / 2; j += 2) {
#pragma GCC unroll 2
        for (int r = 0; r < rows; r++) {
            int32_t four;
            memcpy(&four, a->q + (i0 + r) * k + b * QBLOCK + 2 * j, sizeof four);
            const __m256i xv = _mm256_set1_epi32(four), xabs = _mm256_abs_epi8(xv);
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++) DOT4_AVX2(s[r][q], xabs, xv, codes[j / 2][q]);
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < rows; r++) {
        __m256 acc[4];
        float *row = out + (i0 + r) * ld;
        for (int q = 0; q < 4; q++) acc[q] = _mm256_loadu_ps(row + 8 * q);
        scale_add_avx2(s[r], block, a->scale[(i0 + r) * (k / QBLOCK) + b] * unit, acc);
        for (int q = 0; q < 4; q++) _mm256_storeu_ps(row + 8 * q, acc[q]);
    }
}

__attribute__((target("avx2,fma"))) static void tile_4bit_rows_avx2(const uint8_t *tile, const uint16_t *scales,
                                                                    int64_t k, int64_t blocksize, const uint8_t *lut,
                                                                    float unit, const qacts *a, int64_t m, float *out,
                                                                    int64_t ld) {
    const __m256i table = signed_table_avx2(lut);
    __m256i codes[QBLOCK / 4][4]; /* one block: per column quad, rows 0-7, 8-15, 16-23, 24-31 */
    for (int64_t i = 0; i < m; i++)
        for (int r = 0; r < TILE_ROWS; r++) out[i * ld + r] = 0.0f;
    for (int64_t b = 0; b < k / QBLOCK; b++) {
        const uint8_t *p = tile + b * (QBLOCK / 2) * TILE_ROWS;
        for (int j = 0; j < QBLOCK / 2; j += 2) {
            codes_avx2(table, p + j * TILE_ROWS, &codes[j / 2][0], &codes[j / 2][2]);
            codes_avx2(table, p + j * TILE_ROWS + 32, &codes[j / 2][1], &codes[j / 2][3]);
        }
        const uint16_t *block = scales + (b * QBLOCK / blocksize) * TILE_ROWS;
        int64_t i = 0;
        for (; i + GROUP_AVX2 <= m; i += GROUP_AVX2) group_4bit_avx2(codes, block, b, k, unit, a, i, GROUP_AVX2, out, ld);
        if (i < m) group_4bit_avx2(codes, block, b, k, unit, a, i, 1, out, ld);
    }
}
_Static_assert(GROUP_AVX2 == 2, "tile_4bit_rows_avx2 names the remainder, 1 row");

/* One tile for one activation row, or for m rows into out with row stride ld, with the best
 * instruction set in use. */
static void tile_4bit(const uint8_t *tile, const uint16_t *scales, int64_t k, int64_t blocksize, const uint8_t *lut,
                      float unit, const qacts *a, float *out) {
    if (dsmoe_native_isa() == DSMOE_ISA_VNNI)
        tile_4bit_vnni(tile, scales, k, blocksize, lut, unit, a, out);
    else
        tile_4bit_avx2(tile, scales, k, blocksize, lut, unit, a, out);
}

static void tile_4bit_rows(const uint8_t *tile, const uint16_t *scales, int64_t k, int64_t blocksize,
                           const uint8_t *lut, float unit, const qacts *a, int64_t m, float *out, int64_t ld) {
    if (dsmoe_native_isa() == DSMOE_ISA_VNNI)
        tile_4bit_rows_vnni(tile, scales, k, blocksize, lut, unit, a, m, out, ld);
    else
        tile_4bit_rows_avx2(tile, scales, k, blocksize, lut, unit, a, m, out, ld);
}

/* bitsandbytes' standard nibbles (row-major, high nibble first: column 2j in byte j's high half)
 * -> the native layout above, [n / 32 tiles][k / 4 column quads][16 row pairs][4 columns], each
 * byte row 16 + r's code high, row r's low. pack_4bit in quant/kernels.py is the same permutation in
 * torch, the reference and the fallback; this runs at the memory's speed (the torch one was 40%
 * of a stored 4-bit checkpoint's load). */
/* One tile of 32 rows: standard nibbles -> native layout; the two must not overlap. Output line
 * by output line (16 row pairs x one column quad), each word built in one 32-bit register from
 * bytes l0 l1 of row r and h0 h1 of row 16 + r: (h0 & f0 | l0 >> 4), (h0 << 4 | l0 & 0f), and the
 * same for l1, h1. */
static void pack_tile(int64_t k, const uint8_t *standard, uint8_t *native) {
    const int64_t row_bytes = k / 2, pairs = TILE_ROWS / 2;
    for (int64_t q = 0; q < k / 4; q++) {
        uint32_t *line = (uint32_t *)(native + q * 4 * pairs); /* columns 4q..4q+3 of every row pair */
        for (int64_t r = 0; r < pairs; r++) {
            uint16_t lo, hi;
            memcpy(&lo, standard + r * row_bytes + 2 * q, sizeof lo);
            memcpy(&hi, standard + (r + pairs) * row_bytes + 2 * q, sizeof hi);
            /* each source byte twice: bytes (b0, b0, b1, b1) */
            const uint32_t l = (lo & 0xffu) * 0x0101u | (uint32_t)(lo >> 8) * 0x01010000u;
            const uint32_t h = (hi & 0xffu) * 0x0101u | (uint32_t)(hi >> 8) * 0x01010000u;
            const uint32_t word = (h & 0x00f000f0u) | ((h << 4) & 0xf000f000u) | ((l >> 4) & 0x000f000fu) |
                                  (l & 0x0f000f00u);
            memcpy(line + r, &word, sizeof word);
        }
    }
}

int dsmoe_pack_4bit(int64_t n, int64_t k, const uint8_t *standard, uint8_t *native) {
    if (n % TILE_ROWS || k % 4) return -1;
    const int64_t tile_bytes = TILE_ROWS * (k / 2);
    const int in_place = standard == native;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        /* In place, each tile is copied aside first: a tile's bytes stay within the tile, so the
         * copy (32 rows, in L2) is all the extra memory the repack needs. */
        uint8_t *aside = in_place ? malloc((size_t)tile_bytes) : NULL;
        failed = in_place && !aside;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n / TILE_ROWS; t++) {
            if (failed) continue;
            const uint8_t *from = standard + t * tile_bytes;
            if (in_place) from = memcpy(aside, from, (size_t)tile_bytes);
            pack_tile(k, from, native + t * tile_bytes);
        }
        free(aside);
    }
    return failed ? -2 : 0;
}

/* ---- MLPs for one token --------------------------------------------------------------------- */

/* Output rows handed to a thread at a time: a 4-bit tile, or 16 int8 rows. */
static int64_t rows_per_task(const wformat *f) { return f->lut ? TILE_ROWS : ROWS_PER_TASK; }

/* Rows n0..n1 of y = x @ W.T for one activation row, fp32, into out[n0..n1). */
static void matrix_rows(const wformat *f, const void *w, const void *scale, int64_t n, int64_t k, int64_t n0,
                        int64_t n1, const qacts *a, float *out) {
    if (!f->lut) {
        weight_rows(dsmoe_native_isa(), w, scale, k, n0, n1, 1, a, out, n);
        return;
    }
    for (int64_t r = n0; r < n1; r += TILE_ROWS)
        tile_4bit((const uint8_t *)w + (r / TILE_ROWS) * TILE_ROWS * (k / 2),
                  (const uint16_t *)scale + (r / TILE_ROWS) * (k / f->blocksize) * TILE_ROWS, k, f->blocksize, f->lut,
                  f->unit, a, out + r);
}

/* The kernels need AVX512-VNNI or AVX2, widths in whole activation blocks, and for 4-bit whole
 * tiles and whole absmax blocks per activation block. */
int shape_ok(const wformat *f, int64_t n, int64_t k) {
    if (k % QBLOCK) return 0;
    if (!f->lut) return dsmoe_native_isa() != DSMOE_ISA_NONE;
    return dsmoe_native_4bit() && n % TILE_ROWS == 0 && f->blocksize % QBLOCK == 0;
}

/* Thread id's share [*begin, *end) of a team of `team`, of `groups` runs of equal tasks (run g:
 * tasks[g] tasks of cost cost[g] each, in order), split into contiguous runs of about equal total
 * cost; returns the share's cost. */
static int64_t split_costed(int64_t groups, const int64_t *tasks, const int64_t *cost, int64_t id, int64_t team,
                            int64_t *begin, int64_t *end) {
    int64_t total = 0;
    for (int64_t g = 0; g < groups; g++) total += tasks[g] * cost[g];
    int64_t bounds[2];
    for (int64_t side = 0; side < 2; side++) {
        const int64_t target = total * (id + side) / team;
        int64_t before = 0, first = 0, at = 0;
        for (int64_t g = 0; g < groups; g++) {
            if (target <= before + tasks[g] * cost[g]) {
                at = first + (target - before + cost[g] / 2) / cost[g];
                break;
            }
            before += tasks[g] * cost[g], first += tasks[g], at = first;
        }
        bounds[side] = at;
    }
    *begin = bounds[0], *end = bounds[1];
    int64_t mine = 0, first = 0;
    for (int64_t g = 0; g < groups; g++) {
        const int64_t lo = *begin > first ? *begin : first, hi = *end < first + tasks[g] ? *end : first + tasks[g];
        if (hi > lo) mine += (hi - lo) * cost[g];
        first += tasks[g];
    }
    return mine;
}

/* This thread's share of the team's (split_costed): call it inside a parallel region. */
static void costed_share(int64_t groups, const int64_t *tasks, const int64_t *cost, int64_t *begin, int64_t *end) {
    split_costed(groups, tasks, cost, omp_get_thread_num(), omp_get_num_threads(), begin, end);
}

/* Whether the team can run the MLPs whole, each thread its own contiguous run of them ([*begin,
 * *end) for this one), with every thread's share of their weights within 1/16 of an even split. */
static int whole_mlps(int64_t count, const int64_t *inter, int64_t *begin, int64_t *end) {
    const int64_t team = omp_get_num_threads(), id = omp_get_thread_num();
    int64_t ones[DSMOE_MAX_MLPS], total = 0, largest = 0;
    for (int64_t e = 0; e < count; e++) ones[e] = 1, total += inter[e];
    for (int64_t t = 0; t < team; t++) {
        int64_t b, e;
        const int64_t mine = split_costed(count, ones, inter, t, team, &b, &e);
        largest = mine > largest ? mine : largest;
        if (t == id) *begin = b, *end = e;
    }
    return 16 * largest * team <= 17 * total;
}

/* g[j] = silu(g[j]) * u[j] in fp32: the one-token MLP's step between gate/up and down. */
static void silu_times(float *g, const float *u, int64_t n) {
    for (int64_t j = 0; j < n; j++) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
}

/* silu(gate) * up of one MLP (g: its gate sums, then its up sums, fp32), rounded to int8 into
 * ha at column `at`, the down projection's input. */
static void gated_input(float *g, int64_t inter, const qacts *ha, int64_t at) {
    silu_times(g, g + inter, inter);
    quantize_row(g, inter, ha->q + at, ha->scale + at / QBLOCK, ha->sum + at / QBLOCK);
}

/* Output rows n0..n1 of one MLP's down projection (w: its DSMOE_MLP_POINTERS pointers), from its
 * input in ha at column `at`: fp32 into yf, bf16 into dst. */
static void down_rows(const wformat *f, const void *const *w, int64_t hidden, int64_t inter, const qacts *ha,
                      int64_t at, int64_t n0, int64_t n1, float *yf, uint16_t *dst) {
    const qacts h = {ha->q + at, ha->scale + at / QBLOCK, ha->sum + at / QBLOCK};
    matrix_rows(f, w[4], w[5], hidden, inter, n0, n1, &h, yf);
    floats_to_bf16(yf + n0, n1 - n0, dst + n0);
}

/* count SwiGLU MLPs on one bf16 token x: y_e = down_e(silu(gate_e(x)) * up_e(x)), MLP e inter[e]
 * wide (at most DSMOE_MAX_MLPS). weights holds DSMOE_MLP_POINTERS per MLP (gate, its scale, up,
 * its scale, down, its scale). The first `mixed` MLPs are summed into out: out = out + bf16(y_e * mix[e]) for each in
 * order, with PyTorch's bf16 roundings of `out += expert(x) * weight`, so the result is a
 * per-expert loop's, bit for bit; the others' outputs go to y [count - mixed, hidden] in bf16. One
 * thread team for all of it: the gate and up rows of every MLP are one task list split into
 * contiguous runs, so each thread streams whole matrices (reading that way measured ~31 GB/s
 * against ~27 GB/s with each matrix split across the threads), then the same for the down rows,
 * split by their width so the threads read alike. Where whole MLPs split the weights evenly among
 * the threads (whole_mlps: a decode step's 6 routed experts and the shared one, twice as wide, 4
 * and 4 on 2 threads), each thread runs its MLPs start to end instead, with no barrier between
 * gate/up, silu and down at which the memory would idle: decode 1.04x paired (dsmoe bench, 6
 * rounds, docs/PERFORMANCE.md), the same bits. silu(g) * u stays fp32 until it is rounded to
 * int8 for down. Returns 0, -1 for shapes the kernels cannot take, -2 when out of memory. */
int swiglu_batch(const wformat *f, int64_t count, int64_t hidden, const int64_t *inter, const uint16_t *x,
                 const void *const *weights, int64_t mixed, const float *mix, uint16_t *out, uint16_t *y) {
    if (count > DSMOE_MAX_MLPS || mixed > count) return -1;
    const int64_t step = rows_per_task(f), down_tasks = (hidden + step - 1) / step;
    int64_t first_up[DSMOE_MAX_MLPS + 1], at[DSMOE_MAX_MLPS + 1], up_tasks[DSMOE_MAX_MLPS], down_counts[DSMOE_MAX_MLPS], width = 0, tasks = 0;
    for (int64_t e = 0; e < count; e++) {
        if (!shape_ok(f, inter[e], hidden) || !shape_ok(f, hidden, inter[e])) return -1;
        first_up[e] = tasks, at[e] = width;
        up_tasks[e] = (inter[e] + step - 1) / step, down_counts[e] = down_tasks;
        tasks += 2 * up_tasks[e], width += inter[e];
    }
    first_up[count] = tasks, at[count] = width;
    qacts xa, ha;
    float *tmp = malloc((size_t)hidden * sizeof(float));
    float *gu = malloc((size_t)(2 * width) * sizeof(float));
    float *yf = malloc((size_t)(count * hidden) * sizeof(float));
    uint16_t *ys = malloc((size_t)(count * hidden) * sizeof(uint16_t));
    const int ok = alloc_acts(&xa, 1, hidden) & alloc_acts(&ha, 1, width);
    if (!ok || !tmp || !gu || !yf || !ys) {
        free_acts(&xa), free_acts(&ha), free(tmp), free(gu), free(yf), free(ys);
        return -2;
    }
    quantize_bf16_rows(x, 1, hidden, &xa, tmp);
#pragma omp parallel
    {
        int64_t own_begin, own_end;
        if (whole_mlps(count, inter, &own_begin, &own_end)) {
            /* Each thread runs its MLPs start to end, with no barrier between their layers. */
            for (int64_t e = own_begin; e < own_end; e++) {
                for (int64_t which = 0; which < 2; which++) {
                    const void *const *w = weights + DSMOE_MLP_POINTERS * e + 2 * which;
                    matrix_rows(f, w[0], w[1], inter[e], hidden, 0, inter[e], &xa, gu + 2 * at[e] + which * inter[e]);
                }
                gated_input(gu + 2 * at[e], inter[e], &ha, at[e]);
                down_rows(f, weights + DSMOE_MLP_POINTERS * e, hidden, inter[e], &ha, at[e], 0, hidden,
                          yf + e * hidden, e < mixed ? ys + e * hidden : y + (e - mixed) * hidden);
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tasks; t++) {
                int64_t e = 0;
                while (t >= first_up[e + 1]) e++;
                const int64_t local = t - first_up[e], which = local / up_tasks[e], n0 = (local % up_tasks[e]) * step;
                const void *const *w = weights + DSMOE_MLP_POINTERS * e + 2 * which;
                matrix_rows(f, w[0], w[1], inter[e], hidden, n0, n0 + step < inter[e] ? n0 + step : inter[e], &xa,
                            gu + 2 * at[e] + which * inter[e]);
            }
#pragma omp for schedule(static)
            for (int64_t e = 0; e < count; e++) gated_input(gu + 2 * at[e], inter[e], &ha, at[e]);
            int64_t begin, end;
            costed_share(count, down_counts, inter, &begin, &end);
            for (int64_t t = begin; t < end; t++) {
                const int64_t e = t / down_tasks, n0 = (t % down_tasks) * step, n1 = n0 + step < hidden ? n0 + step : hidden;
                down_rows(f, weights + DSMOE_MLP_POINTERS * e, hidden, inter[e], &ha, at[e], n0, n1, yf + e * hidden,
                          e < mixed ? ys + e * hidden : y + (e - mixed) * hidden);
            }
        }
#pragma omp barrier
        if (mixed > 0) {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < hidden; j++)
                for (int64_t e = 0; e < mixed; e++) {
                    const float scaled = bf16_to_f32(f32_to_bf16(bf16_to_f32(ys[e * hidden + j]) * mix[e]));
                    out[j] = f32_to_bf16(bf16_to_f32(out[j]) + scaled);
                }
        }
    }
    free_acts(&xa), free_acts(&ha), free(tmp), free(gu), free(yf), free(ys);
    return 0;
}

int dsmoe_int8_mlp(int64_t hidden, int64_t inter, const uint16_t *x, const void *gate, const void *gate_scale,
                   const void *up, const void *up_scale, const void *down, const void *down_scale, uint16_t *out) {
    const wformat f = {NULL, 0.0f, 0};
    const void *weights[DSMOE_MLP_POINTERS] = {gate, gate_scale, up, up_scale, down, down_scale};
    return swiglu_batch(&f, 1, hidden, &inter, x, weights, 0, NULL, NULL, out);
}

int dsmoe_4bit_mlp(const uint8_t *lut, float unit, int64_t blocksize, int64_t hidden, int64_t inter, const uint16_t *x,
                   const void *gate, const void *gate_absmax, const void *up, const void *up_absmax,
                   const void *down, const void *down_absmax, uint16_t *out) {
    const wformat f = {lut, unit, blocksize};
    const void *weights[DSMOE_MLP_POINTERS] = {gate, gate_absmax, up, up_absmax, down, down_absmax};
    return swiglu_batch(&f, 1, hidden, &inter, x, weights, 0, NULL, NULL, out);
}

int dsmoe_experts(const uint8_t *lut, float unit, int64_t blocksize, int64_t count, int64_t hidden, int64_t inter,
                  const uint16_t *x, const void *const *weights, const float *mix, uint16_t *out) {
    const wformat f = {lut, unit, blocksize};
    int64_t inters[DSMOE_MAX_MLPS];
    for (int64_t e = 0; e < count && e < DSMOE_MAX_MLPS; e++) inters[e] = inter;
    return swiglu_batch(&f, count, hidden, inters, x, weights, count, mix, out, NULL);
}

int dsmoe_4bit_gemm(const uint8_t *lut, float unit, int64_t blocksize, int64_t m, int64_t n, int64_t k,
                    const uint16_t *x, const uint8_t *w, const uint16_t *scales, uint16_t *out) {
    const wformat f = {lut, unit, blocksize};
    if (!shape_ok(&f, n, k)) return -1;
    qacts a;
    /* fp32 sums: one row's for all tiles, or for several rows each thread's m x TILE_ROWS of the
     * tile in hand (an [m, n] buffer was fresh memory on every call: 45 MB for the dense MLP at
     * 1024 tokens, its page faults a visible share of the call). */
    const int64_t width = m == 1 ? n : omp_get_max_threads() * TILE_ROWS;
    float *acc = quantized_input(x, m, k, width, &a);
    if (!acc) return -2;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n / TILE_ROWS; t++) {
        const int64_t r = t * TILE_ROWS;
        const uint8_t *tile = w + t * TILE_ROWS * (k / 2);
        const uint16_t *tile_scales = scales + t * (k / blocksize) * TILE_ROWS;
        if (m == 1) {
            tile_4bit(tile, tile_scales, k, blocksize, lut, unit, &a, acc + r);
            floats_to_bf16(acc + r, TILE_ROWS, out + r);
            continue;
        }
        float *mine = acc + omp_get_thread_num() * m * TILE_ROWS;
        tile_4bit_rows(tile, tile_scales, k, blocksize, lut, unit, &a, m, mine, TILE_ROWS);
        for (int64_t i = 0; i < m; i++) floats_to_bf16(mine + i * TILE_ROWS, TILE_ROWS, out + i * n + r);
    }
    free_acts(&a), free(acc);
    return 0;
}

/* ---- a MoE layer's routed experts over many tokens (prefill) -------------------------------------
 *
 * The per-expert loop of MoE.route (model/deepseek.py) in two calls, each one thread team, around
 * PyTorch's silu(g) * u (the C library has no exp that matches PyTorch's vectorised one bit for
 * bit, so that step stays PyTorch's). Experts come in ascending id order with their tokens'
 * slots contiguous: slots starts[e] .. starts[e + 1] of expert e hold tokens[slot] (ascending) and
 * the bf16-rounded routing weight mix[slot]. An expert with one token runs as the loop runs it, on
 * the one-token MLP path (swiglu_batch: silu(g) * u in fp32 from the fp32 sums); with more, as its
 * three layers do, with bf16 between them. Each matmul is the one the layer would run (the same
 * kernel per row count), so every number is the loop's, bit for bit. */

/* Rows n0..n1 of y = x @ W.T for m activation rows, fp32 into out[i * ld + j - n0]: the kernels
 * dsmoe_4bit_gemm and dsmoe_int8_gemv run for m rows (the one-row 4-bit one for m = 1). */
static void matrix_rows_m(const wformat *f, const void *w, const void *scale, int64_t k, int64_t n0, int64_t n1,
                          int64_t m, const qacts *a, float *out, int64_t ld) {
    if (!f->lut) {
        weight_rows(dsmoe_native_isa(), (const int8_t *)w + n0 * k, (const float *)scale + n0, k, 0, n1 - n0, m, a,
                    out, ld);
        return;
    }
    for (int64_t r = n0; r < n1; r += TILE_ROWS) {
        const uint8_t *tile = (const uint8_t *)w + (r / TILE_ROWS) * TILE_ROWS * (k / 2);
        const uint16_t *tile_scales = (const uint16_t *)scale + (r / TILE_ROWS) * (k / f->blocksize) * TILE_ROWS;
        if (m == 1)
            tile_4bit(tile, tile_scales, k, f->blocksize, f->lut, f->unit, a, out + r - n0);
        else
            tile_4bit_rows(tile, tile_scales, k, f->blocksize, f->lut, f->unit, a, m, out + r - n0, ld);
    }
}

/* The most slots an expert has: each thread's fp32 scratch holds one task's rows. */
static int64_t most_slots(int64_t count, const int64_t *starts) {
    int64_t most = 0;
    for (int64_t e = 0; e < count; e++) most = starts[e + 1] - starts[e] > most ? starts[e + 1] - starts[e] : most;
    return most;
}

/* Slot rows s0.. of a (row width k) as their own qacts. */
static qacts slot_rows(const qacts *a, int64_t s0, int64_t k) {
    const qacts v = {a->q + s0 * k, a->scale + s0 * (k / QBLOCK), a->sum + s0 * (k / QBLOCK)};
    return v;
}

/* The task list both halves share: per expert, `tiles` tasks of cost m + 1 (its rows, plus the
 * codes' unpacking a tile pays once per group of rows). Returns 0 when out of memory. */
static int expert_costs(int64_t count, const int64_t *starts, int64_t tiles, int64_t **tasks, int64_t **cost) {
    *tasks = malloc((size_t)count * sizeof(int64_t));
    *cost = malloc((size_t)count * sizeof(int64_t));
    if (!*tasks || !*cost) {
        free(*tasks), free(*cost);
        return 0;
    }
    for (int64_t e = 0; e < count; e++) (*tasks)[e] = tiles, (*cost)[e] = starts[e + 1] - starts[e] + 1;
    return 1;
}

/* Expert e of the share's task t (experts' runs of `tiles` tasks in order). */
#define TASK_EXPERT(t, tiles) ((t) / (tiles))

int dsmoe_moe_up(const uint8_t *lut, float unit, int64_t blocksize, int64_t hidden, int64_t inter, int64_t count,
                 const void *const *weights, const int64_t *starts, const int64_t *tokens, const uint16_t *x,
                 uint16_t *gate, uint16_t *up, float *single) {
    const wformat f = {lut, unit, blocksize};
    if (count < 1 || !shape_ok(&f, inter, hidden)) return -1;
    const int64_t total = starts[count], step = rows_per_task(&f), per = (inter + step - 1) / step, tiles = 2 * per;
    const int64_t most = most_slots(count, starts);
    qacts xa;
    float *lone_up = malloc((size_t)(count * inter) * sizeof(float)); /* up of the one-token experts */
    int64_t *tasks = NULL, *cost = NULL;
    if (!alloc_acts(&xa, total, hidden) || !lone_up || !expert_costs(count, starts, tiles, &tasks, &cost)) {
        free_acts(&xa), free(lone_up);
        return -2;
    }
    int failed = 0;
#pragma omp parallel
    {
        float *tmp = thread_scratch(hidden, &failed), *acc = thread_scratch(most * step, &failed);
#pragma omp barrier
        if (!failed) {
            /* Each slot's token rounded to int8, as the layer would round its row of x[tokens]. */
#pragma omp for schedule(static)
            for (int64_t s = 0; s < total; s++) {
                qacts row = slot_rows(&xa, s, hidden);
                quantize_bf16_rows(x + tokens[s] * hidden, 1, hidden, &row, tmp);
            }
            int64_t begin, end;
            costed_share(count, tasks, cost, &begin, &end);
            for (int64_t t = begin; t < end; t++) {
                const int64_t e = TASK_EXPERT(t, tiles), local = t % tiles, which = local / per;
                const int64_t n0 = (local % per) * step, n1 = n0 + step < inter ? n0 + step : inter;
                const int64_t s0 = starts[e], m = starts[e + 1] - s0;
                const void *const *w = weights + DSMOE_MLP_POINTERS * e + 2 * which;
                const qacts rows = slot_rows(&xa, s0, hidden);
                matrix_rows_m(&f, w[0], w[1], hidden, n0, n1, m, &rows, acc, step);
                if (m == 1) { /* fp32 for the one-token path */
                    memcpy((which ? lone_up + e * inter : single + s0 * inter) + n0, acc, (size_t)(n1 - n0) * sizeof(float));
                    continue;
                }
                uint16_t *dst = (which ? up : gate) + s0 * inter; /* else the layer's bf16 output */
                for (int64_t i = 0; i < m; i++) floats_to_bf16(acc + i * step, n1 - n0, dst + i * inter + n0);
            }
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t e = 0; e < count; e++) {
                if (starts[e + 1] - starts[e] == 1) silu_times(single + starts[e] * inter, lone_up + e * inter, inter);
            }
        }
        free(tmp), free(acc);
    }
    free_acts(&xa), free(lone_up), free(tasks), free(cost);
    return failed ? -2 : 0;
}

int dsmoe_moe_down(const uint8_t *lut, float unit, int64_t blocksize, int64_t hidden, int64_t inter, int64_t count,
                   const void *const *weights, const int64_t *starts, const int64_t *tokens, const float *mix,
                   const uint16_t *h, const float *single, uint16_t *out) {
    const wformat f = {lut, unit, blocksize};
    if (count < 1 || !shape_ok(&f, hidden, inter)) return -1;
    const int64_t total = starts[count], step = rows_per_task(&f), tiles = (hidden + step - 1) / step;
    const int64_t most = most_slots(count, starts);
    qacts ha;
    if (!alloc_acts(&ha, total, inter)) {
        free_acts(&ha);
        return -2;
    }
    int failed = 0;
#pragma omp parallel
    {
        float *tmp = thread_scratch(inter, &failed), *acc = thread_scratch(most * step, &failed);
#pragma omp barrier
        if (!failed) {
            /* down's input rounded to int8: the bf16 product of the layers, or a lone token's fp32 one. */
#pragma omp for schedule(static)
            for (int64_t e = 0; e < count; e++)
                for (int64_t s = starts[e]; s < starts[e + 1]; s++) {
                    qacts row = slot_rows(&ha, s, inter);
                    if (starts[e + 1] - starts[e] == 1)
                        quantize_row(single + s * inter, inter, row.q, row.scale, row.sum);
                    else
                        quantize_bf16_rows(h + s * inter, 1, inter, &row, tmp);
                }
            /* A thread owns whole output tiles and goes through the experts in order for each, so it
             * adds bf16(y * mix) into out (out.index_add_) expert after expert, as the loop does,
             * with no [slots, hidden] buffer between (that one, fresh memory per call, cost more
             * than its matmuls at 1024 tokens). Every tile costs the same: a static split. */
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tiles; t++) {
                const int64_t n0 = t * step, n1 = n0 + step < hidden ? n0 + step : hidden;
                for (int64_t e = 0; e < count; e++) {
                    const int64_t s0 = starts[e], m = starts[e + 1] - s0;
                    const qacts rows = slot_rows(&ha, s0, inter);
                    matrix_rows_m(&f, weights[DSMOE_MLP_POINTERS * e + 4], weights[DSMOE_MLP_POINTERS * e + 5], inter,
                                  n0, n1, m, &rows, acc, step);
                    for (int64_t i = 0; i < m; i++)
                        add_mixed_bf16(acc + i * step, n1 - n0, mix[s0 + i], out + tokens[s0 + i] * hidden + n0);
                }
            }
        }
        free(tmp), free(acc);
    }
    free_acts(&ha);
    return failed ? -2 : 0;
}

/* ---- the projections of a layer step (internal.h) ------------------------------------------- */

void project_rows(const wformat *f, int64_t count, const void *const *w, const void *const *s, const int64_t *n,
                  int64_t k, const qacts *a, float *acc, uint16_t *const *y) {
    const int64_t step = rows_per_task(f);
    int64_t tasks = 0, rows = 0, first[4], offset[4];
    for (int64_t i = 0; i < count; i++) {
        first[i] = tasks, offset[i] = rows;
        tasks += (n[i] + step - 1) / step, rows += n[i];
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t i = 0;
        while (i + 1 < count && t >= first[i + 1]) i++;
        const int64_t n0 = (t - first[i]) * step, n1 = n0 + step < n[i] ? n0 + step : n[i];
        float *out = acc + offset[i];
        matrix_rows(f, w[i], s[i], n[i], k, n0, n1, a, out);
        floats_to_bf16(out + n0, n1 - n0, y[i] + n0);
    }
}

