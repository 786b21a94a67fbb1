/* SPDX-License-Identifier: MIT */
/*
 * One decoding "variant" of the demo: a libresa context configured for the
 * model, one live sequence, and the host's side of the step protocol
 * (prefill, decode, and the rectification pass when ReSA asks for it).
 */
#ifndef RESA_DEMO_ENGINE_H
#define RESA_DEMO_ENGINE_H

#include <stdint.h>

#include "model.h"
#include "resa.h"

typedef enum demo_kind {
    DEMO_DENSE = 0,  /* RESA_MODE_APPEND, one token per step: dense decoding */
    DEMO_SPARSE = 1, /* RESA_MODE_DECODE, never rectified (RECTIFY_INTERVAL 0) */
    DEMO_RESA = 2    /* RESA_MODE_DECODE + RESA_MODE_RECTIFY when due */
} demo_kind;

typedef struct demo_method {
    int32_t block_size;  /* RESA_PARAM_BLOCK_SIZE */
    int32_t min_blocks;  /* RESA_PARAM_SELECT_MIN_BLOCKS */
    int32_t interval;    /* RESA_PARAM_RECTIFY_INTERVAL of the ReSA variant */
    int32_t threads;     /* RESA_PARAM_NUM_THREADS */
    double fraction;     /* RESA_PARAM_SELECT_FRACTION */
} demo_method;

typedef struct demo_engine {
    const demo_model *model;
    demo_state state;
    resa_ctx *ctx;
    demo_kind kind;
    int record;                /* RECORD_SELECTION on: measure attended blocks */
    int32_t seq;               /* live sequence, -1 when none */
    int64_t len;               /* its length */
    int32_t *hist;             /* its token ids, [seq_len] */
    int32_t *sel;              /* selection buffer for resa_seq_selected_blocks */
    int64_t sel_cap;
    /* statistics, cumulative over sequences */
    int64_t n_rectify, rectified_tokens;
    double rectify_seconds;    /* wall time of the rectification steps */
    int64_t n_decode;          /* RESA_MODE_DECODE steps */
    double attended_sum;       /* sum over recorded (step, layer, head) of selected/M */
    int64_t attended_n;
    char err[512];             /* message of the last failure */
} demo_engine;

/* Creates and configures the context.  backend AUTO that resolves to CUDA
 * falls back to CPU (note written to note, else note[0] = 0). */
resa_status demo_engine_init(demo_engine *e, const demo_model *m, demo_kind kind,
                             resa_backend backend, const demo_method *method, int record,
                             char *note, size_t note_len);
void demo_engine_free(demo_engine *e);

resa_status demo_engine_begin(demo_engine *e);  /* new empty sequence */
resa_status demo_engine_finish(demo_engine *e); /* releases it */

/* Appends n prompt tokens densely (RESA_MODE_APPEND, one step). */
resa_status demo_engine_prefill(demo_engine *e, const int32_t *tokens, int32_t n,
                                float *logits, int all_rows);
/* Feeds one token (dense: APPEND 1, else DECODE) and writes the next-token
 * logits; then, for ReSA, runs the rectification pass if it is due. */
resa_status demo_engine_decode(demo_engine *e, int32_t token, float *logits);

#endif
