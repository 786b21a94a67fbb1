/* SPDX-License-Identifier: MIT */
/*
 * ReSA decode for one (entry, KV head): pooled group query, block scores from
 * the min/max summaries, the budgeted top-n selection with forced local and
 * sink blocks, then exact attention over the chosen blocks.
 * CUDA twins: cuda/select_blocks.cu (scores and selection) and
 * cuda/attention_sparse.cu (attention).
 */
#include <math.h>
#include <string.h>

#include "../dtype.h"
#include "cpu.h"

/* Strict total order of blocks: higher score first, then lower index (scores
 * are never NaN here: choose_blocks stores a NaN score as -inf). */
static inline int better(const float *score, int32_t a, int32_t b)
{
    return score[a] > score[b] || (score[a] == score[b] && a < b);
}

/* Rearranges ord[0..n) so that ord[0..k) are the k best blocks (Hoare's
 * selection, expected O(n): no sort of all M blocks per step). */
static void select_top(int32_t *ord, int32_t n, int32_t k, const float *score)
{
    int32_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        int32_t pivot = ord[lo + (hi - lo) / 2];
        int32_t i = lo, j = hi;
        while (i <= j) {
            while (better(score, ord[i], pivot))
                i++;
            while (better(score, pivot, ord[j]))
                j--;
            if (i <= j) {
                int32_t t = ord[i];
                ord[i++] = ord[j];
                ord[j--] = t;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            break;
    }
}

/* s = sum_j (q_j (kmax_j + kmin_j) / 2 + w |q_j| (kmax_j - kmin_j) / 2): the centre
 * of the block's key box plus w times its half-width seen from q.  At w = 1
 * this is the paper's upper bound, which choose_blocks computes with
 * block_score instead (the max form, as the CUDA kernel does). */
static float block_score_width(const float *qp, const float *mn, const float *mx, int32_t d,
                               float w)
{
    float s = 0.0f;
    for (int32_t i = 0; i < d; i++)
        s += 0.5f * (qp[i] * (mx[i] + mn[i]) + w * fabsf(qp[i]) * (mx[i] - mn[i]));
    return s;
}

/* s = sum_j max(q_j * kmax_j, q_j * kmin_j): an upper bound of q.k over the block. */
static inline float block_score(const float *qp, const float *mn, const float *mx, int32_t d)
{
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int32_t i = 0;
    for (; i + 8 <= d; i += 8)
        for (int32_t u = 0; u < 8; u++) {
            float a = qp[i + u] * mx[i + u], c = qp[i + u] * mn[i + u];
            part[u] += a > c ? a : c;
        }
    float s = 0.0f;
    for (; i < d; i++) {
        float a = qp[i] * mx[i], c = qp[i] * mn[i];
        s += a > c ? a : c;
    }
    return s + ((part[0] + part[1]) + (part[2] + part[3])) +
           ((part[4] + part[5]) + (part[6] + part[7]));
}

/* A NaN score (a NaN query, or infinite keys in the summary: inf - inf,
 * 0 * inf) ranks as -inf, below every number: the order stays total and
 * equals the CUDA kernel's (cuda/select_blocks.cu, order_key).  Ties, +-0,
 * +-inf and former NaNs alike, go to the lower block index. */
static inline float finite_or_low(float s)
{
    return s == s ? s : -INFINITY;
}

static inline float score_of(const float *q, const float *mn, const float *mx, int32_t d, float w)
{
    return w == 1.0f ? block_score(q, mn, mx, d) : block_score_width(q, mn, mx, d, w);
}

/* Points *mn and *mx at the fp32 summary of (page, head) of this layer and
 * returns the factor its scores take (the fp8 block scale, else 1). */
static float load_summary(const resa_cpu_job *job, int32_t page, int32_t head,
                          resa_cpu_scratch *sc, const float **mn, const float **mx)
{
    const resa_layout *L = &job->ctx->lo;
    const int32_t d = L->d;
    size_t at = resa_summary_offset(L, job->layer, page, head);
    if (L->sum_fp8) {
        const uint8_t *qmin = (const uint8_t *)job->st->kmin + at;
        const uint8_t *qmax = (const uint8_t *)job->st->kmax + at;
        for (int32_t j = 0; j < d; j++) {
            sc->kmin[j] = job->st->e4m3[qmin[j]];
            sc->kmax[j] = job->st->e4m3[qmax[j]];
        }
        *mn = sc->kmin;
        *mx = sc->kmax;
        return ldexpf(1.0f, job->st->kexp[at / (size_t)d]); /* applied once per block */
    }
    if (L->val_dtype == RESA_DTYPE_F32) {
        *mn = (const float *)job->st->kmin + at;
        *mx = (const float *)job->st->kmax + at;
    } else {
        resa_load_f32(job->st->kmin, L->val_dtype, at, d, sc->kmin);
        resa_load_f32(job->st->kmax, L->val_dtype, at, d, sc->kmax);
        *mn = sc->kmin;
        *mx = sc->kmax;
    }
    return 1.0f;
}

/* GROUP_SCORE HEAD_SHARE: sc->score[i] of each candidate i in [sink, local_from)
 * is log sum_h exp(s_hi - lse_h), where s_hi is query head h's block score in
 * logits (times the softmax scale) and lse_h its log-sum-exp over all M blocks,
 * forced ones included: the log of the group's summed estimated attention
 * shares.  A head whose largest score is not finite (every score -inf, or an
 * infinite one) carries no share information and is left out; a block no
 * head scores finitely gets -inf.  The CUDA twin is score_select's head-share
 * path (cuda/select_blocks.cu); both compute in fp32. */
static void head_share_scores(const resa_cpu_job *job, const resa_step_entry *e, int32_t head,
                              int32_t sink, int32_t local_from, resa_cpu_scratch *sc)
{
    const resa_layout *L = &job->ctx->lo;
    const int32_t M = e->n_blocks, d = L->d, g = L->group;
    const float w = job->step->score_width, softmax_scale = job->step->scale;
    for (int32_t i = 0; i < M; i++) {
        const float *mn, *mx;
        float scale = load_summary(job, e->pages[i], head, sc, &mn, &mx) * softmax_scale;
        for (int32_t j = 0; j < g; j++)
            sc->hscore[(size_t)j * M + i] =
                finite_or_low(scale * score_of(sc->qg + (size_t)j * d, mn, mx, d, w));
    }
    for (int32_t j = 0; j < g; j++) {
        const float *hs = sc->hscore + (size_t)j * M;
        float m = -INFINITY;
        for (int32_t i = 0; i < M; i++)
            m = hs[i] > m ? hs[i] : m;
        if (!isfinite(m)) {
            sc->hlse[j] = NAN; /* left out */
            continue;
        }
        float sum = 0.0f;
        for (int32_t i = 0; i < M; i++)
            sum += expf(hs[i] - m);
        sc->hlse[j] = m + logf(sum);
    }
    for (int32_t i = sink; i < local_from; i++) {
        float m = -INFINITY;
        for (int32_t j = 0; j < g; j++)
            if (sc->hlse[j] == sc->hlse[j]) {
                float t = sc->hscore[(size_t)j * M + i] - sc->hlse[j];
                m = t > m ? t : m;
            }
        float sum = 0.0f;
        if (m > -INFINITY)
            for (int32_t j = 0; j < g; j++)
                if (sc->hlse[j] == sc->hlse[j])
                    sum += expf(sc->hscore[(size_t)j * M + i] - sc->hlse[j] - m);
        sc->score[i] = m > -INFINITY ? m + logf(sum) : -INFINITY;
    }
}

static inline void set_bit(uint32_t *bits, int32_t i)
{
    bits[i >> 5] |= 1u << (i & 31);
}

/* This context's candidates of (entry, head): local blocks [*c0, *c1) are
 * neither sink nor local blocks of the whole sequence (blocks [0, sink) and
 * [M - local, M) globally; local block j is global block first_block + j).
 * Returns 0 when nothing is chosen by score (n >= M, or only forced blocks). */
static int candidate_range(const resa_cpu_job *job, const resa_step_entry *e, int32_t *c0,
                           int32_t *c1)
{
    const int32_t M = e->n_blocks, Ml = e->local_blocks, fb = e->first_block;
    int32_t sink = job->step->sink_blocks < M ? job->step->sink_blocks : M;
    int32_t local_from = M - (job->step->local_blocks < M ? job->step->local_blocks : M);
    int32_t lo = sink - fb, hi = local_from - fb;
    lo = lo < 0 ? 0 : lo > Ml ? Ml : lo;
    hi = hi < lo ? lo : hi > Ml ? Ml : hi;
    *c0 = lo;
    *c1 = hi;
    return e->n_select < M && e->n_pick > 0;
}

int32_t resa_cpu_candidate_scores(const resa_cpu_job *job, const resa_step_entry *e,
                                  int32_t head, resa_cpu_scratch *sc, int32_t *c0, int32_t *c1)
{
    const resa_layout *L = &job->ctx->lo;
    const int32_t d = L->d, g = L->group;
    if (!candidate_range(job, e, c0, c1) || *c0 >= *c1)
        return 0;
    const float w = job->step->score_width;
    int32_t n_cand = 0;
    /* the group's query vectors, unscaled, fp32 */
    for (int32_t j = 0; j < g; j++)
        resa_load_f32(job->q, L->io_dtype, ((size_t)e->row * L->hq + (size_t)head * g + j) * d,
                      d, sc->qg + (size_t)j * d);
    if (job->step->group_score == RESA_GROUP_SCORE_HEAD_SHARE) {
        /* the whole sequence is here (step_begin refuses HEAD_SHARE on a split one) */
        head_share_scores(job, e, head, *c0, *c1, sc);
        for (int32_t i = *c0; i < *c1; i++)
            sc->order[n_cand++] = i;
    } else {
        /* pooled query: their mean */
        for (int32_t i = 0; i < d; i++)
            sc->qp[i] = 0.0f;
        for (int32_t j = 0; j < g; j++)
            for (int32_t i = 0; i < d; i++)
                sc->qp[i] += sc->qg[(size_t)j * d + i];
        for (int32_t i = 0; i < d; i++)
            sc->qp[i] /= (float)g;
        for (int32_t i = *c0; i < *c1; i++) {
            const float *mn, *mx;
            float scale = load_summary(job, e->pages[i], head, sc, &mn, &mx);
            sc->score[i] = finite_or_low(scale * score_of(sc->qp, mn, mx, d, w));
            sc->order[n_cand++] = i;
        }
    }
    return n_cand;
}

void resa_cpu_select_top(int32_t *ord, int32_t n, int32_t k, const float *score)
{
    if (k > 0 && k < n)
        select_top(ord, n, k, score);
}

/* Fills sc->sel with the chosen blocks of this (entry, head), as local
 * indices.  With a threshold (t_score, t_block) from resa_ctx_step_thresholds,
 * a candidate is taken when it ranks at or above it in the order of the
 * single-context selection (score descending, then lower global index);
 * without one, the best n_pick of this context's candidates. */
static void choose_blocks(const resa_cpu_job *job, const resa_step_entry *e, int32_t head,
                          resa_cpu_scratch *sc)
{
    const resa_layout *L = &job->ctx->lo;
    const int32_t Ml = e->local_blocks;
    memset(sc->sel, 0, sizeof(uint32_t) * (size_t)L->sel_words);
    if (e->n_select >= e->n_blocks) {
        for (int32_t i = 0; i < Ml; i++)
            set_bit(sc->sel, i);
        return;
    }
    int32_t c0, c1;
    candidate_range(job, e, &c0, &c1);
    for (int32_t i = 0; i < Ml; i++) /* forced: the sequence's first sink and last local */
        if (i < c0 || i >= c1)
            set_bit(sc->sel, i);
    int32_t n_cand = resa_cpu_candidate_scores(job, e, head, sc, &c0, &c1);
    if (n_cand == 0)
        return;
    const resa_attend_extra *x = job->x;
    if (x && x->threshold_scores) {
        const size_t at = (size_t)(e - job->step->entries) * (size_t)L->hkv + (size_t)head;
        const float t = finite_or_low(x->threshold_scores[at]);
        const int64_t tb = (int64_t)x->threshold_blocks[at] - e->first_block; /* local */
        for (int32_t i = c0; i < c1; i++)
            if (sc->score[i] > t || (sc->score[i] == t && i <= tb))
                set_bit(sc->sel, i);
        return;
    }
    int32_t k = e->n_pick < n_cand ? e->n_pick : n_cand;
    resa_cpu_select_top(sc->order, n_cand, k, sc->score);
    for (int32_t i = 0; i < k; i++)
        set_bit(sc->sel, sc->order[i]);
}

void resa_cpu_attention_sparse(const resa_cpu_job *job, const resa_cpu_item *it,
                               resa_cpu_scratch *sc)
{
    const resa_layout *L = &job->ctx->lo;
    const resa_step_entry *e = &job->step->entries[it->entry];
    int32_t d = L->d, g = L->group;
    choose_blocks(job, e, it->head, sc);
    if (job->st->selection)
        memcpy(job->st->selection + resa_selection_offset(L, e->slot, job->layer, it->head),
               sc->sel, sizeof(uint32_t) * (size_t)L->sel_words);

    resa_cpu_load_queries(job, e, it->head, 0, 1, sc->q);
    resa_cpu_reset_rows(sc, g, d);
    int attended = 0;
    for (int32_t w = 0; w < (e->local_blocks + 31) / 32; w++)
        for (uint32_t bits = sc->sel[w]; bits; bits &= bits - 1) {
            int32_t blk = w * 32 + __builtin_ctz(bits);
            int64_t base = (int64_t)blk << L->log2_b;
            int32_t n = (int32_t)(e->end - base < L->b ? e->end - base : L->b);
            const float *kt, *vt;
            resa_cpu_block_f32(job, e->pages[blk], it->head, n, sc, &kt, &vt);
            resa_cpu_attend_block(sc->q, g, d, kt, vt, n, NULL, sc);
            attended = 1;
        }
    /* a QUERY_SPARSE row may choose none of this context's blocks */
    resa_cpu_store_output(job, e, it->head, 0, 1, !attended, sc);
}
