//! A prefill + dense decode + sparse decode + rectify session on the CPU
//! backend, checked against an independent f64 reference written here, and
//! the error paths of the safe API.

// Clippy style only; div_ceil needs Rust 1.73 and the crates keep to 1.63.
#![allow(clippy::manual_div_ceil, clippy::needless_range_loop)]

use resa::{Backend, Bf16, Context, Dtype, F64Param, IntParam, Mode, Seq, Shape, Status};

// A small PRNG (splitmix64, tests/common), so the test needs no crate.
mod common;
use common::Rng;

// ---------------------------------------------------------------------------
// The reference: its own copy of every sequence's K/V per layer, and dense
// or block-restricted causal attention in f64.
// ---------------------------------------------------------------------------
const LAYERS: usize = 2;
const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 24;
const BS: usize = 8;

#[derive(Clone, Default)]
struct RefSeq {
    // [layer][pos * HKV * D + h * D + j]
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl RefSeq {
    fn new() -> RefSeq {
        RefSeq { k: vec![Vec::new(); LAYERS], v: vec![Vec::new(); LAYERS] }
    }
    fn len(&self) -> usize {
        self.k[0].len() / (HKV * D)
    }
    fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let w = HKV * D;
        if pos * w == self.k[layer].len() {
            self.k[layer].extend_from_slice(k);
            self.v[layer].extend_from_slice(v);
        } else {
            self.k[layer][pos * w..(pos + 1) * w].copy_from_slice(k);
            self.v[layer][pos * w..(pos + 1) * w].copy_from_slice(v);
        }
    }
    /// Attention of one query row (HQ × D) at position `pos` over the keys
    /// [0, pos] that `allowed(kv_head, key_pos)` admits.
    fn attend(&self, layer: usize, q: &[f32], pos: usize, scale: f64, allowed: &dyn Fn(usize, usize) -> bool) -> Vec<f64> {
        let g = HQ / HKV;
        let mut out = vec![0.0f64; HQ * D];
        for h in 0..HQ {
            let kvh = h / g;
            let qh = &q[h * D..(h + 1) * D];
            let mut scores = Vec::new();
            for p in 0..=pos {
                if !allowed(kvh, p) {
                    continue;
                }
                let kp = &self.k[layer][(p * HKV + kvh) * D..(p * HKV + kvh + 1) * D];
                let s: f64 = qh.iter().zip(kp).map(|(a, b)| *a as f64 * *b as f64).sum();
                scores.push((p, s * scale));
            }
            assert!(!scores.is_empty());
            let m = scores.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|x| (x.1 - m).exp()).sum();
            for (p, s) in scores {
                let w = (s - m).exp() / z;
                let vp = &self.v[layer][(p * HKV + kvh) * D..(p * HKV + kvh + 1) * D];
                for j in 0..D {
                    out[h * D + j] += w * vp[j] as f64;
                }
            }
        }
        out
    }
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let diff = (*g as f64 - w).abs();
        // NaN (the poison) fails this comparison too.
        assert!(diff <= 1e-4 * (1.0 + w.abs()), "{}: element {}: got {} want {}", what, i, g, w);
    }
}

/// Which blocks each entry attended, for the reference.
enum Check {
    Dense,
    /// Use the blocks that resa_seq_selected_blocks reports.
    Selected,
}

struct Session {
    ctx: Context,
    refs: Vec<RefSeq>,
    seqs: Vec<Seq>,
    rng: Rng,
    scale: f64,
    steps: usize,
}

impl Session {
    /// Runs one step of (sequence index, mode, n) entries on every layer,
    /// updates the reference and checks every written row.  Returns the
    /// selection per DECODE entry ([layer][kv_head] -> blocks).
    fn step(&mut self, entries: &[(usize, Mode, usize)], check: Check) -> Vec<Vec<Vec<Vec<i32>>>> {
        let seqs: Vec<Seq> = entries.iter().map(|e| self.seqs[e.0]).collect();
        let modes: Vec<Mode> = entries.iter().map(|e| e.1).collect();
        let ns: Vec<u32> = entries.iter().map(|e| e.2 as u32).collect();
        // Positions of every row, from the library's lengths and pending counts.
        let mut positions = Vec::new();
        for e in entries {
            let seq = self.seqs[e.0];
            let len = self.ctx.seq_length(seq).unwrap() as usize;
            assert_eq!(len, self.refs[e.0].len());
            let start = if e.1 == Mode::Rectify {
                len - self.ctx.seq_pending(seq).unwrap() as usize
            } else {
                len
            };
            positions.push(start);
        }
        let t: usize = ns.iter().map(|n| *n as usize).sum();
        let mut io = Vec::new(); // per layer (q, k, v, out)
        {
            let mut step = self.ctx.step(&seqs, &modes, &ns).expect("step_begin");
            assert_eq!(step.rows(), t);
            assert_eq!(step.q_len(), t * HQ * D);
            for layer in 0..LAYERS {
                let q = self.rng.vec(t * HQ * D);
                let k = self.rng.vec(t * HKV * D);
                let v = self.rng.vec(t * HKV * D);
                let mut out = vec![f32::NAN; t * HQ * D];
                step.attend(layer as u32, &q, &k, &v, &mut out).expect("attend");
                io.push((q, k, v, out));
            }
            step.finish().expect("step_end");
        }
        self.steps += 1;
        // The reference: writes first (all entries), then reads.
        for (layer, (_, k, v, _)) in io.iter().enumerate() {
            let mut row = 0;
            for (i, e) in entries.iter().enumerate() {
                for r in 0..e.2 {
                    let w = HKV * D;
                    self.refs[e.0].write(layer, positions[i] + r, &k[(row + r) * w..(row + r + 1) * w], &v[(row + r) * w..(row + r + 1) * w]);
                }
                row += e.2;
            }
        }
        let mut selections = Vec::new();
        for e in entries {
            let mut sel = Vec::new();
            if e.1 == Mode::Decode {
                for layer in 0..LAYERS {
                    let mut per_head = Vec::new();
                    for h in 0..HKV {
                        per_head.push(self.ctx.selected_blocks(self.seqs[e.0], layer as u32, h as u32).unwrap());
                    }
                    sel.push(per_head);
                }
            }
            selections.push(sel);
        }
        for (layer, (q, _, _, out)) in io.iter().enumerate() {
            let mut row = 0;
            for (i, e) in entries.iter().enumerate() {
                for r in 0..e.2 {
                    let pos = positions[i] + r;
                    let w = HQ * D;
                    let got = &out[(row + r) * w..(row + r + 1) * w];
                    let qr = &q[(row + r) * w..(row + r + 1) * w];
                    let reference = match (&check, e.1) {
                        (Check::Selected, Mode::Decode) => {
                            let sel = &selections[i][layer];
                            self.refs[e.0].attend(layer, qr, pos, self.scale, &|h, p| sel[h].contains(&((p / BS) as i32)))
                        }
                        _ => self.refs[e.0].attend(layer, qr, pos, self.scale, &|_, _| true),
                    };
                    let what = format!("step {} layer {} entry {} ({:?}) row {} pos {}", self.steps, layer, i, e.1, r, pos);
                    assert_close(got, &reference, &what);
                }
                row += e.2;
            }
        }
        selections
    }
}

fn cpu_context(record: bool) -> Context {
    let shape = Shape { layers: LAYERS as u32, q_heads: HQ as u32, kv_heads: HKV as u32, head_dim: D as u32 };
    let mut ctx = Context::new(Backend::Cpu, shape, Dtype::F32).unwrap();
    ctx.set_param(IntParam::BlockSize, BS as i64).unwrap();
    ctx.set_param(IntParam::NumThreads, 2).unwrap();
    ctx.set_param(IntParam::MaxTokens, 1024).unwrap();
    ctx.set_param(IntParam::RecordSelection, record as i64).unwrap();
    ctx
}

#[test]
fn prefill_sparse_decode_rectify_matches_f64_reference() {
    let mut ctx = cpu_context(true);
    assert_eq!(ctx.get_param(IntParam::HeadDim).unwrap(), D as i64);
    let scale = ctx.get_param(F64Param::SoftmaxScale).unwrap();
    assert!((scale - 1.0 / (D as f64).sqrt()).abs() < 1e-12);
    ctx.set_param(IntParam::SelectMinBlocks, 2).unwrap();
    ctx.set_param(IntParam::SinkBlocks, 1).unwrap();
    ctx.set_param(IntParam::LocalBlocks, 1).unwrap();
    ctx.set_param(IntParam::RectifyInterval, 4).unwrap();
    ctx.set_param(F64Param::SelectFraction, 1.0).unwrap();
    let a = ctx.seq_create().unwrap();
    let b = ctx.seq_create().unwrap();
    let mut s = Session { ctx, refs: vec![RefSeq::new(), RefSeq::new()], seqs: vec![a, b], rng: Rng(0x5eed), scale, steps: 0 };

    // Prefill both sequences in one batch (37 and 13 tokens: not multiples of 8).
    s.step(&[(0, Mode::Append, 37), (1, Mode::Append, 13)], Check::Dense);
    assert_eq!(s.ctx.seq_length(a).unwrap(), 37);
    assert_eq!(s.ctx.seq_length(b).unwrap(), 13);

    // A decode with select_fraction = 1: dense attention, every block listed,
    // nothing pending; batched with a 3-token chunk of b.
    let sel = s.step(&[(1, Mode::Append, 3), (0, Mode::Decode, 1)], Check::Dense);
    let m = (37 + 1 + BS - 1) / BS;
    for layer in 0..LAYERS {
        for h in 0..HKV {
            assert_eq!(sel[1][layer][h], (0..m as i32).collect::<Vec<_>>());
        }
    }
    assert_eq!(s.ctx.seq_pending(a).unwrap(), 0);

    // Sparse decodes: r = 0.25, n_min = 2 keep fewer blocks than the
    // sequence has; each output must be attention over exactly the reported
    // blocks, which hold the sink and the current block.
    s.ctx.set_param(F64Param::SelectFraction, 0.25).unwrap();
    for i in 0..5 {
        let len = s.ctx.seq_length(a).unwrap() as usize;
        let m = (len + 1 + BS - 1) / BS;
        let n = std::cmp::max((m + 3) / 4, 2);
        assert!(n < m);
        let sel = s.step(&[(0, Mode::Decode, 1)], Check::Selected);
        for layer in 0..LAYERS {
            for h in 0..HKV {
                let blocks = &sel[0][layer][h];
                assert_eq!(blocks.len(), n, "budget at len {}", len);
                assert_eq!(blocks[0], 0, "sink block");
                assert_eq!(*blocks.last().unwrap(), (m - 1) as i32, "current block");
                assert!(blocks.windows(2).all(|w| w[0] < w[1]));
            }
        }
        assert_eq!(s.ctx.seq_pending(a).unwrap(), i + 1);
        assert_eq!(s.ctx.seq_rectify_due(a).unwrap(), i + 1 >= 4);
    }

    // Rectify the pending span in two parts, oldest first, batched with a
    // dense decode step (1-token APPEND) of b: dense causal attention with
    // the rewritten K/V.
    s.step(&[(0, Mode::Rectify, 2), (1, Mode::Append, 1)], Check::Dense);
    assert_eq!(s.ctx.seq_pending(a).unwrap(), 3);
    s.step(&[(0, Mode::Rectify, 3)], Check::Dense);
    assert_eq!(s.ctx.seq_pending(a).unwrap(), 0);
    assert!(!s.ctx.seq_rectify_due(a).unwrap());
    assert_eq!(s.ctx.seq_length(a).unwrap(), 43);

    // After rectification the cache equals the reference's: one more sparse
    // decode and a dense check over a fork.
    s.step(&[(0, Mode::Decode, 1)], Check::Selected);
    let c = s.ctx.seq_fork(b).unwrap();
    assert_eq!(s.ctx.seq_length(c).unwrap(), 17);
    s.seqs.push(c);
    let copy = s.refs[1].clone();
    s.refs.push(copy);
    s.step(&[(2, Mode::Append, 5)], Check::Dense);
    assert_eq!(s.ctx.seq_length(b).unwrap(), 17);
    s.ctx.seq_release(c).unwrap();
    assert_eq!(s.ctx.seq_length(c).unwrap_err().status(), Status::InvalidArgument);
}

#[test]
fn wrong_lengths_and_dtype_fail_before_c_and_drop_cancels() {
    let mut ctx = cpu_context(false);
    let seq = ctx.seq_create().unwrap();
    let free = ctx.free_tokens().unwrap();
    let t = 5;
    let (q, k, v) = (vec![0.5f32; t * HQ * D], vec![0.25f32; t * HKV * D], vec![1.0f32; t * HKV * D]);
    {
        let mut step = ctx.step(&[seq], &[Mode::Append], &[t as u32]).unwrap();
        // begin succeeded, so the context's last error is "": a Rust-side
        // refusal leaves it so (C was not called).
        assert_eq!(step.context().last_error(), "");
        let mut out = vec![0.0f32; t * HQ * D];
        let e = step.attend(0, &q[1..], &k, &v, &mut out).unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument);
        assert!(e.message().contains("q has"), "{}", e);
        let e = step.attend(0, &q, &k, &v[..7], &mut out).unwrap_err();
        assert!(e.message().contains("v has"), "{}", e);
        let mut short = vec![0.0f32; 3];
        let e = step.attend(0, &q, &k, &v, &mut short).unwrap_err();
        assert!(e.message().contains("out has"), "{}", e);
        let e = step.attend(LAYERS as u32, &q, &k, &v, &mut out).unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument);
        // Element type against IO_DTYPE (F32 here).
        let qb = vec![Bf16::from_f32(0.5); t * HQ * D];
        let kb = vec![Bf16::from_f32(0.5); t * HKV * D];
        let mut ob = vec![Bf16::default(); t * HQ * D];
        let e = step.attend(0, &qb, &kb, &kb, &mut ob).unwrap_err();
        assert!(e.message().contains("IO_DTYPE"), "{}", e);
        assert_eq!(step.context().last_error(), "");
        // The output was never touched.
        assert!(out.iter().all(|x| *x == 0.0));
        // One real layer, then drop: the step is cancelled.
        step.attend(0, &q, &k, &v, &mut out).unwrap();
        assert!(out.iter().all(|x| x.is_finite()));
    }
    assert_eq!(ctx.seq_length(seq).unwrap(), 0);
    assert_eq!(ctx.free_tokens().unwrap(), free);

    // finish() with a layer missing: BAD_STATE with the library's text, and
    // the step is cancelled (a new one can begin, nothing committed).
    {
        let mut step = ctx.step(&[seq], &[Mode::Append], &[t as u32]).unwrap();
        let mut out = vec![0.0f32; t * HQ * D];
        step.attend(1, &q, &k, &v, &mut out).unwrap();
        let e = step.finish().unwrap_err();
        assert_eq!(e.status(), Status::BadState);
        assert!(!e.message().is_empty());
    }
    assert_eq!(ctx.seq_length(seq).unwrap(), 0);

    // The mismatched batch arrays are refused in Rust too.
    let e = ctx.step(&[seq], &[Mode::Append, Mode::Append], &[1]).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);

    // A full step commits.
    let mut step = ctx.step(&[seq], &[Mode::Append], &[t as u32]).unwrap();
    let mut out = vec![0.0f32; t * HQ * D];
    for layer in 0..LAYERS as u32 {
        step.attend(layer, &q, &k, &v, &mut out).unwrap();
    }
    step.finish().unwrap();
    assert_eq!(ctx.seq_length(seq).unwrap(), t as i64);
}

#[test]
fn capacity_and_state_errors_carry_status_and_message() {
    let mut ctx = cpu_context(false);
    ctx.set_param(IntParam::MaxSequences, 1).unwrap();
    ctx.set_param(IntParam::MaxStepTokens, 16).unwrap();
    let seq = ctx.seq_create().unwrap();

    let e = ctx.seq_create().unwrap_err();
    assert_eq!(e.status(), Status::Capacity);
    assert!(!e.message().is_empty());
    assert!(e.to_string().starts_with("RESA_ERR_CAPACITY: "), "{}", e);

    match ctx.step(&[seq], &[Mode::Append], &[17]) {
        Ok(_) => panic!("17 tokens in a 16-token step"),
        Err(e) => {
            assert_eq!(e.status(), Status::Capacity);
            assert!(!e.message().is_empty());
            let dynerr: &dyn std::error::Error = &e;
            assert!(!dynerr.to_string().is_empty());
        }
    }
    assert_eq!(ctx.seq_length(seq).unwrap(), 0);

    // A shape parameter after the first sequence: BAD_STATE.
    let e = ctx.set_param(IntParam::HeadDim, 64).unwrap_err();
    assert_eq!(e.status(), Status::BadState);
    assert!(!e.message().is_empty());
    // Out of range: INVALID_ARGUMENT naming the parameter.
    let e = ctx.set_param(F64Param::SelectFraction, 2.0).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    // Selection without RECORD_SELECTION: BAD_STATE.
    assert_eq!(ctx.selected_blocks(seq, 0, 0).unwrap_err().status(), Status::BadState);
    // Presets.
    ctx.set_preset(resa::Preset::Paper).unwrap();
    assert_eq!(ctx.get_param(IntParam::SinkBlocks).unwrap(), 0);
    assert_eq!(ctx.get_param(F64Param::ScoreWidth).unwrap(), 1.0);
    ctx.set_preset(resa::Preset::Default).unwrap();
    assert_eq!(ctx.get_param(IntParam::SinkBlocks).unwrap(), 1);
    let (lo, hi) = resa::param_bounds(IntParam::BlockSize).unwrap();
    assert_eq!((lo, hi), (1, 256));
    assert_eq!(resa::version_number(), resa::sys::RESA_VERSION_NUMBER);
    assert!(resa::backend_available(Backend::Cpu));
}

#[test]
fn bf16_io_matches_reference_loosely() {
    let shape = Shape { layers: 1, q_heads: 2, kv_heads: 1, head_dim: 16 };
    let mut ctx = Context::new(Backend::Cpu, shape, Dtype::Bf16).unwrap();
    ctx.set_param(IntParam::NumThreads, 1).unwrap();
    let seq = ctx.seq_create().unwrap();
    let mut rng = Rng(7);
    let t = 11;
    let q: Vec<Bf16> = (0..t * 2 * 16).map(|_| Bf16::from_f32(rng.uniform())).collect();
    let k: Vec<Bf16> = (0..t * 16).map(|_| Bf16::from_f32(rng.uniform())).collect();
    let v: Vec<Bf16> = (0..t * 16).map(|_| Bf16::from_f32(rng.uniform())).collect();
    let mut out = vec![Bf16::from_f32(f32::NAN); t * 2 * 16];
    let mut step = ctx.step(&[seq], &[Mode::Append], &[t as u32]).unwrap();
    // f32 slices on a bf16 context are refused.
    let mut of = vec![0.0f32; t * 2 * 16];
    assert!(step.attend(0, &vec![0.0f32; t * 32], &vec![0.0f32; t * 16], &vec![0.0f32; t * 16], &mut of).is_err());
    step.attend(0, &q, &k, &v, &mut out).unwrap();
    step.finish().unwrap();
    let scale = 0.25f64;
    for r in 0..t {
        for h in 0..2 {
            let mut sc = Vec::new();
            for p in 0..=r {
                let s: f64 = (0..16).map(|j| q[(r * 2 + h) * 16 + j].to_f32() as f64 * k[p * 16 + j].to_f32() as f64).sum();
                sc.push(s * scale);
            }
            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
            for j in 0..16 {
                let want: f64 = sc.iter().enumerate().map(|(p, s)| (s - m).exp() / z * v[p * 16 + j].to_f32() as f64).sum();
                let got = out[(r * 2 + h) * 16 + j].to_f32() as f64;
                assert!((got - want).abs() <= 2e-2, "row {} head {} dim {}: {} vs {}", r, h, j, got, want);
            }
        }
    }
}
