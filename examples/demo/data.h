/* SPDX-License-Identifier: MIT */
/* TinyStories text: read the file, cut it into stories, tokenize. */
#ifndef RESA_DEMO_DATA_H
#define RESA_DEMO_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "tokenizer.h"

/* Reads a whole file as a NUL-terminated string; NULL and err on failure. */
char *demo_read_text(const char *path, char *err, size_t err_len);

/*
 * Cuts text in place at every "\n\nOnce upon" (the models README's rule) and
 * strips each piece.  Returns the number of stories (at most max) and their
 * starts in stories[]; the text is modified (NULs inserted).
 */
int32_t demo_split_stories(char *text, char **stories, int32_t max);

/*
 * The llama2.c training stream: for each story, BOS + encode(story), all
 * concatenated, until at least `want` tokens.  Returns the tokens (malloc'd)
 * and their number in *n, or NULL on failure (message in err).
 */
int32_t *demo_token_stream(const demo_tokenizer *t, char **stories, int32_t n_stories,
                           int64_t want, int64_t *n, char *err, size_t err_len);

#endif
