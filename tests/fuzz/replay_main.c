/* SPDX-License-Identifier: MIT */
/*
 * Replays fuzz inputs without libFuzzer (any compiler): every argument is a
 * file or a directory, and every file (a directory's in name order) is read
 * into a buffer of exactly its size and given to LLVMFuzzerTestOneInput.  A
 * mismatch with the shadow model aborts (the message names the call); exit 0
 * after all inputs.  This is how the corpus (tests/fuzz/corpus) runs as an
 * ordinary test, and how a crash file is reproduced under gcc:
 *     build/tests/fuzz/fuzz_replay crash-<sha1>
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path, size_t *bytes)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        fprintf(stderr, "fuzz_replay: cannot open %s\n", path);
        return 1;
    }
    struct stat st;
    if (fstat(fileno(fp), &st) != 0 || st.st_size < 0) {
        fclose(fp);
        fprintf(stderr, "fuzz_replay: cannot stat %s\n", path);
        return 1;
    }
    size_t n = (size_t)st.st_size;
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf || fread(buf, 1, n, fp) != n) {
        free(buf);
        fclose(fp);
        fprintf(stderr, "fuzz_replay: cannot read %s\n", path);
        return 1;
    }
    fclose(fp);
    if (getenv("RESA_FUZZ_TRACE"))
        fprintf(stderr, "fuzz_replay: %s (%zu bytes)\n", path, n);
    LLVMFuzzerTestOneInput(buf, n); /* exactly n bytes: reading past them is an ASan report */
    free(buf);
    *bytes += n;
    return 0;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(int argc, char **argv)
{
    size_t files = 0, bytes = 0;
    int rc = 0;
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE_OR_DIRECTORY...\n", argv[0]);
        return 2;
    }
    for (int a = 1; a < argc; a++) {
        struct stat st;
        if (stat(argv[a], &st) != 0) {
            fprintf(stderr, "fuzz_replay: %s not found\n", argv[a]);
            return 1;
        }
        if (!S_ISDIR(st.st_mode)) {
            rc |= run_file(argv[a], &bytes);
            files++;
            continue;
        }
        DIR *d = opendir(argv[a]);
        if (!d) {
            fprintf(stderr, "fuzz_replay: cannot open %s\n", argv[a]);
            return 1;
        }
        char **names = NULL;
        size_t n = 0, cap = 0;
        for (struct dirent *e; (e = readdir(d));) {
            if (e->d_name[0] == '.')
                continue;
            if (n == cap) {
                cap = cap ? 2 * cap : 64;
                char **grown = realloc(names, cap * sizeof *names);
                if (!grown)
                    return 1;
                names = grown;
            }
            size_t len = strlen(argv[a]) + strlen(e->d_name) + 2;
            names[n] = malloc(len);
            if (!names[n])
                return 1;
            snprintf(names[n++], len, "%s/%s", argv[a], e->d_name);
        }
        closedir(d);
        qsort(names, n, sizeof *names, cmp_names);
        for (size_t i = 0; i < n; i++) {
            rc |= run_file(names[i], &bytes);
            files++;
            free(names[i]);
        }
        free(names);
    }
    printf("fuzz_replay: %zu inputs, %zu bytes%s\n", files, bytes,
           rc ? ", some could not be read" : ", no mismatch");
    return rc;
}
