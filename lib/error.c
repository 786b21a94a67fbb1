/* SPDX-License-Identifier: MIT */
/* The context's last-error text: set with a failing status, cleared at the
 * start of every call that takes a context, read by resa_ctx_last_error. */
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"

resa_status resa_fail(resa_ctx *ctx, resa_status s, const char *fmt, ...)
{
    if (ctx) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ctx->error, sizeof ctx->error, fmt, ap);
        va_end(ap);
    }
    return s;
}

void resa_clear_error(resa_ctx *ctx)
{
    ctx->error[0] = '\0';
}

const char *resa_ctx_last_error(const resa_ctx *ctx)
{
    return ctx ? ctx->error : "resa_ctx_last_error: ctx is NULL";
}
