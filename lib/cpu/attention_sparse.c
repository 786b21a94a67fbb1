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

/* Strict total order of blocks: higher score first, then lower index. */
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

static inline void set_bit(uint32_t *bits, int32_t i)
{
    bits[i >> 5] |= 1u << (i & 31);
}

/* Fills sc->sel with the chosen blocks of this (entry, head). */
static void choose_blocks(const resa_cpu_job *job, const resa_step_entry *e, int32_t head,
                          resa_cpu_scratch *sc)
{
    const resa_layout *L = &job->ctx->lo;
    int32_t M = e->n_blocks, n = e->n_select, d = L->d, g = L->group;
    memset(sc->sel, 0, sizeof(uint32_t) * (size_t)L->sel_words);
    if (n >= M) {
        for (int32_t i = 0; i < M; i++)
            set_bit(sc->sel, i);
        return;
    }
    /* forced: the first `sink` and the last `local` blocks */
    int32_t sink = job->step->sink_blocks < M ? job->step->sink_blocks : M;
    int32_t local_from = M - (job->step->local_blocks < M ? job->step->local_blocks : M);
    int32_t forced = 0;
    for (int32_t i = 0; i < M; i++)
        if (i < sink || i >= local_from) {
            set_bit(sc->sel, i);
            forced++;
        }
    if (n <= forced)
        return;
    /* pooled query: the mean of the group's query vectors, unscaled, fp32 */
    const resa_step_entry *ent = e;
    for (int32_t i = 0; i < d; i++)
        sc->qp[i] = 0.0f;
    for (int32_t j = 0; j < g; j++) {
        size_t at = ((size_t)ent->row * L->hq + (size_t)head * g + j) * d;
        resa_load_f32(job->q, L->io_dtype, at, d, sc->kt); /* kt as a row buffer */
        for (int32_t i = 0; i < d; i++)
            sc->qp[i] += sc->kt[i];
    }
    for (int32_t i = 0; i < d; i++)
        sc->qp[i] /= (float)g;
    int32_t n_cand = 0;
    const float w = job->step->score_width;
    for (int32_t i = sink; i < local_from; i++) {
        size_t at = resa_summary_offset(L, job->layer, e->pages[i], head);
        const float *mn, *mx;
        float scale = 1.0f;
        if (L->sum_fp8) {
            const uint8_t *qmin = (const uint8_t *)job->st->kmin + at;
            const uint8_t *qmax = (const uint8_t *)job->st->kmax + at;
            for (int32_t j = 0; j < d; j++) {
                sc->kmin[j] = job->st->e4m3[qmin[j]];
                sc->kmax[j] = job->st->e4m3[qmax[j]];
            }
            scale = ldexpf(1.0f, job->st->kexp[at / (size_t)d]); /* applied once per block */
            mn = sc->kmin;
            mx = sc->kmax;
        } else if (L->kv_dtype == RESA_DTYPE_F32) {
            mn = (const float *)job->st->kmin + at;
            mx = (const float *)job->st->kmax + at;
        } else {
            resa_load_f32(job->st->kmin, L->kv_dtype, at, d, sc->kmin);
            resa_load_f32(job->st->kmax, L->kv_dtype, at, d, sc->kmax);
            mn = sc->kmin;
            mx = sc->kmax;
        }
        sc->score[i] = scale * (w == 1.0f ? block_score(sc->qp, mn, mx, d)
                                          : block_score_width(sc->qp, mn, mx, d, w));
        sc->order[n_cand++] = i;
    }
    select_top(sc->order, n_cand, n - forced, sc->score);
    for (int32_t i = 0; i < n - forced; i++)
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
    for (int32_t w = 0; w < (e->n_blocks + 31) / 32; w++)
        for (uint32_t bits = sc->sel[w]; bits; bits &= bits - 1) {
            int32_t blk = w * 32 + __builtin_ctz(bits);
            int64_t base = (int64_t)blk << L->log2_b;
            int32_t n = (int32_t)(e->end - base < L->b ? e->end - base : L->b);
            const float *kt, *vt;
            resa_cpu_block_f32(job, e->pages[blk], it->head, n, sc, &kt, &vt);
            resa_cpu_attend_block(sc->q, g, d, kt, vt, n, NULL, sc);
        }
    resa_cpu_store_output(job, e, it->head, 0, 1, sc);
}
