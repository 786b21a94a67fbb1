//! The first example of docs/rust.md: a 5-token prompt on the CPU backend.
use resa::{Backend, Context, Dtype, F64Param, IntParam, Mode, Shape};

fn main() -> Result<(), resa::Error> {
    let shape = Shape { layers: 2, q_heads: 8, kv_heads: 2, head_dim: 64 };
    let mut ctx = Context::new(Backend::Cpu, shape, Dtype::F32)?;
    ctx.set_param(IntParam::MaxTokens, 4096)?; // i64 parameter
    ctx.set_param(F64Param::SelectFraction, 0.1)?; // f64 parameter
    let seq = ctx.seq_create()?; // locks the shape

    // A 5-token prompt.
    let t = 5;
    let q = vec![0.0f32; t * 8 * 64];
    let (k, v) = (vec![0.0f32; t * 2 * 64], vec![0.0f32; t * 2 * 64]);
    let mut out = vec![0.0f32; t * 8 * 64];
    let mut step = ctx.step(&[seq], &[Mode::Append], &[t as u32])?;
    for layer in 0..2 {
        // ... compute this layer's q, k, v (k post-RoPE) ...
        step.attend(layer, &q, &k, &v, &mut out)?;
        // ... use out ...
    }
    step.finish()?; // commits: length 5
    assert_eq!(ctx.seq_length(seq)?, 5);
    println!("libresa {}: sequence {} has {} tokens", resa::version_string(), seq.id(), ctx.seq_length(seq)?);
    Ok(())
}
