/* SPDX-License-Identifier: MIT */
/* The llama2.c tokenizer (tokenizer.bin format): encode as run.c does, decode. */
#ifndef RESA_DEMO_TOKENIZER_H
#define RESA_DEMO_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#define DEMO_TOKEN_BOS 1
#define DEMO_TOKEN_EOS 2

typedef struct demo_token_index {
    const char *str;
    int32_t id;
} demo_token_index;

typedef struct demo_tokenizer {
    int32_t vocab_size;
    int32_t max_token_length;
    char **vocab;             /* [vocab_size] NUL-terminated pieces */
    float *scores;            /* [vocab_size] merge scores */
    demo_token_index *sorted; /* pieces sorted by strcmp, for lookups */
    unsigned char byte_pieces[512]; /* byte b as the string at byte_pieces + 2b */
} demo_tokenizer;

/* Loads a tokenizer of vocab_size pieces; -1 and a message in err on failure. */
int demo_tokenizer_load(demo_tokenizer *t, const char *path, int32_t vocab_size, char *err,
                        size_t err_len);
void demo_tokenizer_free(demo_tokenizer *t);

/*
 * Encodes UTF-8 text as llama2.c run.c does: optional BOS, the dummy-prefix " "
 * token (when text is not empty), one token per UTF-8 character (byte tokens
 * as fallback), then repeated merges of the adjacent pair with the highest
 * score (the first such pair on ties).  Writes at most max_tokens ids; returns
 * the count, or -1 when they do not fit or memory runs out.
 */
int32_t demo_encode(const demo_tokenizer *t, const char *text, int bos, int eos,
                    int32_t *tokens, int32_t max_tokens);

/* The text of `token` following `prev` (run.c decode: the leading space after
 * BOS is dropped and <0xHH> pieces become raw bytes).  Static or tokenizer-owned. */
const char *demo_decode(const demo_tokenizer *t, int32_t prev, int32_t token);

/* Appends demo_decode(prev, token) to buf (capacity cap, always NUL-terminated),
 * skipping unprintable single bytes as run.c's safe_printf does.  Returns the
 * new length. */
size_t demo_decode_append(const demo_tokenizer *t, int32_t prev, int32_t token, char *buf,
                          size_t len, size_t cap);

#endif
