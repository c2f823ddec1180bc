/* A decoder layer's decode step for one token, in two calls with the same steps and the same
 * bf16 roundings as the PyTorch modules, so the result is the module path's, bit for bit: the
 * attention half (norm, q/k/v, attention, o, residual, the next norm and the router), then, once
 * the router's choice has picked the experts' weights, the MLP half (routed and shared experts, or
 * a dense MLP, and the residual). The decode step of one layer was ~60 PyTorch and Python
 * operations around the kernels (3% of a decode step at the 16B geometry); dsmoe_decode_layers
 * runs all of a model's layers in one call. The structs Python fills are in dsmoe_native.h. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* x_out = x + o(attention(q, k, v of rmsnorm(x))), the token's keys and values written to the
 * caches at pos; normed = rmsnorm(x_out) for the MLP; with a router, ids [top_k] and mix [top_k]
 * (fp32) are its choice for normed. */
static int attention_half_step(const attention_half *L, int64_t pos, int64_t capacity, const uint16_t *cos,
                         const uint16_t *sin, uint16_t *k_cache, uint16_t *v_cache, const uint16_t *x,
                         uint16_t *x_out, uint16_t *normed, int64_t *ids, float *mix) {
    const wformat f = {L->lut, L->unit, L->blocksize};
    const int64_t hidden = L->hidden, width = L->n_heads * L->head_dim, kv = L->n_kv * L->head_dim;
    if (!shape_ok(&f, width, hidden) || !shape_ok(&f, kv, hidden) || !shape_ok(&f, hidden, width) || hidden % 8)
        return -1;
    uint16_t *buf = malloc((size_t)(2 * hidden + 2 * width + 2 * kv) * sizeof(uint16_t));
    float *acc = malloc((size_t)(width + 2 * kv + hidden) * sizeof(float));
    float *tmp = malloc((size_t)(hidden > width ? hidden : width) * sizeof(float));
    qacts a, b;
    const int ok = alloc_acts(&a, 1, hidden) & alloc_acts(&b, 1, width);
    if (!buf || !acc || !tmp || !ok) {
        free(buf), free(acc), free(tmp), free_acts(&a), free_acts(&b);
        return -2;
    }
    uint16_t *h = buf, *o = h + hidden, *q = o + hidden, *att = q + width, *k = att + width, *v = k + kv;
    int status = dsmoe_rmsnorm(hidden, L->eps, x, L->input_norm, h);
    quantize_bf16_rows(h, 1, hidden, &a, tmp);
    {
        const void *w[3] = {L->proj[0], L->proj[2], L->proj[4]}, *s[3] = {L->proj[1], L->proj[3], L->proj[5]};
        const int64_t n[3] = {width, kv, kv};
        uint16_t *y[3] = {q, k, v};
#pragma omp parallel
        project_rows(&f, 3, w, s, n, hidden, &a, acc, y);
    }
    if (status == 0)
        status = dsmoe_attention_decode(L->n_heads, L->n_kv, L->head_dim, pos, capacity, q, k, v, cos, sin, k_cache,
                                        v_cache, att);
    if (status == 0) {
        quantize_bf16_rows(att, 1, width, &b, tmp);
        const void *w[1] = {L->proj[6]}, *s[1] = {L->proj[7]};
        const int64_t n[1] = {hidden};
        uint16_t *y[1] = {o};
#pragma omp parallel
        project_rows(&f, 1, w, s, n, width, &b, acc, y);
        for (int64_t j = 0; j < hidden; j++) x_out[j] = f32_to_bf16(bf16_to_f32(x[j]) + bf16_to_f32(o[j]));
        status = dsmoe_rmsnorm(hidden, L->eps, x_out, L->post_norm, normed);
    }
    if (status == 0 && L->router)
        status = dsmoe_router(L->n_experts, hidden, L->top_k, L->norm_topk, normed, L->router, ids, mix);
    free(buf), free(acc), free(tmp), free_acts(&a), free_acts(&b);
    return status;
}

/* x_out = x + mlp(normed): the routed experts (count of them, DSMOE_MLP_POINTERS each as in
 * dsmoe_experts, mix their router weights in fp32, rounded to bf16 here as the module path
 * rounds them) summed in order, plus the shared experts' MLP (shared_inter wide; NULL for none).
 * A dense layer is count 0 with its MLP as the shared one. */
static int mlp_half_step(const wformat *f, int64_t hidden, int64_t count, int64_t inter, const void *const *experts,
                         const float *mix, int64_t shared_inter, const void *const *shared, const uint16_t *normed,
                         const uint16_t *x, uint16_t *x_out) {
    if (count > DSMOE_MAX_TOP_K) return -1;
    /* The routed experts and the shared MLP in one thread team: one swiglu_batch. */
    const void *weights[DSMOE_MLP_POINTERS * DSMOE_MAX_MLPS];
    int64_t inters[DSMOE_MAX_MLPS];
    float rounded[DSMOE_MAX_TOP_K];
    for (int64_t e = 0; e < count; e++) {
        rounded[e] = bf16_to_f32(f32_to_bf16(mix[e]));
        inters[e] = inter;
        memcpy(weights + DSMOE_MLP_POINTERS * e, experts + DSMOE_MLP_POINTERS * e, DSMOE_MLP_POINTERS * sizeof(void *));
    }
    if (shared) {
        inters[count] = shared_inter;
        memcpy(weights + DSMOE_MLP_POINTERS * count, shared, DSMOE_MLP_POINTERS * sizeof(void *));
    }
    uint16_t *routed = calloc((size_t)(2 * hidden), sizeof(uint16_t));
    if (!routed) return -2;
    uint16_t *mlp = routed + hidden;
    const int status = swiglu_batch(f, count + (shared != NULL), hidden, inters, normed, weights, count, rounded, routed, mlp);
    if (status == 0) {
        for (int64_t j = 0; j < hidden; j++) {
            /* The module path: out = route(...) then out + shared(...); a dense MLP's output as is. */
            float y = bf16_to_f32(routed[j]);
            if (shared) y = count > 0 ? bf16_to_f32(f32_to_bf16(y + bf16_to_f32(mlp[j]))) : bf16_to_f32(mlp[j]);
            x_out[j] = f32_to_bf16(bf16_to_f32(x[j]) + y);
        }
    }
    free(routed);
    return status;
}

int dsmoe_decode_layers(const layer_step *const *layers, int64_t n_layers, int64_t pos, int64_t capacity,
                        const uint16_t *cos, const uint16_t *sin, uint16_t *const *k_caches,
                        uint16_t *const *v_caches, uint16_t *x, int64_t route_stride, int64_t *ids, float *mix,
                        dsmoe_expert_resolver resolve, void *context) {
    const int64_t hidden = n_layers > 0 ? layers[0]->attn.hidden : 0;
    uint16_t *middle = malloc((size_t)(2 * hidden) * sizeof(uint16_t));
    if (!middle) return -2;
    uint16_t *normed = middle + hidden;
    int status = 0;
    for (int64_t l = 0; l < n_layers && status == 0; l++) {
        const layer_step *L = layers[l];
        const int moe = L->attn.router != NULL;
        if (L->attn.hidden != hidden || (moe && (L->attn.top_k > route_stride || L->attn.top_k > DSMOE_MAX_TOP_K))
            || (moe && !L->experts && !resolve)) {
            status = -1;
            break;
        }
        int64_t *chosen = ids + l * route_stride;
        float *weights = mix + l * route_stride;
        status = attention_half_step(&L->attn, pos, capacity, cos, sin, k_caches[l], v_caches[l], x, middle, normed,
                                     moe ? chosen : NULL, moe ? weights : NULL);
        if (status != 0) break;
        const void *picked[DSMOE_MLP_POINTERS * DSMOE_MAX_TOP_K];
        const int64_t count = moe ? L->attn.top_k : 0;
        if (moe && !L->experts) {
            if (resolve(context, l, normed, chosen, count, picked) != 0) {
                status = -3;
                break;
            }
        } else {
            for (int64_t e = 0; e < count; e++)
                for (int64_t i = 0; i < DSMOE_MLP_POINTERS; i++)
                    picked[DSMOE_MLP_POINTERS * e + i] = L->experts[DSMOE_MLP_POINTERS * chosen[e] + i];
        }
        const wformat f = {L->mlp_lut, L->mlp_unit, L->mlp_blocksize};
        status = mlp_half_step(&f, hidden, count, L->inter, picked, weights, L->shared_inter,
                               L->shared_inter ? L->shared : NULL, normed, middle, x);
    }
    free(middle);
    return status;
}
