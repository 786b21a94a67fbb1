/* SPDX-License-Identifier: MIT */
/*
 * Method presets: one call sets every selection and rectification parameter
 * that may change between steps, so that a host can ask for "the library's
 * defaults" or "the paper's method" without knowing the current values.
 * docs/quality.md says why the defaults differ from the paper.
 */
#include "internal.h"

resa_status resa_ctx_set_preset(resa_ctx *ctx, resa_preset preset)
{
    if (!ctx)
        return RESA_ERR_INVALID_ARGUMENT;
    resa_clear_error(ctx);
    if (ctx->device_lost)
        return resa_refuse_lost(ctx, "set_preset");
    if (ctx->step_open)
        return resa_fail(ctx, RESA_ERR_BAD_STATE, "set_preset: a step is open");
    resa_config v;
    resa_config_defaults(&v);
    switch (preset) {
    case RESA_PRESET_DEFAULT:
        break;
    case RESA_PRESET_PAPER: /* Sun et al., arXiv 2506.04108: spec/resa-algorithm.md */
        v.select_fraction = 0.1;
        v.min_blocks = 16;
        v.local_blocks = 1;
        v.sink_blocks = 0;
        v.rectify_interval = 32;
        v.score_width = 1.0;
        v.group_score = RESA_GROUP_SCORE_POOLED;
        break;
    default:
        return resa_fail(ctx, RESA_ERR_INVALID_ARGUMENT,
                         "set_preset: preset = %d; use RESA_PRESET_DEFAULT or RESA_PRESET_PAPER",
                         (int)preset);
    }
    /* all at once: nothing else in resa_config changes */
    ctx->cfg.select_fraction = v.select_fraction;
    ctx->cfg.min_blocks = v.min_blocks;
    ctx->cfg.local_blocks = v.local_blocks;
    ctx->cfg.sink_blocks = v.sink_blocks;
    ctx->cfg.rectify_interval = v.rectify_interval;
    ctx->cfg.score_width = v.score_width;
    ctx->cfg.group_score = v.group_score;
    return RESA_OK;
}
