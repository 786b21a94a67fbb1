/* SPDX-License-Identifier: MIT */
/*
 * The public API contract (black-box): status strings and names, versions,
 * parameter defaults and bounds, every function with each bad argument
 * (documented status, an error text naming the argument, the context still
 * usable and unchanged), lifecycle, reset, allocation hooks, CUDA on a
 * machine without it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

/* ------------------------------------------------------------------------ */
START_TEST(test_status_strings)
{
    static const char *names[] = {
        "RESA_OK", "RESA_ERR_INVALID_ARGUMENT", "RESA_ERR_BAD_STATE", "RESA_ERR_OUT_OF_MEMORY",
        "RESA_ERR_DEVICE_OUT_OF_MEMORY", "RESA_ERR_CAPACITY", "RESA_ERR_NOT_SUPPORTED",
        "RESA_ERR_NO_DEVICE", "RESA_ERR_BACKEND", "RESA_ERR_VERSION_MISMATCH",
        "RESA_ERR_INTERNAL"};
    static const resa_status codes[] = {
        RESA_OK, RESA_ERR_INVALID_ARGUMENT, RESA_ERR_BAD_STATE, RESA_ERR_OUT_OF_MEMORY,
        RESA_ERR_DEVICE_OUT_OF_MEMORY, RESA_ERR_CAPACITY, RESA_ERR_NOT_SUPPORTED,
        RESA_ERR_NO_DEVICE, RESA_ERR_BACKEND, RESA_ERR_VERSION_MISMATCH, RESA_ERR_INTERNAL};
    th_test_seed("status_strings");
    for (int i = 0; i < 11; i++) {
        TCHECK((int)codes[i] == i, "status values are ABI: %s should be %d", names[i], i);
        const char *n = resa_status_name(codes[i]), *s = resa_status_string(codes[i]);
        TCHECK(n && strcmp(n, names[i]) == 0, "resa_status_name(%d) = %s", i, n ? n : "(null)");
        TCHECK(s && s[0], "resa_status_string(%d) is empty", i);
        for (int j = 0; j < i; j++)
            TCHECK(strcmp(s, resa_status_string(codes[j])) != 0,
                   "resa_status_string(%d) equals that of %d", i, j);
    }
    static const int unknown[] = {11, 99, -1, 1000, INT32_MAX};
    for (int i = 0; i < 5; i++) {
        const char *n = resa_status_name((resa_status)unknown[i]);
        const char *s = resa_status_string((resa_status)unknown[i]);
        TCHECK(n && n[0] && s && s[0], "unknown status %d gives NULL/empty text", unknown[i]);
        for (int j = 0; j < 11; j++)
            TCHECK(strcmp(n, names[j]) != 0, "unknown status %d named %s", unknown[i], n);
    }
}
END_TEST

START_TEST(test_versions)
{
    th_test_seed("versions");
    char buf[64];
    snprintf(buf, sizeof buf, "%d.%d.%d", RESA_VERSION_MAJOR, RESA_VERSION_MINOR,
             RESA_VERSION_PATCH);
    TCHECK(strcmp(RESA_VERSION_STRING, buf) == 0, "RESA_VERSION_STRING %s vs macros %s",
           RESA_VERSION_STRING, buf);
    TCHECK(resa_version_number() == RESA_VERSION_NUMBER, "resa_version_number %u",
           resa_version_number());
    TCHECK(RESA_VERSION_NUMBER == RESA_VERSION_MAJOR * 10000 + RESA_VERSION_MINOR * 100 +
                                      RESA_VERSION_PATCH, "RESA_VERSION_NUMBER");
    TCHECK(resa_version_string() && strcmp(resa_version_string(), RESA_VERSION_STRING) == 0,
           "resa_version_string %s", resa_version_string());
    TCHECK(resa_abi_version() == RESA_ABI_VERSION, "resa_abi_version %u", resa_abi_version());
    TCHECK(RESA_ABI_VERSION == RESA_VERSION_MAJOR, "ABI version %d, major %d", RESA_ABI_VERSION,
           RESA_VERSION_MAJOR);
    TCHECK(resa_block_size() == RESA_DEFAULT_BLOCK_SIZE, "resa_block_size %u", resa_block_size());
    TCHECK(resa_max_head_dim() == RESA_MAX_HEAD_DIM, "resa_max_head_dim %u", resa_max_head_dim());
    TCHECK(RESA_AT_LEAST_VERSION(RESA_VERSION_MAJOR, RESA_VERSION_MINOR, RESA_VERSION_PATCH),
           "RESA_AT_LEAST_VERSION(current)");
    TCHECK(!RESA_AT_LEAST_VERSION(RESA_VERSION_MAJOR + 1, 0, 0), "RESA_AT_LEAST_VERSION(next)");
}
END_TEST

/* ------------------------------------------------------------------------ */
typedef struct pinfo {
    resa_param p;
    const char *name;
    int real;
    int shape;          /* locks with the pool */
    double def;         /* documented default */
    double lo, hi;      /* documented bounds (NAN: not documented) */
} pinfo;

static const pinfo params[] = {
    {RESA_PARAM_NUM_LAYERS, "RESA_PARAM_NUM_LAYERS", 0, 1, 1, 1, 4096},
    {RESA_PARAM_NUM_Q_HEADS, "RESA_PARAM_NUM_Q_HEADS", 0, 1, 1, 1, 1024},
    {RESA_PARAM_NUM_KV_HEADS, "RESA_PARAM_NUM_KV_HEADS", 0, 1, 1, 1, 1024},
    {RESA_PARAM_HEAD_DIM, "RESA_PARAM_HEAD_DIM", 0, 1, 128, 1, 256},
    {RESA_PARAM_KV_DTYPE, "RESA_PARAM_KV_DTYPE", 0, 1, RESA_DTYPE_F32, RESA_DTYPE_F32,
     RESA_DTYPE_FP8_E4M3},
    {RESA_PARAM_IO_DTYPE, "RESA_PARAM_IO_DTYPE", 0, 1, RESA_DTYPE_F32, RESA_DTYPE_F32, RESA_DTYPE_BF16},
    {RESA_PARAM_MAX_TOKENS, "RESA_PARAM_MAX_TOKENS", 0, 1, 65536, NAN, NAN},
    {RESA_PARAM_MAX_SEQUENCES, "RESA_PARAM_MAX_SEQUENCES", 0, 1, 64, 1, 65535},
    {RESA_PARAM_MAX_SEQ_TOKENS, "RESA_PARAM_MAX_SEQ_TOKENS", 0, 1, -1 /* 0 or MAX_TOKENS */, NAN, NAN},
    {RESA_PARAM_MAX_STEP_TOKENS, "RESA_PARAM_MAX_STEP_TOKENS", 0, 1, 8192, NAN, NAN},
    {RESA_PARAM_SUMMARY_FORMAT, "RESA_PARAM_SUMMARY_FORMAT", 0, 1, RESA_SUMMARY_FP8_E4M3,
     RESA_SUMMARY_KV_DTYPE, RESA_SUMMARY_FP8_E4M3},
    {RESA_PARAM_BLOCK_SIZE, "RESA_PARAM_BLOCK_SIZE", 0, 1, 16, 1, 256},
    {RESA_PARAM_SELECT_FRACTION, "RESA_PARAM_SELECT_FRACTION", 1, 0, 0.15, 0, 1},
    {RESA_PARAM_SELECT_MIN_BLOCKS, "RESA_PARAM_SELECT_MIN_BLOCKS", 0, 0, 16, 0, 1 << 30},
    {RESA_PARAM_LOCAL_BLOCKS, "RESA_PARAM_LOCAL_BLOCKS", 0, 0, 1, 1, 1 << 30},
    {RESA_PARAM_SINK_BLOCKS, "RESA_PARAM_SINK_BLOCKS", 0, 0, 1, 0, 1 << 30},
    {RESA_PARAM_RECTIFY_INTERVAL, "RESA_PARAM_RECTIFY_INTERVAL", 0, 0, 128, 0, 1 << 30},
    {RESA_PARAM_SOFTMAX_SCALE, "RESA_PARAM_SOFTMAX_SCALE", 1, 0, -1 /* effective 1/sqrt(d) */, 0, 1e6},
    {RESA_PARAM_SCORE_WIDTH, "RESA_PARAM_SCORE_WIDTH", 1, 0, 0.5, 0, 1},
    {RESA_PARAM_GROUP_SCORE, "RESA_PARAM_GROUP_SCORE", 0, 0, RESA_GROUP_SCORE_POOLED,
     RESA_GROUP_SCORE_POOLED, RESA_GROUP_SCORE_HEAD_SHARE},
    {RESA_PARAM_NUM_THREADS, "RESA_PARAM_NUM_THREADS", 0, 1, 0, 0, 1024},
    {RESA_PARAM_RECORD_SELECTION, "RESA_PARAM_RECORD_SELECTION", 0, 1, 0, 0, 1},
};
#define N_PARAMS ((int)(sizeof params / sizeof params[0]))

static resa_ctx *new_ctx(void)
{
    resa_ctx *c = NULL;
    resa_status s = resa_ctx_create(RESA_BACKEND_CPU, NULL, &c);
    TCHECK(s == RESA_OK && c, "resa_ctx_create(CPU): %s", resa_status_name(s));
    TCHECK(strcmp(resa_ctx_last_error(c), "") == 0, "fresh context has an error text");
    return c;
}

/* The model's shape: no safe default, so the first seq_create needs all four. */
static void set_shape(resa_ctx *c, int64_t layers, int64_t hq, int64_t hkv, int64_t d)
{
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_LAYERS, layers));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_Q_HEADS, hq));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_KV_HEADS, hkv));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, d));
}

/* A host that never sets a shape parameter gets RESA_ERR_BAD_STATE naming the
 * first one missing, at the first seq_create, and nothing changes; a
 * parameter reset forgets what was set, a session reset does not. */
START_TEST(test_shape_unset)
{
    static const resa_param shape[] = {RESA_PARAM_NUM_LAYERS, RESA_PARAM_NUM_Q_HEADS,
                                       RESA_PARAM_NUM_KV_HEADS, RESA_PARAM_HEAD_DIM};
    static const char *const names[] = {"RESA_PARAM_NUM_LAYERS", "RESA_PARAM_NUM_Q_HEADS",
                                        "RESA_PARAM_NUM_KV_HEADS", "RESA_PARAM_HEAD_DIM"};
    static const int64_t value[] = {2, 4, 2, 64};
    th_test_seed("shape_unset");
    resa_ctx *c = new_ctx();
    int32_t s = -1;
    /* set them in a random order: each seq_create names the first unset one */
    int order[4] = {0, 1, 2, 3};
    for (int i = 3; i > 0; i--) {
        int j = rand() % (i + 1), t = order[i];
        order[i] = order[j], order[j] = t;
    }
    int set[4] = {0, 0, 0, 0};
    for (int k = 0; k < 4; k++) {
        int first = 0;
        while (set[first])
            first++;
        TFAIL(c, RESA_ERR_BAD_STATE, names[first], resa_seq_create(c, &s));
        TCHECK(s == -1, "a refused seq_create wrote a sequence id");
        TOK(c, resa_ctx_set_param(c, shape[order[k]], value[order[k]]));
        set[order[k]] = 1;
    }
    TOK(c, resa_seq_create(c, &s));
    /* a session reset keeps the parameters, so the shape stays set */
    TOK(c, resa_ctx_reset(c, RESA_RESET_SESSION));
    TOK(c, resa_seq_create(c, &s));
    /* a parameter reset is back to "never set" */
    TOK(c, resa_ctx_reset(c, RESA_RESET_SESSION | RESA_RESET_PARAMS));
    TFAIL(c, RESA_ERR_BAD_STATE, "RESA_PARAM_NUM_LAYERS", resa_seq_create(c, &s));
    set_shape(c, 1, 1, 1, 128); /* the old defaults, now set on purpose */
    TOK(c, resa_seq_create(c, &s));
    resa_ctx_destroy(c);
}
END_TEST

START_TEST(test_param_defaults_and_bounds)
{
    th_test_seed("param_defaults_and_bounds");
    resa_ctx *c = new_ctx();
    /* every default, before anything is set */
    for (int i = 0; i < N_PARAMS; i++) {
        const pinfo *pi = &params[i];
        if (pi->real) {
            double v = -1;
            TOK(c, resa_ctx_get_param_f64(c, pi->p, &v));
            if (pi->p == RESA_PARAM_SOFTMAX_SCALE)
                TCHECK(fabs(v - 1.0 / sqrt(128.0)) < 1e-15, "default scale %.17g", v);
            else
                TCHECK(v == pi->def, "%s default %g, documented %g", pi->name, v, pi->def);
        } else {
            int64_t v = -2;
            TOK(c, resa_ctx_get_param(c, pi->p, &v));
            if (pi->p == RESA_PARAM_MAX_SEQ_TOKENS)
                TCHECK(v == 0 || v == 65536, "MAX_SEQ_TOKENS default %lld", (long long)v);
            else
                TCHECK(v == (int64_t)pi->def, "%s default %lld, documented %g", pi->name,
                       (long long)v, pi->def);
        }
    }
    /* bounds, both setters, the wrong setter, out of range */
    for (int i = 0; i < N_PARAMS; i++) {
        const pinfo *pi = &params[i];
        if (pi->real) {
            double v = -1, lo = -1, hi = -1;
            TOK(c, resa_param_bounds_f64(pi->p, &lo, &hi));
            TCHECK(lo == pi->lo && hi == pi->hi, "%s bounds [%g, %g]", pi->name, lo, hi);
            TCHECK(resa_param_bounds(pi->p, (int64_t[]){0}, (int64_t[]){0}) ==
                       RESA_ERR_INVALID_ARGUMENT, "%s: integer bounds of a real parameter", pi->name);
            int64_t iv;
            TFAIL(c, RESA_ERR_INVALID_ARGUMENT, pi->name, resa_ctx_get_param(c, pi->p, &iv));
            TFAIL(c, RESA_ERR_INVALID_ARGUMENT, pi->name, resa_ctx_set_param(c, pi->p, 0));
            TFAIL(c, RESA_ERR_INVALID_ARGUMENT, pi->name, resa_ctx_set_param_f64(c, pi->p, lo - 1e-3));
            TFAIL(c, RESA_ERR_INVALID_ARGUMENT, pi->name, resa_ctx_set_param_f64(c, pi->p, hi * 1.001 + 1e-3));
            TFAIL(c, RESA_ERR_INVALID_ARGUMENT, pi->name, resa_ctx_set_param_f64(c, pi->p, NAN));
            TFAIL(c, RESA_ERR_INVALID_ARGUMENT, pi->name, resa_ctx_set_param_f64(c, pi->p, INFINITY));
            TOK(c, resa_ctx_set_param_f64(c, pi->p, lo));
            TOK(c, resa_ctx_set_param_f64(c, pi->p, hi));
            TOK(c, resa_ctx_get_param_f64(c, pi->p, &v));
            TCHECK(v == hi, "%s: set %g, read %g", pi->name, hi, v);
        } else {
            int64_t v = -2, lo = -2, hi = -2;
            TOK(c, resa_param_bounds(pi->p, &lo, &hi));
            if (!isnan(pi->lo))
                TCHECK(lo == (int64_t)pi->lo && hi == (int64_t)pi->hi,
                       "%s bounds [%lld, %lld], documented [%g, %g]", pi->name, (long long)lo,
                       (long long)hi, pi->lo, pi->hi);
            TCHECK(lo <= hi && (pi->p == RESA_PARAM_MAX_SEQ_TOKENS ? lo == 0 : lo >= 0),
                   "%s bounds [%lld, %lld]", pi->name, (long long)lo, (long long)hi);
            TCHECK(resa_param_bounds_f64(pi->p, (double[]){0}, (double[]){0}) ==
                       RESA_ERR_INVALID_ARGUMENT, "%s: real bounds of an integer parameter", pi->name);
            double dv;
            TFAIL(c, RESA_ERR_INVALID_ARGUMENT, pi->name, resa_ctx_get_param_f64(c, pi->p, &dv));
            TFAIL(c, RESA_ERR_INVALID_ARGUMENT, pi->name, resa_ctx_set_param_f64(c, pi->p, 1.0));
            if (lo > INT64_MIN)
                TFAIL(c, RESA_ERR_INVALID_ARGUMENT, pi->name, resa_ctx_set_param(c, pi->p, lo - 1));
            if (hi < INT64_MAX)
                TFAIL(c, RESA_ERR_INVALID_ARGUMENT, pi->name, resa_ctx_set_param(c, pi->p, hi + 1));
            TFAIL(c, RESA_ERR_INVALID_ARGUMENT, pi->name, resa_ctx_set_param(c, pi->p, INT64_MIN));
            TOK(c, resa_ctx_set_param(c, pi->p, lo));
            TOK(c, resa_ctx_set_param(c, pi->p, hi));
            TOK(c, resa_ctx_get_param(c, pi->p, &v));
            TCHECK(v == hi, "%s: set %lld, read %lld", pi->name, (long long)hi, (long long)v);
        }
    }
    /* NULL outputs and unknown parameters */
    int64_t iv, lo, hi;
    double dv, dlo, dhi;
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "value", resa_ctx_get_param(c, RESA_PARAM_HEAD_DIM, NULL));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "value",
          resa_ctx_get_param_f64(c, RESA_PARAM_SOFTMAX_SCALE, NULL));
    static const int bogus[] = {-1, 0, 99, 111, 209, 302, 999, 1001, 123456};
    for (int i = 0; i < 9; i++) {
        resa_param bp = (resa_param)bogus[i];
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "param", resa_ctx_set_param(c, bp, 1));
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "param", resa_ctx_get_param(c, bp, &iv));
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "param", resa_ctx_set_param_f64(c, bp, 0.5));
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "param", resa_ctx_get_param_f64(c, bp, &dv));
        TCHECK(resa_param_bounds(bp, &lo, &hi) == RESA_ERR_INVALID_ARGUMENT, "bounds(%d)", bogus[i]);
        TCHECK(resa_param_bounds_f64(bp, &dlo, &dhi) == RESA_ERR_INVALID_ARGUMENT, "bounds_f64(%d)",
               bogus[i]);
    }
    TCHECK(resa_param_bounds(RESA_PARAM_HEAD_DIM, NULL, &hi) == RESA_ERR_INVALID_ARGUMENT, "lo NULL");
    TCHECK(resa_param_bounds(RESA_PARAM_HEAD_DIM, &lo, NULL) == RESA_ERR_INVALID_ARGUMENT, "hi NULL");
    TCHECK(resa_param_bounds_f64(RESA_PARAM_SELECT_FRACTION, NULL, &dhi) == RESA_ERR_INVALID_ARGUMENT,
           "lo NULL");
    TCHECK(resa_param_bounds_f64(RESA_PARAM_SELECT_FRACTION, &dlo, NULL) == RESA_ERR_INVALID_ARGUMENT,
           "hi NULL");
    /* block size must be a power of two */
    static const int64_t npow[] = {3, 12, 24, 48, 100, 255};
    for (int i = 0; i < 6; i++)
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "RESA_PARAM_BLOCK_SIZE",
              resa_ctx_set_param(c, RESA_PARAM_BLOCK_SIZE, npow[i]));
    for (int64_t b = 1; b <= 256; b *= 2)
        TOK(c, resa_ctx_set_param(c, RESA_PARAM_BLOCK_SIZE, b));
    /* NULL context */
    TCHECK(resa_ctx_set_param(NULL, RESA_PARAM_HEAD_DIM, 64) == RESA_ERR_INVALID_ARGUMENT, "NULL ctx");
    TCHECK(resa_ctx_get_param(NULL, RESA_PARAM_HEAD_DIM, &iv) == RESA_ERR_INVALID_ARGUMENT, "NULL ctx");
    TCHECK(resa_ctx_set_param_f64(NULL, RESA_PARAM_SELECT_FRACTION, 0.5) == RESA_ERR_INVALID_ARGUMENT,
           "NULL ctx");
    TCHECK(resa_ctx_get_param_f64(NULL, RESA_PARAM_SELECT_FRACTION, &dv) == RESA_ERR_INVALID_ARGUMENT,
           "NULL ctx");
    /* RESET_PARAMS restores every default */
    TOK(c, resa_ctx_reset(c, RESA_RESET_PARAMS));
    for (int i = 0; i < N_PARAMS; i++) {
        if (params[i].real || params[i].p == RESA_PARAM_MAX_SEQ_TOKENS)
            continue;
        TOK(c, resa_ctx_get_param(c, params[i].p, &iv));
        TCHECK(iv == (int64_t)params[i].def, "%s after RESET_PARAMS: %lld", params[i].name,
               (long long)iv);
    }
    TOK(c, resa_ctx_get_param_f64(c, RESA_PARAM_SELECT_FRACTION, &dv));
    TCHECK(dv == 0.15, "SELECT_FRACTION after RESET_PARAMS: %g", dv);
    /* the effective scale follows HEAD_DIM while unset */
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, 64));
    TOK(c, resa_ctx_get_param_f64(c, RESA_PARAM_SOFTMAX_SCALE, &dv));
    TCHECK(dv == 0.125, "scale for d = 64: %g", dv);
    TOK(c, resa_ctx_set_param_f64(c, RESA_PARAM_SOFTMAX_SCALE, 0.3));
    TOK(c, resa_ctx_get_param_f64(c, RESA_PARAM_SOFTMAX_SCALE, &dv));
    TCHECK(dv == 0.3, "scale set 0.3, read %g", dv);
    resa_ctx_destroy(c);
}
END_TEST

/* Shape parameters lock at the first seq_create; the others stay settable. */
START_TEST(test_param_lock)
{
    th_test_seed("param_lock");
    resa_ctx *c = new_ctx();
    set_shape(c, 1, 1, 1, 64);
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, 4096));
    int32_t s;
    TOK(c, resa_seq_create(c, &s));
    for (int i = 0; i < N_PARAMS; i++) {
        const pinfo *pi = &params[i];
        if (pi->real) {
            double v;
            TOK(c, resa_ctx_get_param_f64(c, pi->p, &v));
            TOK(c, resa_ctx_set_param_f64(c, pi->p, v));
            continue;
        }
        int64_t v;
        TOK(c, resa_ctx_get_param(c, pi->p, &v));
        if (pi->p == RESA_PARAM_MAX_SEQ_TOKENS && v != 0)
            v = 0; /* any value: it is locked */
        if (pi->shape) {
            TFAIL(c, RESA_ERR_BAD_STATE, pi->name, resa_ctx_set_param(c, pi->p, v));
            int64_t w;
            TOK(c, resa_ctx_get_param(c, pi->p, &w));
        } else {
            TOK(c, resa_ctx_set_param(c, pi->p, v));
        }
    }
    int64_t v;
    TOK(c, resa_ctx_get_param(c, RESA_PARAM_HEAD_DIM, &v));
    TCHECK(v == 64, "locked HEAD_DIM changed to %lld", (long long)v);
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_reset(c, RESA_RESET_PARAMS));
    TOK(c, resa_ctx_get_param(c, RESA_PARAM_HEAD_DIM, &v));
    TCHECK(v == 64, "failed RESET_PARAMS changed HEAD_DIM to %lld", (long long)v);
    /* the sequence survived the failures */
    int64_t len = -1;
    TOK(c, resa_seq_length(c, s, &len));
    TCHECK(len == 0, "length %lld", (long long)len);
    /* RESET_SESSION unlocks and releases every sequence */
    TOK(c, resa_ctx_reset(c, RESA_RESET_SESSION));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, NULL, resa_seq_length(c, s, &len));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, 128));
    TOK(c, resa_ctx_reset(c, RESA_RESET_SESSION | RESA_RESET_PARAMS));
    TOK(c, resa_ctx_get_param(c, RESA_PARAM_HEAD_DIM, &v));
    TCHECK(v == 128, "HEAD_DIM after reset %lld", (long long)v);
    TOK(c, resa_ctx_get_param(c, RESA_PARAM_MAX_TOKENS, &v));
    TCHECK(v == 65536, "MAX_TOKENS after reset %lld", (long long)v);
    /* a parameter reset forgets the shape too (test_shape_unset) */
    TFAIL(c, RESA_ERR_BAD_STATE, "RESA_PARAM_NUM_LAYERS", resa_seq_create(c, &s));
    set_shape(c, 1, 1, 1, 128);
    TOK(c, resa_seq_create(c, &s));
    resa_ctx_destroy(c);
}
END_TEST

/* Inconsistent shapes are reported at the lock and change nothing. */
START_TEST(test_lock_validation)
{
    th_test_seed("lock_validation");
    resa_ctx *c = new_ctx();
    int32_t s = -1;
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_LAYERS, 1));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, 128));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_Q_HEADS, 6));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_KV_HEADS, 4));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "RESA_PARAM_NUM_Q_HEADS|RESA_PARAM_NUM_KV_HEADS", resa_seq_create(c, &s));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, 64)); /* still unlocked */
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_KV_HEADS, 3));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, 1000));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_SEQ_TOKENS, 2000));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "RESA_PARAM_MAX_SEQ_TOKENS", resa_seq_create(c, &s));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_SEQ_TOKENS, 1000));
    TOK(c, resa_seq_create(c, &s));
    int64_t free_tok = -1;
    TOK(c, resa_ctx_free_tokens(c, &free_tok));
    TCHECK(free_tok >= 1000 && free_tok < 1000 + 16, "free tokens %lld for MAX_TOKENS 1000",
           (long long)free_tok);
    resa_ctx_destroy(c);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* A small world for the error tests: 2 layers, two sequences with a
 * pending one, and a reference so that "still usable" means "still right". */
typedef struct ew {
    th t;
    th_seq a, b;
} ew;

static void ew_init(ew *w, const char *name)
{
    ref_params p;
    ref_params_default(&p);
    p.n_layers = 2;
    p.d = 64;
    p.hq = 4;
    p.hkv = 2;
    p.min_blocks = 1;
    p.sink_blocks = 0; /* a budget of 1 block: the decode below is sparse */
    th_opts o;
    th_opts_default(&o);
    o.max_seqs = 4;
    o.max_tokens = 2048;
    th_init(&w->t, name, &p, &o);
    th_seq_create(&w->t, &w->a);
    th_seq_create(&w->t, &w->b);
    th_prefill(&w->t, &w->a, 40, 40, 0);
    th_one(&w->t, &w->a, RESA_MODE_DECODE, 1); /* pending 1 */
    th_prefill(&w->t, &w->b, 7, 7, 0);
}

/* The context is as it was: states, and a checked step of both sequences. */
static void ew_usable(ew *w)
{
    th_check_state(&w->t, &w->a);
    th_check_state(&w->t, &w->b);
    th_entry e[2] = {{&w->a, RESA_MODE_DECODE, 1}, {&w->b, RESA_MODE_APPEND, 3}};
    th_step(&w->t, 2, e);
}

static void ew_fini(ew *w)
{
    ref_seq_free(w->a.r);
    ref_seq_free(w->b.r);
    th_fini(&w->t);
}

START_TEST(test_errors_lifecycle)
{
    th_test_seed("errors_lifecycle");
    resa_ctx *c = (resa_ctx *)0x1;
    TCHECK(resa_ctx_create(RESA_BACKEND_CPU, NULL, NULL) == RESA_ERR_INVALID_ARGUMENT, "out NULL");
    TCHECK(resa_ctx_create((resa_backend)3, NULL, &c) == RESA_ERR_INVALID_ARGUMENT && c == NULL,
           "backend 3");
    c = (resa_ctx *)0x1;
    TCHECK(resa_ctx_create((resa_backend)-1, NULL, &c) == RESA_ERR_INVALID_ARGUMENT && c == NULL,
           "backend -1");
    resa_allocator half = {NULL, NULL, NULL};
    c = (resa_ctx *)0x1;
    TCHECK(resa_ctx_create(RESA_BACKEND_CPU, &half, &c) == RESA_ERR_INVALID_ARGUMENT && c == NULL,
           "allocator without functions");
    resa_ctx_destroy(NULL);
    const char *e = resa_ctx_last_error(NULL);
    TCHECK(e != NULL && e[0], "resa_ctx_last_error(NULL) must be a static non-empty text");
    TCHECK(resa_ctx_reset(NULL, RESA_RESET_SESSION) == RESA_ERR_INVALID_ARGUMENT, "reset NULL");
    resa_backend be;
    TCHECK(resa_ctx_get_backend(NULL, &be) == RESA_ERR_INVALID_ARGUMENT, "get_backend NULL");
    TCHECK(resa_ctx_set_stream(NULL, NULL) == RESA_ERR_INVALID_ARGUMENT, "set_stream NULL");
    TCHECK(resa_ctx_synchronize(NULL) == RESA_ERR_INVALID_ARGUMENT, "synchronize NULL");
    int32_t s;
    int64_t i64;
    int32_t i32;
    TCHECK(resa_seq_create(NULL, &s) == RESA_ERR_INVALID_ARGUMENT, "seq_create NULL");
    TCHECK(resa_seq_release(NULL, 0) == RESA_ERR_INVALID_ARGUMENT, "seq_release NULL");
    TCHECK(resa_seq_fork(NULL, 0, &s) == RESA_ERR_INVALID_ARGUMENT, "seq_fork NULL");
    TCHECK(resa_seq_length(NULL, 0, &i64) == RESA_ERR_INVALID_ARGUMENT, "seq_length NULL");
    TCHECK(resa_seq_pending(NULL, 0, &i64) == RESA_ERR_INVALID_ARGUMENT, "seq_pending NULL");
    TCHECK(resa_seq_rectify_due(NULL, 0, &i32) == RESA_ERR_INVALID_ARGUMENT, "rectify_due NULL");
    TCHECK(resa_ctx_free_tokens(NULL, &i64) == RESA_ERR_INVALID_ARGUMENT, "free_tokens NULL");
    int32_t mode = RESA_MODE_APPEND, n = 1;
    TCHECK(resa_ctx_step_begin(NULL, 1, &s, &mode, &n, 0) == RESA_ERR_INVALID_ARGUMENT, "begin NULL");
    float buf[4] = {0};
    TCHECK(resa_ctx_step_attend(NULL, 0, buf, buf, buf, buf, 0) == RESA_ERR_INVALID_ARGUMENT,
           "attend NULL");
    TCHECK(resa_ctx_step_end(NULL, 0) == RESA_ERR_INVALID_ARGUMENT, "end NULL");
    TCHECK(resa_ctx_step_cancel(NULL) == RESA_ERR_INVALID_ARGUMENT, "cancel NULL");
    TCHECK(resa_seq_selected_blocks(NULL, 0, 0, 0, &i32, 1, &i64) == RESA_ERR_INVALID_ARGUMENT,
           "selected_blocks NULL");

    c = new_ctx();
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, NULL, resa_ctx_get_backend(c, NULL));
    TOK(c, resa_ctx_get_backend(c, &be));
    TCHECK(be == RESA_BACKEND_CPU, "backend %d", (int)be);
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "what", resa_ctx_reset(c, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "what", resa_ctx_reset(c, 4));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "what", resa_ctx_reset(c, 0x80000000u));
    TOK(c, resa_ctx_set_stream(c, NULL));
    int dummy;
    TFAIL(c, RESA_ERR_NOT_SUPPORTED, "stream", resa_ctx_set_stream(c, &dummy));
    TOK(c, resa_ctx_synchronize(c));
    TCHECK(strcmp(resa_ctx_last_error(c), "") == 0, "error text not cleared by a success");
    /* queries before any sequence exists */
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seq|sequence", resa_seq_length(c, 0, &i64));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seq|sequence", resa_seq_release(c, 0));
    resa_status st = resa_ctx_step_begin(c, 1, &s, &mode, &n, 0);
    TCHECK(st == RESA_ERR_BAD_STATE || st == RESA_ERR_INVALID_ARGUMENT,
           "step_begin before any sequence: %s", resa_status_name(st));
    th_check_error_text(c, NULL, "step_begin before any sequence");
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_step_end(c, 0));
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_step_cancel(c));
    TOK(c, resa_ctx_free_tokens(c, &i64));
    TCHECK(i64 == 65536, "free tokens before the lock: %lld", (long long)i64);
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "tokens", resa_ctx_free_tokens(c, NULL));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seq", resa_seq_create(c, NULL));
    resa_ctx_destroy(c);

    /* AUTO resolves to a concrete backend */
    TOK(NULL, resa_ctx_create(RESA_BACKEND_AUTO, NULL, &c));
    TOK(c, resa_ctx_get_backend(c, &be));
    TCHECK(be == RESA_BACKEND_CPU || be == RESA_BACKEND_CUDA, "AUTO resolved to %d", (int)be);
    if (!resa_backend_available(RESA_BACKEND_CUDA))
        TCHECK(be == RESA_BACKEND_CPU, "AUTO chose CUDA, which is not available");
    resa_ctx_destroy(c);
}
END_TEST

START_TEST(test_cuda_unavailable)
{
    th_test_seed("cuda_unavailable");
    TCHECK(resa_backend_available(RESA_BACKEND_CPU) == 1, "CPU must always be available");
    TCHECK(resa_backend_available(RESA_BACKEND_AUTO) == 1, "AUTO must always be available");
    TCHECK(resa_backend_available((resa_backend)7) == 0, "backend 7 reported available");
    TCHECK(resa_backend_available((resa_backend)-1) == 0, "backend -1 reported available");
    int32_t cuda = resa_backend_available(RESA_BACKEND_CUDA);
    TCHECK(cuda == 0 || cuda == 1, "resa_backend_available(CUDA) = %d", cuda);
    resa_ctx *c = (resa_ctx *)0x1;
    resa_status s = resa_ctx_create(RESA_BACKEND_CUDA, NULL, &c);
    if (cuda) {
        TCHECK(s == RESA_OK && c, "CUDA available but create failed: %s", resa_status_name(s));
        resa_ctx_destroy(c);
        return;
    }
    TCHECK(s == RESA_ERR_NOT_SUPPORTED || s == RESA_ERR_NO_DEVICE,
           "CUDA context on a machine without CUDA: %s", resa_status_name(s));
    TCHECK(c == NULL, "failed create must set *out to NULL");
    /* the CPU still works afterwards, in the same process */
    c = new_ctx();
    set_shape(c, 1, 1, 1, 128);
    int32_t id;
    TOK(c, resa_seq_create(c, &id));
    resa_ctx_destroy(c);
}
END_TEST

START_TEST(test_errors_params_in_step)
{
    ew w;
    ew_init(&w, "errors_params_in_step");
    resa_ctx *c = w.t.ctx;
    int32_t mode = RESA_MODE_APPEND, n = 1;
    TOK(c, resa_ctx_step_begin(c, 1, &w.b.id, &mode, &n, 0));
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_set_param_f64(c, RESA_PARAM_SELECT_FRACTION, 0.5));
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_set_param(c, RESA_PARAM_RECTIFY_INTERVAL, 3));
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_set_stream(c, NULL));
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_reset(c, RESA_RESET_PARAMS));
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_set_preset(c, RESA_PRESET_PAPER));
    int32_t x;
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_seq_create(c, &x));
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_seq_fork(c, w.a.id, &x));
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_seq_release(c, w.a.id));
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_step_begin(c, 1, &w.a.id, &mode, &n, 0));
    TOK(c, resa_ctx_step_cancel(c));
    double f;
    TOK(c, resa_ctx_get_param_f64(c, RESA_PARAM_SELECT_FRACTION, &f));
    TCHECK(f == w.t.p.fraction, "fraction changed inside a step");
    ew_usable(&w);
    ew_fini(&w);
}
END_TEST

/* The presets set exactly the method parameters: the paper's values, then
 * every default back; nothing else moves, and bad presets change nothing. */
START_TEST(test_presets)
{
    static const resa_param method[] = {RESA_PARAM_SELECT_MIN_BLOCKS, RESA_PARAM_LOCAL_BLOCKS,
                                        RESA_PARAM_SINK_BLOCKS, RESA_PARAM_RECTIFY_INTERVAL,
                                        RESA_PARAM_GROUP_SCORE};
    static const int64_t paper[] = {16, 1, 0, 32, RESA_GROUP_SCORE_POOLED};
    static const int64_t off[] = {7, 7, 7, 7, RESA_GROUP_SCORE_HEAD_SHARE};
    enum { N_METHOD = 5 };
    resa_ctx *c = NULL;
    ck_assert_int_eq(resa_ctx_create(RESA_BACKEND_CPU, NULL, &c), RESA_OK);
    ck_assert_int_eq(resa_ctx_set_preset(NULL, RESA_PRESET_PAPER), RESA_ERR_INVALID_ARGUMENT);
    /* move everything off both presets first */
    TOK(c, resa_ctx_set_param_f64(c, RESA_PARAM_SELECT_FRACTION, 0.37));
    TOK(c, resa_ctx_set_param_f64(c, RESA_PARAM_SCORE_WIDTH, 0.37));
    for (int i = 0; i < N_METHOD; i++)
        TOK(c, resa_ctx_set_param(c, method[i], off[i]));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, 64));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "preset", resa_ctx_set_preset(c, (resa_preset)2));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "preset", resa_ctx_set_preset(c, (resa_preset)-1));
    int64_t v;
    double f;
    TOK(c, resa_ctx_get_param(c, RESA_PARAM_SINK_BLOCKS, &v));
    TCHECK(v == 7, "a refused preset changed SINK_BLOCKS to %lld", (long long)v);

    TOK(c, resa_ctx_set_preset(c, RESA_PRESET_PAPER));
    TOK(c, resa_ctx_get_param_f64(c, RESA_PARAM_SELECT_FRACTION, &f));
    TCHECK(f == 0.1, "paper: fraction %g", f);
    TOK(c, resa_ctx_get_param_f64(c, RESA_PARAM_SCORE_WIDTH, &f));
    TCHECK(f == 1.0, "paper: score width %g", f);
    for (int i = 0; i < N_METHOD; i++) {
        TOK(c, resa_ctx_get_param(c, method[i], &v));
        TCHECK(v == paper[i], "paper: param %d = %lld, expected %lld", (int)method[i],
               (long long)v, (long long)paper[i]);
    }
    TOK(c, resa_ctx_set_preset(c, RESA_PRESET_DEFAULT));
    resa_ctx *fresh = NULL;
    ck_assert_int_eq(resa_ctx_create(RESA_BACKEND_CPU, NULL, &fresh), RESA_OK);
    for (int i = 0; i < N_METHOD; i++) {
        int64_t want;
        TOK(c, resa_ctx_get_param(c, method[i], &v));
        TOK(fresh, resa_ctx_get_param(fresh, method[i], &want));
        TCHECK(v == want, "default: param %d = %lld, a new context has %lld", (int)method[i],
               (long long)v, (long long)want);
    }
    static const resa_param reals[] = {RESA_PARAM_SELECT_FRACTION, RESA_PARAM_SCORE_WIDTH};
    for (int i = 0; i < 2; i++) {
        double want;
        TOK(c, resa_ctx_get_param_f64(c, reals[i], &f));
        TOK(fresh, resa_ctx_get_param_f64(fresh, reals[i], &want));
        TCHECK(f == want, "default: param %d = %g, a new context has %g", (int)reals[i], f, want);
    }
    TOK(c, resa_ctx_get_param(c, RESA_PARAM_HEAD_DIM, &v));
    TCHECK(v == 64, "a preset changed HEAD_DIM to %lld", (long long)v);
    resa_ctx_destroy(fresh);
    resa_ctx_destroy(c);
}
END_TEST

START_TEST(test_errors_sequences)
{
    ew w;
    ew_init(&w, "errors_sequences");
    resa_ctx *c = w.t.ctx;
    int64_t i64;
    int32_t i32, x;
    static const int32_t bad_ids[] = {-1, INT32_MIN, 12345, 65535, 0x7fffffff, 3};
    for (int i = 0; i < 6; i++) {
        int32_t id = bad_ids[i];
        if (id == w.a.id || id == w.b.id)
            continue;
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seq|sequence", resa_seq_length(c, id, &i64));
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seq|sequence", resa_seq_pending(c, id, &i64));
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seq|sequence", resa_seq_rectify_due(c, id, &i32));
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seq|sequence", resa_seq_release(c, id));
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "parent", resa_seq_fork(c, id, &x));
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seq|sequence",
              resa_seq_selected_blocks(c, id, 0, 0, &i32, 1, &i64));
    }
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "length", resa_seq_length(c, w.a.id, NULL));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "pending", resa_seq_pending(c, w.a.id, NULL));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "due", resa_seq_rectify_due(c, w.a.id, NULL));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "child", resa_seq_fork(c, w.a.id, NULL));
    /* a released id stays unknown, also after its slot is reused */
    int32_t t1, t2;
    TOK(c, resa_seq_create(c, &t1));
    TOK(c, resa_seq_release(c, t1));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seq|sequence", resa_seq_release(c, t1));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seq|sequence", resa_seq_length(c, t1, &i64));
    TOK(c, resa_seq_create(c, &t2));
    TCHECK(t2 != t1, "a new sequence got the released id %d", t1);
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seq|sequence", resa_seq_length(c, t1, &i64));
    int32_t mode = RESA_MODE_APPEND, n = 1;
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seqs", resa_ctx_step_begin(c, 1, &t1, &mode, &n, 0));
    TOK(c, resa_seq_release(c, t2));
    ew_usable(&w);
    ew_fini(&w);
}
END_TEST

START_TEST(test_errors_step_begin)
{
    ew w;
    ew_init(&w, "errors_step_begin");
    resa_ctx *c = w.t.ctx;
    int32_t ids[3] = {w.a.id, w.b.id, w.a.id};
    int32_t modes[3] = {RESA_MODE_DECODE, RESA_MODE_APPEND, RESA_MODE_APPEND};
    int32_t n[3] = {1, 4, 1};
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "flags", resa_ctx_step_begin(c, 2, ids, modes, n, 1));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "flags", resa_ctx_step_begin(c, 2, ids, modes, n, 0x80000000u));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "n_seqs", resa_ctx_step_begin(c, 0, ids, modes, n, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "n_seqs", resa_ctx_step_begin(c, -1, ids, modes, n, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "n_seqs", resa_ctx_step_begin(c, 5, ids, modes, n, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seqs", resa_ctx_step_begin(c, 2, NULL, modes, n, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "modes", resa_ctx_step_begin(c, 2, ids, NULL, n, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "n_tokens", resa_ctx_step_begin(c, 2, ids, modes, NULL, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seqs", resa_ctx_step_begin(c, 3, ids, modes, n, 0));
    int32_t badid[2] = {w.a.id, 999};
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seqs", resa_ctx_step_begin(c, 2, badid, modes, n, 0));
    static const int32_t bad_modes[] = {6, -1, 100};
    for (int i = 0; i < 3; i++) {
        int32_t m[2] = {RESA_MODE_DECODE, bad_modes[i]};
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "modes", resa_ctx_step_begin(c, 2, ids, m, n, 0));
    }
    static const int32_t bad_dec[] = {0, 2, -1};
    for (int i = 0; i < 3; i++) {
        int32_t nn[2] = {bad_dec[i], 4};
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "n_tokens", resa_ctx_step_begin(c, 2, ids, modes, nn, 0));
    }
    static const int32_t bad_app[] = {0, -5, INT32_MIN};
    for (int i = 0; i < 3; i++) {
        int32_t nn[2] = {1, bad_app[i]};
        int32_t m[2] = {RESA_MODE_DECODE, i == 1 ? RESA_MODE_APPEND_KV : RESA_MODE_APPEND};
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "n_tokens", resa_ctx_step_begin(c, 2, ids, m, nn, 0));
    }
    /* RECTIFY: wrong count, or nothing pending */
    int32_t rm[2] = {RESA_MODE_RECTIFY, RESA_MODE_RECTIFY};
    int32_t rn[2] = {2, 1};
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "n_tokens", resa_ctx_step_begin(c, 1, ids, rm, rn, 0));
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_step_begin(c, 1, &w.b.id, rm, &rn[1], 0));
    /* nothing of the above opened a step */
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_step_end(c, 0));
    ew_usable(&w);
    ew_fini(&w);
}
END_TEST

START_TEST(test_errors_attend_end)
{
    ew w;
    ew_init(&w, "errors_attend_end");
    resa_ctx *c = w.t.ctx;
    float *q = calloc(64 * 4 * 8, sizeof(float)), *k = calloc(64 * 2 * 8, sizeof(float));
    float *v = calloc(64 * 2 * 8, sizeof(float)), *out = calloc(64 * 4 * 8, sizeof(float));
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_step_attend(c, 0, q, k, v, out, 0));
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_step_end(c, 0));
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_step_cancel(c));
    int32_t ids[2] = {w.a.id, w.b.id};
    int32_t modes[2] = {RESA_MODE_DECODE, RESA_MODE_APPEND};
    int32_t n[2] = {1, 4};
    TOK(c, resa_ctx_step_begin(c, 2, ids, modes, n, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "flags", resa_ctx_step_attend(c, 0, q, k, v, out, 2));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "layer", resa_ctx_step_attend(c, -1, q, k, v, out, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "layer", resa_ctx_step_attend(c, 2, q, k, v, out, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "k", resa_ctx_step_attend(c, 0, q, NULL, v, out, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "v", resa_ctx_step_attend(c, 0, q, k, NULL, out, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "q", resa_ctx_step_attend(c, 0, NULL, k, v, out, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "out", resa_ctx_step_attend(c, 0, q, k, v, NULL, 0));
    TOK(c, resa_ctx_step_attend(c, 1, q, k, v, out, 0));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "flags", resa_ctx_step_end(c, 1));
    TFAIL(c, RESA_ERR_BAD_STATE, "layer", resa_ctx_step_end(c, 0)); /* layer 0 missing */
    /* still open: finish it properly, then check everything through the reference */
    TFAIL(c, RESA_ERR_BAD_STATE, NULL, resa_ctx_step_begin(c, 2, ids, modes, n, 0));
    TOK(c, resa_ctx_step_cancel(c));
    th_check_state(&w.t, &w.a);
    th_check_state(&w.t, &w.b);
    /* step_end after every layer, with a missing layer first attended late */
    TOK(c, resa_ctx_step_begin(c, 2, ids, modes, n, 0));
    TOK(c, resa_ctx_step_attend(c, 0, q, k, v, out, 0));
    TFAIL(c, RESA_ERR_BAD_STATE, "layer", resa_ctx_step_end(c, 0));
    TOK(c, resa_ctx_step_cancel(c));
    ew_usable(&w);
    free(q), free(k), free(v), free(out);
    ew_fini(&w);
}
END_TEST

START_TEST(test_errors_selected_blocks)
{
    ew w;
    ew_init(&w, "errors_selected_blocks");
    resa_ctx *c = w.t.ctx;
    int32_t blocks[8];
    int64_t count = -1;
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "layer",
          resa_seq_selected_blocks(c, w.a.id, -1, 0, blocks, 8, &count));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "layer",
          resa_seq_selected_blocks(c, w.a.id, 2, 0, blocks, 8, &count));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "kv_head",
          resa_seq_selected_blocks(c, w.a.id, 0, -1, blocks, 8, &count));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "kv_head",
          resa_seq_selected_blocks(c, w.a.id, 0, 2, blocks, 8, &count));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "capacity",
          resa_seq_selected_blocks(c, w.a.id, 0, 0, blocks, -1, &count));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "blocks",
          resa_seq_selected_blocks(c, w.a.id, 0, 0, NULL, 4, &count));
    TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "count",
          resa_seq_selected_blocks(c, w.a.id, 0, 0, blocks, 8, NULL));
    TOK(c, resa_seq_selected_blocks(c, w.a.id, 0, 0, NULL, 0, &count));
    TCHECK(count == 1, "a decoded once with budget 1: count %lld", (long long)count);
    ew_usable(&w);
    ew_fini(&w);

    /* RECORD_SELECTION off */
    th_test_seed("errors_selected_blocks_off");
    resa_ctx *d = new_ctx();
    set_shape(d, 1, 1, 1, 128);
    int32_t s;
    TOK(d, resa_seq_create(d, &s));
    TFAIL(d, RESA_ERR_BAD_STATE, "RESA_PARAM_RECORD_SELECTION",
          resa_seq_selected_blocks(d, s, 0, 0, blocks, 8, &count));
    resa_ctx_destroy(d);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Allocation hooks: used, balanced, honoured alignment; failures are
 * RESA_ERR_OUT_OF_MEMORY with nothing leaked. */
typedef struct counting {
    long allocs, frees, live, fail_at, calls;
    size_t bytes_live;
} counting;

typedef struct hdr { size_t size; size_t pad[7]; } hdr; /* 64 bytes */

static void *c_alloc(void *user, size_t size, size_t align)
{
    counting *k = user;
    k->calls++;
    if (k->fail_at >= 0 && k->calls > k->fail_at)
        return NULL;
    if (align < 64)
        align = 64;
    if (align > 4096 || (align & (align - 1)))
        return NULL;
    unsigned char *raw = aligned_alloc(align, ((sizeof(hdr) + size + align - 1) / align + 1) * align);
    if (!raw)
        return NULL;
    unsigned char *p = raw + ((sizeof(hdr) + align - 1) / align) * align;
    /* stash the raw pointer and size just before p */
    memcpy(p - sizeof(void *), &raw, sizeof raw);
    memcpy(p - sizeof(void *) - sizeof(size_t), &size, sizeof size);
    k->allocs++;
    k->live++;
    k->bytes_live += size;
    return p;
}

static void c_free(void *user, void *ptr)
{
    counting *k = user;
    if (!ptr)
        return;
    unsigned char *p = ptr, *raw;
    size_t size;
    memcpy(&raw, p - sizeof(void *), sizeof raw);
    memcpy(&size, p - sizeof(void *) - sizeof(size_t), sizeof size);
    k->frees++;
    k->live--;
    k->bytes_live -= size;
    free(raw);
}

/* A whole session: lock, two sequences, a fork, a step of each kind, destroy. */
static resa_status session(counting *k, int *stage)
{
    resa_allocator a = {c_alloc, c_free, k};
    resa_ctx *c = NULL;
    resa_status s;
    *stage = 0;
    if ((s = resa_ctx_create(RESA_BACKEND_CPU, &a, &c)) != RESA_OK) {
        TCHECK(c == NULL, "failed create left *out set");
        return s;
    }
    *stage = 1;
    resa_ctx_set_param(c, RESA_PARAM_NUM_LAYERS, 1);
    resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, 64);
    resa_ctx_set_param(c, RESA_PARAM_NUM_Q_HEADS, 2);
    resa_ctx_set_param(c, RESA_PARAM_NUM_KV_HEADS, 1);
    resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, 2048);
    resa_ctx_set_param(c, RESA_PARAM_MAX_SEQ_TOKENS, 1024);
    resa_ctx_set_param(c, RESA_PARAM_RECORD_SELECTION, 1);
    resa_ctx_set_param(c, RESA_PARAM_NUM_THREADS, 2);
    resa_ctx_set_param(c, RESA_PARAM_SELECT_MIN_BLOCKS, 1);
    int32_t x = -1, y = -1, z = -1;
    float *buf = calloc(300 * 2 * 64, sizeof(float));
    float *ob = calloc(300 * 2 * 64, sizeof(float));
    for (int i = 0; i < 300 * 2 * 64; i++)
        buf[i] = (float)((i * 7919) % 23) / 23.0f - 0.5f;
    if ((s = resa_seq_create(c, &x)) != RESA_OK)
        goto out;
    *stage = 2;
    if ((s = resa_seq_create(c, &y)) != RESA_OK)
        goto out;
    int32_t m = RESA_MODE_APPEND, n = 300;
    if ((s = resa_ctx_step_begin(c, 1, &x, &m, &n, 0)) != RESA_OK)
        goto out;
    if ((s = resa_ctx_step_attend(c, 0, buf, buf, buf, ob, 0)) != RESA_OK) {
        resa_ctx_step_cancel(c);
        goto out;
    }
    if ((s = resa_ctx_step_end(c, 0)) != RESA_OK)
        goto out;
    *stage = 3;
    if ((s = resa_seq_fork(c, x, &z)) != RESA_OK)
        goto out;
    int32_t ids[2] = {x, z}, ms[2] = {RESA_MODE_DECODE, RESA_MODE_DECODE}, ns[2] = {1, 1};
    if ((s = resa_ctx_step_begin(c, 2, ids, ms, ns, 0)) != RESA_OK)
        goto out;
    if ((s = resa_ctx_step_attend(c, 0, buf, buf, buf, ob, 0)) != RESA_OK) {
        resa_ctx_step_cancel(c);
        goto out;
    }
    if ((s = resa_ctx_step_end(c, 0)) != RESA_OK)
        goto out;
    int32_t rm = RESA_MODE_RECTIFY, rn = 1;
    if ((s = resa_ctx_step_begin(c, 1, &z, &rm, &rn, 0)) != RESA_OK)
        goto out;
    if ((s = resa_ctx_step_attend(c, 0, buf, buf, buf, ob, 0)) != RESA_OK) {
        resa_ctx_step_cancel(c);
        goto out;
    }
    if ((s = resa_ctx_step_end(c, 0)) != RESA_OK)
        goto out;
    int32_t blocks[64];
    int64_t cnt;
    if ((s = resa_seq_selected_blocks(c, x, 0, 0, blocks, 64, &cnt)) != RESA_OK)
        goto out;
    *stage = 4;
    s = resa_ctx_reset(c, RESA_RESET_SESSION);
out:
    free(buf);
    free(ob);
    resa_ctx_destroy(c);
    return s;
}

/* Ids handed out before a session reset, released or not, are unknown after
 * it, even when their slots were reused before the reset. */
START_TEST(test_ids_after_reset)
{
    resa_ctx *c = NULL;
    ck_assert_int_eq(resa_ctx_create(RESA_BACKEND_CPU, NULL, &c), RESA_OK);
    set_shape(c, 1, 1, 1, 128);
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_SEQUENCES, 2));
    TOK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, 256));
    int32_t old[6], n_old = 0, s;
    for (int round = 0; round < 3; round++) {
        TOK(c, resa_seq_create(c, &s));
        old[n_old++] = s;
        TOK(c, resa_seq_release(c, s)); /* the slot's generation moves on */
    }
    TOK(c, resa_seq_create(c, &s));
    old[n_old++] = s;
    TOK(c, resa_seq_create(c, &s));
    old[n_old++] = s;
    TOK(c, resa_ctx_reset(c, RESA_RESET_SESSION));
    int32_t fresh[2];
    TOK(c, resa_seq_create(c, &fresh[0]));
    TOK(c, resa_seq_create(c, &fresh[1]));
    for (int i = 0; i < n_old; i++) {
        int64_t len;
        TCHECK(old[i] != fresh[0] && old[i] != fresh[1],
               "id %d from before the reset was handed out again", old[i]);
        TFAIL(c, RESA_ERR_INVALID_ARGUMENT, "seq", resa_seq_length(c, old[i], &len));
    }
    resa_ctx_destroy(c);
}
END_TEST

START_TEST(test_allocator_hooks)
{
    th_test_seed("allocator_hooks");
    counting k = {0, 0, 0, -1, 0, 0};
    int stage;
    resa_status s = session(&k, &stage);
    TCHECK(s == RESA_OK, "session with hooks: %s at stage %d", resa_status_name(s), stage);
    TCHECK(k.allocs > 0, "the allocation hooks were never called");
    TCHECK(k.frees == k.allocs && k.live == 0 && k.bytes_live == 0,
           "unbalanced: %ld allocations, %ld frees, %zu bytes live", k.allocs, k.frees,
           k.bytes_live);
    long total = k.calls;
    /* fail the n-th allocation, for every n */
    for (long f = 0; f < total; f++) {
        counting kf = {0, 0, 0, f, 0, 0};
        s = session(&kf, &stage);
        TCHECK(s == RESA_OK || s == RESA_ERR_OUT_OF_MEMORY,
               "allocation %ld failing gave %s at stage %d", f, resa_status_name(s), stage);
        TCHECK(s == RESA_ERR_OUT_OF_MEMORY || kf.calls <= f,
               "allocation %ld failed but the session succeeded", f);
        TCHECK(kf.live == 0 && kf.bytes_live == 0,
               "allocation %ld failing: %ld blocks (%zu bytes) leaked", f, kf.live, kf.bytes_live);
    }
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("api");
    TCase *tc = tcase_create("api");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_status_strings);
    tcase_add_test(tc, test_versions);
    tcase_add_test(tc, test_shape_unset);
    tcase_add_test(tc, test_param_defaults_and_bounds);
    tcase_add_test(tc, test_param_lock);
    tcase_add_test(tc, test_lock_validation);
    tcase_add_test(tc, test_errors_lifecycle);
    tcase_add_test(tc, test_cuda_unavailable);
    tcase_add_test(tc, test_errors_params_in_step);
    tcase_add_test(tc, test_presets);
    tcase_add_test(tc, test_errors_sequences);
    tcase_add_test(tc, test_errors_step_begin);
    tcase_add_test(tc, test_errors_attend_end);
    tcase_add_test(tc, test_errors_selected_blocks);
    tcase_add_test(tc, test_ids_after_reset);
    tcase_add_test(tc, test_allocator_hooks);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return th_run_suite(suite(), 1);
}
