//! Rotary position embedding, rotate_half layout (HF's `apply_rotary_pos_emb`): feature `i` of
//! the first half of a head pairs with feature `i + d/2`, both turn by angle `pos · inv_freq[i]`:
//! `(x1, x2) -> (x1·cos - x2·sin, x2·cos + x1·sin)`. Not the interleaved (2i, 2i+1) pairing of
//! the original paper and of GGUF files.

use rayon::prelude::*;

/// Rotates every head of every row of `x` (`[tokens, heads · head_dim]`) in place.
pub fn rope_forward(
    x: &mut [f32],
    positions: &[u32],
    inv_freq: &[f32],
    heads: usize,
    head_dim: usize,
) {
    rotate(x, positions, inv_freq, heads, head_dim, 1.0);
}

/// Backward of [`rope_forward`], in place on the gradient: a rotation is orthogonal, so the
/// gradient turns back by the same angle (`sin -> -sin`). Any base or scaling is already in
/// `inv_freq`.
pub fn rope_backward(
    dx: &mut [f32],
    positions: &[u32],
    inv_freq: &[f32],
    heads: usize,
    head_dim: usize,
) {
    rotate(dx, positions, inv_freq, heads, head_dim, -1.0);
}

/// Turns each feature pair by `direction · pos · inv_freq[i]` (`direction` is ±1).
fn rotate(
    x: &mut [f32],
    positions: &[u32],
    inv_freq: &[f32],
    heads: usize,
    head_dim: usize,
    direction: f32,
) {
    let half = head_dim / 2;
    assert_eq!(
        inv_freq.len(),
        half,
        "rope: inv_freq must have head_dim / 2 entries"
    );
    assert_eq!(
        x.len(),
        positions.len() * heads * head_dim,
        "rope: x is not [tokens, heads * head_dim]"
    );
    x.par_chunks_mut(heads * head_dim)
        .zip(positions)
        .for_each(|(row, &pos)| {
            // Angles in f32, as transformers computes them (position.float() * inv_freq).
            let (sin, cos): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|&f| {
                    let (sin, cos) = (pos as f32 * f).sin_cos();
                    (direction * sin, cos)
                })
                .unzip();
            for head in row.chunks_mut(head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * cos[i] - b * sin[i];
                    x2[i] = b * cos[i] + a * sin[i];
                }
            }
        });
}
