// SPDX-License-Identifier: MIT
// resa-e2e: the host engine.  For one (context, batch) point it sets up a
// libresa context, fills the caches, prefills the prompt through the model and
// decodes in each mode, timing the decode loop with CUDA events.
#pragma once

#include <string>
#include <vector>

#include "model.h"

struct Options {
    std::vector<long> contexts{16384, 65536, 131072, 262144};
    std::vector<int> batches{1, 8};
    std::vector<std::string> modes{"dense", "sparse", "resa"};
    int steps = 64;          // measured decode steps per mode
    int warmup = 36;         // decode steps before the measurement (the first one captures;
                             // > interval, so one rectification runs cold before timing)
    int prompt = 512;        // tokens prefilled through the model
    int chunk = 8192;        // random K/V fill: tokens per APPEND_KV step
    int interval = 32;       // ReSA rectification interval f
    double fraction = 0.1;   // ReSA selected fraction r
    bool fp8_summaries = false; // RESA_SUMMARY_FP8_E4M3 instead of bf16 block summaries
    int agree = 8;           // greedy tokens compared with the dense mode
    bool csv = false;
};

struct ModeResult {
    std::string mode;
    double fill_s = 0, prefill_s = 0; // wall time of the context fill and the prefill
    double total_ms = 0;              // the measured steps, rectification included
    double rect_ms = 0;               // in rectification steps (inside total_ms)
    int n_rect = 0;                   // rectification steps among the measured ones
    double rest_ms = 0;               // one decode step without the attention calls
    std::vector<int> tokens;          // [batch][warmup + steps] greedy tokens
};

// Device bytes one point needs besides the weights (KV pool and summaries,
// libresa workspaces, activations, history), with a margin.
size_t point_bytes(const ModelDims &m, long ctx, int batch, const Options &o);

// Runs every mode of o.modes at one point; results in o.modes order.
// Matrix products through `g`, tuned for this point's row counts first.
std::vector<ModeResult> run_point(const Model &m, Gemms &g, cudaStream_t s, const Options &o,
                                  long ctx, int batch);
