//! The context-parallel API on the CPU backend: `merge_states` against an
//! f64 reference, the lse of a dense step against an f64 log-sum-exp, a
//! 2-rank context-parallel session (tests/check_cp.c's protocol in a small
//! form) against one context, and the Rust-side length checks.

#![allow(clippy::needless_range_loop)]

use resa::{merge_states, Backend, Bf16, Context, Dtype, F64Param, IntParam, Mode, Seq, Shape, Status, Step};

mod common;
use common::Rng;

const LAYERS: usize = 2;
const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 16;
const BS: usize = 8;
const EPS32: f64 = 1.0 / 16_777_216.0; // 2^-24, fp32's unit roundoff

fn make_ctx() -> Context {
    let shape = Shape { layers: LAYERS as u32, q_heads: HQ as u32, kv_heads: HKV as u32, head_dim: D as u32 };
    let mut ctx = Context::new(Backend::Cpu, shape, Dtype::F32).unwrap();
    ctx.set_param(IntParam::BlockSize, BS as i64).unwrap();
    ctx.set_param(IntParam::NumThreads, 1).unwrap();
    ctx.set_param(IntParam::MaxTokens, 512).unwrap();
    ctx.set_param(IntParam::RecordSelection, 1).unwrap();
    // Budget n = 4 of M = 7..8 blocks: forced sink 1 + local 1, K = 2 by score.
    ctx.set_param(F64Param::SelectFraction, 0.25).unwrap();
    ctx.set_param(IntParam::SelectMinBlocks, 4).unwrap();
    ctx.set_param(IntParam::SinkBlocks, 1).unwrap();
    ctx.set_param(IntParam::LocalBlocks, 1).unwrap();
    ctx
}

// ---------------------------------------------------------------------------
// merge_states
// ---------------------------------------------------------------------------

/// The f64 merge of docs/API.md: (out, lse) of one row.
fn merge_ref(parts_out: &[Vec<f64>], parts_lse: &[f64]) -> (Vec<f64>, f64) {
    let d = parts_out[0].len();
    let m = parts_lse.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return (vec![f64::NAN; d], f64::NEG_INFINITY);
    }
    let mut out = vec![0.0; d];
    let mut z = 0.0;
    for (o, &l) in parts_out.iter().zip(parts_lse) {
        if l == f64::NEG_INFINITY {
            continue; // never read
        }
        let w = (l - m).exp();
        z += w;
        for j in 0..d {
            out[j] += w * o[j];
        }
    }
    for x in out.iter_mut() {
        *x /= z;
    }
    (out, m + z.ln())
}

/// Random parts with -inf lse here and there (their rows hold NaN, which
/// the merge must not read) and one row whose every part is -inf.
fn merge_inputs(rng: &mut Rng, p: usize, rows: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut out = rng.vec(p * rows * d);
    let mut lse: Vec<f32> = (0..p * rows).map(|_| rng.uniform() * 8.0).collect();
    for r in 0..rows {
        for i in 0..p {
            let dead = r == 7 || (r % 3 == 1 && i == r % p);
            if dead {
                lse[i * rows + r] = f32::NEG_INFINITY;
                for j in 0..d {
                    out[(i * rows + r) * d + j] = f32::NAN;
                }
            }
        }
    }
    (out, lse)
}

#[allow(clippy::too_many_arguments)]
fn check_merge(p: usize, rows: usize, d: usize, parts: &[f32], plse: &[f32], out: &[f32], lse: &[f32], tol: f64) {
    for r in 0..rows {
        let po: Vec<Vec<f64>> =
            (0..p).map(|i| parts[(i * rows + r) * d..(i * rows + r + 1) * d].iter().map(|x| *x as f64).collect()).collect();
        let pl: Vec<f64> = (0..p).map(|i| plse[i * rows + r] as f64).collect();
        let (ro, rl) = merge_ref(&po, &pl);
        if rl == f64::NEG_INFINITY {
            assert_eq!(lse[r], f32::NEG_INFINITY, "row {}: lse", r);
            assert!(out[r * d..(r + 1) * d].iter().all(|x| x.is_nan()), "row {}: out must be NaN", r);
            continue;
        }
        assert!((lse[r] as f64 - rl).abs() <= 8.0 * EPS32 * (1.0 + rl.abs()), "row {}: lse {} want {}", r, lse[r], rl);
        for j in 0..d {
            let g = out[r * d + j] as f64;
            assert!((g - ro[j]).abs() <= tol, "row {} element {}: got {} want {}", r, j, g, ro[j]);
        }
    }
}

#[test]
fn merge_states_against_f64() {
    let mut rng = Rng(11);
    let (p, rows, d) = (3, 40, 8);
    let (parts, plse) = merge_inputs(&mut rng, p, rows, d);
    assert!((0..p).all(|i| plse[i * rows + 7] == f32::NEG_INFINITY));
    let mut out = vec![f32::NAN; rows * d];
    let mut lse = vec![f32::NAN; rows];
    merge_states(p, rows, d, &parts, &plse, &mut out, Some(&mut lse)).unwrap();
    // |out_i| < 1: a few fp32 roundings of a convex combination.
    check_merge(p, rows, d, &parts, &plse, &out, &lse, 16.0 * EPS32);

    // lse None writes the same out.
    let mut out2 = vec![f32::NAN; rows * d];
    merge_states(p, rows, d, &parts, &plse, &mut out2, None).unwrap();
    assert_eq!(out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), out2.iter().map(|x| x.to_bits()).collect::<Vec<_>>());

    // One part: the identity on finite rows.
    let mut out1 = vec![0.0f32; rows * d];
    let mut lse1 = vec![0.0f32; rows];
    merge_states(1, rows, d, &parts[..rows * d], &plse[..rows], &mut out1, Some(&mut lse1)).unwrap();
    check_merge(1, rows, d, &parts[..rows * d], &plse[..rows], &out1, &lse1, 4.0 * EPS32);

    // bf16: the inputs rounded to bf16, the output at bf16's rounding.
    let pb: Vec<Bf16> = parts.iter().map(|x| Bf16::from_f32(*x)).collect();
    let pbf: Vec<f32> = pb.iter().map(|x| x.to_f32()).collect();
    let mut ob = vec![Bf16(0x7fc0); rows * d];
    let mut lb = vec![f32::NAN; rows];
    merge_states(p, rows, d, &pb, &plse, &mut ob, Some(&mut lb)).unwrap();
    let obf: Vec<f32> = ob.iter().map(|x| x.to_f32()).collect();
    check_merge(p, rows, d, &pbf, &plse, &obf, &lb, 1.0 / 256.0);

    // Zero rows is a no-op.
    merge_states::<f32>(2, 0, d, &[], &[], &mut [], None).unwrap();
}

// ---------------------------------------------------------------------------
// lse of a dense step
// ---------------------------------------------------------------------------

#[test]
fn dense_step_lse_against_f64() {
    let mut ctx = make_ctx();
    let seq = ctx.seq_create().unwrap();
    let scale = ctx.get_param(F64Param::SoftmaxScale).unwrap();
    let mut rng = Rng(5);
    // keys[layer][pos] = (k row, v row) of HKV × D
    let mut keys: Vec<Vec<(Vec<f32>, Vec<f32>)>> = vec![Vec::new(); LAYERS];
    for &n in &[13usize, 6] {
        let start = ctx.seq_length(seq).unwrap() as usize;
        let mut ios = Vec::new();
        {
            let mut step = ctx.step(&[seq], &[Mode::Append], &[n as u32]).unwrap();
            assert_eq!(step.lse_len(), n * HQ);
            for l in 0..LAYERS {
                let q = rng.vec(n * HQ * D);
                let k = rng.vec(n * HKV * D);
                let v = rng.vec(n * HKV * D);
                let mut out = vec![f32::NAN; n * HQ * D];
                let mut lse = vec![f32::NAN; n * HQ];
                step.attend_ex(l as u32, &q, Some((&k, &v)), &mut out, Some(&mut lse), None).unwrap();
                ios.push((q, k, v, out, lse));
            }
            step.finish().unwrap();
        }
        for (l, (q, k, v, out, lse)) in ios.iter().enumerate() {
            for t in 0..n {
                let w = HKV * D;
                keys[l].push((k[t * w..(t + 1) * w].to_vec(), v[t * w..(t + 1) * w].to_vec()));
            }
            for t in 0..n {
                let pos = start + t;
                for h in 0..HQ {
                    let kvh = h / (HQ / HKV);
                    let qr = &q[(t * HQ + h) * D..(t * HQ + h + 1) * D];
                    let s: Vec<f64> = (0..=pos)
                        .map(|p| {
                            let kp = &keys[l][p].0[kvh * D..(kvh + 1) * D];
                            scale * qr.iter().zip(kp).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    let want = m + z.ln();
                    let got = lse[t * HQ + h] as f64;
                    // fp32 scores over D products and a sum of pos + 1 exps.
                    let tol = 4.0 * (D + pos + 1) as f64 * EPS32 * (1.0 + want.abs());
                    assert!((got - want).abs() <= tol, "layer {} pos {} head {}: lse {} want {}", l, pos, h, got, want);
                    for j in 0..D {
                        let o: f64 = (0..=pos).map(|p| (s[p] - m).exp() / z * keys[l][p].1[kvh * D + j] as f64).sum();
                        let g = out[(t * HQ + h) * D + j] as f64;
                        assert!((g - o).abs() <= tol, "layer {} pos {} head {} out[{}]: {} want {}", l, pos, h, j, g, o);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Two ranks against one context
// ---------------------------------------------------------------------------

const CAP: usize = 4;
const SPLIT: i64 = 32; // a block boundary: rank 0 holds [0, 32), rank 1 the tail

struct World {
    one: Context,
    one_seq: Seq,
    rk: Vec<Context>,
    rk_seq: Vec<Seq>,
    bound: [i64; 3],
    owner: usize,
    len: i64,
    rng: Rng,
    steps: usize,
    /// (layer, head) selections in which rank 0 chose a candidate by score.
    rank0_candidates: usize,
}

impl World {
    fn new() -> World {
        let mut one = make_ctx();
        let one_seq = one.seq_create().unwrap();
        let mut rk = vec![make_ctx(), make_ctx()];
        let bound = [0, SPLIT, i64::MAX];
        let mut rk_seq = Vec::new();
        for r in 0..2 {
            let s = rk[r].seq_create().unwrap();
            rk[r].seq_set_span(s, bound[r], -1).unwrap();
            rk_seq.push(s);
        }
        World { one, one_seq, rk, rk_seq, bound, owner: 0, len: 0, rng: Rng(77), steps: 0, rank0_candidates: 0 }
    }

    /// One step of the whole sequence: `mode` (APPEND or DECODE) of n
    /// tokens on the single context and the owner; QUERY_DENSE (QUERY_SPARSE
    /// for a DECODE) on the other rank.
    fn step(&mut self, mode: Mode, n: usize) {
        let sparse = mode == Mode::Decode;
        let g = self.len;
        let o = self.owner;
        for r in 0..2 {
            let global = if r < o { g } else { -1 };
            self.rk[r].seq_set_span(self.rk_seq[r], self.bound[r], global).unwrap();
        }
        let mq = if sparse { Mode::QuerySparse } else { Mode::QueryDense };
        let nn = [n as u32];
        let mut one = self.one.step(&[self.one_seq], &[mode], &nn).unwrap();
        let mut ranks: Vec<Step<'_>> = self
            .rk
            .iter_mut()
            .zip(&self.rk_seq)
            .enumerate()
            .map(|(r, (c, s))| c.step(&[*s], &[if r == o { mode } else { mq }], &nn).unwrap())
            .collect();
        let (qn, kn, rows) = (n * HQ * D, n * HKV * D, n * HQ);
        assert_eq!(ranks[0].pairs_len(), HKV);
        for l in (0..LAYERS).rev() {
            let q = self.rng.vec(qn);
            let k = self.rng.vec(kn);
            let v = self.rng.vec(kn);
            let mut out1 = vec![f32::NAN; qn];
            let mut lse1 = vec![f32::NAN; rows];
            one.attend_ex(l as u32, &q, Some((&k, &v)), &mut out1, Some(&mut lse1), None).unwrap();

            let mut thr: Vec<(Vec<f32>, Vec<i32>)> = Vec::new();
            if sparse {
                // Phase 1 on every rank, then the all-gather.
                let (mut all_sc, mut all_bl, mut all_cn) = (Vec::new(), Vec::new(), Vec::new());
                for (r, st) in ranks.iter_mut().enumerate() {
                    let mut sc = vec![f32::NAN; st.list_len(CAP)];
                    let mut bl = vec![-7i32; st.list_len(CAP)];
                    let mut cn = vec![-7i32; st.pairs_len()];
                    st.block_scores(l as u32, &q, CAP, &mut sc, &mut bl, &mut cn).unwrap();
                    for x in 0..HKV {
                        assert!(cn[x] >= 0 && cn[x] as usize <= CAP, "rank {}: count {}", r, cn[x]);
                        for j in 0..cn[x] as usize {
                            let b = bl[x * CAP + j] as i64;
                            assert!(
                                b >= self.bound[r] / BS as i64 && b * (BS as i64) < self.bound[r + 1].min(g + 1),
                                "rank {} listed block {} outside its span",
                                r,
                                b
                            );
                        }
                    }
                    all_sc.extend_from_slice(&sc);
                    all_bl.extend_from_slice(&bl);
                    all_cn.extend_from_slice(&cn);
                }
                for st in ranks.iter_mut() {
                    let mut ts = vec![f32::NAN; st.pairs_len()];
                    let mut tb = vec![-7i32; st.pairs_len()];
                    st.thresholds(2, CAP, &all_sc, &all_bl, &all_cn, &mut ts, &mut tb).unwrap();
                    thr.push((ts, tb));
                }
                let bits = |t: &(Vec<f32>, Vec<i32>)| (t.0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), t.1.clone());
                assert_eq!(bits(&thr[0]), bits(&thr[1]), "the ranks computed different thresholds");
                assert!(thr[0].1.iter().all(|b| *b >= 0), "K = 2 > 0: a threshold block is chosen");
            }

            let mut parts = Vec::new();
            let mut plse = Vec::new();
            for (r, st) in ranks.iter_mut().enumerate() {
                let mut out = vec![f32::NAN; qn];
                let mut lse = vec![f32::NAN; rows];
                // The rank that only answers queries takes no k and v.
                let kv = if r == o { Some((&k[..], &v[..])) } else { None };
                let t = if sparse { Some((&thr[r].0[..], &thr[r].1[..])) } else { None };
                st.attend_ex(l as u32, &q, kv, &mut out, Some(&mut lse), t).unwrap();
                parts.extend_from_slice(&out);
                plse.extend_from_slice(&lse);
            }
            let mut outm = vec![f32::NAN; qn];
            let mut lsem = vec![f32::NAN; rows];
            ranks[0].merge_states(2, rows, &parts, &plse, &mut outm, Some(&mut lsem)).unwrap();
            let mut outh = vec![f32::NAN; qn];
            let mut lseh = vec![f32::NAN; rows];
            merge_states(2, rows, D, &parts, &plse, &mut outh, Some(&mut lseh)).unwrap();
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&outm), bits(&outh), "context and host merges differ");
            assert_eq!(bits(&lsem), bits(&lseh), "context and host merges differ");

            // Merged against one context: both are fp32 computations of the
            // same attention; scores over D products, exps and sums over at
            // most G + n keys, the merge's few more roundings (|v| < 1,
            // |scale q.k| <= scale D).
            let keys = (g + n as i64) as f64;
            let smag = 0.25 * D as f64;
            let tol = 4.0 * (D as f64 + keys + 8.0) * EPS32 * (1.0 + smag);
            for i in 0..rows {
                let (a, b) = (lsem[i] as f64, lse1[i] as f64);
                assert!(a.is_finite() && (a - b).abs() <= tol * (1.0 + b.abs()), "step {} layer {} row {}: lse {} one {}", self.steps, l, i, a, b);
            }
            for i in 0..qn {
                let (a, b) = (outm[i] as f64, out1[i] as f64);
                assert!((a - b).abs() <= tol, "step {} layer {} element {}: merged {} one {}", self.steps, l, i, a, b);
            }
        }
        one.finish().unwrap();
        for st in ranks {
            st.finish().unwrap();
        }
        self.len += n as i64;
        self.steps += 1;

        // Lengths: rank 0 [0, 32) once full, the owner the rest.
        let want0 = self.len.min(SPLIT);
        assert_eq!(self.rk[0].seq_length(self.rk_seq[0]).unwrap(), want0);
        assert_eq!(self.rk[1].seq_length(self.rk_seq[1]).unwrap(), self.len - want0);
        assert_eq!(self.one.seq_length(self.one_seq).unwrap(), self.len);
        if sparse {
            // Over both ranks, exactly the single context's selection.
            for l in 0..LAYERS as u32 {
                for h in 0..HKV as u32 {
                    let one = self.one.selected_blocks(self.one_seq, l, h).unwrap();
                    let mut both = Vec::new();
                    for r in 0..2 {
                        let s = self.rk[r].selected_blocks(self.rk_seq[r], l, h).unwrap();
                        for b in &s {
                            let b = *b as i64 * BS as i64;
                            assert!(b >= self.bound[r] && b < self.bound[r + 1], "rank {} selected a block outside its span", r);
                        }
                        if r == 0 && s.iter().any(|b| *b > 0) {
                            self.rank0_candidates += 1; // a block other than the sink
                        }
                        both.extend(s);
                    }
                    both.sort_unstable();
                    let mut one_sorted = one.clone();
                    one_sorted.sort_unstable();
                    assert_eq!(one_sorted.len(), 4, "the budget is 4 blocks");
                    assert_eq!(both, one_sorted, "step {} layer {} head {}", self.steps, l, h);
                }
            }
        }
    }
}

#[test]
fn two_rank_decode_matches_one_context() {
    let mut w = World::new();
    // Prefill: rank 0 owns until its span is full (chunks that never cross
    // the boundary), then rank 1 owns the tail.
    w.step(Mode::Append, 20);
    w.step(Mode::Append, 12);
    w.owner = 1;
    w.step(Mode::Append, 13);
    w.step(Mode::Append, 8);
    assert_eq!(w.len, 53);
    // Sparse decodes with the two-phase selection (M = 7, then 8).
    for _ in 0..5 {
        w.step(Mode::Decode, 1);
    }
    // The thresholds mattered: rank 0 (no forced block but the sink)
    // contributed candidates chosen by score.
    assert!(w.rank0_candidates > 0, "rank 0 never held a chosen candidate");
    assert_eq!(w.rk[0].seq_pending(w.rk_seq[0]).unwrap(), 0);
    assert_eq!(w.rk[1].seq_pending(w.rk_seq[1]).unwrap(), w.one.seq_pending(w.one_seq).unwrap());
}

// ---------------------------------------------------------------------------
// Length checks
// ---------------------------------------------------------------------------

fn refused<T: std::fmt::Debug>(r: resa::Result<T>, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.status(), Status::InvalidArgument, "{}: {}", what, e);
    assert!(e.message().contains(what), "{}: message {:?}", what, e.message());
}

#[test]
fn length_checks() {
    let d = 4;
    let parts = vec![0.0f32; 2 * 3 * d];
    let plse = vec![0.0f32; 2 * 3];
    let mut out = vec![0.0f32; 3 * d];
    let mut lse = vec![0.0f32; 3];
    refused(merge_states(2, 3, d, &parts[1..], &plse, &mut out, None), "parts_out");
    refused(merge_states(2, 3, d, &parts, &plse[1..], &mut out, None), "parts_lse");
    refused(merge_states(2, 3, d, &parts, &plse, &mut out[1..], None), "out");
    refused(merge_states(2, 3, d, &parts, &plse, &mut out, Some(&mut lse[1..])), "lse");
    refused(merge_states(2, 1 << 62, d, &parts, &plse, &mut out, None), "overflows");
    // Lengths agree but C refuses: n_parts 0 and head_dim 0.
    let e = merge_states::<f32>(0, 3, d, &[], &[], &mut out, None).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    let e = merge_states::<f32>(2, 3, 0, &[], &plse, &mut [], None).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);

    let mut ctx = make_ctx();
    let seq = ctx.seq_create().unwrap();
    // The context's merge takes its IO_DTYPE and HEAD_DIM.
    let pb = vec![Bf16(0); 2 * 3 * D];
    let mut ob = vec![Bf16(0); 3 * D];
    refused(ctx.merge_states(2, 3, &pb, &plse, &mut ob, None), "IO_DTYPE");
    let parts = vec![0.0f32; 2 * 3 * D];
    let mut out = vec![0.0f32; 3 * D];
    refused(ctx.merge_states(2, 3, &parts, &plse, &mut out[1..], None), "out");
    ctx.merge_states(2, 3, &parts, &plse, &mut out, Some(&mut lse)).unwrap();

    // A prompt of 48 tokens, then a decode (M = 7, K = 2).
    let mut rng = Rng(3);
    {
        let n = 48;
        let mut step = ctx.step(&[seq], &[Mode::Append], &[n]).unwrap();
        let (q, k, v) = (rng.vec(n as usize * HQ * D), rng.vec(n as usize * HKV * D), rng.vec(n as usize * HKV * D));
        let mut out = vec![0.0f32; q.len()];
        // k and v may be None only on a step of QUERY entries.
        refused(step.attend_ex(0, &q, None, &mut out, None, None), "QUERY");
        for l in 0..LAYERS as u32 {
            step.attend_ex(l, &q, Some((&k, &v)), &mut out, None, None).unwrap();
        }
        step.finish().unwrap();
    }
    let mut step = ctx.step(&[seq], &[Mode::Decode], &[1]).unwrap();
    assert_eq!((step.entries(), step.pairs_len(), step.list_len(CAP)), (1, HKV, HKV * CAP));
    let (q, k, v) = (rng.vec(HQ * D), rng.vec(HKV * D), rng.vec(HKV * D));
    let mut out = vec![f32::NAN; HQ * D];
    let mut lse = vec![f32::NAN; HQ];
    let (mut sc, mut bl, mut cn) = (vec![0.0f32; HKV * CAP], vec![0i32; HKV * CAP], vec![0i32; HKV]);
    let (mut ts, mut tb) = (vec![0.0f32; HKV], vec![0i32; HKV]);

    refused(step.block_scores(0, &q[1..], CAP, &mut sc, &mut bl, &mut cn), "q");
    refused(step.block_scores(0, &q, CAP, &mut sc[1..], &mut bl, &mut cn), "scores");
    refused(step.block_scores(0, &q, CAP, &mut sc, &mut bl[1..], &mut cn), "blocks");
    refused(step.block_scores(0, &q, CAP, &mut sc, &mut bl, &mut cn[1..]), "counts");
    refused(step.block_scores(0, &q, CAP + 1, &mut sc, &mut bl, &mut cn), "scores");
    refused(step.block_scores(LAYERS as u32, &q, CAP, &mut sc, &mut bl, &mut cn), "layer");
    let qb: Vec<Bf16> = q.iter().map(|x| Bf16::from_f32(*x)).collect();
    refused(step.block_scores(0, &qb, CAP, &mut sc, &mut bl, &mut cn), "IO_DTYPE");
    refused(step.thresholds(1, CAP, &sc[1..], &bl, &cn, &mut ts, &mut tb), "scores");
    refused(step.thresholds(2, CAP, &sc, &bl, &cn, &mut ts, &mut tb), "scores"); // sized for 1 rank
    refused(step.thresholds(1, CAP, &sc, &bl[1..], &cn, &mut ts, &mut tb), "blocks");
    refused(step.thresholds(1, CAP, &sc, &bl, &cn[1..], &mut ts, &mut tb), "counts");
    refused(step.thresholds(1, CAP, &sc, &bl, &cn, &mut ts[1..], &mut tb), "threshold_scores");
    refused(step.thresholds(1, CAP, &sc, &bl, &cn, &mut ts, &mut tb[1..]), "threshold_blocks");
    refused(step.attend_ex(0, &q, Some((&k, &v)), &mut out, Some(&mut lse[1..]), None), "lse");
    refused(step.attend_ex(0, &q, Some((&k[1..], &v)), &mut out, None, None), "k");
    refused(step.attend_ex(0, &q, Some((&k, &v[1..])), &mut out, None, None), "v");
    refused(step.attend_ex(0, &q, Some((&k, &v)), &mut out[1..], None, None), "out");
    refused(step.attend_ex(0, &q, Some((&k, &v)), &mut out, None, Some((&ts[1..], &tb))), "threshold_scores");
    refused(step.attend_ex(0, &q, Some((&k, &v)), &mut out, None, Some((&ts, &tb[1..]))), "threshold_blocks");
    refused(step.attend_ex(0, &q, None, &mut out, None, None), "QUERY");
    // None of them reached C: no error text, nothing written.
    assert_eq!(step.context().last_error(), "");
    assert!(out.iter().all(|x| x.is_nan()) && lse.iter().all(|x| x.is_nan()));

    // The library's own check: capacity below K = 2, with its message.
    let e = step.block_scores(0, &q, 1, &mut sc[..HKV], &mut bl[..HKV], &mut cn).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(!e.message().is_empty());

    // The two-phase selection of one rank is the plain selection.
    step.block_scores(0, &q, CAP, &mut sc, &mut bl, &mut cn).unwrap();
    assert!(cn.iter().all(|c| *c == 2));
    step.thresholds(1, CAP, &sc, &bl, &cn, &mut ts, &mut tb).unwrap();
    for l in 0..LAYERS as u32 {
        step.attend_ex(l, &q, Some((&k, &v)), &mut out, Some(&mut lse), Some((&ts, &tb))).unwrap();
    }
    assert!(out.iter().all(|x| x.is_finite()) && lse.iter().all(|x| x.is_finite()));
    step.finish().unwrap();
    assert_eq!(ctx.seq_length(seq).unwrap(), 49);
}
