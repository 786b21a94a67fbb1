/* SPDX-License-Identifier: MIT */
/* The llama2.c tokenizer: a port of run.c's encode/decode. */
#include "tokenizer.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int compare_index(const void *a, const void *b)
{
    return strcmp(((const demo_token_index *)a)->str, ((const demo_token_index *)b)->str);
}

int demo_tokenizer_load(demo_tokenizer *t, const char *path, int32_t vocab_size, char *err,
                        size_t err_len)
{
    memset(t, 0, sizeof *t);
    for (int i = 0; i < 256; i++) {
        t->byte_pieces[i * 2] = (unsigned char)i;
        t->byte_pieces[i * 2 + 1] = '\0';
    }
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_len, "cannot open tokenizer '%s'", path);
        return -1;
    }
    t->vocab_size = vocab_size;
    t->vocab = calloc((size_t)vocab_size, sizeof(char *));
    t->scores = malloc((size_t)vocab_size * sizeof(float));
    t->sorted = malloc((size_t)vocab_size * sizeof(demo_token_index));
    if (!t->vocab || !t->scores || !t->sorted) {
        snprintf(err, err_len, "out of memory loading '%s'", path);
        goto fail;
    }
    if (fread(&t->max_token_length, sizeof(int32_t), 1, f) != 1 ||
        t->max_token_length <= 0 || t->max_token_length > 4096) {
        snprintf(err, err_len, "'%s': bad header", path);
        goto fail;
    }
    for (int32_t i = 0; i < vocab_size; i++) {
        int32_t len;
        if (fread(&t->scores[i], sizeof(float), 1, f) != 1 ||
            fread(&len, sizeof(int32_t), 1, f) != 1 || len < 0 ||
            len > t->max_token_length) {
            snprintf(err, err_len, "'%s': truncated or corrupt at token %d", path, (int)i);
            goto fail;
        }
        t->vocab[i] = malloc((size_t)len + 1);
        if (!t->vocab[i]) {
            snprintf(err, err_len, "out of memory loading '%s'", path);
            goto fail;
        }
        if (len > 0 && fread(t->vocab[i], 1, (size_t)len, f) != (size_t)len) {
            snprintf(err, err_len, "'%s': truncated at token %d", path, (int)i);
            goto fail;
        }
        t->vocab[i][len] = '\0';
        t->sorted[i].str = t->vocab[i];
        t->sorted[i].id = i;
    }
    fclose(f);
    qsort(t->sorted, (size_t)vocab_size, sizeof(demo_token_index), compare_index);
    return 0;
fail:
    fclose(f);
    demo_tokenizer_free(t);
    return -1;
}

void demo_tokenizer_free(demo_tokenizer *t)
{
    if (t->vocab)
        for (int32_t i = 0; i < t->vocab_size; i++)
            free(t->vocab[i]);
    free(t->vocab);
    free(t->scores);
    free(t->sorted);
    t->vocab = NULL;
    t->scores = NULL;
    t->sorted = NULL;
}

static int32_t lookup(const demo_tokenizer *t, const char *str)
{
    demo_token_index key = {str, 0};
    const demo_token_index *r = bsearch(&key, t->sorted, (size_t)t->vocab_size,
                                        sizeof(demo_token_index), compare_index);
    return r ? r->id : -1;
}

/* The id of the concatenation of tokens a and b, or -1. */
static int32_t pair_id(const demo_tokenizer *t, char *buf, int32_t a, int32_t b)
{
    size_t la = strlen(t->vocab[a]), lb = strlen(t->vocab[b]);
    if (la + lb > (size_t)t->max_token_length)
        return -1; /* longer than any piece */
    memcpy(buf, t->vocab[a], la);
    memcpy(buf + la, t->vocab[b], lb + 1);
    return lookup(t, buf);
}

int32_t demo_encode(const demo_tokenizer *t, const char *text, int bos, int eos,
                    int32_t *tokens, int32_t max_tokens)
{
    size_t text_len = strlen(text);
    /* Before merging there is at most one token per byte, plus BOS, prefix, EOS. */
    size_t cap = text_len + 3;
    int32_t *tok = malloc(cap * sizeof(int32_t));
    int32_t *pid = malloc(cap * sizeof(int32_t));
    char *buf = malloc((size_t)t->max_token_length * 2 + 8);
    if (!tok || !pid || !buf) {
        free(tok);
        free(pid);
        free(buf);
        return -1;
    }
    size_t n = 0;
    if (bos)
        tok[n++] = DEMO_TOKEN_BOS;
    if (text[0] != '\0') {
        int32_t prefix = lookup(t, " ");
        if (prefix >= 0)
            tok[n++] = prefix;
    }
    /* One token per UTF-8 character (at most 4 bytes), else its bytes + 3. */
    for (size_t i = 0; i < text_len;) {
        size_t len = 1;
        while (i + len < text_len && len < 4 && ((unsigned char)text[i + len] & 0xC0) == 0x80)
            len++;
        memcpy(buf, text + i, len);
        buf[len] = '\0';
        int32_t id = lookup(t, buf);
        if (id >= 0) {
            tok[n++] = id;
        } else {
            for (size_t j = 0; j < len; j++)
                tok[n++] = (int32_t)(unsigned char)text[i + j] + 3;
        }
        i += len;
    }
    /* Merge the best-scoring adjacent pair until none merges.  Pair ids are
     * cached and only the two neighbours of a merge are looked up again; the
     * scan order and the strict ">" keep run.c's choice (first best pair). */
    for (size_t i = 0; i + 1 < n; i++)
        pid[i] = pair_id(t, buf, tok[i], tok[i + 1]);
    while (n > 1) {
        float best_score = -1e10f;
        size_t best = (size_t)-1;
        for (size_t i = 0; i + 1 < n; i++) {
            if (pid[i] >= 0 && t->scores[pid[i]] > best_score) {
                best_score = t->scores[pid[i]];
                best = i;
            }
        }
        if (best == (size_t)-1)
            break;
        tok[best] = pid[best];
        memmove(tok + best + 1, tok + best + 2, (n - best - 2) * sizeof(int32_t));
        if (best + 2 < n)
            memmove(pid + best + 1, pid + best + 2, (n - best - 3) * sizeof(int32_t));
        n--;
        if (best > 0)
            pid[best - 1] = pair_id(t, buf, tok[best - 1], tok[best]);
        if (best + 1 < n)
            pid[best] = pair_id(t, buf, tok[best], tok[best + 1]);
    }
    if (eos)
        tok[n++] = DEMO_TOKEN_EOS;
    int32_t result = -1;
    if (n <= (size_t)max_tokens) {
        memcpy(tokens, tok, n * sizeof(int32_t));
        result = (int32_t)n;
    }
    free(tok);
    free(pid);
    free(buf);
    return result;
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

const char *demo_decode(const demo_tokenizer *t, int32_t prev, int32_t token)
{
    if (token < 0 || token >= t->vocab_size)
        return "";
    const char *piece = t->vocab[token];
    if (prev == DEMO_TOKEN_BOS && piece[0] == ' ')
        piece++;
    /* "<0xHH>" byte pieces */
    if (strlen(piece) == 6 && piece[0] == '<' && piece[1] == '0' && piece[2] == 'x' &&
        piece[5] == '>') {
        int hi = hex_value(piece[3]), lo = hex_value(piece[4]);
        if (hi >= 0 && lo >= 0)
            return (const char *)t->byte_pieces + (hi * 16 + lo) * 2;
    }
    return piece;
}

size_t demo_decode_append(const demo_tokenizer *t, int32_t prev, int32_t token, char *buf,
                          size_t len, size_t cap)
{
    const char *piece = demo_decode(t, prev, token);
    if (piece[0] == '\0')
        return len;
    if (piece[1] == '\0') {
        unsigned char b = (unsigned char)piece[0];
        if (!(isprint(b) || isspace(b)))
            return len;
    }
    size_t pl = strlen(piece);
    if (len + pl + 1 > cap)
        pl = cap > len + 1 ? cap - len - 1 : 0;
    memcpy(buf + len, piece, pl);
    len += pl;
    if (cap > 0)
        buf[len < cap ? len : cap - 1] = '\0';
    return len;
}
