/* SPDX-License-Identifier: MIT */
/*
 * The shadow model of the fuzz target (tests/fuzz/fuzz_api.c): what
 * include/resa.h and docs/API.md say a CPU context does, written from the
 * documents and not from lib/.  For every call the harness asks the model for
 * the status it must return; on RESA_OK the model applies the call's effect.
 * It keeps the visible state (parameters, lock, sequences with their lengths,
 * pending counts, ids and spans, the pool's free pages, the open step, the
 * selection record) and each sequence's K/V as grid values, so that attention
 * outputs, log-sum-exps and block scores can be recomputed in double
 * precision.
 *
 * Context parallelism (since 0.3.0, docs/API.md "Context parallelism"): a
 * sequence's span (first_token, global_length) of resa_seq_set_span; the
 * QUERY modes; the two-phase selection (resa_ctx_step_block_scores, whose
 * lists the model predicts; resa_ctx_step_thresholds, a pure function of the
 * gathered lists that the model recomputes); resa_ctx_step_attend_ex (lse and
 * thresholds) and the merges.  Block indices the library reports are global
 * (first_token / BLOCK_SIZE + local index); the model keeps local ones and
 * converts.  Where API.md leaves the order of several errors open (within
 * one step_begin entry: HEAD_SHARE, then not the tail, then the mode's own
 * rules; set_span's step-open before its id), the model takes the order of
 * lib/step.c, lib/step_cp.c and lib/sequence.c.
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
 * f32, f16 and bf16 (and so in every KV dtype); V elements may also be one
 * of the codes below (op "arm poison"), encoded as NaN, +inf or -inf: the
 * model then predicts which rows are non-finite by the rules of docs/API.md
 * ("Non-finite values") ---- */
#define SH_GRID 8.0
#define SH_NAN 127
#define SH_PINF 126
#define SH_NINF 125
#define SH_IS_POISON(g) ((g) >= SH_NINF)
size_t sh_dtype_size(int32_t dtype);
void sh_encode(int32_t dtype, const int8_t *grid, size_t n, void *dst);
double sh_decode(int32_t dtype, const void *src, size_t i);

/* ---- the model ---- */
typedef struct sh_record {   /* selection of a sequence's last DECODE or QUERY_SPARSE, one layer */
    int32_t has;             /* 0: never decoded since create/fork: count 0 */
    int32_t m, n;            /* the whole sequence's blocks and the budget */
    int32_t sink, local;     /* the forced blocks of that step (global) */
    int64_t fb;              /* this context's first global block */
    int32_t ml;              /* this context's blocks of that step */
    int32_t *known;          /* [hkv]: blocks[] of that head is the whole selection */
    int32_t *cnt_lo, *cnt_hi;/* [hkv]: bounds of the count (equal when known) */
    int32_t *blocks;         /* [hkv][max_seq_blocks] global, ascending: the selection
                                when known, else only the forced blocks here */
    int32_t *n_blocks;       /* [hkv]: entries of blocks[] */
} sh_record;

typedef struct sh_seq {
    int32_t live;
    int32_t id;
    int64_t len, pending;
    int64_t first, glen;     /* span: first_token, global_length (-1: the tail) */
    int32_t n_pages;
    int32_t *pages;          /* [max_seq_blocks] model page ids */
    int64_t cap;             /* positions allocated in k, v */
    int8_t *k, *v;           /* [cap][layers][hkv][d] grid values */
    sh_record *rec;          /* [layers] */
} sh_seq;

typedef struct sh_entry {
    int32_t slot, mode, n;
    int64_t row, start, old_len;
    int32_t m, nsel;         /* DECODE, QUERY_SPARSE: the whole sequence's blocks
                                (with the query's position), budget */
    int32_t kpick;           /* blocks chosen by score: nsel - forced (0 when nsel >= m) */
    int64_t fb;              /* the sequence's first global block in this context */
    int32_t ml;              /* sparse: this context's blocks the entry may attend */
    int32_t new_pages;       /* growth pages reserved at begin */
} sh_entry;

/* Mode groups (resa.h): entries that store K/V, and block-sparse ones. */
#define SH_STORES(mode) ((mode) >= RESA_MODE_APPEND && (mode) <= RESA_MODE_APPEND_KV)
#define SH_SPARSE(mode) ((mode) == RESA_MODE_DECODE || (mode) == RESA_MODE_QUERY_SPARSE)

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
    int32_t has_kv;          /* some entry stores K/V: k and v are needed */
    int32_t n_sparse;        /* DECODE and QUERY_SPARSE entries */
    uint8_t *layer_done;     /* [layers] */
    int32_t st_local, st_sink, st_group;
    /* set by the target around sh_attended: the thresholds came from this
     * context's own block_scores lists alone (one rank), so each sparse
     * entry takes exactly its own best min(K, candidates), as without them */
    int32_t thr_self;
    double st_scale, st_width;

    /* what was checked (RESA_FUZZ_STATS=1) */
    int64_t n_entries_by_mode[7]; /* APPEND, DECODE, RECTIFY, APPEND_KV, sparse DECODE,
                                     QUERY_DENSE, QUERY_SPARSE */
    int64_t n_cow_copies;         /* copy-on-write pages reserved by RECTIFY entries */
    int64_t n_rows_checked;       /* output rows compared with the reference */
    int64_t n_sparse_checked;     /* of them, sparse decodes with the model's selection */
    int64_t n_lse_checked;        /* lse values compared with the reference */
    int64_t n_split_entries;      /* entries on a sequence with first_token > 0 or not the tail */
    int64_t n_lists_checked;      /* block_scores lists equal to the model's */
    int64_t n_thresholds_checked; /* thresholds recomputed from the gathered lists */
    int64_t n_thr_selections;     /* selections by a threshold, exactly predicted */
    int64_t n_poison_rows;        /* rows with a NaN q or that attend a non-finite V, found non-finite */
    int64_t n_fp8_rows;           /* of n_rows_checked, rows over an fp8 cache */
    int64_t n_qnan_rows;          /* of n_poison_rows, rows with a NaN in their own q */
    int64_t last_nonfinite_rows;  /* of the last sh_attended: rows that are or may be non-finite */
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
/* step_attend, and step_attend_ex with its threshold arrays (ts_null, tb_null;
 * both 1 for step_attend). */
resa_status sh_step_attend(const shadow *m, int32_t layer, int q_null, int k_null, int v_null,
                           int out_null, int ts_null, int tb_null, uint32_t flags);
resa_status sh_set_span(shadow *m, int32_t id, int64_t first_token, int64_t global_length,
                        int apply);
resa_status sh_block_scores(const shadow *m, int32_t layer, int q_null, int64_t capacity,
                            int scores_null, int blocks_null, int counts_null, uint32_t flags);
resa_status sh_thresholds(const shadow *m, int32_t n_ranks, int64_t capacity, int scores_null,
                          int blocks_null, int counts_null, int ts_null, int tb_null,
                          uint32_t flags);
/* resa_merge_states (ctx_version 0: dtype and head_dim as given) and
 * resa_ctx_merge_states (1: IO_DTYPE and HEAD_DIM of the model). */
resa_status sh_merge(const shadow *m, int ctx_version, int32_t dtype, int32_t n_parts,
                     int64_t n_rows, int32_t head_dim, int parts_null, int lse_null,
                     int out_null, uint32_t flags);
/* The largest K_i (blocks chosen by score) of the open step's sparse entries. */
int32_t sh_max_kpick(const shadow *m);
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
/* Since 0.3.0 also for resa_ctx_step_attend_ex: `lse` (NULL: not asked;
 * [T][NUM_Q_HEADS], filled with 0xff bytes before the call) is checked
 * against the reference log-sum-exp (and left alone on APPEND_KV rows), and
 * the sparse entries choose by the thresholds `ts`, `tb` when given.  QUERY
 * entries store nothing; a row that attends no key here must be 0 with lse
 * -inf. */
const char *sh_attended(shadow *m, int32_t layer, const int8_t *q, const int8_t *k,
                        const int8_t *v, const void *out, const float *lse, const float *ts,
                        const int32_t *tb, char *msg, size_t msg_cap);
/* A successful resa_ctx_step_block_scores: every count, and, where the
 * selection is exact, the listed (score, block) pairs, against the model;
 * slots past a count must still hold the 0xff fill. */
const char *sh_check_block_scores(shadow *m, int32_t layer, const int8_t *q, int64_t capacity,
                                  const float *scores, const int32_t *blocks,
                                  const int32_t *counts, char *msg, size_t msg_cap);
/* A successful resa_ctx_step_thresholds: the K_i-th best gathered pair of
 * each (entry, head), recomputed. */
const char *sh_check_thresholds(shadow *m, int32_t n_ranks, int64_t capacity,
                                const float *scores, const int32_t *blocks,
                                const int32_t *counts, const float *ts, const int32_t *tb,
                                char *msg, size_t msg_cap);

/* Checks a selection read back with resa_seq_selected_blocks. */
const char *sh_check_selected(const shadow *m, int32_t id, int32_t layer, int32_t head,
                              const int32_t *blocks, int64_t capacity, int64_t count,
                              char *msg, size_t msg_cap);

/* Bytes the library would allocate at lock (an estimate, to keep inputs fast). */
double sh_lock_bytes(const shadow *m);

#endif
