//! Safe Rust bindings for libresa (Rectified Sparse Attention).
//!
//! The C header `include/resa.h` is the contract; `docs/API.md` is the
//! reference and `docs/rust.md` describes this crate.  In short:
//!
//! * [`Context`] owns a `resa_ctx` and destroys it on drop.  It is `Send`
//!   but not `Sync`: one thread at a time, as `docs/THREADING.md` requires.
//! * [`Context::step`] begins a step and returns a [`Step`] guard that
//!   borrows the context mutably (no other call can interleave).
//!   [`Step::attend`] checks the slice lengths and the element type against
//!   the step before it calls C; [`Step::finish`] commits; dropping the guard
//!   without finishing cancels the step.
//! * Every failure is an [`Error`]: the [`Status`] and the text of
//!   `resa_ctx_last_error` (or of the Rust-side check).
//!
//! Slices are host memory, so [`Step::attend`] is for contexts whose backend
//! is the CPU; a CUDA context takes device pointers through the `unsafe`
//! [`Step::attend_raw`].

use std::ffi::CStr;
use std::fmt;
use std::marker::PhantomData;
use std::os::raw::c_void;
use std::ptr;

pub use resa_sys as sys;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// A failed call's status (`resa_status` without `RESA_OK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    InvalidArgument,
    BadState,
    OutOfMemory,
    DeviceOutOfMemory,
    Capacity,
    NotSupported,
    NoDevice,
    Backend,
    VersionMismatch,
    Internal,
    /// A code this crate does not know (a newer library).
    Unknown(i32),
}

impl Status {
    /// The status of a C return code; `None` for `RESA_OK`.
    pub fn from_raw(code: i32) -> Option<Status> {
        Some(match code {
            sys::RESA_OK => return None,
            sys::RESA_ERR_INVALID_ARGUMENT => Status::InvalidArgument,
            sys::RESA_ERR_BAD_STATE => Status::BadState,
            sys::RESA_ERR_OUT_OF_MEMORY => Status::OutOfMemory,
            sys::RESA_ERR_DEVICE_OUT_OF_MEMORY => Status::DeviceOutOfMemory,
            sys::RESA_ERR_CAPACITY => Status::Capacity,
            sys::RESA_ERR_NOT_SUPPORTED => Status::NotSupported,
            sys::RESA_ERR_NO_DEVICE => Status::NoDevice,
            sys::RESA_ERR_BACKEND => Status::Backend,
            sys::RESA_ERR_VERSION_MISMATCH => Status::VersionMismatch,
            sys::RESA_ERR_INTERNAL => Status::Internal,
            other => Status::Unknown(other),
        })
    }

    /// The C code (`RESA_ERR_*`).
    pub fn code(self) -> i32 {
        match self {
            Status::InvalidArgument => sys::RESA_ERR_INVALID_ARGUMENT,
            Status::BadState => sys::RESA_ERR_BAD_STATE,
            Status::OutOfMemory => sys::RESA_ERR_OUT_OF_MEMORY,
            Status::DeviceOutOfMemory => sys::RESA_ERR_DEVICE_OUT_OF_MEMORY,
            Status::Capacity => sys::RESA_ERR_CAPACITY,
            Status::NotSupported => sys::RESA_ERR_NOT_SUPPORTED,
            Status::NoDevice => sys::RESA_ERR_NO_DEVICE,
            Status::Backend => sys::RESA_ERR_BACKEND,
            Status::VersionMismatch => sys::RESA_ERR_VERSION_MISMATCH,
            Status::Internal => sys::RESA_ERR_INTERNAL,
            Status::Unknown(c) => c,
        }
    }

    /// `resa_status_name`, e.g. `"RESA_ERR_CAPACITY"`.
    pub fn name(self) -> &'static str {
        // SAFETY: static storage, never NULL.
        unsafe { static_str(sys::resa_status_name(self.code())) }
    }

    /// `resa_status_string`: the human text of the status.
    pub fn description(self) -> &'static str {
        // SAFETY: static storage, never NULL.
        unsafe { static_str(sys::resa_status_string(self.code())) }
    }
}

/// A failure: the status and a message naming what was wrong (the context's
/// `resa_ctx_last_error` text, or the Rust-side check that refused the call
/// before reaching C).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    status: Status,
    message: String,
}

impl Error {
    pub fn new(status: Status, message: impl Into<String>) -> Error {
        Error { status, message: message.into() }
    }
    pub fn status(&self) -> Status {
        self.status
    }
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}: {}", self.status.name(), self.status.description())
        } else {
            write!(f, "{}: {}", self.status.name(), self.message)
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

unsafe fn static_str(p: *const sys::c_char) -> &'static str {
    if p.is_null() {
        return "";
    }
    CStr::from_ptr(p).to_str().unwrap_or("")
}

fn invalid(message: String) -> Error {
    Error::new(Status::InvalidArgument, message)
}

// ---------------------------------------------------------------------------
// Library-wide functions
// ---------------------------------------------------------------------------

/// `resa_version_string()` of the loaded library.
pub fn version_string() -> &'static str {
    unsafe { static_str(sys::resa_version_string()) }
}
/// `resa_version_number()` of the loaded library (major·10000 + minor·100 + patch).
pub fn version_number() -> u32 {
    unsafe { sys::resa_version_number() }
}
/// `resa_abi_version()` of the loaded library (the SONAME major).
pub fn abi_version() -> u32 {
    unsafe { sys::resa_abi_version() }
}
/// `resa_block_size()`: the default block size.
pub fn default_block_size() -> u32 {
    unsafe { sys::resa_block_size() }
}
/// `resa_max_head_dim()`.
pub fn max_head_dim() -> u32 {
    unsafe { sys::resa_max_head_dim() }
}
/// Whether `backend` can be used on this machine now.
pub fn backend_available(backend: Backend) -> bool {
    unsafe { sys::resa_backend_available(backend as i32) == 1 }
}

// ---------------------------------------------------------------------------
// Enums
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Backend {
    Cpu = sys::RESA_BACKEND_CPU,
    Cuda = sys::RESA_BACKEND_CUDA,
    Auto = sys::RESA_BACKEND_AUTO,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Dtype {
    F32 = sys::RESA_DTYPE_F32,
    F16 = sys::RESA_DTYPE_F16,
    Bf16 = sys::RESA_DTYPE_BF16,
    /// The fp8 KV cache: a `KvDtype` value only (q, k, v and out are never fp8).
    Fp8E4m3 = sys::RESA_DTYPE_FP8_E4M3,
}

impl Dtype {
    pub fn from_raw(v: i64) -> Option<Dtype> {
        match v {
            0 => Some(Dtype::F32),
            1 => Some(Dtype::F16),
            2 => Some(Dtype::Bf16),
            3 => Some(Dtype::Fp8E4m3),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum SummaryFormat {
    KvDtype = sys::RESA_SUMMARY_KV_DTYPE,
    Fp8E4m3 = sys::RESA_SUMMARY_FP8_E4M3,
}

/// What one sequence does in a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Mode {
    /// n ≥ 1 new tokens: store K/V, dense causal attention.
    Append = sys::RESA_MODE_APPEND,
    /// Exactly 1 new token: store K/V, ReSA block-sparse attention.
    Decode = sys::RESA_MODE_DECODE,
    /// The oldest n pending tokens: overwrite K/V, dense causal attention.
    Rectify = sys::RESA_MODE_RECTIFY,
    /// n ≥ 1 new tokens: store K/V only; no attention, output untouched.
    AppendKv = sys::RESA_MODE_APPEND_KV,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Preset {
    Default = sys::RESA_PRESET_DEFAULT,
    Paper = sys::RESA_PRESET_PAPER,
}

/// Integer parameters (`resa_ctx_set_param` / `resa_ctx_get_param`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum IntParam {
    NumLayers = sys::RESA_PARAM_NUM_LAYERS,
    NumQHeads = sys::RESA_PARAM_NUM_Q_HEADS,
    NumKvHeads = sys::RESA_PARAM_NUM_KV_HEADS,
    HeadDim = sys::RESA_PARAM_HEAD_DIM,
    /// A [`Dtype`] value.
    KvDtype = sys::RESA_PARAM_KV_DTYPE,
    /// A [`Dtype`] value.
    IoDtype = sys::RESA_PARAM_IO_DTYPE,
    MaxTokens = sys::RESA_PARAM_MAX_TOKENS,
    MaxSequences = sys::RESA_PARAM_MAX_SEQUENCES,
    MaxSeqTokens = sys::RESA_PARAM_MAX_SEQ_TOKENS,
    MaxStepTokens = sys::RESA_PARAM_MAX_STEP_TOKENS,
    /// A [`SummaryFormat`] value.
    SummaryFormat = sys::RESA_PARAM_SUMMARY_FORMAT,
    BlockSize = sys::RESA_PARAM_BLOCK_SIZE,
    SelectMinBlocks = sys::RESA_PARAM_SELECT_MIN_BLOCKS,
    LocalBlocks = sys::RESA_PARAM_LOCAL_BLOCKS,
    SinkBlocks = sys::RESA_PARAM_SINK_BLOCKS,
    RectifyInterval = sys::RESA_PARAM_RECTIFY_INTERVAL,
    NumThreads = sys::RESA_PARAM_NUM_THREADS,
    RecordSelection = sys::RESA_PARAM_RECORD_SELECTION,
}

/// Real parameters (`resa_ctx_set_param_f64` / `resa_ctx_get_param_f64`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum F64Param {
    SelectFraction = sys::RESA_PARAM_SELECT_FRACTION,
    /// Reads back the effective scale (1/sqrt(HEAD_DIM) when set to 0).
    SoftmaxScale = sys::RESA_PARAM_SOFTMAX_SCALE,
    ScoreWidth = sys::RESA_PARAM_SCORE_WIDTH,
}

/// A parameter id with its value type: [`IntParam`] takes `i64`,
/// [`F64Param`] takes `f64`, so the wrong setter cannot be called.
pub trait Param: Copy + sealed::Sealed {
    type Value: Copy;
    #[doc(hidden)]
    fn raw(self) -> i32;
    #[doc(hidden)]
    unsafe fn set(self, ctx: *mut sys::resa_ctx, v: Self::Value) -> i32;
    #[doc(hidden)]
    unsafe fn get(self, ctx: *const sys::resa_ctx, v: *mut Self::Value) -> i32;
    #[doc(hidden)]
    unsafe fn bounds(self, lo: *mut Self::Value, hi: *mut Self::Value) -> i32;
}

impl Param for IntParam {
    type Value = i64;
    fn raw(self) -> i32 {
        self as i32
    }
    unsafe fn set(self, ctx: *mut sys::resa_ctx, v: i64) -> i32 {
        sys::resa_ctx_set_param(ctx, self as i32, v)
    }
    unsafe fn get(self, ctx: *const sys::resa_ctx, v: *mut i64) -> i32 {
        sys::resa_ctx_get_param(ctx, self as i32, v)
    }
    unsafe fn bounds(self, lo: *mut i64, hi: *mut i64) -> i32 {
        sys::resa_param_bounds(self as i32, lo, hi)
    }
}

impl Param for F64Param {
    type Value = f64;
    fn raw(self) -> i32 {
        self as i32
    }
    unsafe fn set(self, ctx: *mut sys::resa_ctx, v: f64) -> i32 {
        sys::resa_ctx_set_param_f64(ctx, self as i32, v)
    }
    unsafe fn get(self, ctx: *const sys::resa_ctx, v: *mut f64) -> i32 {
        sys::resa_ctx_get_param_f64(ctx, self as i32, v)
    }
    unsafe fn bounds(self, lo: *mut f64, hi: *mut f64) -> i32 {
        sys::resa_param_bounds_f64(self as i32, lo, hi)
    }
}

/// `resa_param_bounds` / `resa_param_bounds_f64`: the inclusive range of `p`.
pub fn param_bounds<P: Param>(p: P) -> Result<(P::Value, P::Value)>
where
    P::Value: Default,
{
    let mut lo = P::Value::default();
    let mut hi = P::Value::default();
    let rc = unsafe { p.bounds(&mut lo, &mut hi) };
    match Status::from_raw(rc) {
        None => Ok((lo, hi)),
        Some(s) => Err(Error::new(s, format!("resa_param_bounds({})", p.raw()))),
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::IntParam {}
    impl Sealed for super::F64Param {}
    impl Sealed for f32 {}
    impl Sealed for super::Bf16 {}
    impl Sealed for super::F16 {}
}

// ---------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------

/// bfloat16, stored as its bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Bf16(pub u16);

/// IEEE binary16, stored as its bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct F16(pub u16);

impl Bf16 {
    /// Round to nearest even (NaN stays NaN).
    pub fn from_f32(x: f32) -> Bf16 {
        let b = x.to_bits();
        if x.is_nan() {
            return Bf16(((b >> 16) as u16) | 0x0040);
        }
        let round = 0x7fff + ((b >> 16) & 1);
        Bf16((b.wrapping_add(round) >> 16) as u16)
    }
    pub fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
}

impl F16 {
    /// Round to nearest even; overflow gives ±inf, NaN stays NaN.
    pub fn from_f32(x: f32) -> F16 {
        let b = x.to_bits();
        let sign = ((b >> 16) & 0x8000) as u16;
        let exp = ((b >> 23) & 0xff) as i32;
        let man = b & 0x007f_ffff;
        if exp == 0xff {
            return F16(sign | 0x7c00 | if man != 0 { 0x0200 } else { 0 });
        }
        let e = exp - 127 + 15;
        if e >= 0x1f {
            return F16(sign | 0x7c00);
        }
        if e <= 0 {
            // Subnormal (or zero) in half precision.
            if e < -10 {
                return F16(sign);
            }
            let m = man | 0x0080_0000; // implicit bit
            let shift = (14 - e) as u32; // 24-bit mantissa down to the subnormal grid
            let half = 1u32 << (shift - 1);
            let rem = m & ((1u32 << shift) - 1);
            let mut r = m >> shift;
            if rem > half || (rem == half && (r & 1) == 1) {
                r += 1;
            }
            return F16(sign | r as u16);
        }
        let mut r = ((e as u32) << 10) | (man >> 13);
        let rem = man & 0x1fff;
        if rem > 0x1000 || (rem == 0x1000 && (r & 1) == 1) {
            r += 1; // may carry into the exponent, up to inf: correct
        }
        F16(sign | r as u16)
    }
    pub fn to_f32(self) -> f32 {
        let h = self.0 as u32;
        let sign = (h & 0x8000) << 16;
        let exp = (h >> 10) & 0x1f;
        let man = h & 0x3ff;
        let bits = if exp == 0 {
            if man == 0 {
                sign
            } else {
                // Subnormal: value = man · 2^-24 (exact in f32).
                let mag = (man as f32) * (1.0 / 16_777_216.0);
                return if sign != 0 { -mag } else { mag };
            }
        } else if exp == 0x1f {
            sign | 0x7f80_0000 | (man << 13)
        } else {
            sign | ((exp + 127 - 15) << 23) | (man << 13)
        };
        f32::from_bits(bits)
    }
}

/// An element type of q, k, v and out: `f32`, [`F16`] or [`Bf16`].
///
/// # Safety
/// `DTYPE` must describe the type's memory layout exactly; the trait is
/// sealed.
pub unsafe trait Element: Copy + sealed::Sealed {
    const DTYPE: Dtype;
}
unsafe impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
}
unsafe impl Element for Bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
}
unsafe impl Element for F16 {
    const DTYPE: Dtype = Dtype::F16;
}

// ---------------------------------------------------------------------------
// Context
// ---------------------------------------------------------------------------

/// The model shape a context is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub layers: u32,
    pub q_heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
}

/// A sequence id (chosen by the library; a released id is reported as
/// unknown by the library, so using one is an error, never undefined).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Seq(i32);

impl Seq {
    pub fn id(self) -> i32 {
        self.0
    }
    /// A sequence from a raw id (e.g. one kept by a host scheduler).
    pub fn from_id(id: i32) -> Seq {
        Seq(id)
    }
}

/// An owned `resa_ctx`.  `Send` (it may move between threads) but not
/// `Sync`: the C context is not internally synchronized, and even its
/// `const` queries overwrite the last-error text.
pub struct Context {
    raw: *mut sys::resa_ctx,
    // *mut makes it !Send and !Sync; Send is restored below.
    _not_sync: PhantomData<*mut sys::resa_ctx>,
}

// SAFETY: docs/THREADING.md: a context may move between threads; only
// concurrent use is forbidden, which !Sync and &mut prevent.
unsafe impl Send for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: raw came from resa_ctx_create and is destroyed once.  An
        // open step cannot exist here: a Step borrows the context.
        unsafe { sys::resa_ctx_destroy(self.raw) }
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context").field("raw", &self.raw).finish()
    }
}

impl Context {
    /// `resa_ctx_create(backend, NULL, &ctx)` with the default parameters.
    pub fn create(backend: Backend) -> Result<Context> {
        let mut raw: *mut sys::resa_ctx = ptr::null_mut();
        let rc = unsafe { sys::resa_ctx_create(backend as i32, ptr::null(), &mut raw) };
        if let Some(s) = Status::from_raw(rc) {
            let msg = unsafe { CStr::from_ptr(sys::resa_ctx_last_error(ptr::null())) }
                .to_string_lossy()
                .into_owned();
            return Err(Error::new(s, format!("resa_ctx_create({:?}): {}", backend, msg)));
        }
        if raw.is_null() {
            return Err(Error::new(Status::Internal, "resa_ctx_create returned a NULL context"));
        }
        Ok(Context { raw, _not_sync: PhantomData })
    }

    /// A context for `shape` whose cache and I/O are both `dtype`: sets
    /// NUM_LAYERS, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, KV_DTYPE and IO_DTYPE.
    /// Other parameters may be set afterwards, before the first sequence.
    pub fn new(backend: Backend, shape: Shape, dtype: Dtype) -> Result<Context> {
        let mut ctx = Context::create(backend)?;
        ctx.set_param(IntParam::NumLayers, shape.layers as i64)?;
        // KV heads first: Q heads must be a multiple of them.
        ctx.set_param(IntParam::NumKvHeads, shape.kv_heads as i64)?;
        ctx.set_param(IntParam::NumQHeads, shape.q_heads as i64)?;
        ctx.set_param(IntParam::HeadDim, shape.head_dim as i64)?;
        ctx.set_param(IntParam::KvDtype, dtype as i64)?;
        ctx.set_param(IntParam::IoDtype, dtype as i64)?;
        Ok(ctx)
    }

    /// The raw pointer, for calls through [`sys`].  It stays owned by `self`.
    pub fn as_ptr(&self) -> *mut sys::resa_ctx {
        self.raw
    }

    /// The text of the last failure on this context ("" after a success).
    pub fn last_error(&self) -> String {
        unsafe { CStr::from_ptr(sys::resa_ctx_last_error(self.raw)) }
            .to_string_lossy()
            .into_owned()
    }

    fn check(&self, rc: i32) -> Result<()> {
        match Status::from_raw(rc) {
            None => Ok(()),
            Some(s) => Err(Error::new(s, self.last_error())),
        }
    }

    /// `resa_ctx_reset(ctx, what)` with `RESA_RESET_*` bits ([`sys::RESA_RESET_SESSION`],
    /// [`sys::RESA_RESET_PARAMS`]).
    pub fn reset(&mut self, what: u32) -> Result<()> {
        let rc = unsafe { sys::resa_ctx_reset(self.raw, what) };
        self.check(rc)
    }

    /// The backend the context runs on (AUTO resolved).
    pub fn backend(&self) -> Result<Backend> {
        let mut b: sys::resa_backend = 0;
        let rc = unsafe { sys::resa_ctx_get_backend(self.raw, &mut b) };
        self.check(rc)?;
        Ok(match b {
            sys::RESA_BACKEND_CPU => Backend::Cpu,
            sys::RESA_BACKEND_CUDA => Backend::Cuda,
            _ => Backend::Auto,
        })
    }

    /// Sets an integer ([`IntParam`], `i64`) or real ([`F64Param`], `f64`) parameter.
    pub fn set_param<P: Param>(&mut self, p: P, value: P::Value) -> Result<()> {
        let rc = unsafe { p.set(self.raw, value) };
        self.check(rc)
    }

    /// Reads a parameter (SOFTMAX_SCALE reads back the effective scale).
    pub fn get_param<P: Param>(&self, p: P) -> Result<P::Value>
    where
        P::Value: Default,
    {
        let mut v = P::Value::default();
        let rc = unsafe { p.get(self.raw, &mut v) };
        self.check(rc)?;
        Ok(v)
    }

    /// `resa_ctx_set_preset`.
    pub fn set_preset(&mut self, preset: Preset) -> Result<()> {
        let rc = unsafe { sys::resa_ctx_set_preset(self.raw, preset as i32) };
        self.check(rc)
    }

    /// `resa_ctx_set_stream`.
    ///
    /// # Safety
    /// `stream` must be NULL or a valid `cudaStream_t` that outlives its use
    /// by this context (CPU contexts accept only NULL).
    pub unsafe fn set_stream(&mut self, stream: *mut c_void) -> Result<()> {
        let rc = sys::resa_ctx_set_stream(self.raw, stream);
        self.check(rc)
    }

    /// `resa_ctx_synchronize`: waits for all work; reports deferred faults.
    pub fn synchronize(&mut self) -> Result<()> {
        let rc = unsafe { sys::resa_ctx_synchronize(self.raw) };
        self.check(rc)
    }

    /// A new empty sequence (the first one locks the shape parameters).
    pub fn seq_create(&mut self) -> Result<Seq> {
        let mut id = -1;
        let rc = unsafe { sys::resa_seq_create(self.raw, &mut id) };
        self.check(rc)?;
        Ok(Seq(id))
    }

    pub fn seq_release(&mut self, seq: Seq) -> Result<()> {
        let rc = unsafe { sys::resa_seq_release(self.raw, seq.0) };
        self.check(rc)
    }

    /// A new sequence sharing `parent`'s cache (copy-on-write).
    pub fn seq_fork(&mut self, parent: Seq) -> Result<Seq> {
        let mut id = -1;
        let rc = unsafe { sys::resa_seq_fork(self.raw, parent.0, &mut id) };
        self.check(rc)?;
        Ok(Seq(id))
    }

    pub fn seq_length(&self, seq: Seq) -> Result<i64> {
        let mut v = 0;
        let rc = unsafe { sys::resa_seq_length(self.raw, seq.0, &mut v) };
        self.check(rc)?;
        Ok(v)
    }

    pub fn seq_pending(&self, seq: Seq) -> Result<i64> {
        let mut v = 0;
        let rc = unsafe { sys::resa_seq_pending(self.raw, seq.0, &mut v) };
        self.check(rc)?;
        Ok(v)
    }

    pub fn seq_rectify_due(&self, seq: Seq) -> Result<bool> {
        let mut v = 0;
        let rc = unsafe { sys::resa_seq_rectify_due(self.raw, seq.0, &mut v) };
        self.check(rc)?;
        Ok(v != 0)
    }

    /// Free pool capacity, in tokens.
    pub fn free_tokens(&self) -> Result<i64> {
        let mut v = 0;
        let rc = unsafe { sys::resa_ctx_free_tokens(self.raw, &mut v) };
        self.check(rc)?;
        Ok(v)
    }

    /// The blocks `seq`'s last DECODE attended for (`layer`, `kv_head`),
    /// ascending.  Needs RECORD_SELECTION = 1.
    pub fn selected_blocks(&mut self, seq: Seq, layer: u32, kv_head: u32) -> Result<Vec<i32>> {
        let layer = to_i32(layer, "layer")?;
        let kv_head = to_i32(kv_head, "kv_head")?;
        let mut count: i64 = 0;
        let rc = unsafe {
            sys::resa_seq_selected_blocks(self.raw, seq.0, layer, kv_head, ptr::null_mut(), 0, &mut count)
        };
        self.check(rc)?;
        let mut blocks = vec![0i32; count as usize];
        if count > 0 {
            let rc = unsafe {
                sys::resa_seq_selected_blocks(
                    self.raw,
                    seq.0,
                    layer,
                    kv_head,
                    blocks.as_mut_ptr(),
                    blocks.len() as i64,
                    &mut count,
                )
            };
            self.check(rc)?;
            blocks.truncate(count as usize);
        }
        Ok(blocks)
    }

    /// Begins a step: entry `i` is `seqs[i]` doing `modes[i]` with
    /// `n_tokens[i]` rows.  The returned guard must be attended for every
    /// layer and then [`Step::finish`]ed; dropping it cancels the step.
    pub fn step(&mut self, seqs: &[Seq], modes: &[Mode], n_tokens: &[u32]) -> Result<Step<'_>> {
        self.step_with_flags(seqs, modes, n_tokens, 0)
    }

    /// [`Context::step`] with `resa_ctx_step_begin` flags (e.g.
    /// [`sys::RESA_STEP_REPLAY`] on CUDA).
    pub fn step_with_flags(
        &mut self,
        seqs: &[Seq],
        modes: &[Mode],
        n_tokens: &[u32],
        flags: u32,
    ) -> Result<Step<'_>> {
        if seqs.len() != modes.len() || seqs.len() != n_tokens.len() {
            return Err(invalid(format!(
                "step: seqs, modes and n_tokens must have one length (got {}, {}, {})",
                seqs.len(),
                modes.len(),
                n_tokens.len()
            )));
        }
        let n = to_i32(seqs.len() as u64, "n_seqs")?;
        let ids: Vec<i32> = seqs.iter().map(|s| s.0).collect();
        let mds: Vec<i32> = modes.iter().map(|m| *m as i32).collect();
        let mut nts: Vec<i32> = Vec::with_capacity(n_tokens.len());
        let mut rows: usize = 0;
        for &t in n_tokens {
            nts.push(to_i32(t, "n_tokens")?);
            rows += t as usize;
        }
        let all_kv_only = modes.iter().all(|m| *m == Mode::AppendKv);
        // Read the shape before begin so nothing can fail after it.
        let layers = self.get_param(IntParam::NumLayers)? as usize;
        let q_heads = self.get_param(IntParam::NumQHeads)? as usize;
        let kv_heads = self.get_param(IntParam::NumKvHeads)? as usize;
        let head_dim = self.get_param(IntParam::HeadDim)? as usize;
        let io = self.get_param(IntParam::IoDtype)?;
        let io_dtype = Dtype::from_raw(io)
            .ok_or_else(|| Error::new(Status::Unknown(-1), format!("IO_DTYPE {} unknown to this crate", io)))?;
        let host_memory = self.backend()? == Backend::Cpu;
        let rc = unsafe {
            sys::resa_ctx_step_begin(self.raw, n, ids.as_ptr(), mds.as_ptr(), nts.as_ptr(), flags)
        };
        self.check(rc)?;
        Ok(Step {
            ctx: self,
            open: true,
            rows,
            layers,
            q_heads,
            kv_heads,
            head_dim,
            io_dtype,
            all_kv_only,
            host_memory,
        })
    }
}

fn to_i32<T: TryInto<i32> + Copy + fmt::Display>(v: T, what: &str) -> Result<i32> {
    v.try_into().map_err(|_| invalid(format!("{} = {} does not fit in int32_t", what, v)))
}

// ---------------------------------------------------------------------------
// Step guard
// ---------------------------------------------------------------------------

/// An open step.  It borrows its context mutably, so nothing else can call
/// into the context until the step is finished, cancelled or dropped
/// (dropping an unfinished step cancels it).
#[must_use = "a step is cancelled when dropped; call finish() to commit it"]
pub struct Step<'a> {
    ctx: &'a mut Context,
    open: bool,
    rows: usize,
    layers: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    io_dtype: Dtype,
    all_kv_only: bool,
    host_memory: bool,
}

impl<'a> Step<'a> {
    /// T: the rows of the step (the sum of its token counts).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Elements of q and out: T × NUM_Q_HEADS × HEAD_DIM.
    pub fn q_len(&self) -> usize {
        self.rows * self.q_heads * self.head_dim
    }
    /// Elements of k and v: T × NUM_KV_HEADS × HEAD_DIM.
    pub fn kv_len(&self) -> usize {
        self.rows * self.kv_heads * self.head_dim
    }
    /// The context, for its read-only queries during the step.
    pub fn context(&self) -> &Context {
        self.ctx
    }

    fn check_common<T: Element>(&self, layer: u32, k: &[T], v: &[T]) -> Result<i32> {
        if T::DTYPE != self.io_dtype {
            return Err(invalid(format!(
                "attend: element type {:?} but the context's IO_DTYPE is {:?}",
                T::DTYPE,
                self.io_dtype
            )));
        }
        if !self.host_memory {
            return Err(Error::new(
                Status::NotSupported,
                "attend: slices are host memory; a CUDA context takes device pointers (attend_raw)",
            ));
        }
        if layer as usize >= self.layers {
            return Err(invalid(format!("attend: layer {} outside [0, {})", layer, self.layers)));
        }
        let want = self.kv_len();
        if k.len() != want {
            return Err(invalid(format!("attend: k has {} elements, the step needs {}", k.len(), want)));
        }
        if v.len() != want {
            return Err(invalid(format!("attend: v has {} elements, the step needs {}", v.len(), want)));
        }
        Ok(layer as i32)
    }

    /// Stores `layer`'s K/V of the step and writes its attention output.
    /// Lengths must be exactly [`Step::q_len`] (q, out) and [`Step::kv_len`]
    /// (k, v), and `T` must match IO_DTYPE; otherwise an error is returned
    /// without calling C.  Rows of APPEND_KV entries in `out` are untouched.
    pub fn attend<T: Element>(&mut self, layer: u32, q: &[T], k: &[T], v: &[T], out: &mut [T]) -> Result<()> {
        let l = self.check_common(layer, k, v)?;
        let want = self.q_len();
        if q.len() != want {
            return Err(invalid(format!("attend: q has {} elements, the step needs {}", q.len(), want)));
        }
        if out.len() != want {
            return Err(invalid(format!("attend: out has {} elements, the step needs {}", out.len(), want)));
        }
        // SAFETY: lengths and element type checked; CPU backend reads host
        // memory synchronously and retains nothing.
        let rc = unsafe {
            sys::resa_ctx_step_attend(
                self.ctx.raw,
                l,
                q.as_ptr() as *const c_void,
                k.as_ptr() as *const c_void,
                v.as_ptr() as *const c_void,
                out.as_mut_ptr() as *mut c_void,
                0,
            )
        };
        self.ctx.check(rc)
    }

    /// [`Step::attend`] for a step whose entries are all APPEND_KV: stores
    /// K/V only (q and out are NULL).
    pub fn attend_kv<T: Element>(&mut self, layer: u32, k: &[T], v: &[T]) -> Result<()> {
        let l = self.check_common(layer, k, v)?;
        if !self.all_kv_only {
            return Err(invalid("attend_kv: the step has entries that are not APPEND_KV".to_string()));
        }
        let rc = unsafe {
            sys::resa_ctx_step_attend(
                self.ctx.raw,
                l,
                ptr::null(),
                k.as_ptr() as *const c_void,
                v.as_ptr() as *const c_void,
                ptr::null_mut(),
                0,
            )
        };
        self.ctx.check(rc)
    }

    /// `resa_ctx_step_attend` with raw pointers (device pointers on CUDA).
    ///
    /// # Safety
    /// The pointers must be valid for the step's layouts in IO_DTYPE
    /// ([`Step::q_len`], [`Step::kv_len`] elements) in the memory the
    /// backend reads (host for CPU, device for CUDA), until the work
    /// completes (CUDA: until the stream has run it).
    pub unsafe fn attend_raw(
        &mut self,
        layer: u32,
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        out: *mut c_void,
    ) -> Result<()> {
        let l = to_i32(layer, "layer")?;
        let rc = sys::resa_ctx_step_attend(self.ctx.raw, l, q, k, v, out, 0);
        self.ctx.check(rc)
    }

    /// Commits the step (`resa_ctx_step_end`).  On failure (e.g. a layer
    /// not attended) the step is cancelled and the error returned.
    pub fn finish(mut self) -> Result<()> {
        let rc = unsafe { sys::resa_ctx_step_end(self.ctx.raw, 0) };
        let r = self.ctx.check(rc);
        if r.is_ok() {
            self.open = false;
        }
        r // on error, Drop cancels
    }

    /// Abandons the step (`resa_ctx_step_cancel`), reporting its status.
    pub fn cancel(mut self) -> Result<()> {
        self.open = false;
        let rc = unsafe { sys::resa_ctx_step_cancel(self.ctx.raw) };
        self.ctx.check(rc)
    }
}

impl fmt::Debug for Step<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("rows", &self.rows)
            .field("layers", &self.layers)
            .field("io_dtype", &self.io_dtype)
            .field("open", &self.open)
            .finish()
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        if self.open {
            // The step is closed even when cancel reports an error.
            unsafe {
                sys::resa_ctx_step_cancel(self.ctx.raw);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::excessive_precision)]
    fn half_conversions() {
        for &x in &[0.0f32, 1.0, -2.5, 0.333251953125, 65504.0, 6.103515625e-05, 5.960464477539063e-08] {
            assert_eq!(F16::from_f32(x).to_f32(), x, "f16 {}", x);
        }
        assert_eq!(F16::from_f32(1.0).0, 0x3c00);
        assert_eq!(F16::from_f32(1e6).to_f32(), f32::INFINITY);
        assert!(F16::from_f32(f32::NAN).to_f32().is_nan());
        assert_eq!(F16::from_f32(1.0 + 1.0 / 4096.0).0, 0x3c00); // tie to even
        for &x in &[0.0f32, 1.0, -3.0, 0.15625, 1.2676506e30] {
            assert_eq!(Bf16::from_f32(x).to_f32(), x, "bf16 {}", x);
        }
        assert_eq!(Bf16::from_f32(1.0).0, 0x3f80);
        assert!(Bf16::from_f32(f32::NAN).to_f32().is_nan());
    }

    #[test]
    fn status_round_trip() {
        for c in 1..=10 {
            assert_eq!(Status::from_raw(c).unwrap().code(), c);
        }
        assert_eq!(Status::from_raw(0), None);
        assert_eq!(Status::Capacity.name(), "RESA_ERR_CAPACITY");
    }
}
