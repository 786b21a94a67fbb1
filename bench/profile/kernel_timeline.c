/* SPDX-License-Identifier: MIT */
/*
 * kernel_timeline.so: an LD_PRELOAD library that writes every kernel a
 * process runs, with its GPU start and end times, to a CSV (CUPTI's
 * concurrent-kernel activity records, kernels inside CUDA graphs included).
 *
 * Why: ncu profiles kernels one at a time (no programmatic-launch overlap,
 * ~1-2 us of profiler overhead each), so its durations add up to more than a
 * decode step's wall time and say nothing of the gaps between dependent
 * kernels.  At batch 1 those gaps and each kernel's latency chain are the
 * step (docs/performance.md, "Batch 1"); this records them as the step runs.
 *
 *   gcc -O2 -shared -fPIC -I$CUDA/include bench/profile/kernel_timeline.c \
 *       -L$CUDA/lib64 -lcupti -o kernel_timeline.so
 *   RESA_TIMELINE_OUT=t.csv LD_PRELOAD=./kernel_timeline.so \
 *       resa-bench --backend cuda --batch 1 --contexts 32768 --modes sparse
 *   python3 bench/profile/timeline_account.py t.csv
 *
 * Columns: start_ns, end_ns (GPU timestamps), queued_ns and submitted_ns
 * (0 where CUPTI does not know them, as for kernels of a graph), device,
 * stream, grid x/y/z, block x/y/z, graph id (0: not in a graph), graph node,
 * correlation id, the (mangled) kernel name.  Completed buffers are written
 * by CUPTI's worker thread every 100 ms and at exit; the count of kernels
 * written and of records CUPTI dropped goes to stderr at exit.
 * scripts/device-run.sh timeline builds and runs it.  Tracing costs each
 * kernel a little time: compare the span it shows with the program's own
 * timing of the same run.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include <cupti.h>

enum { BUF_BYTES = 4 << 20 };

static FILE *g_out;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static size_t g_kernels, g_dropped;

static void report(const char *what, CUptiResult r)
{
    const char *s = NULL;
    cuptiGetResultString(r, &s);
    fprintf(stderr, "kernel_timeline: %s failed: %s\n", what, s ? s : "unknown CUPTI error");
}

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records)
{
    *buffer = aligned_alloc(8, BUF_BYTES); /* CUPTI wants 8-byte aligned buffers */
    *size = *buffer ? BUF_BYTES : 0;
    *max_records = 0; /* as many as fit */
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size,
                                      size_t valid)
{
    (void)size;
    CUpti_Activity *rec = NULL;
    pthread_mutex_lock(&g_lock);
    while (g_out && cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL &&
            rec->kind != CUPTI_ACTIVITY_KIND_KERNEL)
            continue;
        const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)rec;
        fprintf(g_out, "%llu,%llu,%llu,%llu,%u,%u,%d,%d,%d,%d,%d,%d,%u,%llu,%u,%s\n",
                (unsigned long long)k->start, (unsigned long long)k->end,
                (unsigned long long)k->queued, (unsigned long long)k->submitted, k->deviceId,
                k->streamId, k->gridX, k->gridY, k->gridZ, k->blockX, k->blockY, k->blockZ,
                k->graphId, (unsigned long long)k->graphNodeId, k->correlationId,
                k->name ? k->name : "?");
        g_kernels++;
    }
    size_t dropped = 0;
    if (cuptiActivityGetNumDroppedRecords(ctx, stream, &dropped) == CUPTI_SUCCESS)
        g_dropped += dropped;
    pthread_mutex_unlock(&g_lock);
    free(buffer);
}

__attribute__((constructor)) static void timeline_start(void)
{
    const char *path = getenv("RESA_TIMELINE_OUT");
    if (!path || !*path)
        path = "kernel-timeline.csv";
    g_out = fopen(path, "w");
    if (!g_out) {
        perror("kernel_timeline: RESA_TIMELINE_OUT");
        return;
    }
    fprintf(g_out, "start_ns,end_ns,queued_ns,submitted_ns,device,stream,grid_x,grid_y,grid_z,"
                   "block_x,block_y,block_z,graph,graph_node,correlation,name\n");
    CUptiResult r;
    if ((r = cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed)) != CUPTI_SUCCESS) {
        report("cuptiActivityRegisterCallbacks", r);
        return;
    }
    if ((r = cuptiActivityEnableLatencyTimestamps(1)) != CUPTI_SUCCESS)
        report("cuptiActivityEnableLatencyTimestamps", r); /* only queued/submitted are lost */
    if ((r = cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL)) != CUPTI_SUCCESS) {
        report("cuptiActivityEnable(CONCURRENT_KERNEL)", r);
        return;
    }
    if ((r = cuptiActivityFlushPeriod(100)) != CUPTI_SUCCESS)
        report("cuptiActivityFlushPeriod", r); /* then only the flush at exit writes */
}

__attribute__((destructor)) static void timeline_stop(void)
{
    if (!g_out)
        return;
    CUptiResult r = cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    if (r != CUPTI_SUCCESS)
        report("cuptiActivityFlushAll", r);
    pthread_mutex_lock(&g_lock);
    fprintf(stderr, "kernel_timeline: %zu kernels written, %zu records dropped\n", g_kernels,
            g_dropped);
    fclose(g_out);
    g_out = NULL;
    pthread_mutex_unlock(&g_lock);
}
