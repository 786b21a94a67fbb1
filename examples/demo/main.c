/* SPDX-License-Identifier: MIT */
/*
 * resa-demo: a real pretrained model (Karpathy's stories260K) decoding through
 * libresa in three ways (dense, block-sparse without rectification, ReSA), with
 * generated text, tokens per second, and the teacher-forced distance of each
 * variant's next-token distribution from dense decoding.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "data.h"
#include "engine.h"
#include "model.h"
#include "resa.h"
#include "tokenizer.h"

#ifndef RESA_DEMO_MODEL_DIR
#define RESA_DEMO_MODEL_DIR "models"
#endif

/* The greedy sample of llama2.c's doc/stories260K.md (models/README.md). */
static const char README_SAMPLE[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\"";
#define README_NLL 1.2921     /* nats/token, first 50 stories, models README */
#define README_NLL_TOKENS 17271
#define README_NLL_STORIES 50
#define NLL_TOLERANCE 0.003

#define DEFAULT_PROMPT "Once upon a time, there was a little dog named Max."
#define TF_PREFILL 32 /* teacher forcing: tokens of each window prefilled densely */
#define MAX_STORIES 4096

typedef struct options {
    resa_backend backend;
    const char *model_dir;
    const char *prompt;
    int32_t tokens, windows, threads;
    demo_method method;
    int check_greedy;
} options;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: resa-demo [--backend cpu|cuda|auto] [--model DIR] [--tokens N] "
            "[--windows N]\n"
            "                 [--block-size B] [--interval F] [--fraction R] "
            "[--min-blocks N]\n"
            "                 [--threads N] [--prompt TEXT] [--check-greedy]\n"
            "  --backend      libresa backend (default cpu)\n"
            "  --model DIR    folder with stories260K.bin, tok512.bin and "
            "tinystories_val_head.txt\n"
            "                 (default %s)\n"
            "  --tokens N     tokens to generate per variant (default 300)\n"
            "  --windows N    512-token TinyStories windows for the teacher-forced "
            "comparison (default 12)\n"
            "  --block-size B RESA_PARAM_BLOCK_SIZE (default 4)\n"
            "  --interval F   RESA_PARAM_RECTIFY_INTERVAL of the ReSA variant (default 16)\n"
            "  --fraction R   RESA_PARAM_SELECT_FRACTION (default 0.1)\n"
            "  --min-blocks N RESA_PARAM_SELECT_MIN_BLOCKS (default 4)\n"
            "  --threads N    RESA_PARAM_NUM_THREADS (default 1; 0 = all CPUs)\n"
            "  --prompt TEXT  generation prompt (default \"%s\")\n"
            "  --check-greedy only check that dense decoding reproduces the README's greedy\n"
            "                 sample and teacher-forced NLL; exit status 0 when it does\n",
            RESA_DEMO_MODEL_DIR, DEFAULT_PROMPT);
}

static int parse_int(const char *s, int64_t lo, int64_t hi, int32_t *out)
{
    char *end;
    long long v = strtoll(s, &end, 10);
    if (end == s || *end != '\0' || v < lo || v > hi)
        return -1;
    *out = (int32_t)v;
    return 0;
}

static int parse_options(int argc, char **argv, options *o)
{
    memset(o, 0, sizeof *o);
    o->backend = RESA_BACKEND_CPU;
    o->model_dir = RESA_DEMO_MODEL_DIR;
    o->prompt = DEFAULT_PROMPT;
    o->tokens = 300;
    o->windows = 12;
    o->threads = 1;
    o->method.block_size = 4;
    o->method.min_blocks = 4;
    o->method.interval = 16;
    o->method.fraction = 0.1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        } else if (!strcmp(a, "--check-greedy")) {
            o->check_greedy = 1;
            continue;
        }
        if (!v) {
            fprintf(stderr, "resa-demo: unknown option or missing value: %s\n", a);
            usage(stderr);
            return -1;
        }
        if (!strcmp(a, "--backend")) {
            if (!strcmp(v, "cpu"))
                o->backend = RESA_BACKEND_CPU;
            else if (!strcmp(v, "cuda"))
                o->backend = RESA_BACKEND_CUDA;
            else if (!strcmp(v, "auto"))
                o->backend = RESA_BACKEND_AUTO;
            else
                bad = 1;
        } else if (!strcmp(a, "--model")) {
            o->model_dir = v;
        } else if (!strcmp(a, "--prompt")) {
            o->prompt = v;
        } else if (!strcmp(a, "--tokens")) {
            bad = parse_int(v, 1, 100000, &o->tokens);
        } else if (!strcmp(a, "--windows")) {
            bad = parse_int(v, 1, 10000, &o->windows);
        } else if (!strcmp(a, "--block-size")) {
            bad = parse_int(v, 1, 256, &o->method.block_size);
        } else if (!strcmp(a, "--interval")) {
            bad = parse_int(v, 0, 1 << 30, &o->method.interval);
        } else if (!strcmp(a, "--min-blocks")) {
            bad = parse_int(v, 0, 1 << 30, &o->method.min_blocks);
        } else if (!strcmp(a, "--threads")) {
            bad = parse_int(v, 0, 1024, &o->threads);
        } else if (!strcmp(a, "--fraction")) {
            char *end;
            o->method.fraction = strtod(v, &end);
            bad = end == v || *end != '\0' || !(o->method.fraction >= 0.0) ||
                  !(o->method.fraction <= 1.0);
        } else {
            fprintf(stderr, "resa-demo: unknown option: %s\n", a);
            usage(stderr);
            return -1;
        }
        if (bad) {
            fprintf(stderr, "resa-demo: bad value for %s: '%s'\n", a, v);
            return -1;
        }
        i++;
    }
    o->method.threads = o->threads;
    return 0;
}

static double now_s(void)
{
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int32_t argmax(const float *x, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

static void log_softmax(double *out, const float *logits, int32_t n)
{
    double mx = logits[0];
    for (int32_t i = 1; i < n; i++)
        if (logits[i] > mx)
            mx = logits[i];
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++)
        sum += exp((double)logits[i] - mx);
    double lse = mx + log(sum);
    for (int32_t i = 0; i < n; i++)
        out[i] = (double)logits[i] - lse;
}

/* KL(p || q) from log-probabilities. */
static double kl_div(const double *lp, const double *lq, int32_t n)
{
    double kl = 0.0;
    for (int32_t i = 0; i < n; i++)
        kl += exp(lp[i]) * (lp[i] - lq[i]);
    return kl > 0.0 ? kl : 0.0;
}

static int32_t argmax_d(const double *x, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* ------------------------------------------------------------------------ */

typedef struct app {
    options opt;
    demo_model model;
    demo_tokenizer tok;
    char *text;            /* TinyStories text (cut in place into stories) */
    char **stories;
    int32_t n_stories;
    char path[3][1024];
    int print_note;        /* print the backend note of the next context */
} app;

#define DIE(...)                                    \
    do {                                            \
        fflush(stdout);                             \
        fprintf(stderr, "resa-demo: " __VA_ARGS__); \
        fputc('\n', stderr);                        \
        exit(1);                                    \
    } while (0)

static void check(demo_engine *e, resa_status st)
{
    if (st != RESA_OK)
        DIE("%s", e->err);
}

static void engine_init_with(const app *a, demo_engine *e, demo_kind kind, int record,
                             const demo_method *method)
{
    char note[256];
    resa_status st = demo_engine_init(e, &a->model, kind, a->opt.backend, method, record,
                                      note, sizeof note);
    if (st != RESA_OK)
        DIE("cannot set up a libresa context: %s", e->err);
    if (note[0] && a->print_note)
        printf("note: %s\n", note);
}

static void engine_init(const app *a, demo_engine *e, demo_kind kind, int record)
{
    engine_init_with(a, e, kind, record, &a->opt.method);
}

static const char *kind_name(demo_kind k)
{
    switch (k) {
    case DEMO_DENSE: return "dense";
    case DEMO_SPARSE: return "sparse";
    default: return "ReSA";
    }
}

/* The ReSA block budget for M blocks (spec "Budget"), to explain the settings. */
static int64_t budget(const demo_method *m, int64_t blocks)
{
    int64_t n = (int64_t)ceil(m->fraction * (double)blocks - 1e-9);
    int64_t floor_n = m->min_blocks < blocks ? m->min_blocks : blocks;
    if (n < floor_n)
        n = floor_n;
    if (n < 1)
        n = 1; /* LOCAL_BLOCKS 1 */
    return n < blocks ? n : blocks;
}

/* ------------------------------------------------------------------------ */
/* --check-greedy                                                            */

static int run_check(app *a)
{
    const demo_config *c = &a->model.cfg;
    demo_engine e;
    engine_init(a, &e, DEMO_DENSE, 0);
    float *logits = malloc((size_t)c->seq_len * (size_t)c->vocab_size * sizeof(float));
    int32_t *toks = malloc(((size_t)c->seq_len + 1) * sizeof(int32_t));
    if (!logits || !toks)
        DIE("out of memory");

    /* 1. Greedy from BOS: APPEND for the prompt, then APPEND 1 token per step. */
    char text[4096];
    size_t len = 0;
    text[0] = '\0';
    int32_t prev = DEMO_TOKEN_BOS;
    check(&e, demo_engine_begin(&e));
    check(&e, demo_engine_prefill(&e, &prev, 1, logits, 0));
    size_t want = strlen(README_SAMPLE);
    for (int32_t i = 0; i < 256 && len < want; i++) {
        int32_t next = argmax(logits, c->vocab_size);
        len = demo_decode_append(&a->tok, prev, next, text, len, sizeof text);
        check(&e, demo_engine_decode(&e, next, logits));
        prev = next;
    }
    check(&e, demo_engine_finish(&e));
    int greedy_ok = strncmp(text, README_SAMPLE, want) == 0;
    printf("dense greedy from BOS (%zu bytes):\n%s\n", len, text);
    printf("%s: greedy text %s the README sample\n", greedy_ok ? "PASS" : "FAIL",
           greedy_ok ? "starts with" : "does NOT start with");

    /* 2. Teacher-forced NLL, the README's protocol: the first 50 stories, each
     * BOS + encode(story) truncated to seq_len, one dense APPEND step each. */
    double nll = 0.0;
    int64_t count = 0;
    int32_t n_st = a->n_stories < README_NLL_STORIES ? a->n_stories : README_NLL_STORIES;
    double *lp = malloc((size_t)c->vocab_size * sizeof(double));
    if (!lp)
        DIE("out of memory");
    for (int32_t s = 0; s < n_st; s++) {
        size_t cap = strlen(a->stories[s]) + 3;
        int32_t *all = malloc(cap * sizeof(int32_t));
        if (!all)
            DIE("out of memory");
        int32_t n = demo_encode(&a->tok, a->stories[s], 1, 0, all, (int32_t)cap);
        if (n < 0)
            DIE("tokenizing story %d failed", (int)s);
        if (n > c->seq_len)
            n = c->seq_len;
        check(&e, demo_engine_begin(&e));
        check(&e, demo_engine_prefill(&e, all, n, logits, 1));
        check(&e, demo_engine_finish(&e));
        for (int32_t t = 0; t + 1 < n; t++) {
            log_softmax(lp, logits + (size_t)t * c->vocab_size, c->vocab_size);
            nll -= lp[all[t + 1]];
            count++;
        }
        free(all);
    }
    nll /= (double)(count > 0 ? count : 1);
    int nll_ok = n_st == README_NLL_STORIES && fabs(nll - README_NLL) <= NLL_TOLERANCE;
    printf("teacher-forced NLL, first %d stories: %.4f nats/token (ppl %.3f) over %lld "
           "tokens; README: %.4f over %d\n",
           (int)n_st, nll, exp(nll), (long long)count, README_NLL, README_NLL_TOKENS);
    printf("%s: NLL within %.3f of the README's\n", nll_ok ? "PASS" : "FAIL", NLL_TOLERANCE);
    free(lp);
    free(toks);
    free(logits);
    demo_engine_free(&e);
    return greedy_ok && nll_ok ? 0 : 1;
}

/* ------------------------------------------------------------------------ */
/* Generation                                                                */

typedef struct gen_result {
    int32_t *tokens;  /* generated ids */
    char *text;       /* prompt + generated text */
    double tok_per_s; /* decode phase, rectification included, fastest run */
    double best_s;    /* seconds of the fastest run's decode phase */
    int32_t reps;
    int64_t n_rectify, rectified_tokens;
    double rectify_share; /* of the decode time */
} gen_result;

/* One greedy generation on e; returns the seconds of its decode phase
 * (rectification included).  The first run records the tokens, later runs
 * check that they are the same. */
static double generate_once(const app *a, demo_engine *e, const int32_t *prompt,
                            int32_t n_prompt, int32_t n_gen, float *logits, gen_result *r,
                            int first)
{
    const demo_config *c = &a->model.cfg;
    check(e, demo_engine_begin(e));
    check(e, demo_engine_prefill(e, prompt, n_prompt, logits, 0));
    int64_t rect0 = e->n_rectify, rect_tok0 = e->rectified_tokens;
    double rect_s0 = e->rectify_seconds;
    double t0 = now_s();
    for (int32_t i = 0; i < n_gen; i++) {
        int32_t next = argmax(logits, c->vocab_size);
        if (first)
            r->tokens[i] = next;
        else if (r->tokens[i] != next)
            DIE("%s: greedy decoding is not deterministic across runs (token %d)",
                kind_name(e->kind), (int)i);
        check(e, demo_engine_decode(e, next, logits));
    }
    double dt = now_s() - t0;
    check(e, demo_engine_finish(e));
    if (first) {
        r->n_rectify = e->n_rectify - rect0;
        r->rectified_tokens = e->rectified_tokens - rect_tok0;
    }
    if (first || dt < r->best_s) {
        r->best_s = dt;
        r->rectify_share = (e->rectify_seconds - rect_s0) / dt;
    }
    return dt;
}

/* Greedy generation with the three variants.  The runs are interleaved and
 * repeated, and the fastest run of each counts, so that a busy machine
 * disturbs the comparison as little as possible. */
static void generate_all(const app *a, const int32_t *prompt, int32_t n_prompt, int32_t n_gen,
                         gen_result r[3])
{
    const demo_config *c = &a->model.cfg;
    demo_engine e[3];
    float *logits = malloc((size_t)c->vocab_size * sizeof(float));
    size_t cap = 16 * ((size_t)n_gen + (size_t)n_prompt) + 1;
    if (!logits)
        DIE("out of memory");
    for (int k = 0; k < 3; k++) {
        engine_init(a, &e[k], (demo_kind)k, 0);
        memset(&r[k], 0, sizeof r[k]);
        r[k].tokens = malloc((size_t)n_gen * sizeof(int32_t));
        r[k].text = malloc(cap);
        if (!r[k].tokens || !r[k].text)
            DIE("out of memory");
    }
    double total = 0.0;
    int32_t reps = 0;
    while (reps < 3 || (total < 1.5 && reps < 50)) {
        for (int k = 0; k < 3; k++)
            total += generate_once(a, &e[k], prompt, n_prompt, n_gen, logits, &r[k], reps == 0);
        reps++;
    }
    for (int k = 0; k < 3; k++) {
        r[k].reps = reps;
        r[k].tok_per_s = (double)n_gen / r[k].best_s;
        size_t len = 0;
        r[k].text[0] = '\0';
        int32_t prev = prompt[0];
        for (int32_t i = 1; i < n_prompt; i++) {
            len = demo_decode_append(&a->tok, prev, prompt[i], r[k].text, len, cap);
            prev = prompt[i];
        }
        for (int32_t i = 0; i < n_gen; i++) {
            len = demo_decode_append(&a->tok, prev, r[k].tokens[i], r[k].text, len, cap);
            prev = r[k].tokens[i];
        }
        demo_engine_free(&e[k]);
    }
    free(logits);
}

/* ------------------------------------------------------------------------ */
/* Teacher forcing                                                           */

#define N_RANGES 4

typedef struct tf_stats {
    double *kl_win; /* [windows] mean KL of each window */
    double kl, nll;
    int64_t agree, count;
    double kl_range[N_RANGES];
    int64_t n_range[N_RANGES];
    double kl_max;
    double attended; /* mean fraction of blocks attended per DECODE step */
    int64_t n_rectify, rectified_tokens;
    double seconds;
} tf_stats;

/*
 * Decodes each window token by token with `kind` (the first TF_PREFILL tokens
 * prefilled densely) and compares the next-token distribution at every decoded
 * position with the dense reference ref[w][t][vocab] (log-probabilities).
 */
static void teacher_force(const app *a, demo_kind kind, const demo_method *method,
                          const int32_t *stream, int32_t windows, const double *ref,
                          tf_stats *s)
{
    const demo_config *c = &a->model.cfg;
    const int32_t T = c->seq_len, V = c->vocab_size;
    demo_engine e;
    engine_init_with(a, &e, kind, kind != DEMO_DENSE, method);
    float *logits = malloc((size_t)V * sizeof(float));
    double *lp = malloc((size_t)V * sizeof(double));
    if (!logits || !lp)
        DIE("out of memory");
    memset(s, 0, sizeof *s);
    s->kl_win = calloc((size_t)windows, sizeof(double));
    if (!s->kl_win)
        DIE("out of memory");
    double t0 = now_s();
    for (int32_t w = 0; w < windows; w++) {
        const int32_t *win = stream + (size_t)w * T;
        check(&e, demo_engine_begin(&e));
        check(&e, demo_engine_prefill(&e, win, TF_PREFILL, logits, 0));
        for (int32_t t = TF_PREFILL; t + 1 < T; t++) {
            check(&e, demo_engine_decode(&e, win[t], logits));
            log_softmax(lp, logits, V);
            const double *rp = ref + ((size_t)w * T + (size_t)t) * V;
            double kl = kl_div(rp, lp, V);
            s->kl += kl;
            s->kl_win[w] += kl / (double)(T - 1 - TF_PREFILL);
            if (kl > s->kl_max)
                s->kl_max = kl;
            int32_t r = t * N_RANGES / T;
            s->kl_range[r] += kl;
            s->n_range[r]++;
            s->nll -= lp[win[t + 1]];
            s->agree += argmax_d(lp, V) == argmax_d(rp, V);
            s->count++;
        }
        check(&e, demo_engine_finish(&e));
    }
    s->seconds = now_s() - t0;
    s->kl /= (double)s->count;
    s->nll /= (double)s->count;
    for (int r = 0; r < N_RANGES; r++)
        if (s->n_range[r])
            s->kl_range[r] /= (double)s->n_range[r];
    s->attended = e.attended_n ? e.attended_sum / (double)e.attended_n : 1.0;
    s->n_rectify = e.n_rectify;
    s->rectified_tokens = e.rectified_tokens;
    free(logits);
    free(lp);
    demo_engine_free(&e);
}

/* ------------------------------------------------------------------------ */

static void load(app *a)
{
    char err[512];
    snprintf(a->path[0], sizeof a->path[0], "%s/stories260K.bin", a->opt.model_dir);
    snprintf(a->path[1], sizeof a->path[1], "%s/tok512.bin", a->opt.model_dir);
    snprintf(a->path[2], sizeof a->path[2], "%s/tinystories_val_head.txt", a->opt.model_dir);
    if (demo_model_load(&a->model, a->path[0], err, sizeof err) != 0)
        DIE("%s (see --model)", err);
    const demo_config *c = &a->model.cfg;
    if (demo_tokenizer_load(&a->tok, a->path[1], c->vocab_size, err, sizeof err) != 0)
        DIE("%s (see --model)", err);
    a->text = demo_read_text(a->path[2], err, sizeof err);
    if (!a->text)
        DIE("%s (see --model)", err);
    a->stories = malloc(MAX_STORIES * sizeof(char *));
    if (!a->stories)
        DIE("out of memory");
    a->n_stories = demo_split_stories(a->text, a->stories, MAX_STORIES);
}

int main(int argc, char **argv)
{
    app a;
    memset(&a, 0, sizeof a);
    if (parse_options(argc, argv, &a.opt) != 0)
        return 2;
    load(&a);
    const demo_config *c = &a.model.cfg;
    const demo_method *m = &a.opt.method;

    printf("resa-demo: libresa %s, model %s\n", resa_version_string(), a.path[0]);
    printf("model: dim %d, %d layers, %d query / %d KV heads (GQA %d:1), head_dim %d, "
           "vocab %d, context %d tokens\n",
           (int)c->dim, (int)c->n_layers, (int)c->n_heads, (int)c->n_kv_heads,
           (int)(c->n_heads / c->n_kv_heads), (int)c->head_dim, (int)c->vocab_size,
           (int)c->seq_len);
    {
        /* Probe: fail early, with libresa's message, on a bad setting or backend. */
        demo_engine probe;
        a.print_note = 1;
        engine_init(&a, &probe, DEMO_RESA, 1);
        demo_engine_free(&probe);
        a.print_note = 0;
    }
    if (a.opt.check_greedy) {
        int rc = run_check(&a);
        demo_tokenizer_free(&a.tok);
        demo_model_free(&a.model);
        free(a.stories);
        free(a.text);
        return rc;
    }

    int64_t max_blocks = (c->seq_len + m->block_size - 1) / m->block_size;
    int64_t sel_max = budget(m, max_blocks);
    int64_t dense_upto = (int64_t)m->block_size * m->min_blocks;
    printf("\nReSA settings: BLOCK_SIZE %d, SELECT_MIN_BLOCKS %d, SELECT_FRACTION %.3g, "
           "LOCAL_BLOCKS 1, SINK_BLOCKS 0, RECTIFY_INTERVAL %d (ReSA variant; 0 for sparse)\n",
           (int)m->block_size, (int)m->min_blocks, m->fraction, (int)m->interval);
    printf("  why: the context is only %d tokens.  With the library defaults (b=16, n_min=16)\n"
           "  every context up to 256 tokens is attended densely and a full context still\n"
           "  reads 16 of 32 blocks (50%%), so sparsity would hardly bite.  With b=%d and\n"
           "  n_min=%d, contexts longer than %lld tokens are sparse, and at %d tokens %lld of\n"
           "  %lld blocks (%lld tokens, %.0f%%) are attended.\n",
           (int)c->seq_len, (int)m->block_size, (int)m->min_blocks, (long long)dense_upto,
           (int)c->seq_len, (long long)sel_max, (long long)max_blocks,
           (long long)(sel_max * m->block_size), 100.0 * (double)sel_max / (double)max_blocks);
    if (m->interval > 0)
        printf("  f=%d: one RESA_MODE_RECTIFY step re-encodes the last %d sparsely decoded\n"
               "  tokens every %d steps (libresa's default f is 32).  A 512-token window has\n"
               "  only %d decode steps; f=%d rectifies %d times per window.  The teacher-\n"
               "  forced table below also shows f = 64, 32, 16 and 1.\n",
               (int)m->interval, (int)m->interval, (int)m->interval,
               (int)(c->seq_len - 1 - TF_PREFILL), (int)m->interval,
               (int)((c->seq_len - 1 - TF_PREFILL) / m->interval));
    else
        printf("  f=0: the ReSA variant never rectifies, so it equals the sparse one.\n");
    printf("  threads: RESA_PARAM_NUM_THREADS %d; the host model is single-threaded fp32.\n",
           (int)a.opt.threads);

    /* ---------------- generation ---------------- */
    int32_t *prompt = malloc(((size_t)strlen(a.opt.prompt) + 3) * sizeof(int32_t));
    if (!prompt)
        DIE("out of memory");
    int32_t n_prompt = demo_encode(&a.tok, a.opt.prompt, 1, 0, prompt,
                                   (int32_t)strlen(a.opt.prompt) + 3);
    if (n_prompt < 1 || n_prompt >= c->seq_len)
        DIE("the prompt must be shorter than %d tokens", (int)c->seq_len);
    int32_t n_gen = a.opt.tokens;
    if (n_prompt + n_gen > c->seq_len) {
        n_gen = c->seq_len - n_prompt;
        printf("note: --tokens clamped to %d (the context is %d tokens)\n", (int)n_gen,
               (int)c->seq_len);
    }
    printf("\n== Greedy generation: prompt of %d tokens (BOS included), then %d tokens "
           "==\n", (int)n_prompt, (int)n_gen);
    gen_result g[3];
    generate_all(&a, prompt, n_prompt, n_gen, g);
    for (int k = 0; k < 3; k++) {
        int32_t same = 0;
        while (same < n_gen && g[k].tokens[same] == g[0].tokens[same])
            same++;
        printf("\n--- %s", k == DEMO_DENSE    ? "dense (RESA_MODE_APPEND, 1 token per step)"
                        : k == DEMO_SPARSE ? "sparse (RESA_MODE_DECODE, never rectified)"
                                           : "ReSA (RESA_MODE_DECODE + RESA_MODE_RECTIFY)");
        printf(": %.0f tokens/s (best of %d runs)", g[k].tok_per_s, (int)g[k].reps);
        if (k == DEMO_RESA)
            printf(", %lld rectification passes over %lld tokens (%.0f%% of the time, "
                   "counted in tokens/s)",
                   (long long)g[k].n_rectify, (long long)g[k].rectified_tokens,
                   100.0 * g[k].rectify_share);
        if (k != DEMO_DENSE) {
            if (same == n_gen)
                printf(", all %d tokens identical to dense", (int)n_gen);
            else
                printf(", identical to dense for the first %d of %d tokens", (int)same,
                       (int)n_gen);
        }
        printf(" ---\n%s\n", g[k].text);
    }
    printf("\nnote on speed: tokens/s time the decode steps after the prompt (host model and\n"
           "libresa together, NUM_THREADS %d, fastest of the interleaved runs).  Here the\n"
           "attention is compute-bound: a RESA_MODE_RECTIFY step attends densely for each of\n"
           "its rows and the host re-runs the whole model on them, so ReSA costs about one\n"
           "sparse plus one dense token per token on this toy.  The spec's 1/f cost holds where\n"
           "decoding is memory-bound (long contexts, GPUs): one rectification step reads the\n"
           "KV cache once for f tokens.\n",
           (int)a.opt.threads);

    /* ---------------- teacher forcing ---------------- */
    const int32_t T = c->seq_len, V = c->vocab_size;
    char err[512];
    int64_t n_stream = 0;
    int32_t *stream = demo_token_stream(&a.tok, a.stories, a.n_stories,
                                        (int64_t)a.opt.windows * T, &n_stream, err,
                                        sizeof err);
    if (!stream)
        DIE("%s (try fewer --windows)", err);
    printf("\n== Teacher-forced on TinyStories: %d windows of %d tokens of the llama2.c "
           "training stream (BOS + story, concatenated), ==\n"
           "== first %d tokens of each prefilled densely, then one step per token: %d "
           "predictions per variant ==\n",
           (int)a.opt.windows, (int)T, TF_PREFILL, (int)(a.opt.windows * (T - 1 - TF_PREFILL)));

    /* Dense reference: one APPEND step per window, logits of every row. */
    double *ref = malloc((size_t)a.opt.windows * T * V * sizeof(double));
    float *logits = malloc((size_t)T * V * sizeof(float));
    if (!ref || !logits)
        DIE("out of memory");
    double ref_nll = 0.0;
    int64_t ref_count = 0;
    {
        demo_engine e;
        engine_init(&a, &e, DEMO_DENSE, 0);
        for (int32_t w = 0; w < a.opt.windows; w++) {
            const int32_t *win = stream + (size_t)w * T;
            check(&e, demo_engine_begin(&e));
            check(&e, demo_engine_prefill(&e, win, T, logits, 1));
            check(&e, demo_engine_finish(&e));
            for (int32_t t = 0; t < T; t++) {
                double *rp = ref + ((size_t)w * T + (size_t)t) * V;
                log_softmax(rp, logits + (size_t)t * V, V);
                if (t >= TF_PREFILL && t + 1 < T) {
                    ref_nll -= rp[win[t + 1]];
                    ref_count++;
                }
            }
        }
        demo_engine_free(&e);
    }
    ref_nll /= (double)ref_count;

    /* s[0..2]: dense (1 token per step), sparse, ReSA at the chosen f.  Then
     * ReSA at other intervals, f = 1 last: rectifying after every token keeps
     * every cached K/V dense, so its distance from dense is the error of each
     * step's own sparse attention, the floor no interval can beat. */
    int32_t sweep[8], n_sweep = 0;
    static const int32_t others[] = {64, 32, 16, 1};
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++)
        if (others[i] != m->interval)
            sweep[n_sweep++] = others[i];
    tf_stats s[3 + 8];
    for (int k = 0; k < 3 + n_sweep; k++) {
        demo_method mk = *m;
        if (k >= 3)
            mk.interval = sweep[k - 3];
        teacher_force(&a, k < 3 ? (demo_kind)k : DEMO_RESA, &mk, stream, a.opt.windows, ref,
                      &s[k]);
    }
    const tf_stats *floor_s = m->interval == 1 ? &s[DEMO_RESA] : &s[3 + n_sweep - 1];

    printf("\n%-36s %12s %8s %8s %8s %8s %10s\n", "variant", "KL(dense||v)", "max KL",
           "top-1", "NLL", "attended", "rect. tok");
    printf("%-36s %12s %8s %8s %8.4f %8s %10s\n", "dense reference (one 512-token step)", "-",
           "-", "-", ref_nll, "100%", "-");
    for (int k = 0; k < 3 + n_sweep; k++) {
        char name[64], att[16], rect[24];
        int32_t f = k == DEMO_RESA ? m->interval : k >= 3 ? sweep[k - 3] : 0;
        if (k == DEMO_DENSE)
            snprintf(name, sizeof name, "dense, 1 token per APPEND step");
        else if (k == DEMO_SPARSE)
            snprintf(name, sizeof name, "sparse (no rectification)");
        else
            snprintf(name, sizeof name, "ReSA f=%d%s", (int)f,
                     k == DEMO_RESA ? "  <- the ReSA variant"
                     : f == 1       ? " (floor: every token)"
                                    : "");
        snprintf(att, sizeof att, "%.1f%%", 100.0 * s[k].attended);
        snprintf(rect, sizeof rect, "%lld", (long long)s[k].rectified_tokens);
        printf("%-36s %12.6f %8.4f %7.2f%% %8.4f %8s %10s\n", name, s[k].kl, s[k].kl_max,
               100.0 * (double)s[k].agree / (double)s[k].count, s[k].nll,
               k == DEMO_DENSE ? "100%" : att, k >= DEMO_RESA ? rect : "-");
        if (k == DEMO_RESA && n_sweep > 0)
            printf("  other intervals, for comparison:\n");
    }
    printf("(KL and NLL in nats per predicted token; top-1: argmax equal to dense's; attended:\n"
           " mean share of the blocks so far selected per DECODE step, layer and KV head, as\n"
           " resa_seq_selected_blocks reports it; rect. tok: tokens re-encoded by\n"
           " RESA_MODE_RECTIFY steps)\n");
    printf("\nmean KL(dense||v) by position:");
    for (int r = 0; r < N_RANGES; r++)
        printf("  [%d,%d)", r == 0 ? TF_PREFILL : r * T / N_RANGES, (r + 1) * T / N_RANGES);
    printf("\n");
    for (int k = DEMO_SPARSE; k <= DEMO_RESA + 1; k++) {
        const tf_stats *sk = k <= DEMO_RESA ? &s[k] : floor_s;
        char name[40];
        snprintf(name, sizeof name, "%s",
                 k == DEMO_SPARSE ? "sparse (no rectification)" : k == DEMO_RESA ? "ReSA" : "ReSA f=1 (floor)");
        printf("  %-28s", name);
        for (int r = 0; r < N_RANGES; r++)
            printf(" %10.5f", sk->kl_range[r]);
        printf("\n");
    }

    double drift = s[DEMO_SPARSE].kl - floor_s->kl;
    printf("\nfloor: with f=1 every cached K/V is the dense one, so KL %.5f is the error of the\n"
           "steps' own sparse attention; the rest of the sparse variant's KL (%.5f - %.5f =\n"
           "%.5f) is drift from K/V computed on approximate attention, which is what\n"
           "rectification removes.  ReSA f=%d removes %.0f%% of it.\n",
           floor_s->kl, s[DEMO_SPARSE].kl, floor_s->kl, drift, (int)m->interval,
           drift > 0 ? 100.0 * (s[DEMO_SPARSE].kl - s[DEMO_RESA].kl) / drift : 0.0);

    /* Paired, per window: is the difference larger than the spread of texts? */
    {
        int32_t W = a.opt.windows, wins = 0;
        double mean = 0.0, var = 0.0;
        for (int32_t w = 0; w < W; w++) {
            double d = s[DEMO_RESA].kl_win[w] - s[DEMO_SPARSE].kl_win[w];
            wins += d < 0.0;
            mean += d;
        }
        mean /= W;
        for (int32_t w = 0; w < W; w++) {
            double d = s[DEMO_RESA].kl_win[w] - s[DEMO_SPARSE].kl_win[w] - mean;
            var += d * d;
        }
        printf("per window: ReSA's KL is lower than sparse's in %d of %d windows; mean "
               "difference\n%+.5f nats/token",
               (int)wins, (int)W, mean);
        if (W > 1)
            printf(", standard error over windows %.5f.\n", sqrt(var / (W - 1) / W));
        else
            printf(" (one window: no standard error).\n");
    }

    double top_s = (double)s[DEMO_SPARSE].agree / (double)s[DEMO_SPARSE].count;
    double top_r = (double)s[DEMO_RESA].agree / (double)s[DEMO_RESA].count;
    int closer = s[DEMO_RESA].kl < s[DEMO_SPARSE].kl;
    const char *verdict = closer ? "CLOSER to dense than"
                          : s[DEMO_RESA].kl == s[DEMO_SPARSE].kl ? "exactly as close to dense as"
                                                                 : "NOT closer to dense than";
    printf("\nresult: ReSA (f=%d) is %s sparse decoding without rectification:\n"
           "        KL %.5f vs %.5f (%+.1f%%), top-1 agreement %.2f%% vs %.2f%%,\n"
           "        NLL %.4f vs %.4f (dense %.4f)\n",
           (int)m->interval, verdict, s[DEMO_RESA].kl,
           s[DEMO_SPARSE].kl,
           s[DEMO_SPARSE].kl > 0 ? 100.0 * (s[DEMO_RESA].kl / s[DEMO_SPARSE].kl - 1.0) : 0.0,
           100.0 * top_r, 100.0 * top_s, s[DEMO_RESA].nll, s[DEMO_SPARSE].nll, ref_nll);

    for (int k = 0; k < 3 + n_sweep; k++)
        free(s[k].kl_win);
    free(ref);
    free(logits);
    free(stream);
    free(prompt);
    for (int k = 0; k < 3; k++) {
        free(g[k].tokens);
        free(g[k].text);
    }
    demo_tokenizer_free(&a.tok);
    demo_model_free(&a.model);
    free(a.stories);
    free(a.text);
    return 0;
}
