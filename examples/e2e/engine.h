// SPDX-License-Identifier: MIT
// resa-e2e: the host engine.  For one (context, batch) point it sets up a
// libresa context, fills the caches, prefills the prompt through the model and
// decodes in each mode, timing the decode loop with CUDA events.  Under
// tensor parallelism (--tp N) each rank runs the same engine on its own GPU
// and its share of the heads, in its own host thread (run_point_tp).
#pragma once

#include <string>
#include <vector>

#include "model.h"

// A mode and the KV cache it decodes from ("resa:fp8").
struct ModeSpec {
    std::string mode;    // dense, sparse or resa
    bool kv_fp8 = false; // RESA_DTYPE_FP8_E4M3 instead of bf16 (RESA_PARAM_KV_DTYPE)
    const char *kv_name() const { return kv_fp8 ? "fp8" : "bf16"; }
};

struct Options {
    std::vector<long> contexts{16384, 65536, 131072, 262144};
    std::vector<int> batches{1, 8};
    std::vector<ModeSpec> modes; // from --modes and --kv-dtype (parse fills it)
    int steps = 64;          // measured decode steps per mode
    int warmup = 36;         // decode steps before the measurement (the first one captures;
                             // > interval, so one rectification runs cold before timing)
    int prompt = 512;        // tokens prefilled through the model
    int chunk = 8192;        // random K/V fill: tokens per APPEND_KV step
    // Method parameters: the preset first (resa_ctx_set_preset), then r and f.
    // Defaults: the paper's method at r 0.1, f 32, as every published resa-e2e
    // number (--params defaults: the library's 0.3.0 defaults, r 0.15, f 128).
    resa_preset preset = RESA_PRESET_PAPER;
    int interval = 32;       // ReSA rectification interval f
    double fraction = 0.1;   // ReSA selected fraction r
    bool fp8_summaries = false; // RESA_SUMMARY_FP8_E4M3 instead of exact block summaries
    int agree = 8;           // greedy tokens compared with the dense mode
    bool csv = false;
    int tp = 0;              // --tp N: N ranks over NCCL; 0: one GPU, no NCCL (the default)
    bool check_tp = false;   // --check-tp: decode with and without TP, compare (main.cu)
    bool record_logits = false; // keep every decode step's logits (ModeResult::logits)
};

struct ModeResult {
    ModeSpec spec;
    double fill_s = 0, prefill_s = 0; // wall time of the context fill and the prefill
    double total_ms = 0;              // the measured steps, rectification included
    double rect_ms = 0;               // in rectification steps (inside total_ms)
    int n_rect = 0;                   // rectification steps among the measured ones
    double rest_ms = 0;               // one decode step without the attention calls
    std::vector<int> tokens;          // [batch][warmup + steps] greedy tokens
    std::vector<float> logits;        // record_logits: [warmup + steps][batch][vocab]
};

// One GPU's share of the engine: its stream, cuBLAS handle and workspace,
// tuned matrix products and model (shard).
struct Rank {
    int device = 0;
    cudaStream_t s = nullptr;
    cublasHandle_t blas = nullptr;
    void *blas_ws = nullptr;
    Gemms *gemms = nullptr;
    Model m;
};
// Makes `device` current and creates its stream, handle and workspaces.
void rank_open(Rank &r, int device);
// Frees them and the model (device made current).
void rank_close(Rank &r);

// Device bytes one point needs on each GPU besides the weights (KV pool and
// summaries, libresa workspaces, activations, history), with a margin; `m`
// is one rank's dims (ModelDims::shard).
size_t point_bytes(const ModelDims &m, long ctx, int batch, const Options &o, bool kv_fp8);

// Runs `modes` (all of one KV dtype) at one point on one GPU (the current
// device must be r.device); results in `modes` order.  Matrix products tuned
// for this point's row counts first.  With r.m.comm set this is one rank of
// a TP group and must run in step with the others (run_point_tp).
std::vector<ModeResult> run_point(Rank &r, const Options &o, long ctx, int batch,
                                  const std::vector<ModeSpec> &modes);

// run_point on every rank at once, one host thread each.  Returns rank 0's
// results (its times: the ranks run in lockstep through the all-reduces)
// after checking that every rank generated the same tokens and ran the same
// rectifications (exits with a message otherwise).
std::vector<ModeResult> run_point_tp(std::vector<Rank> &ranks, const Options &o, long ctx,
                                     int batch, const std::vector<ModeSpec> &modes);
