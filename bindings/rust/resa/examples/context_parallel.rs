//! The context-parallelism example of docs/rust.md (the same code): one
//! sequence split over two CPU contexts ("ranks") at a block boundary, the
//! last rank (the owner) holding the tail; each step's partial states merged.
use resa::{merge_states, Backend, Context, Dtype, Mode, Seq, Shape};

const HQ: usize = 2;
const HKV: usize = 1;
const D: usize = 8;
const SPLIT: i64 = 32; // rank 0 holds [0, 32), rank 1 [32, ...): a multiple of BLOCK_SIZE
const CAP: usize = 16; // phase-1 capacity: at least every entry's K (here at most M)

/// One step of the whole sequence (length g): the owner runs `mode`, the
/// other rank answers the same queries; returns the merged output.
fn cp_step(ranks: &mut [Context], seqs: &[Seq], owner: usize, g: i64, mode: Mode,
           qkv: (&[f32], &[f32], &[f32])) -> resa::Result<Vec<f32>> {
    let (q, k, v) = qkv;
    let n = (q.len() / (HQ * D)) as u32;
    let query = if mode == Mode::Decode { Mode::QuerySparse } else { Mode::QueryDense };
    let n_ranks = ranks.len();
    let mut steps = Vec::new();
    for (r, ctx) in ranks.iter_mut().enumerate() {
        // Ranks before the owner answer queries at g; the owner holds the tail.
        ctx.seq_set_span(seqs[r], SPLIT * r as i64, if r < owner { g } else { -1 })?;
        let m = if r == owner { mode } else { query };
        steps.push(ctx.step(&[seqs[r]], &[m], &[n])?);
    }
    // Sparse rows: phase 1 everywhere, the all-gather, the thresholds.
    let mut thr: Option<(Vec<f32>, Vec<i32>)> = None;
    if mode == Mode::Decode {
        let (mut sc, mut bl, mut cn) = (Vec::new(), Vec::new(), Vec::new());
        for st in steps.iter_mut() {
            let mut s = vec![0.0f32; st.list_len(CAP)];
            let mut b = vec![0i32; st.list_len(CAP)];
            let mut c = vec![0i32; st.pairs_len()];
            st.block_scores(0, q, CAP, &mut s, &mut b, &mut c)?;
            sc.extend(s);
            bl.extend(b);
            cn.extend(c);
        }
        let mut ts = vec![0.0f32; steps[0].pairs_len()];
        let mut tb = vec![0i32; steps[0].pairs_len()];
        steps[0].thresholds(n_ranks, CAP, &sc, &bl, &cn, &mut ts, &mut tb)?;
        thr = Some((ts, tb));
    }
    // Every rank's partial output and lse, one rank after another.
    let rows = steps[0].lse_len();
    let (mut parts, mut lses) = (Vec::new(), Vec::new());
    for (r, st) in steps.iter_mut().enumerate() {
        let mut out = vec![0.0f32; st.q_len()];
        let mut lse = vec![0.0f32; rows];
        let kv = if r == owner { Some((k, v)) } else { None }; // QUERY ranks take no k, v
        let t = thr.as_ref().map(|(s, b)| (&s[..], &b[..]));
        st.attend_ex(0, q, kv, &mut out, Some(&mut lse), t)?;
        parts.extend(out);
        lses.extend(lse);
    }
    for st in steps {
        st.finish()?;
    }
    let mut out = vec![0.0f32; q.len()];
    merge_states(n_ranks, rows, D, &parts, &lses, &mut out, None)?;
    Ok(out)
}

fn main() -> resa::Result<()> {
    let shape = Shape { layers: 1, q_heads: HQ as u32, kv_heads: HKV as u32, head_dim: D as u32 };
    let mut ranks = vec![Context::new(Backend::Cpu, shape, Dtype::F32)?,
                         Context::new(Backend::Cpu, shape, Dtype::F32)?];
    let seqs = vec![ranks[0].seq_create()?, ranks[1].seq_create()?];
    let x = |n: usize, heads: usize| -> Vec<f32> {
        (0..n * heads * D).map(|i| (i * 7919 % 113) as f32 / 113.0 - 0.5).collect()
    };
    // Prefill: 32 tokens owned by rank 0, then 8 owned by rank 1.
    cp_step(&mut ranks, &seqs, 0, 0, Mode::Append, (&x(32, HQ), &x(32, HKV), &x(32, HKV)))?;
    cp_step(&mut ranks, &seqs, 1, 32, Mode::Append, (&x(8, HQ), &x(8, HKV), &x(8, HKV)))?;
    // A sparse decode at position 40, the selection global over both ranks.
    let out = cp_step(&mut ranks, &seqs, 1, 40, Mode::Decode, (&x(1, HQ), &x(1, HKV), &x(1, HKV)))?;
    assert!(out.iter().all(|v| v.is_finite()));
    assert_eq!(ranks[1].seq_length(seqs[1])?, 9);
    Ok(())
}
