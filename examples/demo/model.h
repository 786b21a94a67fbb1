/* SPDX-License-Identifier: MIT */
/*
 * A llama2.c "v0" checkpoint and its fp32 forward pass, with the attention
 * delegated to libresa's step protocol.  The host side of the contract: this
 * file owns the weights, the embeddings, the norms, the projections, RoPE
 * (applied to q and k before libresa sees them), the MLP and the classifier;
 * libresa owns the KV cache and the attention.
 */
#ifndef RESA_DEMO_MODEL_H
#define RESA_DEMO_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "resa.h"

typedef struct demo_config {
    int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
    int32_t head_dim, kv_dim;
} demo_config;

typedef struct demo_weights {
    const float *tok_emb;   /* [vocab][dim], also the (tied) classifier */
    const float *rms_att;   /* [layer][dim] */
    const float *wq;        /* [layer][dim][dim] */
    const float *wk;        /* [layer][kv_dim][dim] */
    const float *wv;        /* [layer][kv_dim][dim] */
    const float *wo;        /* [layer][dim][dim] */
    const float *rms_ffn;   /* [layer][dim] */
    const float *w1;        /* [layer][hidden][dim] */
    const float *w2;        /* [layer][dim][hidden] */
    const float *w3;        /* [layer][hidden][dim] */
    const float *rms_final; /* [dim] */
} demo_weights;

typedef struct demo_model {
    demo_config cfg;
    demo_weights w;
    float *data;            /* all fp32 values of the file after the header */
} demo_model;

/* Loads path; on failure returns -1 and writes a message to err. */
int demo_model_load(demo_model *m, const char *path, char *err, size_t err_len);
void demo_model_free(demo_model *m);

/* Scratch buffers for chunks of up to max_tokens rows. */
typedef struct demo_state {
    int32_t max_tokens;
    float *x, *xb, *hb, *hb2;     /* [T][dim], [T][dim], [T][hidden] x2 */
    float *q, *k, *v, *att;       /* [T][dim], [T][kv_dim] x2, [T][dim] */
} demo_state;

int demo_state_init(demo_state *s, const demo_config *cfg, int32_t max_tokens);
void demo_state_free(demo_state *s);

/*
 * One libresa step for one sequence: `n` tokens at positions pos0 .. pos0+n-1
 * (pos0 must equal the sequence's length, or length - pending for RECTIFY),
 * with the given resa_mode.  Runs the whole model; attention of every layer
 * goes through resa_ctx_step_attend.  When `logits` is not NULL it receives
 * the logits of the last row ([vocab]) or, with all_rows != 0, of every row
 * ([n][vocab]).  On failure the step is cancelled and the status returned.
 */
resa_status demo_forward(const demo_model *m, demo_state *s, resa_ctx *ctx, int32_t seq,
                         resa_mode mode, const int32_t *tokens, int32_t n, int64_t pos0,
                         float *logits, int all_rows);

#endif
