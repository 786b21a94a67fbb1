/* SPDX-License-Identifier: MIT */
/* The host-engine loop of libresa, random q/k/v in place of a model.
 * Build: cc host_engine.c $(pkg-config --cflags --libs resa) */
#include <resa.h>
#include <stdio.h>
#include <stdlib.h>

enum { LAYERS = 2, HQ = 4, HKV = 2, D = 64, PROMPT = 1000, TOKENS = 40 };
static float q[PROMPT * HQ * D], k[PROMPT * HKV * D], v[PROMPT * HKV * D], out[PROMPT * HQ * D];

static void fill(float *x, int n) { while (n--) x[n] = (float)(rand() % 2001 - 1000) / 1000.0f; }

/* One step of one sequence: begin, attend every layer, end (cancel on failure). */
static resa_status step(resa_ctx *ctx, int32_t seq, int32_t mode, int32_t n)
{
    resa_status s = resa_ctx_step_begin(ctx, 1, &seq, &mode, &n, 0);
    for (int32_t l = 0; s == RESA_OK && l < LAYERS; l++) {
        fill(q, n * HQ * D), fill(k, n * HKV * D), fill(v, n * HKV * D); /* the model, layer l */
        if ((s = resa_ctx_step_attend(ctx, l, q, k, v, out, 0)) != RESA_OK)
            resa_ctx_step_cancel(ctx);
    }
    return s == RESA_OK ? resa_ctx_step_end(ctx, 0) : s;
}

int main(void)
{
    resa_ctx *ctx;
    int32_t seq, due = 0;
    int64_t len = 0, pending = 0;
    if (resa_ctx_create(RESA_BACKEND_CPU, NULL, &ctx) != RESA_OK) return 1;
    resa_status s = resa_ctx_set_param(ctx, RESA_PARAM_NUM_LAYERS, LAYERS);
    if (!s) s = resa_ctx_set_param(ctx, RESA_PARAM_NUM_Q_HEADS, HQ);
    if (!s) s = resa_ctx_set_param(ctx, RESA_PARAM_NUM_KV_HEADS, HKV);
    if (!s) s = resa_ctx_set_param(ctx, RESA_PARAM_HEAD_DIM, D);
    if (!s) s = resa_ctx_set_param(ctx, RESA_PARAM_MAX_TOKENS, 4096);
    if (!s) s = resa_ctx_set_param(ctx, RESA_PARAM_RECTIFY_INTERVAL, 16);
    if (!s) s = resa_seq_create(ctx, &seq);                       /* locks the shape */
    if (!s) s = step(ctx, seq, RESA_MODE_APPEND, PROMPT);          /* prefill: dense */
    for (int t = 0; !s && t < TOKENS; t++) {
        s = step(ctx, seq, RESA_MODE_DECODE, 1);                   /* decode: block-sparse */
        if (!s) s = resa_seq_rectify_due(ctx, seq, &due);
        if (!s && due && !(s = resa_seq_pending(ctx, seq, &pending)))
            s = step(ctx, seq, RESA_MODE_RECTIFY, (int32_t)pending); /* rewrite pending K/V */
    }
    if (!s) s = resa_seq_length(ctx, seq, &len);
    if (!s) s = resa_seq_pending(ctx, seq, &pending);
    if (!s) printf("length %lld, pending %lld\n", (long long)len, (long long)pending);
    else fprintf(stderr, "%s: %s\n", resa_status_name(s), resa_ctx_last_error(ctx));
    resa_ctx_destroy(ctx);
    return s ? 1 : 0;
}
