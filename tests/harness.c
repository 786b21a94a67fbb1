/* SPDX-License-Identifier: MIT */
#include "cuda_shim.h"
#include "harness.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t g_base_seed;
static int g_base_set;
static uint64_t g_test_seed;
static char g_test_name[128];

static uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint64_t th_test_seed(const char *name)
{
    if (!g_base_set) {
        const char *env = getenv("RESA_TEST_SEED");
        if (env && *env)
            g_base_seed = strtoull(env, NULL, 0);
        else
            g_base_seed = mix64((uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32) ^
                                (uint64_t)clock());
        g_base_set = 1;
    }
    uint64_t h = 1469598103934665603ull;
    for (const char *c = name; *c; c++)
        h = (h ^ (uint8_t)*c) * 1099511628211ull;
    g_test_seed = mix64(g_base_seed ^ h);
    snprintf(g_test_name, sizeof g_test_name, "%s", name);
    return g_test_seed;
}

void th_print_seed(void)
{
    fprintf(stderr, "test %s failed: rerun with RESA_TEST_SEED=%llu (test seed 0x%016llx)\n",
            g_test_name, (unsigned long long)g_base_seed, (unsigned long long)g_test_seed);
    fflush(stderr);
}

static int ident_char(char c)
{
    return isalnum((unsigned char)c) || c == '_';
}

/* Whole-word, case-insensitive: the needle is not part of a longer
 * identifier (so "seq_length:" does not name "length"). */
static int names_word(const char *hay, const char *needle, size_t n)
{
    for (const char *h = hay; *h; h++) {
        size_t i = 0;
        while (i < n && h[i] && tolower((unsigned char)h[i]) == tolower((unsigned char)needle[i]))
            i++;
        if (i == n && (h == hay || !ident_char(h[-1])) && !ident_char(h[n]))
            return 1;
    }
    return n == 0;
}

/* needle: alternatives separated by '|'. */
static int names_any(const char *hay, const char *needle)
{
    for (;;) {
        const char *bar = strchr(needle, '|');
        size_t n = bar ? (size_t)(bar - needle) : strlen(needle);
        if (names_word(hay, needle, n))
            return 1;
        if (!bar)
            return 0;
        needle = bar + 1;
    }
}

void th_check_error_text(const resa_ctx *ctx, const char *needle, const char *what)
{
    if (!ctx)
        return;
    const char *e = resa_ctx_last_error(ctx);
    TCHECK(e != NULL, "%s: resa_ctx_last_error returned NULL", what);
    TCHECK(e[0] != '\0', "%s: failed but resa_ctx_last_error is empty", what);
    if (needle)
        TCHECK(names_any(e, needle), "%s: error text \"%s\" does not name \"%s\"", what, e,
               needle);
}

void th_opts_default(th_opts *o)
{
    o->max_tokens = 16384;
    o->max_seqs = 8;
    o->max_seq_tokens = 0;
    o->max_step_tokens = 8192;
    o->threads = 2;
    o->record = 1;
    o->backend = RESA_BACKEND_CPU;
}

/* ---- device memory for the CUDA backend, through libcudart loaded at run time ---- */
static cuda_shim g_cu;
static int g_cu_state; /* 0 unknown, 1 usable, -1 not */

static int g_only_matched; /* tests that RESA_TEST_ONLY let through */

int th_run_suite(Suite *s, int fork)
{
    const char *only = getenv("RESA_TEST_ONLY");
    if (only && *only && g_only_matched == 0) {
        /* a misspelt name must not pass as an empty suite */
        fprintf(stderr, "RESA_TEST_ONLY=%s matches no test that this process added with th_add_loop\n", only);
        return EXIT_FAILURE;
    }
    SRunner *sr = srunner_create(s);
    if (!fork)
        srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

void th_add_loop(TCase *tc, const TTest *fn, int lo, int hi)
{
    static int shard = -1, shards = 1, next = 0;
    if (shard < 0) {
        const char *e = getenv("RESA_TEST_SHARD");
        shard = 0;
        if (e && *e && (sscanf(e, "%d/%d", &shard, &shards) != 2 || shards < 1 || shard < 0 ||
                  shard >= shards)) {
            fprintf(stderr, "RESA_TEST_SHARD must be k/n with 0 <= k < n, not '%s'\n", e);
            exit(2);
        }
    }
    /* RESA_TEST_ONLY=name: only that test function (for example to run one
     * test against another build's CUDA module), counted as usual for shards */
    const char *only = getenv("RESA_TEST_ONLY");
    for (int i = lo; i < hi; i++)
        if (next++ % shards == shard && (!only || !*only || strcmp(only, fn->name) == 0)) {
            tcase_add_loop_test(tc, fn, i, i + 1);
            g_only_matched++;
        }
}

int th_verbose(void)
{
    const char *v = getenv("RESA_TEST_VERBOSE");
    return v && *v && *v != '0';
}

int th_quick(void)
{
    const char *q = getenv("RESA_TEST_QUICK");
    if (!q || !*q || *q == '0')
        return 0;
    const int level = atoi(q);
    return level > 1 ? level : 1;
}

int th_cuda_usable(void)
{
    if (g_cu_state == 0)
        g_cu_state = resa_backend_available(RESA_BACKEND_CUDA) && cuda_shim_load(&g_cu) == 0
                         ? 1 : -1;
    return g_cu_state == 1;
}

static void *dev_copy_in(const void *host, size_t bytes)
{
    void *d = NULL;
    TCHECK(g_cu.Malloc(&d, bytes) == 0, "cudaMalloc(%zu) failed", bytes);
    TCHECK(g_cu.Memcpy(d, host, bytes, 1) == 0, "cudaMemcpy to the device failed");
    return d;
}

/* step_attend with host buffers on either backend: on CUDA the inputs (and
 * the poisoned output) go to device memory and the output comes back. */
static resa_status attend(th *t, int32_t l, const void *q, const void *k, const void *v,
                          void *out, size_t q_bytes, size_t kv_bytes)
{
    if (t->o.backend != RESA_BACKEND_CUDA)
        return resa_ctx_step_attend(t->ctx, l, q, k, v, out, 0);
    void *dq = q ? dev_copy_in(q, q_bytes) : NULL, *dk = dev_copy_in(k, kv_bytes),
         *dv = dev_copy_in(v, kv_bytes), *dout = out ? dev_copy_in(out, q_bytes) : NULL;
    resa_status s = resa_ctx_step_attend(t->ctx, l, dq, dk, dv, dout, 0);
    if (s == RESA_OK)
        s = resa_ctx_synchronize(t->ctx);
    if (s == RESA_OK && out)
        TCHECK(g_cu.Memcpy(out, dout, q_bytes, 2) == 0, "cudaMemcpy from the device failed");
    g_cu.Free(dq);
    g_cu.Free(dk);
    g_cu.Free(dv);
    g_cu.Free(dout);
    return s;
}

void th_push_method(th *t)
{
    TOK(t->ctx, resa_ctx_set_param_f64(t->ctx, RESA_PARAM_SELECT_FRACTION, t->p.fraction));
    TOK(t->ctx, resa_ctx_set_param(t->ctx, RESA_PARAM_SELECT_MIN_BLOCKS, t->p.min_blocks));
    TOK(t->ctx, resa_ctx_set_param(t->ctx, RESA_PARAM_LOCAL_BLOCKS, t->p.local_blocks));
    TOK(t->ctx, resa_ctx_set_param(t->ctx, RESA_PARAM_SINK_BLOCKS, t->p.sink_blocks));
    TOK(t->ctx, resa_ctx_set_param(t->ctx, RESA_PARAM_RECTIFY_INTERVAL, t->p.interval));
    TOK(t->ctx, resa_ctx_set_param_f64(t->ctx, RESA_PARAM_SOFTMAX_SCALE, t->p.scale));
    TOK(t->ctx, resa_ctx_set_param_f64(t->ctx, RESA_PARAM_SCORE_WIDTH, t->p.score_width));
    TOK(t->ctx, resa_ctx_set_param(t->ctx, RESA_PARAM_GROUP_SCORE, t->p.group_score));
}

static double *g_dir; /* the planted direction, [d] */

void th_init(th *t, const char *test_name, const ref_params *p, const th_opts *o)
{
    memset(t, 0, sizeof *t);
    t->p = *p;
    if (o)
        t->o = *o;
    else
        th_opts_default(&t->o);
    t->rng.s = th_test_seed(test_name);
    t->k_scale = 1.0;
    t->v_scale = 1.0;
    t->tol = (p->io_dtype == RESA_DTYPE_F32) ? 1e-4 : 1e-2;
    if (t->o.backend == RESA_BACKEND_CUDA)
        TCHECK(th_cuda_usable(), "th_init: CUDA requested but not usable");
    resa_status s = resa_ctx_create(t->o.backend, NULL, &t->ctx);
    TCHECK(s == RESA_OK && t->ctx, "resa_ctx_create: %s", resa_status_name(s));
    resa_ctx *c = t->ctx;
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_LAYERS, p->n_layers));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_Q_HEADS, p->hq));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_KV_HEADS, p->hkv));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, p->d));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_KV_DTYPE, p->kv_dtype));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_IO_DTYPE, p->io_dtype));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_BLOCK_SIZE, p->b));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, t->o.max_tokens));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_SEQUENCES, t->o.max_seqs));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_SEQ_TOKENS, t->o.max_seq_tokens));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_STEP_TOKENS, t->o.max_step_tokens));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_THREADS, t->o.threads));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_RECORD_SELECTION, t->o.record));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_SUMMARY_FORMAT,
                              p->summary_fp8 ? RESA_SUMMARY_FP8_E4M3 : RESA_SUMMARY_KV_DTYPE));
    th_push_method(t);
    free(g_dir);
    g_dir = malloc(sizeof(double) * (size_t)p->d);
    double nrm = 0;
    for (int32_t j = 0; j < p->d; j++) {
        g_dir[j] = ref_rng_normal(&t->rng);
        nrm += g_dir[j] * g_dir[j];
    }
    for (int32_t j = 0; j < p->d; j++)
        g_dir[j] *= sqrt((double)p->d / nrm); /* |dir|^2 = d */
}

void th_fini(th *t)
{
    resa_ctx_destroy(t->ctx);
    t->ctx = NULL;
    free(g_dir);
    g_dir = NULL;
}

void th_seq_create(th *t, th_seq *s)
{
    s->id = -1;
    TOK(t->ctx, resa_seq_create(t->ctx, &s->id));
    TCHECK(s->id >= 0, "resa_seq_create gave a negative id %d", s->id);
    s->r = ref_seq_new(&t->p, 64);
    th_check_state(t, s);
}

void th_seq_fork(th *t, const th_seq *parent, th_seq *child)
{
    child->id = -1;
    TOK(t->ctx, resa_seq_fork(t->ctx, parent->id, &child->id));
    TCHECK(child->id >= 0 && child->id != parent->id, "resa_seq_fork gave id %d", child->id);
    child->r = ref_seq_clone(parent->r);
    th_check_state(t, child);
    th_check_state(t, parent);
}

void th_seq_release(th *t, th_seq *s)
{
    TOK(t->ctx, resa_seq_release(t->ctx, s->id));
    ref_seq_free(s->r);
    s->r = NULL;
}

void th_check_state(th *t, const th_seq *s)
{
    int64_t len = -1, pend = -1;
    int32_t due = -1;
    TOK(t->ctx, resa_seq_length(t->ctx, s->id, &len));
    TOK(t->ctx, resa_seq_pending(t->ctx, s->id, &pend));
    TOK(t->ctx, resa_seq_rectify_due(t->ctx, s->id, &due));
    int64_t rp = ref_seq_pending(s->r);
    int32_t rdue = t->p.interval > 0 && rp >= t->p.interval;
    TCHECK(len == s->r->len, "seq %d: length %lld, reference %lld", s->id, (long long)len,
           (long long)s->r->len);
    TCHECK(pend == rp, "seq %d: pending %lld, reference %lld (length %lld)", s->id,
           (long long)pend, (long long)rp, (long long)len);
    TCHECK(due == rdue, "seq %d: rectify_due %d, reference %d (pending %lld, f %lld)", s->id,
           due, rdue, (long long)rp, (long long)t->p.interval);
}

void th_poison(void *buf, size_t bytes)
{
    memset(buf, 0xff, bytes);
}

void th_fill(th *t, void *buf, size_t n, double scale)
{
    for (size_t i = 0; i < n; i++)
        ref_store(t->p.io_dtype, buf, i, scale * ref_rng_normal(&t->rng));
}

/* Random q, k, v rows for a step of T rows. */
static void make_inputs(th *t, int64_t T, void *q, void *k, void *v)
{
    const ref_params *p = &t->p;
    for (int64_t r = 0; r < T; r++) {
        for (int32_t h = 0; h < p->hq; h++)
            for (int32_t j = 0; j < p->d; j++) {
                double x = 1.5 * ref_rng_normal(&t->rng);
                if (t->planted)
                    x = 0.5 * x + 0.4 * g_dir[j];
                ref_store(p->io_dtype, q, ((size_t)r * (size_t)p->hq + (size_t)h) * (size_t)p->d + (size_t)j, x);
            }
        for (int32_t h = 0; h < p->hkv; h++) {
            double f = 0.3 + 1.4 * ref_rng_uniform(&t->rng); /* blocks get different ranges */
            int needle = t->planted && ref_rng_uniform(&t->rng) < 0.04;
            for (int32_t j = 0; j < p->d; j++) {
                size_t at = ((size_t)r * (size_t)p->hkv + (size_t)h) * (size_t)p->d + (size_t)j;
                double x = t->k_scale * f * ref_rng_normal(&t->rng);
                if (needle)
                    x += t->k_scale * 0.6 * g_dir[j];
                ref_store(p->io_dtype, k, at, x);
                ref_store(p->io_dtype, v, at, t->v_scale * ref_rng_normal(&t->rng));
            }
        }
    }
}

int64_t th_plan_step(const th *t, int32_t n, th_entry *e, int32_t *ids, int32_t *modes,
                     int32_t *ntok, th_plan *pl)
{
    const ref_params *p = &t->p;
    int64_t T = 0;
    for (int32_t i = 0; i < n; i++) {
        ref_seq *r = e[i].s->r;
        ids[i] = e[i].s->id;
        modes[i] = e[i].mode;
        if (e[i].mode == RESA_MODE_RECTIFY && e[i].n <= 0)
            e[i].n = (int32_t)ref_seq_pending(r);
        ntok[i] = e[i].n;
        pl[i].row = T;
        pl[i].n = e[i].n;
        pl[i].old_len = r->len;
        pl[i].start = e[i].mode == RESA_MODE_RECTIFY ? r->rect_start : r->len;
        if (e[i].mode == RESA_MODE_DECODE) {
            pl[i].M = ref_blocks(r->len + 1, p->b);
            pl[i].n_sel = ref_budget(pl[i].M, p->fraction, p->min_blocks, p->local_blocks,
                                     p->sink_blocks);
        }
        T += e[i].n;
    }
    return T;
}

/* Checks the library's selection against the reference scores: forced blocks
 * present, the budget met, and no unselected block scores higher than a
 * selected non-forced one beyond rounding.  Returns the blocks to use for
 * the reference attention in `use` (the library's when it passes). */
static int64_t check_selection(th *t, const th_seq *s, int32_t layer, int32_t h,
                               const void *q, int64_t row, int64_t M, int64_t valid, int32_t *use)
{
    const ref_params *p = &t->p;
    double *sc = malloc(sizeof(double) * (size_t)M);
    double *mag = malloc(sizeof(double) * (size_t)M);
    int32_t *rsel = malloc(sizeof(int32_t) * (size_t)M);
    ref_group_scores(p, s->r, layer, h, q, row, M, valid, sc, mag);
    int64_t n = ref_select(p, sc, M, rsel);
    if (!t->o.record) {
        memcpy(use, rsel, sizeof(int32_t) * (size_t)n);
        free(sc);
        free(mag);
        free(rsel);
        return n;
    }
    int64_t count = -1;
    for (int64_t i = 0; i < M; i++)
        use[i] = -7;
    TOK(t->ctx, resa_seq_selected_blocks(t->ctx, s->id, layer, h, use, M, &count));
    TCHECK(count == n, "seq %d layer %d head %d: %lld blocks selected of M=%lld, budget %lld",
           s->id, layer, h, (long long)count, (long long)M, (long long)n);
    char *in = calloc((size_t)M, 1);
    for (int64_t i = 0; i < n; i++) {
        TCHECK(use[i] >= 0 && use[i] < M, "selected block %d outside [0, %lld)", use[i],
               (long long)M);
        TCHECK(i == 0 || use[i] > use[i - 1], "selected blocks not ascending at %lld",
               (long long)i);
        in[use[i]] = 1;
    }
    for (int64_t i = 0; i < M; i++)
        if (ref_is_forced(i, M, p->local_blocks, p->sink_blocks))
            TCHECK(in[i], "seq %d layer %d head %d: forced block %lld not selected (M=%lld)",
                   s->id, layer, h, (long long)i, (long long)M);
    for (int64_t x = 0; x < M; x++) {
        if (!in[x] || ref_is_forced(x, M, p->local_blocks, p->sink_blocks))
            continue;
        for (int64_t y = 0; y < M; y++) {
            if (in[y])
                continue;
            /* HEAD_SHARE adds fp32 sums of M exponentials (the per-head
             * normalisers): about 2 ulps of relative error per term */
            double tol = 1e-4 * (mag[x] + mag[y]) + 1e-30 +
                         (p->group_score == RESA_GROUP_SCORE_HEAD_SHARE ? 2.4e-7 * (double)M : 0);
            TCHECK(sc[x] >= sc[y] - tol,
                   "seq %d layer %d head %d: block %lld (score %.9g) selected over block %lld "
                   "(score %.9g), M=%lld n=%lld",
                   s->id, layer, h, (long long)x, sc[x], (long long)y, sc[y], (long long)M,
                   (long long)n);
        }
    }
    free(in);
    free(sc);
    free(mag);
    free(rsel);
    return n;
}

static double rel_err_acc(double *num, double *den, const double *ref, const void *out,
                          resa_dtype t, size_t at, int32_t d, int *bad)
{
    for (int32_t j = 0; j < d; j++) {
        double o = ref_load(t, out, at + (size_t)j);
        if (!isfinite(o))
            *bad = 1;
        *num += (o - ref[j]) * (o - ref[j]);
        *den += ref[j] * ref[j];
    }
    return 0;
}

/* sqrt(num / den): the relative error of rel_err_acc's sums */
static double rel_of(double num, double den)
{
    return sqrt(num / (den > 0 ? den : 1e-300));
}

/* The squared error and norm of one dense entry's rows (APPEND, RECTIFY)
 * against the reference attending with pr. */
static void dense_err(const ref_params *pr, const ref_seq *r, int32_t l, const th_plan *pe,
                      const void *q, const void *out, double *qv, double *rv, double *num,
                      double *den, int *bad)
{
    *num = *den = 0;
    *bad = 0;
    for (int64_t row = 0; row < pe->n; row++) {
        int64_t pos = pe->start + row;
        for (int32_t qh = 0; qh < pr->hq; qh++) {
            size_t at = ((size_t)(pe->row + row) * (size_t)pr->hq + (size_t)qh) * (size_t)pr->d;
            for (int32_t j = 0; j < pr->d; j++)
                qv[j] = ref_load(pr->io_dtype, q, at + (size_t)j);
            ref_attend(pr, r, l, qh / (pr->hq / pr->hkv), qv, pos + 1, NULL, 0, rv);
            rel_err_acc(num, den, rv, out, pr->io_dtype, at, pr->d, bad);
        }
    }
}

void th_step(th *t, int32_t n, th_entry *e)
{
    const ref_params *p = &t->p;
    resa_ctx *c = t->ctx;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
    int32_t *modes = malloc(sizeof(int32_t) * (size_t)n);
    int32_t *ntok = malloc(sizeof(int32_t) * (size_t)n);
    th_plan *pl = calloc((size_t)n, sizeof *pl);
    int64_t T = th_plan_step(t, n, e, ids, modes, ntok, pl);
    size_t qn = (size_t)T * (size_t)p->hq * (size_t)p->d;
    size_t kn = (size_t)T * (size_t)p->hkv * (size_t)p->d;
    size_t es = ref_dtype_size(p->io_dtype);
    void **q = calloc((size_t)p->n_layers, sizeof(void *));
    void **out = calloc((size_t)p->n_layers, sizeof(void *));
    void *k = malloc(kn * es + 1), *v = malloc(kn * es + 1);

    int64_t free_before = -1, free_after = -1;
    TOK(c, resa_ctx_free_tokens(c, &free_before));
    TOK(c, resa_ctx_step_begin(c, n, ids, modes, ntok, 0));

    int32_t *order = malloc(sizeof(int32_t) * (size_t)p->n_layers);
    for (int32_t l = 0; l < p->n_layers; l++)
        order[l] = l;
    for (int32_t l = p->n_layers - 1; l > 0; l--) {
        int32_t j = (int32_t)ref_rng_range(&t->rng, 0, l), x = order[l];
        order[l] = order[j];
        order[j] = x;
    }
    for (int32_t oi = 0; oi < p->n_layers; oi++) {
        int32_t l = order[oi];
        q[l] = malloc(qn * es + 1);
        out[l] = malloc(qn * es + 1);
        make_inputs(t, T, q[l], k, v);
        th_poison(out[l], qn * es);
        TOK(c, attend(t, l, q[l], k, v, out[l], qn * es, kn * es));
        for (int32_t i = 0; i < n; i++)
            ref_write_kv(p, e[i].s->r, l, pl[i].start, pl[i].n, k, v, pl[i].row);
    }
    TOK(c, resa_ctx_step_end(c, 0));
    TOK(c, resa_ctx_free_tokens(c, &free_after));
    TCHECK(free_after <= free_before, "free tokens grew during a step (%lld -> %lld)",
           (long long)free_before, (long long)free_after);

    /* reference outputs.  An fp8 cache on CUDA: the sparse decode attends the
     * exact products e4m3 * scale, and so does Hopper's wgmma dense kernel
     * (HEAD_DIM 128 and 256), where the CPU and the mma.sync kernel attend
     * their IO_DTYPE rounding (docs/API.md, "fp8 KV cache"); the two differ
     * by up to about the tolerance where one block dominates a row (a
     * 70,001-token case at 0.0104 relative, 2026-12-07), so each path is
     * checked against what it computes: DECODE against the exact products,
     * a dense entry against the rounding or, failing that, the products */
    int32_t g = p->hq / p->hkv;
    ref_params px = *p;
    px.fp8_exact = t->o.backend == RESA_BACKEND_CUDA && p->kv_dtype == RESA_DTYPE_FP8_E4M3;
    double *qv = malloc(sizeof(double) * (size_t)p->d);
    double *rv = malloc(sizeof(double) * (size_t)p->d);
    for (int32_t i = 0; i < n; i++) {
        const th_seq *s = e[i].s;
        int32_t mode = e[i].mode;
        for (int32_t l = 0; l < p->n_layers; l++) {
            size_t row_elems = (size_t)p->hq * (size_t)p->d;
            if (mode == RESA_MODE_APPEND_KV) {
                const unsigned char *o = (const unsigned char *)out[l] + (size_t)pl[i].row * row_elems * es;
                for (size_t b = 0; b < (size_t)pl[i].n * row_elems * es; b++)
                    TCHECK(o[b] == 0xff, "APPEND_KV entry %d wrote its output rows (layer %d)", i, l);
                continue;
            }
            double num = 0, den = 0;
            int bad = 0;
            char why[200] = "";
            if (mode == RESA_MODE_DECODE) {
                int64_t M = pl[i].M;
                /* every head's list, and the query head with the largest
                 * error, for the explanation below */
                int32_t *use = malloc(sizeof(int32_t) * (size_t)M * (size_t)p->hkv);
                int64_t *ns = malloc(sizeof(int64_t) * (size_t)p->hkv);
                int32_t worst = 0;
                double worst_err = -1;
                for (int32_t h = 0; h < p->hkv; h++) {
                    int32_t *uh = use + (size_t)h * (size_t)M;
                    ns[h] = check_selection(t, s, l, h, q[l], pl[i].row, M, pl[i].old_len + 1, uh);
                    for (int32_t gi = 0; gi < g; gi++) {
                        int32_t qh = h * g + gi;
                        size_t at = ((size_t)pl[i].row * (size_t)p->hq + (size_t)qh) * (size_t)p->d;
                        for (int32_t j = 0; j < p->d; j++)
                            qv[j] = ref_load(p->io_dtype, q[l], at + (size_t)j);
                        ref_attend(&px, s->r, l, h, qv, pl[i].old_len + 1, uh, ns[h], rv);
                        double hn = 0, hd = 0;
                        rel_err_acc(&hn, &hd, rv, out[l], p->io_dtype, at, p->d, &bad);
                        num += hn;
                        den += hd;
                        if (hn > worst_err) {
                            worst_err = hn;
                            worst = qh;
                        }
                    }
                }
                if (bad || rel_of(num, den) > t->tol) {
                    /* a failure: which one attended block, left out or read
                     * wrongly, best accounts for the worst head's error */
                    int32_t h = worst / g;
                    size_t at = ((size_t)pl[i].row * (size_t)p->hq + (size_t)worst) * (size_t)p->d;
                    for (int32_t j = 0; j < p->d; j++) {
                        qv[j] = ref_load(p->io_dtype, q[l], at + (size_t)j);
                        rv[j] = ref_load(p->io_dtype, out[l], at + (size_t)j);
                    }
                    double alpha, share;
                    int64_t blk = ref_explain_block(&px, s->r, l, h, qv, pl[i].old_len + 1,
                                                    use + (size_t)h * (size_t)M, ns[h], rv, &alpha, &share);
                    snprintf(why, sizeof why,
                             "; worst query head %d: block %lld (one of %lld chosen) would account for %.0f%% "
                             "of its squared error (alpha %.2f; 1: left out, -1: twice)",
                             worst, (long long)blk, (long long)ns[h], 100 * share, alpha);
                }
                free(ns);
                free(use);
            } else {
                dense_err(p, s->r, l, &pl[i], q[l], out[l], qv, rv, &num, &den, &bad);
                if (px.fp8_exact && !bad && rel_of(num, den) > t->tol) {
                    double xn, xd;
                    dense_err(&px, s->r, l, &pl[i], q[l], out[l], qv, rv, &xn, &xd, &bad);
                    const double rx = rel_of(xn, xd);
                    snprintf(why, sizeof why, " against the rounded values, %.3g against the exact products",
                             rx);
                    if (rx <= t->tol)
                        num = xn, den = xd, why[0] = 0;
                }
            }
            double rel = rel_of(num, den);
            if (th_verbose()) /* how near the tolerance each check runs */
                fprintf(stderr, "step %lld entry %d (mode %d, %lld tokens at %lld) layer %d: "
                        "relative error %.3g (tolerance %.1g)\n", (long long)t->steps, i,
                        mode, (long long)pl[i].n, (long long)pl[i].start, l, rel, t->tol);
            TCHECK(!bad && rel <= t->tol,
                   "step %lld entry %d (seq %d, mode %d, %lld tokens at %lld, len %lld) layer %d: "
                   "relative error %.3g (tolerance %.1g)%s; d=%d hq=%d hkv=%d b=%d kv=%d io=%d%s",
                   (long long)t->steps, i, s->id, mode, (long long)pl[i].n, (long long)pl[i].start,
                   (long long)pl[i].old_len, l, rel, t->tol, bad ? ", non-finite output" : "",
                   p->d, p->hq, p->hkv, p->b, (int)p->kv_dtype, (int)p->io_dtype, why);
        }
    }
    for (int32_t i = 0; i < n; i++) {
        ref_commit(e[i].s->r, e[i].mode, pl[i].n, pl[i].n_sel, pl[i].M);
        th_check_state(t, e[i].s);
    }
    t->steps++;
    for (int32_t l = 0; l < p->n_layers; l++) {
        free(q[l]);
        free(out[l]);
    }
    free(q);
    free(out);
    free(k);
    free(v);
    free(qv);
    free(rv);
    free(order);
    free(ids);
    free(modes);
    free(ntok);
    free(pl);
}

void th_one(th *t, th_seq *s, int32_t mode, int32_t n)
{
    th_entry e = {s, mode, n};
    th_step(t, 1, &e);
}

void th_prefill(th *t, th_seq *s, int64_t n, int32_t chunk, int kv_only)
{
    while (n > 0) {
        int32_t c = n < chunk ? (int32_t)n : chunk;
        th_one(t, s, kv_only ? RESA_MODE_APPEND_KV : RESA_MODE_APPEND, c);
        n -= c;
    }
}
