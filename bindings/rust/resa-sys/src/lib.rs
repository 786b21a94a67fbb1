//! Raw FFI declarations for libresa, written by hand from `include/resa.h`
//! (the header is the truth; this file mirrors it one to one).
//!
//! Every function of the header is declared here.  The C enums are `i32`
//! type aliases with their values as constants, so a value the library adds
//! later can still be carried without undefined behaviour.  Nothing here is
//! safe to call without reading the header's contract; see the `resa` crate
//! for the safe wrapper.
#![allow(non_camel_case_types)]

pub use std::os::raw::{c_char, c_void};

// ---------------------------------------------------------------------------
// Version (RESA_VERSION_*, RESA_ABI_VERSION)
// ---------------------------------------------------------------------------
pub const RESA_VERSION_MAJOR: u32 = 0;
pub const RESA_VERSION_MINOR: u32 = 3;
pub const RESA_VERSION_PATCH: u32 = 0;
pub const RESA_VERSION_NUMBER: u32 =
    RESA_VERSION_MAJOR * 10000 + RESA_VERSION_MINOR * 100 + RESA_VERSION_PATCH;
pub const RESA_VERSION_STRING: &str = "0.3.0";
pub const RESA_ABI_VERSION: u32 = 0;

/// `RESA_AT_LEAST_VERSION(x, y, z)` for the header these declarations mirror.
pub const fn resa_at_least_version(x: u32, y: u32, z: u32) -> bool {
    RESA_VERSION_NUMBER >= x * 10000 + y * 100 + z
}

// ---------------------------------------------------------------------------
// Status codes
// ---------------------------------------------------------------------------
pub type resa_status = i32;
pub const RESA_OK: resa_status = 0;
pub const RESA_ERR_INVALID_ARGUMENT: resa_status = 1;
pub const RESA_ERR_BAD_STATE: resa_status = 2;
pub const RESA_ERR_OUT_OF_MEMORY: resa_status = 3;
pub const RESA_ERR_DEVICE_OUT_OF_MEMORY: resa_status = 4;
pub const RESA_ERR_CAPACITY: resa_status = 5;
pub const RESA_ERR_NOT_SUPPORTED: resa_status = 6;
pub const RESA_ERR_NO_DEVICE: resa_status = 7;
pub const RESA_ERR_BACKEND: resa_status = 8;
pub const RESA_ERR_VERSION_MISMATCH: resa_status = 9;
pub const RESA_ERR_INTERNAL: resa_status = 10;

// ---------------------------------------------------------------------------
// Opaque types and public enums
// ---------------------------------------------------------------------------
/// The opaque context (`struct resa_ctx`).  Only ever used behind a pointer.
#[repr(C)]
pub struct resa_ctx {
    _private: [u8; 0],
    // Not Send, not Sync, not Unpin: a raw C object.
    _marker: core::marker::PhantomData<(*mut u8, core::marker::PhantomPinned)>,
}

pub type resa_backend = i32;
pub const RESA_BACKEND_CPU: resa_backend = 0;
pub const RESA_BACKEND_CUDA: resa_backend = 1;
pub const RESA_BACKEND_AUTO: resa_backend = 2;

pub type resa_dtype = i32;
pub const RESA_DTYPE_F32: resa_dtype = 0;
pub const RESA_DTYPE_F16: resa_dtype = 1;
pub const RESA_DTYPE_BF16: resa_dtype = 2;
/// KV_DTYPE only (the fp8 KV cache); as IO_DTYPE the library refuses it.
pub const RESA_DTYPE_FP8_E4M3: resa_dtype = 3;

pub type resa_summary_format = i32;
pub const RESA_SUMMARY_KV_DTYPE: resa_summary_format = 0;
pub const RESA_SUMMARY_FP8_E4M3: resa_summary_format = 1;

pub type resa_mode = i32;
pub const RESA_MODE_APPEND: resa_mode = 0;
pub const RESA_MODE_DECODE: resa_mode = 1;
pub const RESA_MODE_RECTIFY: resa_mode = 2;
pub const RESA_MODE_APPEND_KV: resa_mode = 3;
pub const RESA_MODE_QUERY_DENSE: resa_mode = 4; // since 0.3.0
pub const RESA_MODE_QUERY_SPARSE: resa_mode = 5; // since 0.3.0

pub type resa_param = i32;
pub const RESA_PARAM_NUM_LAYERS: resa_param = 100;
pub const RESA_PARAM_NUM_Q_HEADS: resa_param = 101;
pub const RESA_PARAM_NUM_KV_HEADS: resa_param = 102;
pub const RESA_PARAM_HEAD_DIM: resa_param = 103;
pub const RESA_PARAM_KV_DTYPE: resa_param = 104;
pub const RESA_PARAM_IO_DTYPE: resa_param = 105;
pub const RESA_PARAM_MAX_TOKENS: resa_param = 106;
pub const RESA_PARAM_MAX_SEQUENCES: resa_param = 107;
pub const RESA_PARAM_MAX_SEQ_TOKENS: resa_param = 108;
pub const RESA_PARAM_MAX_STEP_TOKENS: resa_param = 109;
pub const RESA_PARAM_SUMMARY_FORMAT: resa_param = 110;
pub const RESA_PARAM_BLOCK_SIZE: resa_param = 200;
pub const RESA_PARAM_SELECT_FRACTION: resa_param = 201;
pub const RESA_PARAM_SELECT_MIN_BLOCKS: resa_param = 202;
pub const RESA_PARAM_LOCAL_BLOCKS: resa_param = 203;
pub const RESA_PARAM_SINK_BLOCKS: resa_param = 204;
pub const RESA_PARAM_RECTIFY_INTERVAL: resa_param = 205;
pub const RESA_PARAM_SOFTMAX_SCALE: resa_param = 206;
pub const RESA_PARAM_SCORE_WIDTH: resa_param = 207;
pub const RESA_PARAM_NUM_THREADS: resa_param = 300;
pub const RESA_PARAM_RECORD_SELECTION: resa_param = 301;
pub const RESA_PARAM_EXPERIMENTAL_1: resa_param = 1000;

pub type resa_preset = i32;
pub const RESA_PRESET_DEFAULT: resa_preset = 0;
pub const RESA_PRESET_PAPER: resa_preset = 1;

/// Host allocation hooks, per context (`struct resa_allocator`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct resa_allocator {
    pub alloc: Option<unsafe extern "C" fn(user: *mut c_void, size: usize, align: usize) -> *mut c_void>,
    pub free: Option<unsafe extern "C" fn(user: *mut c_void, ptr: *mut c_void)>,
    pub user: *mut c_void,
}

/// Flags for `resa_ctx_reset`.
pub const RESA_RESET_SESSION: u32 = 1;
pub const RESA_RESET_PARAMS: u32 = 2;

/// Compile-time limits.
pub const RESA_DEFAULT_BLOCK_SIZE: u32 = 16;
pub const RESA_MAX_HEAD_DIM: u32 = 256;

/// Flag for `resa_ctx_step_begin` (CUDA graphs).
pub const RESA_STEP_REPLAY: u32 = 1;

extern "C" {
    // Version
    pub fn resa_version_number() -> u32;
    pub fn resa_version_string() -> *const c_char;
    pub fn resa_abi_version() -> u32;

    // Status text
    pub fn resa_status_string(s: resa_status) -> *const c_char;
    pub fn resa_status_name(s: resa_status) -> *const c_char;

    // Limits
    pub fn resa_block_size() -> u32;
    pub fn resa_max_head_dim() -> u32;

    // Lifecycle
    pub fn resa_backend_available(backend: resa_backend) -> i32;
    pub fn resa_ctx_create(
        backend: resa_backend,
        host_alloc: *const resa_allocator,
        out: *mut *mut resa_ctx,
    ) -> resa_status;
    pub fn resa_ctx_destroy(ctx: *mut resa_ctx);
    pub fn resa_ctx_reset(ctx: *mut resa_ctx, what: u32) -> resa_status;
    pub fn resa_ctx_get_backend(ctx: *const resa_ctx, backend: *mut resa_backend) -> resa_status;
    pub fn resa_ctx_last_error(ctx: *const resa_ctx) -> *const c_char;

    // Configuration
    pub fn resa_ctx_set_param(ctx: *mut resa_ctx, p: resa_param, value: i64) -> resa_status;
    pub fn resa_ctx_get_param(ctx: *const resa_ctx, p: resa_param, value: *mut i64) -> resa_status;
    pub fn resa_ctx_set_param_f64(ctx: *mut resa_ctx, p: resa_param, value: f64) -> resa_status;
    pub fn resa_ctx_get_param_f64(ctx: *const resa_ctx, p: resa_param, value: *mut f64) -> resa_status;
    pub fn resa_param_bounds(p: resa_param, lo: *mut i64, hi: *mut i64) -> resa_status;
    pub fn resa_ctx_set_preset(ctx: *mut resa_ctx, preset: resa_preset) -> resa_status;
    pub fn resa_param_bounds_f64(p: resa_param, lo: *mut f64, hi: *mut f64) -> resa_status;
    pub fn resa_ctx_set_stream(ctx: *mut resa_ctx, stream: *mut c_void) -> resa_status;
    pub fn resa_ctx_synchronize(ctx: *mut resa_ctx) -> resa_status;

    // Sequences
    pub fn resa_seq_create(ctx: *mut resa_ctx, seq: *mut i32) -> resa_status;
    pub fn resa_seq_release(ctx: *mut resa_ctx, seq: i32) -> resa_status;
    pub fn resa_seq_fork(ctx: *mut resa_ctx, parent: i32, child: *mut i32) -> resa_status;
    pub fn resa_seq_length(ctx: *const resa_ctx, seq: i32, length: *mut i64) -> resa_status;
    pub fn resa_seq_pending(ctx: *const resa_ctx, seq: i32, pending: *mut i64) -> resa_status;
    pub fn resa_seq_rectify_due(ctx: *const resa_ctx, seq: i32, due: *mut i32) -> resa_status;
    pub fn resa_ctx_free_tokens(ctx: *const resa_ctx, tokens: *mut i64) -> resa_status;

    // The step protocol
    pub fn resa_ctx_step_begin(
        ctx: *mut resa_ctx,
        n_seqs: i32,
        seqs: *const i32,
        modes: *const i32,
        n_tokens: *const i32,
        flags: u32,
    ) -> resa_status;
    pub fn resa_ctx_step_attend(
        ctx: *mut resa_ctx,
        layer: i32,
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        out: *mut c_void,
        flags: u32,
    ) -> resa_status;
    pub fn resa_ctx_step_end(ctx: *mut resa_ctx, flags: u32) -> resa_status;
    pub fn resa_ctx_step_cancel(ctx: *mut resa_ctx) -> resa_status;

    // Introspection
    // Context parallelism (since 0.3.0; docs/API.md, "Context parallelism")
    pub fn resa_seq_set_span(
        ctx: *mut resa_ctx,
        seq: i32,
        first_token: i64,
        global_length: i64,
    ) -> resa_status;
    pub fn resa_ctx_step_block_scores(
        ctx: *mut resa_ctx,
        layer: i32,
        q: *const c_void,
        capacity: i64,
        scores: *mut f32,
        blocks: *mut i32,
        counts: *mut i32,
        flags: u32,
    ) -> resa_status;
    pub fn resa_ctx_step_thresholds(
        ctx: *mut resa_ctx,
        n_ranks: i32,
        capacity: i64,
        scores: *const f32,
        blocks: *const i32,
        counts: *const i32,
        threshold_scores: *mut f32,
        threshold_blocks: *mut i32,
        flags: u32,
    ) -> resa_status;
    pub fn resa_ctx_step_attend_ex(
        ctx: *mut resa_ctx,
        layer: i32,
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        out: *mut c_void,
        lse: *mut f32,
        threshold_scores: *const f32,
        threshold_blocks: *const i32,
        flags: u32,
    ) -> resa_status;
    pub fn resa_merge_states(
        dtype: resa_dtype,
        n_parts: i32,
        n_rows: i64,
        head_dim: i32,
        parts_out: *const c_void,
        parts_lse: *const f32,
        out: *mut c_void,
        lse: *mut f32,
        flags: u32,
    ) -> resa_status;
    pub fn resa_ctx_merge_states(
        ctx: *mut resa_ctx,
        n_parts: i32,
        n_rows: i64,
        parts_out: *const c_void,
        parts_lse: *const f32,
        out: *mut c_void,
        lse: *mut f32,
        flags: u32,
    ) -> resa_status;

    pub fn resa_seq_selected_blocks(
        ctx: *mut resa_ctx,
        seq: i32,
        layer: i32,
        kv_head: i32,
        blocks: *mut i32,
        capacity: i64,
        count: *mut i64,
    ) -> resa_status;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_library_agree() {
        unsafe {
            assert_eq!(resa_version_number(), RESA_VERSION_NUMBER);
            assert_eq!(resa_abi_version(), RESA_ABI_VERSION);
            let s = std::ffi::CStr::from_ptr(resa_version_string());
            assert_eq!(s.to_str().unwrap(), RESA_VERSION_STRING);
            assert_eq!(resa_block_size(), RESA_DEFAULT_BLOCK_SIZE);
            assert_eq!(resa_max_head_dim(), RESA_MAX_HEAD_DIM);
            let n = std::ffi::CStr::from_ptr(resa_status_name(RESA_ERR_CAPACITY));
            assert_eq!(n.to_str().unwrap(), "RESA_ERR_CAPACITY");
            assert_eq!(resa_backend_available(RESA_BACKEND_CPU), 1);
            assert!(resa_at_least_version(0, 2, 0));
        }
    }

    #[test]
    fn create_and_destroy() {
        unsafe {
            let mut ctx: *mut resa_ctx = core::ptr::null_mut();
            assert_eq!(resa_ctx_create(RESA_BACKEND_CPU, core::ptr::null(), &mut ctx), RESA_OK);
            assert!(!ctx.is_null());
            let mut v = 0i64;
            assert_eq!(resa_ctx_get_param(ctx, RESA_PARAM_BLOCK_SIZE, &mut v), RESA_OK);
            assert_eq!(v, 16);
            resa_ctx_destroy(ctx);
        }
    }
}
