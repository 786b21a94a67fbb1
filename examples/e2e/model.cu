// SPDX-License-Identifier: MIT
// resa-e2e: weights, activations and the forward pass.
#include <cmath>
#include <initializer_list>
#include <vector>

#include "model.h"
#include "tp.h"

namespace {

// Weight elements of one layer, in arena order.
size_t layer_elems(const ModelDims &m)
{
    size_t h = m.hidden, qkv = m.qkv(), qd = (size_t)m.hq * m.d, i = m.inter;
    return 2 * h + qkv * h + qkv + h * qd + 2 * i * h + h * i;
}

} // namespace

size_t model_param_elems(const ModelDims &m)
{
    return layer_elems(m) * m.layers + 2 * (size_t)m.vocab * m.hidden + m.hidden;
}

void model_init(Model &m, const ModelDims &full, int tp, int rank, cudaStream_t s)
{
    m.full = full;
    m.tp = tp;
    m.rank = rank;
    m.comm = nullptr;
    m.dims = full.shard(tp);
    const ModelDims &D = m.dims, &F = m.full;
    if (D.layers > 64) {
        std::fprintf(stderr, "resa-e2e: at most 64 layers\n");
        std::exit(1);
    }
    m.arena_elems = model_param_elems(D);
    CK(cudaMalloc(&m.arena, m.arena_elems * sizeof(bf16)));
    bf16 *p = m.arena;
    uint64_t tensor = 0;
    // A tensor of the whole model, [rows][cols], uniform with standard
    // deviation `sd` around `center` (sd from the whole model's sizes); this
    // rank keeps the row ranges `pieces` (first row, count), one after the
    // other, of columns [col0, col0 + ncols).
    struct Piece {
        size_t row0, rows;
    };
    auto take = [&](size_t cols, std::initializer_list<Piece> pieces, size_t col0, size_t ncols,
                    float center, float sd) {
        const uint64_t seed = kSeed + 0x1000 * ++tensor;
        bf16 *t = p;
        for (const Piece &pc : pieces) {
            launch_init_slice(p, pc.rows, ncols, cols, pc.row0, col0, seed, center,
                              sd * 1.7320508f, s);
            p += pc.rows * ncols;
        }
        return t;
    };
    auto whole = [&](size_t rows, size_t cols, float center, float sd) {
        return take(cols, {{0, rows}}, 0, cols, center, sd);
    };
    const size_t h = F.hidden, d = F.d, in = F.inter, qd = (size_t)F.hq * d;
    const size_t r = (size_t)rank, hq = D.hq, hkv = D.hkv, in_r = D.inter; // this rank's share
    // q | k | v rows of this rank's heads; gate | up rows of its MLP columns
    const std::initializer_list<Piece> qkv = {{r * hq * d, hq * d},
                                              {qd + r * hkv * d, hkv * d},
                                              {qd + ((size_t)F.hkv + r * hkv) * d, hkv * d}};
    const std::initializer_list<Piece> gu = {{r * in_r, in_r}, {in + r * in_r, in_r}};
    for (int l = 0; l < D.layers; l++) {
        Layer &L = m.layers[l];
        L.ln1 = whole(1, h, 1.0f, 0.05f);
        L.ln2 = whole(1, h, 1.0f, 0.05f);
        L.w_qkv = take(h, qkv, 0, h, 0.0f, 1.0f / std::sqrt((float)h));
        L.b_qkv = take(1, qkv, 0, 1, 0.0f, 0.05f);
        L.w_o = take(qd, {{0, h}}, r * hq * d, hq * d, 0.0f, 1.0f / std::sqrt((float)qd));
        L.w_gu = take(h, gu, 0, h, 0.0f, 1.0f / std::sqrt((float)h));
        L.w_down = take(in, {{0, h}}, r * in_r, in_r, 0.0f, 1.0f / std::sqrt((float)in));
    }
    m.emb = whole(D.vocab, h, 0.0f, 1.0f);
    m.lm_head = whole(D.vocab, h, 0.0f, 1.0f / std::sqrt((float)h));
    m.final_norm = whole(1, h, 1.0f, 0.05f);
    if ((size_t)(p - m.arena) != m.arena_elems) {
        std::fprintf(stderr, "resa-e2e: internal error: weight arena layout\n");
        std::exit(1);
    }
    std::vector<double> inv_freq(D.d / 2);
    rope_inv_freq(inv_freq.data(), D.d, D.rope_theta);
    CK(cudaMalloc(&m.rope_inv_freq, inv_freq.size() * sizeof(double)));
    CK(cudaMemcpyAsync(m.rope_inv_freq, inv_freq.data(), inv_freq.size() * sizeof(double),
                       cudaMemcpyHostToDevice, s));
    CK(cudaStreamSynchronize(s));
}

void model_free(Model &m)
{
    CK(cudaFree(m.arena));
    CK(cudaFree(m.rope_inv_freq));
    m.arena = nullptr;
    m.rope_inv_freq = nullptr;
}

size_t acts_bytes(const ModelDims &m, int tmax, int max_out)
{
    size_t h = m.hidden, row = 4 * h + 2 * (h + (size_t)m.qkv() + (size_t)m.hq * m.d +
                                            2 * (size_t)m.hkv * m.d + h + h +
                                            2 * (size_t)m.inter + m.inter) + 8;
    return row * tmax + 4 * (size_t)m.vocab * max_out + 16 * 256;
}

void acts_alloc(Acts &a, const ModelDims &m, int tmax, int max_out)
{
    a.tmax = tmax;
    a.max_out = max_out;
    size_t t = tmax, h = m.hidden;
    CK(cudaMalloc(&a.x, t * h * sizeof(float)));
    CK(cudaMalloc(&a.xn, t * h * sizeof(bf16)));
    CK(cudaMalloc(&a.qkv, t * m.qkv() * sizeof(bf16)));
    CK(cudaMalloc(&a.q, t * m.hq * m.d * sizeof(bf16)));
    CK(cudaMalloc(&a.k, t * m.hkv * m.d * sizeof(bf16)));
    CK(cudaMalloc(&a.v, t * m.hkv * m.d * sizeof(bf16)));
    CK(cudaMalloc(&a.attn, t * m.hq * m.d * sizeof(bf16)));
    CK(cudaMalloc(&a.tmp, t * h * sizeof(bf16)));
    CK(cudaMalloc(&a.gu, t * 2 * m.inter * sizeof(bf16)));
    CK(cudaMalloc(&a.act, t * m.inter * sizeof(bf16)));
    CK(cudaMalloc(&a.logits, (size_t)max_out * m.vocab * sizeof(float)));
    CK(cudaMalloc(&a.rows_tok, t * sizeof(int)));
    CK(cudaMalloc(&a.rows_pos, t * sizeof(int)));
}

void acts_free(Acts &a)
{
    void *ptrs[] = {a.x, a.xn, a.qkv, a.q, a.k, a.v, a.attn, a.tmp, a.gu, a.act, a.logits,
                    a.rows_tok, a.rows_pos};
    for (void *p : ptrs)
        CK(cudaFree(p));
    a = Acts{};
}

void model_tune_gemms(const Model &m, const Acts &a, Gemms &g, int rows, int rows_per_seq,
                      bool logits)
{
    const ModelDims &D = m.dims;
    const int H = D.hidden, qd = D.hq * D.d;
    std::vector<const bf16 *> qkv, o, gu, down;
    for (int l = 0; l < D.layers; l++) {
        qkv.push_back(m.layers[l].w_qkv);
        o.push_back(m.layers[l].w_o);
        gu.push_back(m.layers[l].w_gu);
        down.push_back(m.layers[l].w_down);
    }
    // the products of model_forward, with its operands as scratch
    g.tune("qkv", {rows, D.qkv(), H, H, CUDA_R_16BF}, qkv, a.xn, a.qkv);
    g.tune("o", {rows, H, qd, qd, CUDA_R_16BF}, o, a.attn, a.tmp);
    g.tune("gate_up", {rows, 2 * D.inter, H, H, CUDA_R_16BF}, gu, a.xn, a.gu);
    g.tune("down", {rows, H, D.inter, D.inter, CUDA_R_16BF}, down, a.act, a.tmp);
    if (logits)
        g.tune("lm_head", {rows / rows_per_seq, D.vocab, H, (int64_t)H * rows_per_seq, CUDA_R_32F},
               {m.lm_head}, a.xn + (size_t)(rows_per_seq - 1) * H, a.logits);
}

void model_forward(const Model &m, const Acts &a, const Gemms &g, cudaStream_t s, const Pass &p)
{
    const ModelDims &D = m.dims;
    const int T = p.rows, H = D.hidden, qd = D.hq * D.d;
    if (T < 1 || T > a.tmax || p.rows_per_seq < 1 || T % p.rows_per_seq) {
        std::fprintf(stderr, "resa-e2e: internal error: %d rows in groups of %d (at most %d)\n",
                     T, p.rows_per_seq, a.tmax);
        std::exit(1);
    }
    launch_embed(m.emb, p.tok, p.pos, T, H, a.x, p.hist, p.hist_stride, p.seq_base,
                 p.rows_per_seq, s);
    launch_add_rmsnorm(a.x, nullptr, m.layers[0].ln1, a.xn, T, H, D.eps, s);
    for (int l = 0; l < D.layers; l++) {
        const Layer &L = m.layers[l];
        g.run(L.w_qkv, a.xn, H, a.qkv, CUDA_R_16BF, T, D.qkv(), H);
        launch_bias_rope(a.qkv, L.b_qkv, p.pos, m.rope_inv_freq, a.q, a.k, a.v, T, D.hq, D.hkv,
                         D.d, s);
        if (p.ctx) // store K/V of these rows, attention over the cache (libresa)
            CR(p.ctx, resa_ctx_step_attend(p.ctx, l, a.q, a.k, a.v, a.attn, 0));
        g.run(L.w_o, a.attn, qd, a.tmp, CUDA_R_16BF, T, H, qd);
        if (m.comm) // row-parallel o_proj: the sum of the ranks' partial outputs
            tp_allreduce_bf16(m.comm, a.tmp, (size_t)T * H, s);
        launch_add_rmsnorm(a.x, a.tmp, L.ln2, a.xn, T, H, D.eps, s);
        g.run(L.w_gu, a.xn, H, a.gu, CUDA_R_16BF, T, 2 * D.inter, H);
        launch_swiglu(a.gu, a.act, T, D.inter, s);
        g.run(L.w_down, a.act, D.inter, a.tmp, CUDA_R_16BF, T, H, D.inter);
        bool last = l + 1 == D.layers;
        if (last && !p.logits) { // rectification: K/V are all it needs; logits discarded
            break;
        }
        if (m.comm) // row-parallel down projection, as o_proj
            tp_allreduce_bf16(m.comm, a.tmp, (size_t)T * H, s);
        launch_add_rmsnorm(a.x, a.tmp, last ? m.final_norm : m.layers[l + 1].ln1, a.xn, T, H,
                           D.eps, s);
    }
    if (!p.logits)
        return;
    // LM head over the last row of each group only: rows rows_per_seq - 1, 2 rows_per_seq - 1, ...
    const int n_out = T / p.rows_per_seq;
    if (n_out > a.max_out) {
        std::fprintf(stderr, "resa-e2e: internal error: %d logit rows (at most %d)\n", n_out,
                     a.max_out);
        std::exit(1);
    }
    g.run(m.lm_head, a.xn + (size_t)(p.rows_per_seq - 1) * H, (int64_t)H * p.rows_per_seq,
         a.logits, CUDA_R_32F, n_out, D.vocab, H);
    launch_argmax(a.logits, n_out, D.vocab, p.tok_out, p.pos_adv, p.pos_add, s);
}
