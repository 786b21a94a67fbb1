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
    /// Since 0.3.0 (context parallelism): n ≥ 1 rows that come after every
    /// token this context stores; each attends every stored token.  Nothing
    /// is stored; the sequence must have nothing pending.
    QueryDense = sys::RESA_MODE_QUERY_DENSE,
    /// Since 0.3.0 (context parallelism): exactly 1 row at the span's
    /// `global_length`; ReSA block-sparse attention over this context's part
    /// of the sequence ([`Context::seq_set_span`]).  Nothing is stored.
    QuerySparse = sys::RESA_MODE_QUERY_SPARSE,
}

impl Mode {
    /// Whether the mode stores nothing (QUERY_DENSE, QUERY_SPARSE).
    pub fn is_query(self) -> bool {
        matches!(self, Mode::QueryDense | Mode::QuerySparse)
    }
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

    /// `resa_seq_set_span` (since 0.3.0): makes `seq` this context's part
    /// `[first_token, first_token + length)` of a longer sequence whose
    /// whole length (the position of its next token, where QUERY rows sit)
    /// is `global_length`, or -1 when this context holds the tail.
    /// `first_token` is a multiple of BLOCK_SIZE and may change only while
    /// the sequence is empty.  docs/API.md, "resa_seq_set_span".
    pub fn seq_set_span(&mut self, seq: Seq, first_token: i64, global_length: i64) -> Result<()> {
        let rc = unsafe { sys::resa_seq_set_span(self.raw, seq.0, first_token, global_length) };
        self.check(rc)
    }

    /// `resa_ctx_merge_states` on host memory (a CPU context): merges
    /// `n_parts` attention states of `n_rows` rows each, in the context's
    /// IO_DTYPE (`T`) and HEAD_DIM.  `parts_out` has n_parts × n_rows ×
    /// HEAD_DIM elements, `parts_lse` n_parts × n_rows, `out` n_rows ×
    /// HEAD_DIM and `lse` (optional) n_rows; otherwise an error is returned
    /// without calling C.  Allowed inside a step too ([`Step::merge_states`]).
    pub fn merge_states<T: Element>(
        &mut self,
        n_parts: usize,
        n_rows: usize,
        parts_out: &[T],
        parts_lse: &[f32],
        out: &mut [T],
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        let io = self.get_param(IntParam::IoDtype)?;
        if Dtype::from_raw(io) != Some(T::DTYPE) {
            return Err(invalid(format!(
                "merge_states: element type {:?} but the context's IO_DTYPE is {:?}",
                T::DTYPE,
                Dtype::from_raw(io)
            )));
        }
        if self.backend()? != Backend::Cpu {
            return Err(Error::new(
                Status::NotSupported,
                "merge_states: slices are host memory; a CUDA context takes device pointers (merge_states_raw)",
            ));
        }
        let head_dim = self.get_param(IntParam::HeadDim)? as usize;
        let np = to_i32(n_parts as u64, "n_parts")?;
        let nr = to_i64(n_rows, "n_rows")?;
        check_merge_lengths(n_parts, n_rows, head_dim, parts_out.len(), parts_lse.len(), out.len(), lse.as_deref())?;
        let lse_ptr = lse.map_or(ptr::null_mut(), |l| l.as_mut_ptr());
        // SAFETY: lengths and element type checked; the CPU backend reads
        // and writes host memory synchronously; `out` is a &mut, so it
        // cannot overlap the parts.
        let rc = unsafe {
            sys::resa_ctx_merge_states(
                self.raw,
                np,
                nr,
                parts_out.as_ptr() as *const c_void,
                parts_lse.as_ptr(),
                out.as_mut_ptr() as *mut c_void,
                lse_ptr,
                0,
            )
        };
        self.check(rc)
    }

    /// `resa_ctx_merge_states` with raw pointers (device memory on CUDA).
    ///
    /// # Safety
    /// The pointers must be valid for the layouts of
    /// [`Context::merge_states`] in the context's IO_DTYPE, in the memory
    /// the backend reads (host for CPU, device for CUDA), until the work
    /// completes; `out` must not overlap the parts; `lse` may be NULL.
    pub unsafe fn merge_states_raw(
        &mut self,
        n_parts: i32,
        n_rows: i64,
        parts_out: *const c_void,
        parts_lse: *const f32,
        out: *mut c_void,
        lse: *mut f32,
    ) -> Result<()> {
        let rc = sys::resa_ctx_merge_states(self.raw, n_parts, n_rows, parts_out, parts_lse, out, lse, 0);
        self.check(rc)
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
        let all_query = modes.iter().all(|m| m.is_query());
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
            entries: seqs.len(),
            layers,
            q_heads,
            kv_heads,
            head_dim,
            io_dtype,
            all_kv_only,
            all_query,
            host_memory,
        })
    }
}

fn to_i32<T: TryInto<i32> + Copy + fmt::Display>(v: T, what: &str) -> Result<i32> {
    v.try_into().map_err(|_| invalid(format!("{} = {} does not fit in int32_t", what, v)))
}

fn to_i64<T: TryInto<i64> + Copy + fmt::Display>(v: T, what: &str) -> Result<i64> {
    v.try_into().map_err(|_| invalid(format!("{} = {} does not fit in int64_t", what, v)))
}

/// The product of `dims`, or an error naming `what` when it overflows.
fn elems(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| invalid(format!("{}: the size {:?} overflows usize", what, dims)))
}

fn check_len(call: &str, what: &str, got: usize, want: usize, layout: &str) -> Result<()> {
    if got != want {
        return Err(invalid(format!("{}: {} has {} elements, {} needs {}", call, what, got, layout, want)));
    }
    Ok(())
}

fn check_merge_lengths(
    n_parts: usize,
    n_rows: usize,
    head_dim: usize,
    parts_out: usize,
    parts_lse: usize,
    out: usize,
    lse: Option<&[f32]>,
) -> Result<()> {
    let c = "merge_states";
    check_len(c, "parts_out", parts_out, elems(c, &[n_parts, n_rows, head_dim])?, "n_parts × n_rows × head_dim")?;
    check_len(c, "parts_lse", parts_lse, elems(c, &[n_parts, n_rows])?, "n_parts × n_rows")?;
    check_len(c, "out", out, elems(c, &[n_rows, head_dim])?, "n_rows × head_dim")?;
    if let Some(l) = lse {
        check_len(c, "lse", l.len(), n_rows, "n_rows")?;
    }
    Ok(())
}

/// `resa_merge_states` (since 0.3.0): merges `n_parts` attention states of
/// the same `n_rows` rows over disjoint key sets, on host memory, with no
/// context (thread-safe).  `parts_out` is `[n_parts][n_rows][head_dim]`,
/// `parts_lse` `[n_parts][n_rows]` (as [`Step::attend_ex`] writes them, one
/// rank after another; a row is one query head of one token), `out`
/// `[n_rows][head_dim]` and `lse` (optional) `[n_rows]`.  Per row:
/// `m = max lse_i`, `w_i = exp(lse_i − m)` (0 for −inf),
/// `out = Σ w_i out_i / Σ w_i`, `lse = m + log Σ w_i`; a row whose parts are
/// all −inf gets lse −inf and a NaN out.  Wrong lengths are an error
/// before any C call.
pub fn merge_states<T: Element>(
    n_parts: usize,
    n_rows: usize,
    head_dim: usize,
    parts_out: &[T],
    parts_lse: &[f32],
    out: &mut [T],
    lse: Option<&mut [f32]>,
) -> Result<()> {
    let np = to_i32(n_parts as u64, "n_parts")?;
    let nr = to_i64(n_rows, "n_rows")?;
    let d = to_i32(head_dim as u64, "head_dim")?;
    check_merge_lengths(n_parts, n_rows, head_dim, parts_out.len(), parts_lse.len(), out.len(), lse.as_deref())?;
    let lse_ptr = lse.map_or(ptr::null_mut(), |l| l.as_mut_ptr());
    // SAFETY: lengths checked; host memory, synchronous; `out` is a &mut
    // and cannot overlap the parts.
    let rc = unsafe {
        sys::resa_merge_states(
            T::DTYPE as i32,
            np,
            nr,
            d,
            parts_out.as_ptr() as *const c_void,
            parts_lse.as_ptr(),
            out.as_mut_ptr() as *mut c_void,
            lse_ptr,
            0,
        )
    };
    match Status::from_raw(rc) {
        None => Ok(()),
        Some(s) => Err(Error::new(
            s,
            format!(
                "resa_merge_states({:?}, n_parts {}, n_rows {}, head_dim {}) refused its arguments",
                T::DTYPE,
                n_parts,
                n_rows,
                head_dim
            ),
        )),
    }
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
    entries: usize,
    layers: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    io_dtype: Dtype,
    all_kv_only: bool,
    all_query: bool,
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
    /// The number of entries (sequences) of the step.
    pub fn entries(&self) -> usize {
        self.entries
    }
    /// Elements of `lse` in [`Step::attend_ex`]: T × NUM_Q_HEADS (also the
    /// `n_rows` of a merge of this step's outputs).
    pub fn lse_len(&self) -> usize {
        self.rows * self.q_heads
    }
    /// Elements of the per-(entry, KV head) arrays: the `counts` of
    /// [`Step::block_scores`] and the thresholds, n_entries × NUM_KV_HEADS.
    pub fn pairs_len(&self) -> usize {
        self.entries * self.kv_heads
    }
    /// Elements of `scores` and `blocks` of [`Step::block_scores`] for
    /// `capacity`: n_entries × NUM_KV_HEADS × capacity.
    pub fn list_len(&self, capacity: usize) -> usize {
        self.entries * self.kv_heads * capacity
    }
    /// The context, for its read-only queries during the step.
    pub fn context(&self) -> &Context {
        self.ctx
    }

    fn check_host(&self, call: &str) -> Result<()> {
        if !self.host_memory {
            return Err(Error::new(
                Status::NotSupported,
                format!("{}: slices are host memory; a CUDA context takes device pointers ({}_raw)", call, call),
            ));
        }
        Ok(())
    }

    fn check_io<T: Element>(&self, call: &str, layer: u32) -> Result<i32> {
        if T::DTYPE != self.io_dtype {
            return Err(invalid(format!(
                "{}: element type {:?} but the context's IO_DTYPE is {:?}",
                call,
                T::DTYPE,
                self.io_dtype
            )));
        }
        self.check_host(call)?;
        if layer as usize >= self.layers {
            return Err(invalid(format!("{}: layer {} outside [0, {})", call, layer, self.layers)));
        }
        Ok(layer as i32)
    }

    fn check_common<T: Element>(&self, layer: u32, k: &[T], v: &[T]) -> Result<i32> {
        let l = self.check_io::<T>("attend", layer)?;
        check_len("attend", "k", k.len(), self.kv_len(), "the step")?;
        check_len("attend", "v", v.len(), self.kv_len(), "the step")?;
        Ok(l)
    }

    /// Stores `layer`'s K/V of the step and writes its attention output.
    /// Lengths must be exactly [`Step::q_len`] (q, out) and [`Step::kv_len`]
    /// (k, v), and `T` must match IO_DTYPE; otherwise an error is returned
    /// without calling C.  Rows of APPEND_KV entries in `out` are untouched.
    pub fn attend<T: Element>(&mut self, layer: u32, q: &[T], k: &[T], v: &[T], out: &mut [T]) -> Result<()> {
        let l = self.check_common(layer, k, v)?;
        check_len("attend", "q", q.len(), self.q_len(), "the step")?;
        check_len("attend", "out", out.len(), self.q_len(), "the step")?;
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

    /// `resa_ctx_step_attend_ex` (since 0.3.0): [`Step::attend`] plus the
    /// context-parallel inputs and outputs.
    ///
    /// * `kv`: `Some((k, v))`, each [`Step::kv_len`] elements, or `None`,
    ///   allowed only when every entry is a QUERY entry (nothing stored).
    /// * `lse`: `Some` of [`Step::lse_len`] float32s receives each row's
    ///   natural log-sum-exp over the keys it attended here (−inf, with a 0
    ///   output row, for a row that attended none).
    /// * `thresholds`: `Some((scores, blocks))`, each [`Step::pairs_len`]
    ///   long, from [`Step::thresholds`]: DECODE and QUERY_SPARSE entries
    ///   attend their forced blocks here and the candidates at or above the
    ///   threshold.
    ///
    /// q and out are [`Step::q_len`] elements of IO_DTYPE.  Every length,
    /// the element type, the layer and the backend (CPU) are checked before
    /// the C call.
    pub fn attend_ex<T: Element>(
        &mut self,
        layer: u32,
        q: &[T],
        kv: Option<(&[T], &[T])>,
        out: &mut [T],
        lse: Option<&mut [f32]>,
        thresholds: Option<(&[f32], &[i32])>,
    ) -> Result<()> {
        const C: &str = "attend_ex";
        let l = self.check_io::<T>(C, layer)?;
        let (k, v) = match kv {
            Some((k, v)) => {
                check_len(C, "k", k.len(), self.kv_len(), "the step")?;
                check_len(C, "v", v.len(), self.kv_len(), "the step")?;
                (k.as_ptr() as *const c_void, v.as_ptr() as *const c_void)
            }
            None if self.all_query => (ptr::null(), ptr::null()),
            None => {
                return Err(invalid(format!(
                    "{}: k and v may be None only when every entry is QUERY_DENSE or QUERY_SPARSE",
                    C
                )))
            }
        };
        check_len(C, "q", q.len(), self.q_len(), "the step")?;
        check_len(C, "out", out.len(), self.q_len(), "the step")?;
        let lse_ptr = match lse {
            Some(lse) => {
                check_len(C, "lse", lse.len(), self.lse_len(), "the step (rows × NUM_Q_HEADS)")?;
                lse.as_mut_ptr()
            }
            None => ptr::null_mut(),
        };
        let (ts, tb) = match thresholds {
            Some((ts, tb)) => {
                let want = self.pairs_len();
                check_len(C, "threshold_scores", ts.len(), want, "the step (entries × NUM_KV_HEADS)")?;
                check_len(C, "threshold_blocks", tb.len(), want, "the step (entries × NUM_KV_HEADS)")?;
                (ts.as_ptr(), tb.as_ptr())
            }
            None => (ptr::null(), ptr::null()),
        };
        // SAFETY: lengths and element type checked; the CPU backend reads
        // and writes host memory synchronously and retains nothing.
        let rc = unsafe {
            sys::resa_ctx_step_attend_ex(
                self.ctx.raw,
                l,
                q.as_ptr() as *const c_void,
                k,
                v,
                out.as_mut_ptr() as *mut c_void,
                lse_ptr,
                ts,
                tb,
                0,
            )
        };
        self.ctx.check(rc)
    }

    /// `resa_ctx_step_attend_ex` with raw pointers (device pointers on CUDA).
    ///
    /// # Safety
    /// As [`Step::attend_raw`]; `lse` (NULL or [`Step::lse_len`] float32s)
    /// and the thresholds (both NULL or both [`Step::pairs_len`] long) are
    /// in the same memory space.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attend_ex_raw(
        &mut self,
        layer: u32,
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        out: *mut c_void,
        lse: *mut f32,
        threshold_scores: *const f32,
        threshold_blocks: *const i32,
    ) -> Result<()> {
        let l = to_i32(layer, "layer")?;
        let rc = sys::resa_ctx_step_attend_ex(
            self.ctx.raw,
            l,
            q,
            k,
            v,
            out,
            lse,
            threshold_scores,
            threshold_blocks,
            0,
        );
        self.ctx.check(rc)
    }

    /// `resa_ctx_step_block_scores` (since 0.3.0), phase 1 of the two-phase
    /// selection, for `layer` before its [`Step::attend_ex`]: for every
    /// entry `i` and KV head `h` (`x = i · NUM_KV_HEADS + h`), this
    /// context's best candidates as `scores[x · capacity + j]` and
    /// `blocks[x · capacity + j]` (global block indices), `j < counts[x]`.
    /// `q` is [`Step::q_len`] elements; `scores` and `blocks` are
    /// [`Step::list_len`]`(capacity)` long, `counts` [`Step::pairs_len`];
    /// `capacity` must be at least every entry's `K_i` (the library checks).
    pub fn block_scores<T: Element>(
        &mut self,
        layer: u32,
        q: &[T],
        capacity: usize,
        scores: &mut [f32],
        blocks: &mut [i32],
        counts: &mut [i32],
    ) -> Result<()> {
        const C: &str = "block_scores";
        let l = self.check_io::<T>(C, layer)?;
        let cap = to_i64(capacity, "capacity")?;
        check_len(C, "q", q.len(), self.q_len(), "the step")?;
        let want = elems(C, &[self.entries, self.kv_heads, capacity])?;
        check_len(C, "scores", scores.len(), want, "entries × NUM_KV_HEADS × capacity")?;
        check_len(C, "blocks", blocks.len(), want, "entries × NUM_KV_HEADS × capacity")?;
        check_len(C, "counts", counts.len(), self.pairs_len(), "entries × NUM_KV_HEADS")?;
        // SAFETY: lengths and element type checked; host memory, synchronous.
        let rc = unsafe {
            sys::resa_ctx_step_block_scores(
                self.ctx.raw,
                l,
                q.as_ptr() as *const c_void,
                cap,
                scores.as_mut_ptr(),
                blocks.as_mut_ptr(),
                counts.as_mut_ptr(),
                0,
            )
        };
        self.ctx.check(rc)
    }

    /// `resa_ctx_step_block_scores` with raw pointers (device pointers on CUDA).
    ///
    /// # Safety
    /// The pointers must be valid for the layouts of [`Step::block_scores`]
    /// in the memory the backend reads and writes, until the work completes.
    pub unsafe fn block_scores_raw(
        &mut self,
        layer: u32,
        q: *const c_void,
        capacity: i64,
        scores: *mut f32,
        blocks: *mut i32,
        counts: *mut i32,
    ) -> Result<()> {
        let l = to_i32(layer, "layer")?;
        let rc = sys::resa_ctx_step_block_scores(self.ctx.raw, l, q, capacity, scores, blocks, counts, 0);
        self.ctx.check(rc)
    }

    /// `resa_ctx_step_thresholds` (since 0.3.0): from the phase-1 lists of
    /// `n_ranks` contexts laid end to end (as an all-gather leaves them:
    /// `scores` and `blocks` n_ranks × [`Step::list_len`]`(capacity)`,
    /// `counts` n_ranks × [`Step::pairs_len`]), each (entry, KV head)'s
    /// `K_i`-th best pair into `threshold_scores` / `threshold_blocks`
    /// ([`Step::pairs_len`] each; (+inf, −1) where nothing is chosen by
    /// score).  Every rank computes the same thresholds from the same lists.
    #[allow(clippy::too_many_arguments)]
    pub fn thresholds(
        &mut self,
        n_ranks: usize,
        capacity: usize,
        scores: &[f32],
        blocks: &[i32],
        counts: &[i32],
        threshold_scores: &mut [f32],
        threshold_blocks: &mut [i32],
    ) -> Result<()> {
        const C: &str = "thresholds";
        self.check_host(C)?;
        let nr = to_i32(n_ranks as u64, "n_ranks")?;
        let cap = to_i64(capacity, "capacity")?;
        let want = elems(C, &[n_ranks, self.entries, self.kv_heads, capacity])?;
        check_len(C, "scores", scores.len(), want, "n_ranks × entries × NUM_KV_HEADS × capacity")?;
        check_len(C, "blocks", blocks.len(), want, "n_ranks × entries × NUM_KV_HEADS × capacity")?;
        let want = elems(C, &[n_ranks, self.entries, self.kv_heads])?;
        check_len(C, "counts", counts.len(), want, "n_ranks × entries × NUM_KV_HEADS")?;
        let pairs = self.pairs_len();
        check_len(C, "threshold_scores", threshold_scores.len(), pairs, "entries × NUM_KV_HEADS")?;
        check_len(C, "threshold_blocks", threshold_blocks.len(), pairs, "entries × NUM_KV_HEADS")?;
        // SAFETY: lengths checked; host memory, synchronous.
        let rc = unsafe {
            sys::resa_ctx_step_thresholds(
                self.ctx.raw,
                nr,
                cap,
                scores.as_ptr(),
                blocks.as_ptr(),
                counts.as_ptr(),
                threshold_scores.as_mut_ptr(),
                threshold_blocks.as_mut_ptr(),
                0,
            )
        };
        self.ctx.check(rc)
    }

    /// `resa_ctx_step_thresholds` with raw pointers (device pointers on CUDA).
    ///
    /// # Safety
    /// The pointers must be valid for the layouts of [`Step::thresholds`]
    /// in the memory the backend reads and writes, until the work completes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn thresholds_raw(
        &mut self,
        n_ranks: i32,
        capacity: i64,
        scores: *const f32,
        blocks: *const i32,
        counts: *const i32,
        threshold_scores: *mut f32,
        threshold_blocks: *mut i32,
    ) -> Result<()> {
        let rc = sys::resa_ctx_step_thresholds(
            self.ctx.raw,
            n_ranks,
            capacity,
            scores,
            blocks,
            counts,
            threshold_scores,
            threshold_blocks,
            0,
        );
        self.ctx.check(rc)
    }

    /// [`Context::merge_states`] during the step (the C call is allowed
    /// inside a step).
    pub fn merge_states<T: Element>(
        &mut self,
        n_parts: usize,
        n_rows: usize,
        parts_out: &[T],
        parts_lse: &[f32],
        out: &mut [T],
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        self.ctx.merge_states(n_parts, n_rows, parts_out, parts_lse, out, lse)
    }

    /// [`Context::merge_states_raw`] during the step.
    ///
    /// # Safety
    /// As [`Context::merge_states_raw`].
    pub unsafe fn merge_states_raw(
        &mut self,
        n_parts: i32,
        n_rows: i64,
        parts_out: *const c_void,
        parts_lse: *const f32,
        out: *mut c_void,
        lse: *mut f32,
    ) -> Result<()> {
        self.ctx.merge_states_raw(n_parts, n_rows, parts_out, parts_lse, out, lse)
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
