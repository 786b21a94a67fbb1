/* SPDX-License-Identifier: MIT */
/* llama2.c v0 checkpoint loader and fp32 forward pass; attention via libresa. */
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RMS_EPS 1e-5f
#define ROPE_THETA 10000.0f

int demo_model_load(demo_model *m, const char *path, char *err, size_t err_len)
{
    memset(m, 0, sizeof *m);
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_len, "cannot open checkpoint '%s'", path);
        return -1;
    }
    int32_t hdr[7];
    if (fread(hdr, sizeof(int32_t), 7, f) != 7) {
        snprintf(err, err_len, "'%s': short header", path);
        fclose(f);
        return -1;
    }
    demo_config *c = &m->cfg;
    c->dim = hdr[0];
    c->hidden_dim = hdr[1];
    c->n_layers = hdr[2];
    c->n_heads = hdr[3];
    c->n_kv_heads = hdr[4];
    int shared = hdr[5] > 0;
    c->vocab_size = shared ? hdr[5] : -hdr[5];
    c->seq_len = hdr[6];
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 ||
        c->n_kv_heads <= 0 || c->vocab_size <= 0 || c->seq_len <= 0 ||
        c->dim % c->n_heads != 0 || c->n_heads % c->n_kv_heads != 0 ||
        (c->dim / c->n_heads) % 2 != 0) {
        snprintf(err, err_len, "'%s': not a llama2.c v0 checkpoint (bad header)", path);
        fclose(f);
        return -1;
    }
    c->head_dim = c->dim / c->n_heads;
    c->kv_dim = c->head_dim * c->n_kv_heads;

    size_t L = (size_t)c->n_layers, D = (size_t)c->dim, H = (size_t)c->hidden_dim;
    size_t KV = (size_t)c->kv_dim, V = (size_t)c->vocab_size;
    size_t need = V * D + L * D + L * D * D + 2 * L * KV * D + L * D * D + L * D +
                  2 * L * H * D + L * D * H + D +
                  (size_t)c->seq_len * (size_t)c->head_dim; /* freq_cis real + imag */
    if (!shared)
        need += V * D;

    if (fseek(f, 0, SEEK_END) != 0) {
        snprintf(err, err_len, "'%s': cannot seek", path);
        fclose(f);
        return -1;
    }
    long size = ftell(f);
    if (size < 0 || (size_t)size != 28 + need * sizeof(float)) {
        snprintf(err, err_len, "'%s': %ld bytes, expected %zu for this header", path, size,
                 28 + need * sizeof(float));
        fclose(f);
        return -1;
    }
    m->data = malloc(need * sizeof(float));
    if (!m->data) {
        snprintf(err, err_len, "out of memory loading '%s'", path);
        fclose(f);
        return -1;
    }
    if (fseek(f, 28, SEEK_SET) != 0 || fread(m->data, sizeof(float), need, f) != need) {
        snprintf(err, err_len, "'%s': read error", path);
        free(m->data);
        m->data = NULL;
        fclose(f);
        return -1;
    }
    fclose(f);

    const float *p = m->data;
    demo_weights *w = &m->w;
    w->tok_emb = p;   p += V * D;
    w->rms_att = p;   p += L * D;
    w->wq = p;        p += L * D * D;
    w->wk = p;        p += L * KV * D;
    w->wv = p;        p += L * KV * D;
    w->wo = p;        p += L * D * D;
    w->rms_ffn = p;   p += L * D;
    w->w1 = p;        p += L * H * D;
    w->w2 = p;        p += L * D * H;
    w->w3 = p;        p += L * H * D;
    w->rms_final = p; p += D;
    p += (size_t)c->seq_len * (size_t)c->head_dim; /* legacy freq_cis, unused */
    if (!shared) {
        snprintf(err, err_len, "'%s': untied classifier not supported by the demo", path);
        free(m->data);
        m->data = NULL;
        return -1;
    }
    return 0;
}

void demo_model_free(demo_model *m)
{
    free(m->data);
    m->data = NULL;
}

int demo_state_init(demo_state *s, const demo_config *c, int32_t max_tokens)
{
    memset(s, 0, sizeof *s);
    size_t T = (size_t)max_tokens;
    s->max_tokens = max_tokens;
    s->x = malloc(T * (size_t)c->dim * sizeof(float));
    s->xb = malloc(T * (size_t)c->dim * sizeof(float));
    s->hb = malloc(T * (size_t)c->hidden_dim * sizeof(float));
    s->hb2 = malloc(T * (size_t)c->hidden_dim * sizeof(float));
    s->q = malloc(T * (size_t)c->dim * sizeof(float));
    s->k = malloc(T * (size_t)c->kv_dim * sizeof(float));
    s->v = malloc(T * (size_t)c->kv_dim * sizeof(float));
    s->att = malloc(T * (size_t)c->dim * sizeof(float));
    if (!s->x || !s->xb || !s->hb || !s->hb2 || !s->q || !s->k || !s->v || !s->att) {
        demo_state_free(s);
        return -1;
    }
    return 0;
}

void demo_state_free(demo_state *s)
{
    free(s->x);
    free(s->xb);
    free(s->hb);
    free(s->hb2);
    free(s->q);
    free(s->k);
    free(s->v);
    free(s->att);
    memset(s, 0, sizeof *s);
}

static void rmsnorm(float *o, const float *x, const float *weight, int32_t n)
{
    float ss = 0.0f;
    for (int32_t j = 0; j < n; j++)
        ss += x[j] * x[j];
    ss = 1.0f / sqrtf(ss / (float)n + RMS_EPS);
    for (int32_t j = 0; j < n; j++)
        o[j] = weight[j] * (ss * x[j]);
}

/* out[t][0..rows) = W[rows][cols] . x[t][0..cols) for t < n.  Four rows at a
 * time: four independent sums keep the FPU busy without -ffast-math (the
 * order of each sum, and so every result, is the same as a plain loop's). */
static void matmul(float *out, const float *x, const float *W, int32_t n, int32_t rows,
                   int32_t cols)
{
    for (int32_t t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * (size_t)cols;
        float *ot = out + (size_t)t * (size_t)rows;
        int32_t i = 0;
        for (; i + 4 <= rows; i += 4) {
            const float *w0 = W + (size_t)i * (size_t)cols;
            const float *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
            for (int32_t j = 0; j < cols; j++) {
                float xj = xt[j];
                a0 += w0[j] * xj;
                a1 += w1[j] * xj;
                a2 += w2[j] * xj;
                a3 += w3[j] * xj;
            }
            ot[i] = a0;
            ot[i + 1] = a1;
            ot[i + 2] = a2;
            ot[i + 3] = a3;
        }
        for (; i < rows; i++) {
            const float *wi = W + (size_t)i * (size_t)cols;
            float acc = 0.0f;
            for (int32_t j = 0; j < cols; j++)
                acc += wi[j] * xt[j];
            ot[i] = acc;
        }
    }
}

/* llama2.c RoPE: rotate the interleaved pairs (2i, 2i+1) of every head by
 * pos * 10000^(-2i/head_dim); `vec` holds `width` floats (heads * head_dim). */
static void rope(float *vec, int32_t width, int32_t head_dim, int64_t pos)
{
    for (int32_t i = 0; i < width; i += 2) {
        int32_t hd = i % head_dim;
        float freq = 1.0f / powf(ROPE_THETA, (float)hd / (float)head_dim);
        float val = (float)pos * freq;
        float fcr = cosf(val), fci = sinf(val);
        float v0 = vec[i], v1 = vec[i + 1];
        vec[i] = v0 * fcr - v1 * fci;
        vec[i + 1] = v0 * fci + v1 * fcr;
    }
}

resa_status demo_forward(const demo_model *m, demo_state *s, resa_ctx *ctx, int32_t seq,
                         resa_mode mode, const int32_t *tokens, int32_t n, int64_t pos0,
                         float *logits, int all_rows)
{
    const demo_config *c = &m->cfg;
    const demo_weights *w = &m->w;
    if (n <= 0 || n > s->max_tokens)
        return RESA_ERR_INVALID_ARGUMENT;
    const int32_t D = c->dim, H = c->hidden_dim, KV = c->kv_dim;

    int32_t mode_i = (int32_t)mode;
    resa_status st = resa_ctx_step_begin(ctx, 1, &seq, &mode_i, &n, 0);
    if (st != RESA_OK)
        return st;

    for (int32_t t = 0; t < n; t++)
        memcpy(s->x + (size_t)t * D, w->tok_emb + (size_t)tokens[t] * D,
               (size_t)D * sizeof(float));

    for (int32_t l = 0; l < c->n_layers; l++) {
        size_t lo = (size_t)l;
        for (int32_t t = 0; t < n; t++)
            rmsnorm(s->xb + (size_t)t * D, s->x + (size_t)t * D, w->rms_att + lo * D, D);
        matmul(s->q, s->xb, w->wq + lo * D * D, n, D, D);
        matmul(s->k, s->xb, w->wk + lo * KV * D, n, KV, D);
        matmul(s->v, s->xb, w->wv + lo * KV * D, n, KV, D);
        for (int32_t t = 0; t < n; t++) {
            rope(s->q + (size_t)t * D, D, c->head_dim, pos0 + t);
            rope(s->k + (size_t)t * KV, KV, c->head_dim, pos0 + t);
        }
        /* q [T][Hq][d], k/v [T][Hkv][d]: exactly llama2.c's row layout. */
        st = resa_ctx_step_attend(ctx, l, s->q, s->k, s->v, s->att, 0);
        if (st != RESA_OK) {
            (void)resa_ctx_step_cancel(ctx);
            return st;
        }
        matmul(s->xb, s->att, w->wo + lo * D * D, n, D, D);
        for (size_t i = 0; i < (size_t)n * D; i++)
            s->x[i] += s->xb[i];

        for (int32_t t = 0; t < n; t++)
            rmsnorm(s->xb + (size_t)t * D, s->x + (size_t)t * D, w->rms_ffn + lo * D, D);
        matmul(s->hb, s->xb, w->w1 + lo * H * D, n, H, D);
        matmul(s->hb2, s->xb, w->w3 + lo * H * D, n, H, D);
        for (size_t i = 0; i < (size_t)n * H; i++) {
            float a = s->hb[i];
            s->hb[i] = a / (1.0f + expf(-a)) * s->hb2[i]; /* SiLU(w1 x) * (w3 x) */
        }
        matmul(s->xb, s->hb, w->w2 + lo * D * H, n, D, H);
        for (size_t i = 0; i < (size_t)n * D; i++)
            s->x[i] += s->xb[i];
    }

    st = resa_ctx_step_end(ctx, 0);
    if (st != RESA_OK) {
        (void)resa_ctx_step_cancel(ctx);
        return st;
    }

    if (logits) {
        int32_t first = all_rows ? 0 : n - 1;
        for (int32_t t = first; t < n; t++) {
            float *xt = s->x + (size_t)t * D;
            rmsnorm(s->xb, xt, w->rms_final, D);
            matmul(logits + (size_t)(t - first) * c->vocab_size, s->xb, w->tok_emb, 1,
                   c->vocab_size, D);
        }
    }
    return RESA_OK;
}
