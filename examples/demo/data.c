/* SPDX-License-Identifier: MIT */
/* TinyStories text: read, cut into stories, tokenize. */
#include "data.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

char *demo_read_text(const char *path, char *err, size_t err_len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_len, "cannot open text '%s'", path);
        return NULL;
    }
    if (fseek(f, 0, SEEK_END) != 0) {
        snprintf(err, err_len, "'%s': cannot seek", path);
        fclose(f);
        return NULL;
    }
    long size = ftell(f);
    if (size < 0 || fseek(f, 0, SEEK_SET) != 0) {
        snprintf(err, err_len, "'%s': cannot tell its size", path);
        fclose(f);
        return NULL;
    }
    char *text = malloc((size_t)size + 1);
    if (!text) {
        snprintf(err, err_len, "out of memory reading '%s'", path);
        fclose(f);
        return NULL;
    }
    if (fread(text, 1, (size_t)size, f) != (size_t)size) {
        snprintf(err, err_len, "'%s': read error", path);
        free(text);
        fclose(f);
        return NULL;
    }
    fclose(f);
    text[size] = '\0';
    return text;
}

static char *strip(char *s)
{
    while (*s && isspace((unsigned char)*s))
        s++;
    size_t len = strlen(s);
    while (len > 0 && isspace((unsigned char)s[len - 1]))
        s[--len] = '\0';
    return s;
}

int32_t demo_split_stories(char *text, char **stories, int32_t max)
{
    static const char sep[] = "\n\nOnce upon";
    int32_t n = 0;
    char *start = text;
    while (n < max) {
        char *next = strstr(start, sep);
        if (next)
            *next = '\0';
        char *s = strip(start);
        if (*s)
            stories[n++] = s;
        if (!next)
            break;
        start = next + 2; /* only next[0] became NUL: "Once upon" is intact */
    }
    return n;
}

int32_t *demo_token_stream(const demo_tokenizer *t, char **stories, int32_t n_stories,
                           int64_t want, int64_t *n, char *err, size_t err_len)
{
    int64_t cap = want + 4096, len = 0;
    int32_t *out = malloc((size_t)cap * sizeof(int32_t));
    if (!out) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    for (int32_t i = 0; i < n_stories && len < want; i++) {
        int64_t room = cap - len;
        int64_t need = (int64_t)strlen(stories[i]) + 3;
        if (need > room) {
            cap = len + need + 4096;
            int32_t *grown = realloc(out, (size_t)cap * sizeof(int32_t));
            if (!grown) {
                free(out);
                snprintf(err, err_len, "out of memory");
                return NULL;
            }
            out = grown;
        }
        int32_t k = demo_encode(t, stories[i], 1, 0, out + len, (int32_t)(cap - len));
        if (k < 0) {
            free(out);
            snprintf(err, err_len, "tokenizing story %d failed", (int)i);
            return NULL;
        }
        len += k;
    }
    if (len < want) {
        free(out);
        snprintf(err, err_len, "the text holds only %lld tokens, %lld needed", (long long)len,
                 (long long)want);
        return NULL;
    }
    *n = len;
    return out;
}
