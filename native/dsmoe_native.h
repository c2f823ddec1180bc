/* dsmoe's native library: the one interface between its C kernels and Python.
 *
 * Everything that crosses to Python is declared here and nowhere else in C: the named constants,
 * the structs Python fills, and every exported entry point. Python (native/library.py) reads the
 * DSMOE_ constants from this file itself, mirrors the structs in ctypes and declares each entry
 * point's argument types; at load it refuses a library whose DSMOE_ABI_VERSION, constants or
 * struct layouts (dsmoe_abi_facts) differ from its own. Change anything here: raise
 * DSMOE_ABI_VERSION and update native/library.py in the same commit (tests/test_native_abi.py
 * checks the two agree).
 *
 * The kernels, by job: matmul.c (8- and 4-bit matmuls, SwiGLU MLPs, routed experts), q6.c (the
 * 6-bit lm_head matmul), bf16.c (float weights), ops.c
 * (attention for one new token, RMSNorm, the router), layer_step.c (a decoder layer's decode step),
 * abi.c (what this library was built with). Every kernel returns 0 on success, -1 for arguments
 * it cannot take (shapes, sizes, a CPU without the instruction set), -2 when out of memory; the
 * queries (ABI, instruction set) return what they are asked. Tensors are bf16 (uint16_t) unless
 * said otherwise.
 */
#ifndef DSMOE_NATIVE_H
#define DSMOE_NATIVE_H

#include <stdint.h>

/* Python parses the lines `#define DSMOE_<NAME> <integer>` below; keep each one a plain integer. */
#define DSMOE_ABI_VERSION 5
/* Activation values per int8 scale: every matmul input width is a multiple of it. */
#define DSMOE_ACT_BLOCK 64
/* Output rows per tile of the 4-bit layout (bitsandbytes' CPU tiles). */
#define DSMOE_TILE_ROWS 32
/* Weight pointers per SwiGLU MLP: gate, its scale, up, its scale, down, its scale. */
#define DSMOE_MLP_POINTERS 6
/* Weight pointers of an attention block: q, k, v, o, each followed by its scale. */
#define DSMOE_ATTENTION_POINTERS 8
/* The most routed experts per token the router and the layer step take. */
#define DSMOE_MAX_TOP_K 64
/* MLPs in one swiglu batch: a token's routed experts and the shared ones (DSMOE_MAX_TOP_K + 1). */
#define DSMOE_MAX_MLPS 65
/* The instruction sets the matmuls run with (dsmoe_native_isa). */
#define DSMOE_ISA_NONE 0
#define DSMOE_ISA_VNNI 1
#define DSMOE_ISA_AVX2 2
/* dsmoe's 6-bit format (q6.c): codes q in [-DSMOE_Q6_MAX, DSMOE_Q6_MAX] per block of
 * DSMOE_ACT_BLOCK values, stored as q + DSMOE_Q6_MAX + 1 in DSMOE_Q6_BLOCK_BYTES bytes. */
#define DSMOE_Q6_MAX 31
#define DSMOE_Q6_BLOCK_BYTES 48

_Static_assert(DSMOE_MAX_MLPS == DSMOE_MAX_TOP_K + 1, "the routed experts and one shared MLP");

/* ---- structs Python fills (ctypes mirrors in native/library.py) ------------------------------ */

/* What the attention half of a layer step needs of a layer; Python fills it once per layer.
 * Projections: q, k, v, o, each followed by its scale, all of one format. */
typedef struct {
    const uint8_t *lut; /* NULL: int8 projections */
    const uint16_t *input_norm, *post_norm;
    const void *proj[DSMOE_ATTENTION_POINTERS];
    const float *router; /* [n_experts, hidden] fp32; NULL for a dense layer */
    int64_t blocksize, hidden, n_heads, n_kv, head_dim, n_experts, top_k;
    float unit, eps;
    int32_t norm_topk;
} attention_half;

/* A decoder layer as the decode step runs it: its attention half, then its MLP half in the
 * MLP's format, with the routed experts' weights for every expert id (experts
 * [n_experts * DSMOE_MLP_POINTERS]; NULL for a dense layer, or for a MoE layer whose experts an
 * expert store holds: the decode step's resolver names them) and the shared experts' or the
 * dense MLP's (shared_inter 0: none). Python fills one per layer. */
typedef struct {
    attention_half attn;
    const uint8_t *mlp_lut;
    float mlp_unit;
    int64_t mlp_blocksize, inter, shared_inter;
    const void *const *experts;
    const void *shared[DSMOE_MLP_POINTERS];
} layer_step;

/* One fact about the interface this library was built with: a constant ("DSMOE_ACT_BLOCK"), a
 * struct's size ("sizeof(layer_step)") or a field's offset ("offsetof(layer_step, attn)"). */
typedef struct {
    const char *name;
    int64_t value;
} dsmoe_abi_fact;

/* ---- abi.c ----------------------------------------------------------------------------------- */

/* DSMOE_ABI_VERSION as this library was compiled. */
int dsmoe_abi_version(void);

/* Points *facts at the table of every constant, struct size and field offset; returns its length. */
int dsmoe_abi_facts(const dsmoe_abi_fact **facts);

/* ---- matmul.c: quantized weights times int8-rounded activations ------------------------------ */

/* The instruction set the matmuls use (DSMOE_ISA_VNNI, DSMOE_ISA_AVX2, DSMOE_ISA_NONE). */
int dsmoe_native_isa(void);

/* 1 when the 4-bit kernels can run: on AVX512-VNNI or AVX2, like the 8-bit ones (both paths give
 * the same bits). */
int dsmoe_native_4bit(void);

/* Run the AVX2 path on a VNNI machine (isa = DSMOE_ISA_AVX2), so tests compare the two; -1
 * detects again. Returns the instruction set now in use; asking for one the CPU lacks changes
 * nothing. */
int dsmoe_native_use_isa(int isa);

/* y [m, n] = x [m, k] bf16 @ (w [n, k] int8 * scale[n]).T, written as bf16 (out_f32 = 0) or fp32.
 * -1 also when the CPU has neither instruction set or k is not a multiple of DSMOE_ACT_BLOCK. */
int dsmoe_int8_gemv(int64_t m, int64_t n, int64_t k, const uint16_t *x, const int8_t *w, const float *scale,
                    void *out, int out_f32);

/* One SwiGLU MLP for one token, 8-bit: out = down(silu(gate(x)) * up(x)), bf16 in and out, in one
 * call and one thread team. gate and up are [inter, hidden], down [hidden, inter]. */
int dsmoe_int8_mlp(int64_t hidden, int64_t inter, const uint16_t *x, const void *gate, const void *gate_scale,
                   const void *up, const void *up_scale, const void *down, const void *down_scale, uint16_t *out);

/* The same for 4-bit weights in the native layout; lut and unit are the codebook's table (matmul.c). */
int dsmoe_4bit_mlp(const uint8_t *lut, float unit, int64_t blocksize, int64_t hidden, int64_t inter, const uint16_t *x,
                   const void *gate, const void *gate_absmax, const void *up, const void *up_absmax,
                   const void *down, const void *down_absmax, uint16_t *out);

/* The routed experts of one token: out = out + bf16(y_e * mix[e]) for each expert e in order, all
 * in one thread team; weights holds DSMOE_MLP_POINTERS per expert. lut NULL: 8-bit experts; else
 * 4-bit with that table and unit. mix holds the bf16-rounded routing weights. */
int dsmoe_experts(const uint8_t *lut, float unit, int64_t blocksize, int64_t count, int64_t hidden, int64_t inter,
                  const uint16_t *x, const void *const *weights, const float *mix, uint16_t *out);

/* y [m, n] = x [m, k] bf16 @ W.T for a 4-bit weight [n, k] in the native layout with
 * tile-major scales, bf16 out: one row (decode's projections) or many (prefill). Tiles are split
 * across the threads. */
int dsmoe_4bit_gemm(const uint8_t *lut, float unit, int64_t blocksize, int64_t m, int64_t n, int64_t k,
                    const uint16_t *x, const uint8_t *w, const uint16_t *scales, uint16_t *out);

/* A MoE layer's routed experts over many tokens (prefill), MoE.route's per-expert loop in two
 * calls with PyTorch's h = silu(gate) * up (bf16) between them; matmul.c says how its numbers are
 * the loop's, bit for bit. count experts (ascending ids; weights holds DSMOE_MLP_POINTERS each;
 * lut NULL: 8-bit, else 4-bit with that table and unit), expert e's slots starts[e] ..
 * starts[e + 1] (at least one each; total = starts[count]) holding tokens[slot], rows of x
 * [tokens, hidden], and mix[slot], the bf16-rounded routing weights.
 * dsmoe_moe_up writes the slots' gate and up outputs, gate and up [total, inter] bf16, for experts
 * with more than one slot, and silu(gate) * up in fp32 into single [total, inter] for those with one.
 * dsmoe_moe_down takes h [total, inter] (experts with more than one slot) and single (the others)
 * and adds each slot's bf16(down(h) * mix) into out[tokens[slot]], expert after expert. */
int dsmoe_moe_up(const uint8_t *lut, float unit, int64_t blocksize, int64_t hidden, int64_t inter, int64_t count,
                 const void *const *weights, const int64_t *starts, const int64_t *tokens, const uint16_t *x,
                 uint16_t *gate, uint16_t *up, float *single);
int dsmoe_moe_down(const uint8_t *lut, float unit, int64_t blocksize, int64_t hidden, int64_t inter, int64_t count,
                   const void *const *weights, const int64_t *starts, const int64_t *tokens, const float *mix,
                   const uint16_t *h, const float *single, uint16_t *out);

/* A 4-bit weight [n, k] from bitsandbytes' standard nibbles (n * k / 2 bytes, row-major, high
 * nibble first) into the native layout the kernels above read. standard and native may be the
 * same buffer: a loaded weight is then repacked in place, with no second copy to allocate and
 * fault in. -1 unless n is a multiple of DSMOE_TILE_ROWS and k of 4, -2 when out of memory (in place, the buffer is then left half done). */
int dsmoe_pack_4bit(int64_t n, int64_t k, const uint8_t *standard, uint8_t *native);

/* ---- q6.c: the 6-bit lm_head ----------------------------------------------------------------- */

/* y [m, n] = x [m, k] bf16 @ dequant(W).T for a q6 weight: w [n, k / DSMOE_ACT_BLOCK blocks of
 * DSMOE_Q6_BLOCK_BYTES] and steps [n, k / DSMOE_ACT_BLOCK] fp16 (q6.c has the layout), written as
 * bf16 (out_f32 = 0) or fp32. -1 also when the CPU lacks the instruction sets (or F16C) or k is
 * not a multiple of DSMOE_ACT_BLOCK. Weight rows are split across the threads. */
int dsmoe_q6_gemv(int64_t m, int64_t n, int64_t k, const uint16_t *x, const uint8_t *w, const uint16_t *steps,
                  void *out, int out_f32);

/* ---- bf16.c: float weights ------------------------------------------------------------------ */

/* The matmuls' step along the input width: bf16.c's k is a multiple of it. */
#define DSMOE_BF16_K_STEP 16

/* out [m, n] = x [m, k] bf16 @ w [n, k] bf16 .T, summed in fp32 and rounded to bf16 (what
 * torch.nn.functional.linear gives, up to the order of the fp32 sums). -1 also when the CPU lacks
 * AVX2 and FMA or k is not a multiple of DSMOE_BF16_K_STEP. Weight rows are split across the
 * threads. */
int dsmoe_bf16_matmul(int64_t m, int64_t n, int64_t k, const uint16_t *x, const uint16_t *w, uint16_t *out);

/* ---- ops.c: the decode step's other kernels --------------------------------------------------- */

/* The decode step's attention, batch 1, bf16: rotate q and k at position `pos`, store k and v at
 * `pos` in the caches ([n_kv, capacity, head_dim] each), attend over positions 0..pos, write
 * out [n_heads * head_dim]. Scores, softmax and the weighted sum are fp32, as in SDPA; query heads
 * share KV heads in groups of n_heads / n_kv. head_dim must be a multiple of 8. */
int dsmoe_attention_decode(int64_t n_heads, int64_t n_kv, int64_t head_dim, int64_t pos, int64_t capacity,
                           const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *cos,
                           const uint16_t *sin, uint16_t *k_cache, uint16_t *v_cache, uint16_t *out);

/* RMSNorm of one bf16 row, as the PyTorch module computes it: x in fp32 times 1/sqrt(mean(x^2) +
 * eps), rounded to bf16, times the bf16 weight, rounded again. The sum of squares may add up in
 * another order than PyTorch's, so an output can differ from it by one bf16 step, rarely. */
int dsmoe_rmsnorm(int64_t n, float eps, const uint16_t *x, const uint16_t *weight, uint16_t *out);

/* DeepSeekMoE's router for one bf16 token: fp32 scores x . weight[e] for each of n_experts,
 * softmax, the top_k (at most DSMOE_MAX_TOP_K; the lower id first on a tie), renormalised to sum
 * 1 when norm_topk, written as ids ascending with their weights (MoEGate's output). The scores'
 * sums may add up in another order than PyTorch's matmul, so a near-tie between two experts could
 * resolve the other way. */
int dsmoe_router(int64_t n_experts, int64_t hidden, int64_t top_k, int norm_topk, const uint16_t *x,
                 const float *weight, int64_t *ids, float *weights);

/* ---- layer_step.c: decoder layers for one token ----------------------------------------------- */

/* Names the weights of the experts a MoE layer's router chose when an expert store holds them
 * (layer_step.experts NULL): for layer row l of the call, the router's input normed [hidden] and
 * its choice ids [count], it writes DSMOE_MLP_POINTERS pointers per expert, in ids' order, to
 * weights, which must stay valid until the layer's MLP half is done. Returns 0, or non-zero to
 * stop the step (dsmoe_decode_layers then returns -3). Called on the calling thread, between the
 * layer's halves. */
typedef int (*dsmoe_expert_resolver)(void *context, int64_t l, const uint16_t *normed, const int64_t *ids,
                                     int64_t count, const void **weights);

/* n_layers decoder layers for one bf16 token at position pos, in place on x [hidden]: each
 * layer's attention half, the weights of the experts its router chose (from layer_step.experts,
 * or from resolve(context, ...) where that is NULL), its MLP half. k_caches and v_caches hold
 * each layer's cache ([n_kv, capacity, head_dim] bf16). Each MoE layer's choice goes to ids and
 * mix at row l (route_stride entries a row), for the routing observer. The result is the
 * layer-by-layer module path's, bit for bit. Returns 0, or the first failing step's status. */
int dsmoe_decode_layers(const layer_step *const *layers, int64_t n_layers, int64_t pos, int64_t capacity,
                        const uint16_t *cos, const uint16_t *sin, uint16_t *const *k_caches,
                        uint16_t *const *v_caches, uint16_t *x, int64_t route_stride, int64_t *ids, float *mix,
                        dsmoe_expert_resolver resolve, void *context);

/* ---- quantize.c: float weights into the stored formats, while loading ------------------------ */

/* The element types the quantizers read (the weight as the checkpoint holds it). */
#define DSMOE_DTYPE_F32 0
#define DSMOE_DTYPE_BF16 1
#define DSMOE_DTYPE_F16 2
/* Entries of a 4-bit codebook (NF4, FP4). */
#define DSMOE_4BIT_CODES 16
/* The largest 4-bit blocksize the quantizer takes (bitsandbytes' largest). */
#define DSMOE_MAX_QUANT_BLOCK 4096

/* n values of x (dtype DSMOE_DTYPE_*) into bitsandbytes' blockwise 4-bit format, bit for bit
 * what its quantize_4bit gives on the CPU: absmax [ceil(n / blocksize)] fp32 and packed
 * [ceil(n / 2)] bytes, two codes a byte, the first high. bounds are the DSMOE_4BIT_CODES - 1
 * midpoints of the sorted codebook, codes the stored code of each of the DSMOE_4BIT_CODES
 * buckets between them. blocksize even, at most DSMOE_MAX_QUANT_BLOCK; x finite. */
int dsmoe_quantize_4bit(const void *x, int dtype, int64_t n, int64_t blocksize, const float *bounds,
                        const uint8_t *codes, uint8_t *packed, float *absmax);

/* x [rows, cols] (dtype DSMOE_DTYPE_*) into LLM.int8 rows, bit for bit quant/linear.py's
 * quantize_int8: q [rows, cols] int8 and scb [rows] fp32 (each row's max |x|); x finite. */
int dsmoe_quantize_int8(const void *x, int dtype, int64_t rows, int64_t cols, int8_t *q, float *scb);

/* x [rows, cols] (dtype DSMOE_DTYPE_*) into the q6 format, bit for bit quant/q6.py's quantize_q6:
 * packed [rows, cols / DSMOE_ACT_BLOCK * DSMOE_Q6_BLOCK_BYTES] and steps [rows, cols /
 * DSMOE_ACT_BLOCK] fp16. -1 also when cols is not a multiple of DSMOE_ACT_BLOCK or a block's step
 * overflows fp16 (|x| above ~2e6); x finite. */
int dsmoe_quantize_q6(const void *x, int dtype, int64_t rows, int64_t cols, uint8_t *packed, uint16_t *steps);

#endif
