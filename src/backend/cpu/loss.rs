//! Softmax cross-entropy of head logits, fused with its gradient (the loss is the last op of
//! the forward and the first of the backward, so both come from one pass over the logits).

/// Cross-entropy of each row of `logits` (`[rows, classes]`) against `labels`, with torch's
/// label smoothing `eps` (target `(1 - eps)·onehot(y) + eps / classes`):
/// `loss = logsumexp(z) - (1 - eps)·z_y - eps·mean(z)`, in f64. Returns each row's loss and
/// writes `dlogits = weight · (softmax(z) - target)`; a row without label has loss 0 and
/// gradient 0.
pub fn softmax_cross_entropy(
    dlogits: &mut [f32],
    logits: &[f32],
    labels: &[Option<u32>],
    classes: usize,
    smoothing: f32,
    weight: f32,
) -> Vec<f32> {
    assert!(
        logits.len() == labels.len() * classes && dlogits.len() == logits.len(),
        "cross-entropy: logits / dlogits are not [{}, {classes}]",
        labels.len()
    );
    let eps = smoothing as f64;
    logits
        .chunks(classes)
        .zip(dlogits.chunks_mut(classes))
        .zip(labels)
        .map(|((z, dz), label)| {
            let Some(y) = label else {
                dz.fill(0.0);
                return 0.0;
            };
            let y = *y as usize;
            assert!(y < classes, "cross-entropy: label {y} of {classes} classes");
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let total: f64 = z.iter().map(|&v| (v as f64 - max).exp()).sum();
            let log_sum = total.ln() + max;
            let mean = z.iter().map(|&v| v as f64).sum::<f64>() / classes as f64;
            for (c, (d, &v)) in dz.iter_mut().zip(z).enumerate() {
                let target = eps / classes as f64 + if c == y { 1.0 - eps } else { 0.0 };
                *d = (weight as f64 * ((v as f64 - log_sum).exp() - target)) as f32;
            }
            (log_sum - (1.0 - eps) * z[y] as f64 - eps * mean) as f32
        })
        .collect()
}
