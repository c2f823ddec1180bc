/* What this library was built with, for the check Python makes before using it
 * (native/library.py): the ABI version, every DSMOE_ constant, and the size and field offsets of
 * each struct Python fills. A library built from another dsmoe_native.h than the Python beside it
 * then fails that check with one line, instead of reading its structs at the wrong offsets. */
#include <stddef.h>

#include "dsmoe_native.h"

#define CONSTANT(name) {#name, name}
#define SIZE(type) {"sizeof(" #type ")", (int64_t)sizeof(type)}
#define FIELD(type, field) {"offsetof(" #type ", " #field ")", (int64_t)offsetof(type, field)}

static const dsmoe_abi_fact facts[] = {
    CONSTANT(DSMOE_ABI_VERSION),
    CONSTANT(DSMOE_ACT_BLOCK),
    CONSTANT(DSMOE_TILE_ROWS),
    CONSTANT(DSMOE_MLP_POINTERS),
    CONSTANT(DSMOE_ATTENTION_POINTERS),
    CONSTANT(DSMOE_MAX_TOP_K),
    CONSTANT(DSMOE_MAX_MLPS),
    CONSTANT(DSMOE_ISA_NONE),
    CONSTANT(DSMOE_ISA_VNNI),
    CONSTANT(DSMOE_ISA_AVX2),
    CONSTANT(DSMOE_Q6_MAX),
    CONSTANT(DSMOE_Q6_BLOCK_BYTES),
    CONSTANT(DSMOE_BF16_K_STEP),
    CONSTANT(DSMOE_DTYPE_F32),
    CONSTANT(DSMOE_DTYPE_BF16),
    CONSTANT(DSMOE_DTYPE_F16),
    CONSTANT(DSMOE_4BIT_CODES),
    CONSTANT(DSMOE_MAX_QUANT_BLOCK),
    SIZE(attention_half),
    FIELD(attention_half, lut),
    FIELD(attention_half, input_norm),
    FIELD(attention_half, post_norm),
    FIELD(attention_half, proj),
    FIELD(attention_half, router),
    FIELD(attention_half, blocksize),
    FIELD(attention_half, hidden),
    FIELD(attention_half, n_heads),
    FIELD(attention_half, n_kv),
    FIELD(attention_half, head_dim),
    FIELD(attention_half, n_experts),
    FIELD(attention_half, top_k),
    FIELD(attention_half, unit),
    FIELD(attention_half, eps),
    FIELD(attention_half, norm_topk),
    SIZE(layer_step),
    FIELD(layer_step, attn),
    FIELD(layer_step, mlp_lut),
    FIELD(layer_step, mlp_unit),
    FIELD(layer_step, mlp_blocksize),
    FIELD(layer_step, inter),
    FIELD(layer_step, shared_inter),
    FIELD(layer_step, experts),
    FIELD(layer_step, shared),
};

int dsmoe_abi_version(void) { return DSMOE_ABI_VERSION; }

int dsmoe_abi_facts(const dsmoe_abi_fact **out) {
    *out = facts;
    return (int)(sizeof facts / sizeof facts[0]);
}
