/* SPDX-License-Identifier: MIT */
#ifndef RESA_SEQUENCE_H
#define RESA_SEQUENCE_H

#include "internal.h"

/* Public ids carry the slot in the low 16 bits and a generation above, so
 * that a released id is reported as unknown instead of reaching a reused slot. */
RESA_HIDDEN int32_t resa_seq_id(const resa_ctx *ctx, int32_t slot);
/* Slot of a live sequence id, else -1 (with the error text set, naming
 * `what`, unless `what` is NULL). */
RESA_HIDDEN int32_t resa_seq_slot(resa_ctx *ctx, int32_t id, const char *what);
RESA_HIDDEN resa_status resa_ctx_lock(resa_ctx *ctx);

#endif
