/* SPDX-License-Identifier: MIT */
/*
 * libresa: Rectified Sparse Attention (ReSA) for long-context decoding.
 *
 * Contract in one paragraph.  A host inference engine owns the model; libresa
 * owns the paged KV cache and the attention.  Everything stateful lives in an
 * opaque resa_ctx.  A context is NOT internally synchronized: one thread at a
 * time may use it (it may move between threads); distinct contexts are fully
 * independent and the library has no global mutable state.  Pointers passed
 * in are borrowed for the duration of the call (CUDA backend: until the work
 * enqueued on the context's stream has completed) and never retained.  On the
 * CPU backend every call is synchronous; on the CUDA backend the step calls
 * only enqueue work on the stream set with resa_ctx_set_stream().  Every call
 * that can fail returns a resa_status (RESA_OK == 0); no call aborts, exits or
 * prints, and a failed call leaves the context as it was.
 *
 * See docs/API.md for the reference, docs/integration.md for the step protocol
 * and docs/ABI.md for the versioning policy.
 */
#ifndef RESA_H
#define RESA_H

#ifdef __cplusplus
extern "C" {
#endif

#include <stddef.h>
#include <stdint.h>

/* ------------------------------------------------------------------------ */
/* Visibility                                                                */
/* ------------------------------------------------------------------------ */
#if defined(_WIN32)
#  if defined(RESA_BUILDING_LIBRARY)
#    define RESA_API __declspec(dllexport)
#  elif defined(RESA_STATIC)
#    define RESA_API
#  else
#    define RESA_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__) && __GNUC__ >= 4
#  define RESA_API __attribute__((visibility("default")))
#else
#  define RESA_API
#endif

#if defined(__GNUC__) && __GNUC__ >= 4
#  define RESA_DEPRECATED(msg) __attribute__((deprecated(msg)))
#  define RESA_NODISCARD __attribute__((warn_unused_result))
#else
#  define RESA_DEPRECATED(msg)
#  define RESA_NODISCARD
#endif

/* ------------------------------------------------------------------------ */
/* Version (this header is the single source of truth; meson reads it)      */
/* ------------------------------------------------------------------------ */
#define RESA_VERSION_MAJOR 0
#define RESA_VERSION_MINOR 3
#define RESA_VERSION_PATCH 0
#define RESA_VERSION_NUMBER \
    (RESA_VERSION_MAJOR * 10000 + RESA_VERSION_MINOR * 100 + RESA_VERSION_PATCH)
#define RESA_VERSION_STRING "0.3.0"
/* Equals the SONAME major: libresa.so.RESA_ABI_VERSION */
#define RESA_ABI_VERSION 0
#define RESA_AT_LEAST_VERSION(x, y, z) \
    (RESA_VERSION_NUMBER >= ((x) * 10000 + (y) * 100 + (z)))

RESA_API uint32_t resa_version_number(void);      /* RESA_VERSION_NUMBER of the loaded library */
RESA_API const char *resa_version_string(void);   /* static storage */
RESA_API uint32_t resa_abi_version(void);         /* RESA_ABI_VERSION of the loaded library */

/* ------------------------------------------------------------------------ */
/* Status codes: values are ABI, never renumbered or reused                  */
/* ------------------------------------------------------------------------ */
typedef enum resa_status {
    RESA_OK                       = 0,
    RESA_ERR_INVALID_ARGUMENT     = 1,  /* NULL, out of range, unknown flag bits, unknown sequence */
    RESA_ERR_BAD_STATE            = 2,  /* call not allowed now (shape set after lock, no open step, ...) */
    RESA_ERR_OUT_OF_MEMORY        = 3,  /* host allocation failed */
    RESA_ERR_DEVICE_OUT_OF_MEMORY = 4,  /* device allocation failed */
    RESA_ERR_CAPACITY             = 5,  /* KV pool, sequence slots or step size exhausted; nothing changed */
    RESA_ERR_NOT_SUPPORTED        = 6,  /* backend not built, dtype/head_dim unsupported by the backend */
    RESA_ERR_NO_DEVICE            = 7,  /* CUDA backend built, but no usable GPU or driver */
    RESA_ERR_BACKEND              = 8,  /* CUDA failure (also deferred async faults; after a
                                           sticky one, every call but destroy and the
                                           queries: docs/API.md "After a device fault") */
    RESA_ERR_VERSION_MISMATCH     = 9,  /* a backend module of another version was found */
    RESA_ERR_INTERNAL             = 10  /* a libresa bug: please report it */
} resa_status;

RESA_API const char *resa_status_string(resa_status s); /* human text, static, never NULL */
RESA_API const char *resa_status_name(resa_status s);   /* "RESA_ERR_CAPACITY", static, never NULL */

/* ------------------------------------------------------------------------ */
/* Opaque types and public enums                                             */
/* ------------------------------------------------------------------------ */
typedef struct resa_ctx resa_ctx;

/* The CUDA backend takes device pointers; it needs IO_DTYPE F16 or BF16 with
 * KV_DTYPE == IO_DTYPE or FP8_E4M3, HEAD_DIM 64, 128 or 256, BLOCK_SIZE 8 to
 * 64 and at most 16 query heads per KV head (else RESA_ERR_NOT_SUPPORTED at
 * the first resa_seq_create).
 * It works on the device that was current at resa_ctx_create. */
typedef enum resa_backend {
    RESA_BACKEND_CPU  = 0,  /* portable C, always built; the reference */
    RESA_BACKEND_CUDA = 1,  /* loaded at run time from libresa-cuda.so.RESA_ABI_VERSION */
    RESA_BACKEND_AUTO = 2   /* CUDA when the module loads, a device is usable and the
                               context starts on it, else CPU (at resa_ctx_create);
                               then, at the first resa_seq_create, parameters outside
                               the CUDA limits above move it to the CPU (any other
                               failure there is returned).  Ask resa_ctx_get_backend
                               after that call which memory to pass */
} resa_backend;

typedef enum resa_dtype {
    RESA_DTYPE_F32  = 0,
    RESA_DTYPE_F16  = 1,    /* IEEE binary16 */
    RESA_DTYPE_BF16 = 2,    /* bfloat16 */
    RESA_DTYPE_FP8_E4M3 = 3 /* (0.3.0) KV_DTYPE only; as IO_DTYPE it is
                               RESA_ERR_INVALID_ARGUMENT.  OCP fp8 e4m3 with one fp32
                               scale per token and KV head (amax / 448) for K and one
                               for V; a stored value reads back as e4m3 * scale rounded
                               to IO_DTYPE (docs/API.md, "fp8 KV cache") */
} resa_dtype;

/* How the block summaries (per block and KV head, the element-wise min and
 * max of its keys) are stored; RESA_PARAM_SUMMARY_FORMAT. */
typedef enum resa_summary_format {
    RESA_SUMMARY_KV_DTYPE = 0, /* in the KV dtype: exact, 2 d elements per block and head
                                  (an fp8 cache: in IO_DTYPE, still exact) */
    RESA_SUMMARY_FP8_E4M3 = 1  /* fp8 e4m3 with one power-of-two scale per block and head,
                                  rounded outward (min down, max up) so the block score
                                  stays an upper bound; 2 d + 1 bytes, half the scoring
                                  traffic of a 16-bit cache.  The chosen blocks may differ
                                  from the exact summaries' where scores are close. */
} resa_summary_format;

/* How the query heads of a GQA group rank the blocks they read together;
 * RESA_PARAM_GROUP_SCORE.  Either way the group reads n blocks once per step:
 * the same K/V bytes. */
typedef enum resa_group_score {
    RESA_GROUP_SCORE_POOLED     = 0, /* one score per block from the mean of the group's
                                        query vectors (the paper) */
    RESA_GROUP_SCORE_HEAD_SHARE = 1  /* every query head scores every block, in logits
                                        (times SOFTMAX_SCALE); per head a softmax over the
                                        sequence's blocks turns the scores into estimated
                                        attention shares, and a block ranks by the sum of
                                        its shares over the group's heads.  g times the
                                        scoring arithmetic, the same summary bytes.  CUDA:
                                        groups of at most 16 query heads.  docs/quality.md */
} resa_group_score;

/* What one sequence does in a step (see resa_ctx_step_begin). */
typedef enum resa_mode {
    RESA_MODE_APPEND    = 0, /* n >= 1 new tokens (prompt/chunk): store K/V, dense causal attention */
    RESA_MODE_DECODE    = 1, /* exactly 1 new token: store K/V, ReSA block-sparse attention */
    RESA_MODE_RECTIFY   = 2, /* the oldest n pending tokens: overwrite K/V, dense causal attention */
    RESA_MODE_APPEND_KV = 3, /* n >= 1 new tokens: store K/V only, no attention, output untouched */
    /* Since 0.3.0, for context parallelism (docs/integration.md, "Multi-GPU"):
     * queries of rows that come after every token this context stores (they
     * live in another context); nothing is stored, lengths and pending counts
     * do not change, and the sequence must have nothing pending. */
    RESA_MODE_QUERY_DENSE  = 4, /* n >= 1 rows: each attends every stored token */
    RESA_MODE_QUERY_SPARSE = 5  /* exactly 1 row: ReSA block-sparse attention over this
                                   context's part of the sequence (resa_seq_set_span) */
} resa_mode;

/*
 * Parameters.  Each has a default and bounds (resa_param_bounds*); integer
 * parameters use resa_ctx_set_param, real ones resa_ctx_set_param_f64, and
 * the wrong setter is RESA_ERR_INVALID_ARGUMENT.
 *
 * "Shape" parameters (the 100 group, BLOCK_SIZE, the 300 group) size the
 * KV pool.  They lock when the pool is allocated, at the first
 * resa_seq_create(); setting one afterwards is RESA_ERR_BAD_STATE until
 * resa_ctx_reset(ctx, RESA_RESET_SESSION).  The other parameters may change
 * between steps.  The model's shape (NUM_LAYERS, NUM_Q_HEADS, NUM_KV_HEADS,
 * HEAD_DIM) has no safe default: the first resa_seq_create is
 * RESA_ERR_BAD_STATE, naming the first of them the host never set (since
 * 0.2.0; RESA_RESET_PARAMS forgets them again).
 */
typedef enum resa_param {
    /* model shape and capacity (lock) */
    RESA_PARAM_NUM_LAYERS       = 100, /* default 1,     [1, 4096] */
    RESA_PARAM_NUM_Q_HEADS      = 101, /* default 1,     [1, 1024]; multiple of NUM_KV_HEADS */
    RESA_PARAM_NUM_KV_HEADS     = 102, /* default 1,     [1, 1024] */
    RESA_PARAM_HEAD_DIM         = 103, /* default 128,   [1, 256] (CUDA: 64, 128, 256) */
    RESA_PARAM_KV_DTYPE         = 104, /* default F32:   storage type of the cache (resa_dtype) */
    RESA_PARAM_IO_DTYPE         = 105, /* default F32:   type of q, k, v and out (resa_dtype;
                                          not FP8_E4M3) */
    RESA_PARAM_MAX_TOKENS       = 106, /* default 65536: pool size, tokens over all sequences */
    RESA_PARAM_MAX_SEQUENCES    = 107, /* default 64,    [1, 65535] live sequences */
    RESA_PARAM_MAX_SEQ_TOKENS   = 108, /* default 0 = MAX_TOKENS: longest sequence */
    RESA_PARAM_MAX_STEP_TOKENS  = 109, /* default 8192:  tokens in one step, all sequences */
    RESA_PARAM_SUMMARY_FORMAT   = 110, /* default RESA_SUMMARY_FP8_E4M3 since 0.3.0 (resa_summary_format;
                                          0.2.0 and the paper: RESA_SUMMARY_KV_DTYPE) */
    /* ReSA method */
    RESA_PARAM_BLOCK_SIZE       = 200, /* default 16,    power of two in [1, 256] (locks) */
    RESA_PARAM_SELECT_FRACTION  = 201, /* f64, default 0.15 since 0.3.0 (0.2.0 and the paper: 0.1),
                                          [0, 1]: r, fraction of blocks attended */
    RESA_PARAM_SELECT_MIN_BLOCKS = 202,/* default 16,    [0, 2^30]: n_min */
    RESA_PARAM_LOCAL_BLOCKS     = 203, /* default 1,     [1, 2^30]: trailing blocks always attended */
    RESA_PARAM_SINK_BLOCKS      = 204, /* default 1,     [0, 2^30]: leading blocks always attended
                                          (the paper: 0; docs/quality.md) */
    RESA_PARAM_RECTIFY_INTERVAL = 205, /* default 128 since 0.3.0 (0.2.0 and the paper: 32),
                                          [0, 2^30]: f; 0 disables the "due" signal
                                          (r 0.15, f 128, fp8 summaries: docs/quality.md) */
    RESA_PARAM_SOFTMAX_SCALE    = 206, /* f64, default 0 = 1/sqrt(HEAD_DIM), [0, 1e6] */
    RESA_PARAM_SCORE_WIDTH      = 207, /* f64, default 0.5, [0, 1]: w in the block score
                                          s = q.(kmax+kmin)/2 + w |q|.(kmax-kmin)/2; 1 is
                                          the paper's upper bound sum max(q kmax, q kmin),
                                          0 ranks blocks by the centre of their key box
                                          (the paper: 1; docs/quality.md) */
    RESA_PARAM_GROUP_SCORE      = 208, /* default RESA_GROUP_SCORE_POOLED (resa_group_score):
                                          how a GQA group ranks blocks */
    /* execution (lock) */
    RESA_PARAM_NUM_THREADS      = 300, /* CPU worker threads, default 0 = online CPUs, [0, 1024] */
    RESA_PARAM_RECORD_SELECTION = 301, /* default 0; 1 keeps the last selection per sequence,
                                          layer and KV head for resa_seq_selected_blocks() */
    /* reserved for experimental parameters, as ZSTD_c_experimentalParam */
    RESA_PARAM_EXPERIMENTAL_1   = 1000
} resa_param;

/* Host allocation hooks, per context (never process-global). */
typedef struct resa_allocator {
    void *(*alloc)(void *user, size_t size, size_t align); /* NULL on failure */
    void (*free)(void *user, void *ptr);                  /* ptr may be NULL */
    void *user;
} resa_allocator;

/* Flags for resa_ctx_reset. */
#define RESA_RESET_SESSION 1u  /* release every sequence and the pool; unlock shape parameters */
#define RESA_RESET_PARAMS  2u  /* every parameter back to its default (needs an unlocked context) */

/* Compile-time limits, also as functions for FFI users. */
#define RESA_DEFAULT_BLOCK_SIZE 16
#define RESA_MAX_HEAD_DIM 256
RESA_API uint32_t resa_block_size(void);     /* RESA_DEFAULT_BLOCK_SIZE */
RESA_API uint32_t resa_max_head_dim(void);   /* RESA_MAX_HEAD_DIM */

/* ------------------------------------------------------------------------ */
/* Lifecycle                                                                 */
/* ------------------------------------------------------------------------ */

/* 1 if `backend` can be used on this machine now, else 0.  Thread-safe. */
RESA_API int32_t resa_backend_available(resa_backend backend);

/* Creates a context.  host_alloc may be NULL (malloc/free); when given, the
 * struct is copied.  On failure *out is NULL.  CUDA on a machine without the
 * module is RESA_ERR_NOT_SUPPORTED; without a GPU, RESA_ERR_NO_DEVICE. */
RESA_API RESA_NODISCARD resa_status resa_ctx_create(resa_backend backend,
                                                    const resa_allocator *host_alloc,
                                                    resa_ctx **out);
RESA_API void resa_ctx_destroy(resa_ctx *ctx);                 /* NULL is a no-op */
RESA_API resa_status resa_ctx_reset(resa_ctx *ctx, uint32_t what); /* RESA_RESET_* bits */
/* The backend a context runs on (AUTO resolved). */
RESA_API resa_status resa_ctx_get_backend(const resa_ctx *ctx, resa_backend *backend);
/* Text of the last failure on ctx, naming the bad argument; "" after success.
 * Owned by ctx, valid until the next call on ctx.  NULL ctx gives a static text. */
RESA_API const char *resa_ctx_last_error(const resa_ctx *ctx);

/* ------------------------------------------------------------------------ */
/* Configuration                                                             */
/* ------------------------------------------------------------------------ */
RESA_API resa_status resa_ctx_set_param(resa_ctx *ctx, resa_param p, int64_t value);
RESA_API resa_status resa_ctx_get_param(const resa_ctx *ctx, resa_param p, int64_t *value);
RESA_API resa_status resa_ctx_set_param_f64(resa_ctx *ctx, resa_param p, double value);
/* SOFTMAX_SCALE reads back the effective scale (1/sqrt(d) when set to 0). */
RESA_API resa_status resa_ctx_get_param_f64(const resa_ctx *ctx, resa_param p, double *value);
RESA_API resa_status resa_param_bounds(resa_param p, int64_t *lo, int64_t *hi);

/* Method presets: the selection and rectification parameters that may change
 * between steps (SELECT_FRACTION, SELECT_MIN_BLOCKS, LOCAL_BLOCKS, SINK_BLOCKS,
 * RECTIFY_INTERVAL, SCORE_WIDTH, GROUP_SCORE), set together.  Shape and execution
 * parameters are untouched.  docs/quality.md measures both. */
typedef enum resa_preset {
    RESA_PRESET_DEFAULT = 0, /* the parameters' defaults (this header) */
    RESA_PRESET_PAPER   = 1  /* the paper's method: r 0.1, n_min 16, LOCAL 1, SINK 0,
                                f 32, SCORE_WIDTH 1 (the min/max upper bound),
                                (its exact summaries are SUMMARY_FORMAT KV_DTYPE, a
                                shape parameter no preset sets),
                                GROUP_SCORE POOLED */
} resa_preset;
/* Not inside an open step (RESA_ERR_BAD_STATE). */
RESA_API resa_status resa_ctx_set_preset(resa_ctx *ctx, resa_preset preset);
RESA_API resa_status resa_param_bounds_f64(resa_param p, double *lo, double *hi);

/* CUDA: the cudaStream_t all work is enqueued on (NULL = legacy default
 * stream).  CPU: only NULL is accepted (RESA_ERR_NOT_SUPPORTED otherwise). */
RESA_API resa_status resa_ctx_set_stream(resa_ctx *ctx, void *stream);
/* Waits for all work of ctx; reports deferred device faults. */
RESA_API resa_status resa_ctx_synchronize(resa_ctx *ctx);

/* ------------------------------------------------------------------------ */
/* Sequences                                                                 */
/* ------------------------------------------------------------------------ */
/* Sequence ids are non-negative int32 values chosen by the library; a
 * released id is detected as unknown (RESA_ERR_INVALID_ARGUMENT). */

/* New empty sequence.  The first call locks the shape parameters and
 * allocates the pool.  No free slot: RESA_ERR_CAPACITY. */
RESA_API resa_status resa_seq_create(resa_ctx *ctx, int32_t *seq);
/* Returns the sequence's pages to the pool. */
RESA_API resa_status resa_seq_release(resa_ctx *ctx, int32_t seq);
/* New sequence with the same cache, length and pending count as parent.  Full
 * pages are shared copy-on-write; the partial last page is copied. */
RESA_API resa_status resa_seq_fork(resa_ctx *ctx, int32_t parent, int32_t *child);
/* Tokens stored for seq. */
RESA_API resa_status resa_seq_length(const resa_ctx *ctx, int32_t seq, int64_t *length);
/* Tokens pending rectification: the last `pending` positions of seq, from the
 * first token decoded with a true subset of blocks since the last
 * rectification up to the end (0 when there is none). */
RESA_API resa_status resa_seq_pending(const resa_ctx *ctx, int32_t seq, int64_t *pending);
/* *due = 1 when RECTIFY_INTERVAL > 0 and pending >= RECTIFY_INTERVAL. */
RESA_API resa_status resa_seq_rectify_due(const resa_ctx *ctx, int32_t seq, int32_t *due);
/* Free pool capacity, in tokens (whole free pages times the block size). */
RESA_API resa_status resa_ctx_free_tokens(const resa_ctx *ctx, int64_t *tokens);
/* Context parallelism (since 0.3.0): this context holds the positions
 * [first_token, first_token + length) of a longer sequence.  first_token is
 * a multiple of BLOCK_SIZE (blocks are the global ones: block i of this
 * context is block first_token / BLOCK_SIZE + i of the sequence); it may
 * change only while the sequence is empty.  global_length is the length of
 * the whole sequence (the position of its next token, where QUERY rows sit),
 * >= first_token + length, or -1 for first_token + length (this context
 * holds the tail; it then follows the sequence's growth).  A context whose
 * global_length lies past its tokens takes only QUERY entries for the
 * sequence.  Block selection uses the global block count and the global
 * forced blocks; resa_seq_selected_blocks reports global indices. */
RESA_API resa_status resa_seq_set_span(resa_ctx *ctx, int32_t seq, int64_t first_token,
                                       int64_t global_length);

/* ------------------------------------------------------------------------ */
/* The step protocol                                                         */
/* ------------------------------------------------------------------------ */
/*
 * One step = one batch of distinct sequences, each with a resa_mode and a
 * token count.  Then, for every layer 0 .. NUM_LAYERS-1 (any order, each at
 * least once), resa_ctx_step_attend with that layer's q, k, v.  Then
 * resa_ctx_step_end commits the new lengths.
 *
 * Rows are packed in batch order: entry i owns rows [t_i, t_i + n_i) where
 * t_i = n_0 + ... + n_{i-1}; T is the sum of all n_i.  Layouts (IO_DTYPE,
 * contiguous):  q and out [T][NUM_Q_HEADS][HEAD_DIM];  k and v
 * [T][NUM_KV_HEADS][HEAD_DIM].  Query head h reads KV head h / (Hq / Hkv).
 * K is post-RoPE.  Positions: APPEND/APPEND_KV/DECODE rows are the positions
 * [len, len + n); RECTIFY rows are the oldest n pending positions
 * [len - pending, len - pending + n), 1 <= n <= pending (usually n = pending;
 * a long span may be rectified in several steps, oldest first).
 *
 * begin validates everything and reserves pages (including copy-on-write
 * copies for rectification of shared pages): RESA_ERR_CAPACITY there changes
 * nothing.  flags: 0 or RESA_STEP_REPLAY.
 *
 * CUDA graphs: begin plans the step and uploads its metadata (one
 * asynchronous copy on the stream); the step_attend calls of all layers only
 * enqueue kernels that read that metadata, so a host may capture them in one
 * graph.  A later step of the same shape (same number of entries, same
 * modes and token counts, same SOFTMAX_SCALE, LOCAL_BLOCKS, SINK_BLOCKS and SCORE_WIDTH;
 * any sequences, any lengths) is begun with RESA_STEP_REPLAY, the graph is
 * launched on the context's stream instead of calling step_attend, and
 * step_end commits it.  A replay flag on a step whose shape differs from the
 * last captured one is RESA_ERR_INVALID_ARGUMENT.
 */
#define RESA_STEP_REPLAY 1u
RESA_API resa_status resa_ctx_step_begin(resa_ctx *ctx, int32_t n_seqs,
                                         const int32_t *seqs, const int32_t *modes,
                                         const int32_t *n_tokens, uint32_t flags);
/* Stores this layer's K/V of the step and writes its attention output.  q and
 * out may be NULL only when every entry is RESA_MODE_APPEND_KV.  CUDA:
 * enqueues only; no allocation and no host synchronization. */
RESA_API resa_status resa_ctx_step_attend(resa_ctx *ctx, int32_t layer,
                                          const void *q, const void *k, const void *v,
                                          void *out, uint32_t flags);
/* Commits the step: lengths grow, pending counts update.  Every layer must
 * have been attended (else RESA_ERR_BAD_STATE and the step stays open). */
RESA_API resa_status resa_ctx_step_end(resa_ctx *ctx, uint32_t flags);
/*
 * Context parallelism (since 0.3.0; docs/API.md, "Context parallelism").
 *
 * resa_ctx_step_block_scores, phase 1 of a two-phase selection: for every
 * DECODE and QUERY_SPARSE entry i and KV head h of the open step whose
 * budget n is below the global block count M, the best K_i = n - forced
 * candidates of this context (blocks neither sink nor local, ranked by score
 * descending, NaN as -inf, then lower global block index), at most K_i of
 * them: scores[(i * NUM_KV_HEADS + h) * capacity + j] and the global block
 * index in blocks[...] for j < counts[i * NUM_KV_HEADS + h], in no
 * particular order; other entries get count 0.  capacity >= every K_i.
 * Needs this layer's q only; writes nothing to the cache.
 *
 * resa_ctx_step_thresholds: from the phase-1 lists of n_ranks contexts laid
 * end to end (scores and blocks [n_ranks][n_entries][NUM_KV_HEADS][capacity],
 * counts [n_ranks][n_entries][NUM_KV_HEADS], as an all-gather leaves them),
 * the K_i-th best (score, block) of each (entry, head) into
 * threshold_scores / threshold_blocks [n_entries][NUM_KV_HEADS] ((+inf, -1)
 * where nothing is chosen by score).
 *
 * resa_ctx_step_attend_ex: resa_ctx_step_attend, plus
 *  - lse (may be NULL): float32 [T][NUM_Q_HEADS], the natural log of each
 *    row's softmax denominator, sum over its attended keys of
 *    exp(scale q.k); -INFINITY, with an output row of 0, for a row that
 *    attends no key in this context;
 *  - threshold_scores / threshold_blocks (both NULL or both given,
 *    [n_entries][NUM_KV_HEADS]): a DECODE or QUERY_SPARSE entry attends its
 *    forced blocks in this context and the candidates ranking at or above
 *    the threshold (score > t, or score == t and global index <= t_block),
 *    which over all contexts is the single-context selection.
 * CUDA: every pointer of these three calls is a device pointer; they only
 * enqueue.  GROUP_SCORE HEAD_SHARE is RESA_ERR_NOT_SUPPORTED with thresholds
 * and in phase 1 (its ranking needs every block's score).
 */
RESA_API resa_status resa_ctx_step_block_scores(resa_ctx *ctx, int32_t layer, const void *q,
                                                int64_t capacity, float *scores,
                                                int32_t *blocks, int32_t *counts,
                                                uint32_t flags);
RESA_API resa_status resa_ctx_step_thresholds(resa_ctx *ctx, int32_t n_ranks, int64_t capacity,
                                              const float *scores, const int32_t *blocks,
                                              const int32_t *counts, float *threshold_scores,
                                              int32_t *threshold_blocks, uint32_t flags);
RESA_API resa_status resa_ctx_step_attend_ex(resa_ctx *ctx, int32_t layer, const void *q,
                                             const void *k, const void *v, void *out,
                                             float *lse, const float *threshold_scores,
                                             const int32_t *threshold_blocks, uint32_t flags);
/* Abandons an open step: lengths and pending counts stay as before the step;
 * the pages reserved for growth go back to the pool.  K/V already rewritten
 * by a RECTIFY entry stay rewritten (those tokens are still pending). */
RESA_API resa_status resa_ctx_step_cancel(resa_ctx *ctx);

/* Merges attention states computed over disjoint key sets (since 0.3.0):
 * parts_out [n_parts][n_rows][head_dim] (dtype), parts_lse [n_parts][n_rows]
 * float32, as resa_ctx_step_attend_ex writes them (a row is one query head
 * of one token: n_rows = T * NUM_Q_HEADS).  With m = max_i lse_i and
 * w_i = exp(lse_i - m) (0 for lse_i = -inf, whose out is never read):
 * out = sum_i w_i out_i / sum_i w_i, lse = m + log(sum_i w_i) (lse may be
 * NULL).  A row whose every part is -inf gets lse -inf and a NaN out (0/0,
 * as one context gives a row whose every score is -inf).  out must not
 * overlap the parts.  resa_merge_states works on host memory and is
 * thread-safe; resa_ctx_merge_states takes the context's IO_DTYPE and
 * HEAD_DIM and its memory space (CUDA: a kernel on the context's stream). */
RESA_API resa_status resa_merge_states(resa_dtype dtype, int32_t n_parts, int64_t n_rows,
                                       int32_t head_dim, const void *parts_out,
                                       const float *parts_lse, void *out, float *lse,
                                       uint32_t flags);
RESA_API resa_status resa_ctx_merge_states(resa_ctx *ctx, int32_t n_parts, int64_t n_rows,
                                           const void *parts_out, const float *parts_lse,
                                           void *out, float *lse, uint32_t flags);

/* ------------------------------------------------------------------------ */
/* Introspection                                                             */
/* ------------------------------------------------------------------------ */
/* Block indices (ascending) chosen at seq's last RESA_MODE_DECODE for
 * (layer, kv_head) (a cancelled step's attended layers count too).  Needs RECORD_SELECTION = 1 (else RESA_ERR_BAD_STATE).
 * Writes min(count, capacity) indices and the full count to *count (0 when
 * the sequence never decoded).  CUDA: synchronizes the stream. */
RESA_API resa_status resa_seq_selected_blocks(resa_ctx *ctx, int32_t seq, int32_t layer,
                                              int32_t kv_head, int32_t *blocks,
                                              int64_t capacity, int64_t *count);

#ifdef RESA_EXPERIMENTAL_API
/* Nothing experimental yet. */
#endif

#ifdef __cplusplus
}
#endif
#endif /* RESA_H */
