/* SPDX-License-Identifier: MIT */
/*
 * The shadow model of the fuzz target (tests/fuzz/fuzz_api.c): what
 * include/resa.h and docs/API.md say a CPU context does, written from the
 * documents and not from lib/.  For every call the harness asks the model for
 * the status it must return; on RESA_OK the model applies the call's effect.
 * It keeps the visible state (parameters, lock, sequences with their lengths,
 * pending counts and ids, the pool's free pages, the open step, the selection
 * record) and each sequence's K/V as grid values, so that attention outputs
 * can be recomputed in double precision.
 */
#ifndef RESA_FUZZ_SHADOW_H
#define RESA_FUZZ_SHADOW_H

#include <stddef.h>
#include <stdint.h>

#include <resa.h>

/* ---- parameters: the table of resa.h / docs/API.md ---- */
typedef struct sh_param {
    int32_t id;
    const char *name;
    int real;       /* set with the _f64 functions */
    int locks;      /* fixed from the first resa_seq_create to a session reset */
    double def, lo, hi;
} sh_param;

#define SH_NPARAMS 22
extern const sh_param sh_params[SH_NPARAMS];
int sh_param_index(int32_t id); /* -1 when resa.h has no such parameter */

/* Indices into sh_params (the table's order). */
enum {
    P_LAYERS, P_QHEADS, P_KVHEADS, P_HEAD_DIM, P_KV_DTYPE, P_IO_DTYPE, P_MAX_TOKENS,
    P_MAX_SEQS, P_MAX_SEQ_TOKENS, P_MAX_STEP, P_SUMMARY, P_BLOCK, P_FRACTION, P_MIN_BLOCKS,
    P_LOCAL, P_SINK, P_INTERVAL, P_SCALE, P_WIDTH, P_GROUP, P_THREADS, P_RECORD
};

/* ---- values: every q, k, v element is k/8 with k in [-8, 8], exact in
 * f32, f16 and bf16 (and so in every KV dtype) ---- */
#define SH_GRID 8.0
size_t sh_dtype_size(int32_t dtype);
void sh_encode(int32_t dtype, const int8_t *grid, size_t n, void *dst);
double sh_decode(int32_t dtype, const void *src, size_t i);

/* ---- the model ---- */
typedef struct sh_record {   /* selection of a sequence's last DECODE, one layer */
    int32_t has;             /* 0: never decoded since create/fork: count 0 */
    int32_t m, n;            /* blocks so far and blocks attended */
    int32_t sink, local;     /* the forced blocks of that step */
    int32_t exact;           /* blocks[] below is the model's own selection */
    int32_t *blocks;         /* [hkv][max_seq_blocks], ascending, n per head */
} sh_record;

typedef struct sh_seq {
    int32_t live;
    int32_t id;
    int64_t len, pending;
    int32_t n_pages;
    int32_t *pages;          /* [max_seq_blocks] model page ids */
    int64_t cap;             /* positions allocated in k, v */
    int8_t *k, *v;           /* [cap][layers][hkv][d] grid values */
    sh_record *rec;          /* [layers] */
} sh_seq;

typedef struct sh_entry {
    int32_t slot, mode, n;
    int64_t row, start, old_len;
    int32_t m, nsel;         /* DECODE: blocks so far (with the new token), budget */
    int32_t new_pages;       /* growth pages reserved at begin */
} sh_entry;

typedef struct shadow {
    /* configuration */
    int64_t iv[SH_NPARAMS];
    double fv[SH_NPARAMS];
    uint32_t shape_set;      /* NUM_LAYERS .. HEAD_DIM set by the host */

    /* the lock */
    int32_t locked;
    int32_t n_pages, n_free;
    int32_t *free_list, *refcount;
    int32_t max_seq_blocks;
    sh_seq *seqs;            /* [MAX_SEQUENCES at lock] */

    /* ids released in this session: always unknown (resa.h) */
#define SH_STALE 64
    int32_t stale[SH_STALE];
    int32_t n_stale;

    /* the open step */
    int32_t step_open;
    int32_t n_entries;
    sh_entry *entries;       /* [max_seqs] */
    int64_t rows;
    int32_t has_output;
    uint8_t *layer_done;     /* [layers] */
    int32_t st_local, st_sink, st_group;
    double st_scale, st_width;

    /* what was checked (RESA_FUZZ_STATS=1) */
    int64_t n_entries_by_mode[5]; /* APPEND, DECODE, RECTIFY, APPEND_KV, sparse DECODE */
    int64_t n_cow_copies;         /* copy-on-write pages reserved by RECTIFY entries */
    int64_t n_rows_checked;       /* output rows compared with the reference */
    int64_t n_sparse_checked;     /* of them, sparse decodes with the model's selection */
} shadow;

void sh_init(shadow *m);            /* a new context: defaults, unlocked, counters 0 */
void sh_free(shadow *m);            /* frees what the model holds */

/* Resolved values as get_param reads them back. */
int64_t sh_get_int(const shadow *m, int p);    /* MAX_SEQ_TOKENS 0 -> MAX_TOKENS */
double sh_get_real(const shadow *m, int p);    /* SOFTMAX_SCALE 0 -> 1/sqrt(HEAD_DIM) */

/* Each sh_<call> returns the status resa.h / docs/API.md give for the call
 * and, when that is RESA_OK and `apply` is set, changes the model as the call
 * changes the context.  Pointers are only tested for NULL. */
resa_status sh_set_param(shadow *m, int32_t id, int64_t v, int apply);
resa_status sh_set_param_f64(shadow *m, int32_t id, double v, int apply);
resa_status sh_get_param(const shadow *m, int32_t id, int real, int null_out);
resa_status sh_set_preset(shadow *m, int32_t preset, int apply);
resa_status sh_reset(shadow *m, uint32_t what, int apply);
/* seq_create: *first_unset names the shape parameter the error must name
 * (or -1); on success *slot is the slot the new sequence must take. */
resa_status sh_seq_create(shadow *m, int null_out, int *first_unset, int32_t *slot);
void sh_seq_created(shadow *m, int32_t slot, int32_t id);
resa_status sh_seq_release(shadow *m, int32_t id, int apply);
resa_status sh_seq_fork(shadow *m, int32_t parent, int null_out, int32_t *slot);
void sh_seq_forked(shadow *m, int32_t parent, int32_t slot, int32_t id);
resa_status sh_query(const shadow *m, int32_t id, int null_out); /* length, pending, due */
int64_t sh_free_tokens(const shadow *m);
resa_status sh_step_begin(shadow *m, int32_t n, const int32_t *ids, const int32_t *modes,
                          const int32_t *n_tokens, uint32_t flags, int apply);
resa_status sh_step_attend(const shadow *m, int32_t layer, int q_null, int k_null, int v_null,
                           int out_null, uint32_t flags);
resa_status sh_step_end(shadow *m, uint32_t flags, int apply);
resa_status sh_step_cancel(shadow *m, int apply);
resa_status sh_selected(const shadow *m, int32_t id, int32_t layer, int32_t head,
                        int blocks_null, int64_t capacity, int count_null);

/* A sequence's slot from a live id, or -1. */
int32_t sh_slot(const shadow *m, int32_t id);
int sh_is_stale(const shadow *m, int32_t id);
/* The budget rule of docs/API.md ("Block selection"). */
int32_t sh_budget(int64_t m_blocks, double r, int64_t n_min, int64_t local, int64_t sink);

/*
 * One attended layer (after the library returned RESA_OK): stores the
 * step's K/V (grid values, rows as in resa.h) into the sequences, records
 * the DECODE selections, and checks `out` (NULL when every entry is
 * APPEND_KV) against the reference: untouched rows of APPEND_KV entries
 * (still all 0xff bytes), finite values within the range of V, and, where
 * the model can compute them exactly, the attention outputs.  Returns NULL
 * or a message naming the first mismatch.
 */
const char *sh_attended(shadow *m, int32_t layer, const int8_t *q, const int8_t *k,
                        const int8_t *v, const void *out, char *msg, size_t msg_cap);

/* Checks a selection read back with resa_seq_selected_blocks. */
const char *sh_check_selected(const shadow *m, int32_t id, int32_t layer, int32_t head,
                              const int32_t *blocks, int64_t capacity, int64_t count,
                              char *msg, size_t msg_cap);

/* Bytes the library would allocate at lock (an estimate, to keep inputs fast). */
double sh_lock_bytes(const shadow *m);

#endif
