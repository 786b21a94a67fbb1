/* SPDX-License-Identifier: MIT */
/*
 * An asynchronous device fault on the CUDA backend (docs/API.md, "After a
 * device fault").  A step's q and out are a freed device buffer (256 MiB,
 * cudaMalloc'd and cudaFree'd, so its addresses are unmapped): the kernels
 * fault with a sticky error (cudaErrorIllegalAddress), which poisons the CUDA
 * context of the whole process.  Checked:
 *
 *  - the fault comes back as RESA_ERR_BACKEND, with a last-error text naming
 *    the CUDA error, from the next call that asks the device, by mode:
 *      end    the host waits for the device, then resa_ctx_step_end;
 *      sync   resa_ctx_synchronize right after the attend calls;
 *      begin  resa_ctx_step_end at once (it reports the fault only if the
 *             kernels have already hit it), then the host waits, then the
 *             next resa_ctx_step_begin;
 *    and the failed step_end commits nothing;
 *  - afterwards every call but destroy and the queries is RESA_ERR_BACKEND,
 *    its text naming the call and the CUDA error; the queries answer from the
 *    host's bookkeeping (lengths as before the faulting step);
 *  - a second CUDA context of the process, which did nothing wrong, reports
 *    the same fault at its next step_begin and is refused from then on;
 *  - a CPU context of the process keeps working;
 *  - resa_ctx_destroy of every context returns, without crash or hang.
 *
 * Each mode runs as its own process (meson: check_cuda_fault_<mode>), since
 * the sticky error leaves CUDA unusable in the process that hit it.  Exit 0
 * when every check held, 1 at the first that did not, 77 (skipped, nothing
 * checked) where there is no GPU or no CUDA module.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_shim.h"
#include "resa.h"

enum { LAYERS = 2, HQ = 4, HKV = 1, DIM = 64, PROMPT = 256, ELT = 2 /* f16 */ };

static const char *mode = "?";
static int checked;

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            printf("check_cuda_fault[%s]: FAILED: ", mode);                   \
            printf(__VA_ARGS__);                                              \
            printf("\n");                                                     \
            exit(1);                                                          \
        }                                                                     \
        checked++;                                                            \
    } while (0)
#define OK(ctx, call)                                                         \
    CHECK((call) == RESA_OK, "%s: %s", #call, resa_ctx_last_error(ctx))

static void note(const char *what)
{
    printf("check_cuda_fault[%s]: ok: %s\n", mode, what);
}

static cuda_shim cu;

static void *dev_zeros(size_t bytes)
{
    void *p = NULL;
    CHECK(cu.Malloc(&p, bytes) == 0 && p, "cudaMalloc(%zu)", bytes);
    CHECK(cu.Memset(p, 0, bytes) == 0, "cudaMemset");
    return p;
}

/* Device buffers of one step of up to PROMPT rows (zeros: f16 0.0). */
typedef struct bufs {
    void *q, *k, *v, *out;
} bufs;

static void setup(resa_ctx *c, resa_backend backend)
{
    OK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_LAYERS, LAYERS));
    OK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_Q_HEADS, HQ));
    OK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_KV_HEADS, HKV));
    OK(c, resa_ctx_set_param(c, RESA_PARAM_HEAD_DIM, DIM));
    OK(c, resa_ctx_set_param(c, RESA_PARAM_KV_DTYPE, RESA_DTYPE_F16));
    OK(c, resa_ctx_set_param(c, RESA_PARAM_IO_DTYPE, RESA_DTYPE_F16));
    OK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_TOKENS, 4096));
    OK(c, resa_ctx_set_param(c, RESA_PARAM_MAX_SEQUENCES, 4));
    OK(c, resa_ctx_set_param(c, RESA_PARAM_RECORD_SELECTION, 1));
    if (backend == RESA_BACKEND_CPU)
        OK(c, resa_ctx_set_param(c, RESA_PARAM_NUM_THREADS, 1));
}

/* One whole step of one sequence: begin, every layer, end. */
static resa_status step(resa_ctx *c, int32_t seq, int32_t mode_, int32_t n, const bufs *b)
{
    resa_status s = resa_ctx_step_begin(c, 1, &seq, &mode_, &n, 0);
    for (int32_t l = 0; s == RESA_OK && l < LAYERS; l++)
        s = resa_ctx_step_attend(c, l, b->q, b->k, b->v, b->out, 0);
    if (s == RESA_OK)
        s = resa_ctx_step_end(c, 0);
    return s;
}

/* The text names the CUDA error (its cudaGetErrorName). */
static int names_fault(const char *text, int code)
{
    if (code == 700)
        return strstr(text, "cudaErrorIllegalAddress") != NULL;
    return strstr(text, "cudaError") != NULL;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Every call but destroy and the queries is RESA_ERR_BACKEND, naming the
 * call and the fault; the queries answer. */
static void check_refused(resa_ctx *c, const char *name, int32_t seq, int64_t length,
                          int code, const bufs *b)
{
    struct {
        const char *call;
        resa_status s;
    } calls[16];
    int n = 0;
    int32_t id = -1, dmode = RESA_MODE_DECODE, one = 1, blocks[64];
    int64_t count = -1;
#define REFUSED(name_, call_) calls[n].call = name_, calls[n++].s = (call_)
    REFUSED("step_begin", resa_ctx_step_begin(c, 1, &seq, &dmode, &one, 0));
    REFUSED("step_attend", resa_ctx_step_attend(c, 0, b->q, b->k, b->v, b->out, 0));
    REFUSED("step_end", resa_ctx_step_end(c, 0));
    REFUSED("step_cancel", resa_ctx_step_cancel(c));
    REFUSED("synchronize", resa_ctx_synchronize(c));
    REFUSED("set_stream", resa_ctx_set_stream(c, NULL));
    REFUSED("set_param", resa_ctx_set_param(c, RESA_PARAM_SELECT_MIN_BLOCKS, 4));
    REFUSED("set_param_f64", resa_ctx_set_param_f64(c, RESA_PARAM_SELECT_FRACTION, 0.5));
    REFUSED("set_preset", resa_ctx_set_preset(c, RESA_PRESET_PAPER));
    REFUSED("seq_create", resa_seq_create(c, &id));
    REFUSED("seq_fork", resa_seq_fork(c, seq, &id));
    REFUSED("seq_selected_blocks", resa_seq_selected_blocks(c, seq, 0, 0, blocks, 64, &count));
    REFUSED("seq_release", resa_seq_release(c, seq));
    REFUSED("reset", resa_ctx_reset(c, RESA_RESET_SESSION));
#undef REFUSED
    /* each message was overwritten by the next call: check them one by one */
    CHECK(resa_ctx_reset(c, RESA_RESET_SESSION) == RESA_ERR_BACKEND, "%s: reset", name);
    const char *text = resa_ctx_last_error(c);
    CHECK(strstr(text, "reset") && strstr(text, "refused") && names_fault(text, code),
          "%s: reset's text does not name the call and the fault: \"%s\"", name, text);
    for (int i = 0; i < n; i++)
        CHECK(calls[i].s == RESA_ERR_BACKEND, "%s: %s returned %s after the fault, not "
              "RESA_ERR_BACKEND", name, calls[i].call, resa_status_name(calls[i].s));
    printf("check_cuda_fault[%s]: ok: %s: %d calls refused with RESA_ERR_BACKEND "
           "(step_begin/attend/end/cancel, synchronize, set_stream, set_param, "
           "set_param_f64, set_preset, seq_create/fork/selected_blocks/release, reset); "
           "text: \"%s\"\n", mode, name, n, text);

    resa_backend be = RESA_BACKEND_AUTO;
    int64_t v = -1, len = -1, pending = -1, free_tokens = -1;
    double f = -1;
    int32_t due = -1;
    OK(c, resa_ctx_get_backend(c, &be));
    CHECK(be == RESA_BACKEND_CUDA, "%s: get_backend", name);
    OK(c, resa_ctx_get_param(c, RESA_PARAM_HEAD_DIM, &v));
    CHECK(v == DIM, "%s: get_param", name);
    OK(c, resa_ctx_get_param_f64(c, RESA_PARAM_SELECT_FRACTION, &f));
    OK(c, resa_seq_length(c, seq, &len));
    CHECK(len == length, "%s: seq_length %lld, expected %lld (the faulting step is not "
          "committed)", name, (long long)len, (long long)length);
    OK(c, resa_seq_pending(c, seq, &pending));
    OK(c, resa_seq_rectify_due(c, seq, &due));
    OK(c, resa_ctx_free_tokens(c, &free_tokens));
    CHECK(resa_ctx_last_error(c)[0] == '\0', "%s: a query left an error text", name);
    printf("check_cuda_fault[%s]: ok: %s: the queries answer (get_backend CUDA, get_param, "
           "get_param_f64, seq_length %lld, seq_pending, seq_rectify_due, free_tokens)\n",
           mode, name, (long long)len);
}

static void destroy_timed(resa_ctx *c, const char *name)
{
    double t0 = now();
    resa_ctx_destroy(c);
    double dt = now() - t0;
    CHECK(dt < 30.0, "%s: resa_ctx_destroy took %.1f s", name, dt);
    printf("check_cuda_fault[%s]: ok: %s: resa_ctx_destroy returned after %.3f s\n", mode,
           name, dt);
}

int main(int argc, char **argv)
{
    mode = argc > 1 ? argv[1] : "end";
    if (strcmp(mode, "end") != 0 && strcmp(mode, "sync") != 0 && strcmp(mode, "begin") != 0) {
        fprintf(stderr, "usage: check_cuda_fault end|sync|begin\n");
        return 2;
    }
    if (!resa_backend_available(RESA_BACKEND_CUDA) || cuda_shim_load(&cu) != 0) {
        printf("check_cuda_fault[%s]: no usable GPU or CUDA module here: skipped, "
               "nothing checked\n", mode);
        return 77; /* meson: SKIP */
    }

    /* a: the context that faults; b: another CUDA context; cpu: a CPU one */
    resa_ctx *a = NULL, *b = NULL, *cpu = NULL;
    CHECK(resa_ctx_create(RESA_BACKEND_CUDA, NULL, &a) == RESA_OK, "create a");
    CHECK(resa_ctx_create(RESA_BACKEND_CUDA, NULL, &b) == RESA_OK, "create b");
    CHECK(resa_ctx_create(RESA_BACKEND_CPU, NULL, &cpu) == RESA_OK, "create cpu");
    void *stream_a = NULL, *stream_b = NULL;
    CHECK(cu.StreamCreate(&stream_a) == 0 && cu.StreamCreate(&stream_b) == 0, "streams");
    OK(a, resa_ctx_set_stream(a, stream_a));
    OK(b, resa_ctx_set_stream(b, stream_b));
    setup(a, RESA_BACKEND_CUDA);
    setup(b, RESA_BACKEND_CUDA);
    setup(cpu, RESA_BACKEND_CPU);

    const size_t q_bytes = (size_t)PROMPT * HQ * DIM * ELT, kv_bytes = (size_t)PROMPT * HKV * DIM * ELT;
    bufs dev = {dev_zeros(q_bytes), dev_zeros(kv_bytes), dev_zeros(kv_bytes), dev_zeros(q_bytes)};
    bufs host = {calloc(1, q_bytes), calloc(1, kv_bytes), calloc(1, kv_bytes), calloc(1, q_bytes)};
    CHECK(host.q && host.k && host.v && host.out, "host buffers");

    /* a prompt and a decode on every context, all fine */
    int32_t sa = -1, sb = -1, sc = -1;
    OK(a, resa_seq_create(a, &sa));
    OK(b, resa_seq_create(b, &sb));
    OK(cpu, resa_seq_create(cpu, &sc));
    OK(a, step(a, sa, RESA_MODE_APPEND, PROMPT, &dev));
    OK(b, step(b, sb, RESA_MODE_APPEND, PROMPT, &dev));
    OK(cpu, step(cpu, sc, RESA_MODE_APPEND, PROMPT, &host));
    OK(a, step(a, sa, RESA_MODE_DECODE, 1, &dev));
    OK(b, step(b, sb, RESA_MODE_DECODE, 1, &dev));
    OK(cpu, step(cpu, sc, RESA_MODE_DECODE, 1, &host));
    OK(a, resa_ctx_synchronize(a));
    OK(b, resa_ctx_synchronize(b));
    const int64_t length = PROMPT + 1;
    note("before the fault: a prompt and a decode step on two CUDA contexts and a CPU one");

    /* the fault: q and out in a freed 256 MiB buffer */
    void *freed = NULL;
    CHECK(cu.Malloc(&freed, (size_t)256 << 20) == 0 && freed, "cudaMalloc(256 MiB)");
    CHECK(cu.Free(freed) == 0, "cudaFree");
    bufs bad = {freed, dev.k, dev.v, freed};
    int32_t dmode = RESA_MODE_DECODE, one = 1;
    OK(a, resa_ctx_step_begin(a, 1, &sa, &dmode, &one, 0));
    resa_status s = RESA_OK;
    const char *seen_at = NULL;
    for (int32_t l = 0; s == RESA_OK && l < LAYERS; l++)
        s = resa_ctx_step_attend(a, l, bad.q, bad.k, bad.v, bad.out, 0);
    if (s != RESA_OK) { /* a later launch already saw the fault: allowed */
        CHECK(s == RESA_ERR_BACKEND, "step_attend returned %s", resa_status_name(s));
        seen_at = "step_attend";
    }
    char first_text[512] = "";
    int code = 0;
    if (!seen_at && strcmp(mode, "sync") == 0) {
        s = resa_ctx_synchronize(a);
        seen_at = "resa_ctx_synchronize";
    } else if (!seen_at && strcmp(mode, "end") == 0) {
        code = cu.DeviceSynchronize(); /* the host's own wait: the fault has happened */
        CHECK(code != 0, "no device fault happened: the freed buffer was still mapped, the "
              "test could not provoke a fault");
        s = resa_ctx_step_end(a, 0);
        seen_at = "resa_ctx_step_end";
    } else if (!seen_at) { /* begin */
        s = resa_ctx_step_end(a, 0);
        if (s != RESA_OK) {
            seen_at = "resa_ctx_step_end (the kernels had already faulted)";
        } else {
            code = cu.DeviceSynchronize();
            CHECK(code != 0, "no device fault happened: the freed buffer was still mapped, "
                  "the test could not provoke a fault");
            s = resa_ctx_step_begin(a, 1, &sa, &dmode, &one, 0);
            seen_at = "the next resa_ctx_step_begin";
        }
    }
    snprintf(first_text, sizeof first_text, "%s", resa_ctx_last_error(a));
    if (code == 0)
        code = cu.DeviceSynchronize();
    CHECK(code != 0, "no device fault happened (cudaDeviceSynchronize returned 0)");
    CHECK(s == RESA_ERR_BACKEND, "%s returned %s after the fault, not RESA_ERR_BACKEND (%s)",
          seen_at, resa_status_name(s), first_text);
    CHECK(names_fault(first_text, code) && strstr(first_text, "CUDA context is lost"),
          "%s: the text does not name the CUDA error %d (%s) or say the context is lost: "
          "\"%s\"", seen_at, code, cu.GetErrorString(code), first_text);
    printf("check_cuda_fault[%s]: ok: the fault (CUDA error %d, %s) came back from %s as "
           "RESA_ERR_BACKEND: \"%s\"\n", mode, code, cu.GetErrorString(code), seen_at,
           first_text);

    /* the faulting context: only destroy and the queries */
    check_refused(a, "the faulting context", sa, strcmp(mode, "begin") == 0 &&
                  strcmp(seen_at, "the next resa_ctx_step_begin") == 0 ? length + 1 : length,
                  code, &dev);

    /* the other CUDA context sees the fault at its next step_begin */
    s = resa_ctx_step_begin(b, 1, &sb, &dmode, &one, 0);
    snprintf(first_text, sizeof first_text, "%s", resa_ctx_last_error(b));
    CHECK(s == RESA_ERR_BACKEND && names_fault(first_text, code) &&
          strstr(first_text, "CUDA context is lost"),
          "the other CUDA context's step_begin returned %s: \"%s\"", resa_status_name(s),
          first_text);
    printf("check_cuda_fault[%s]: ok: the other CUDA context's next step_begin is "
           "RESA_ERR_BACKEND: \"%s\"\n", mode, first_text);
    check_refused(b, "the other CUDA context", sb, length, code, &dev);

    /* the CPU backend is not affected */
    OK(cpu, step(cpu, sc, RESA_MODE_DECODE, 1, &host));
    int64_t len = -1;
    OK(cpu, resa_seq_length(cpu, sc, &len));
    CHECK(len == length + 1, "cpu length %lld", (long long)len);
    note("a CPU context of the same process still runs steps");

    destroy_timed(a, "the faulting context");
    destroy_timed(b, "the other CUDA context");
    resa_ctx_destroy(cpu);
    free(host.q);
    free(host.k);
    free(host.v);
    free(host.out);
    /* the device buffers and streams go with the process: CUDA refuses
     * every call now */
    printf("check_cuda_fault[%s]: %d checks passed, 0 failed\n", mode, checked);
    return 0;
}
