//! AdamW and global-norm gradient clipping, as `torch.optim.AdamW` and
//! `torch.nn.utils.clip_grad_norm_` compute them, on f32 host vectors.
//!
//! Place in the data flow: the loop accumulates each step's gradients on the device (one
//! buffer per trainable parameter, in `Model::trainable_params` order), reads back one
//! squared norm per tensor for the global norm, and hands the gradients to [`DeviceAdamW`]
//! with the clipping factor and the step's learning rate per parameter: the update runs on
//! the device (kernels/adamw.cu), whose CPU reference (`backend/cpu/adamw.rs`) is what the
//! host [`AdamW`] runs too, checked against torch below. The moments are f32, as torch keeps
//! them for f32 parameters, so a checkpoint stores and restores them bit for bit.
//!
//! One update, in torch's order (decoupled weight decay first, then the Adam step):
//! ```text
//! p ← p · (1 − lr·wd)
//! m ← m + (1 − β1)·(g − m)            v ← β2·v + (1 − β2)·g²
//! p ← p − lr / (1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
//! ```

use crate::backend::{AdamWStep, Backend, MemoryUse};

/// Hyper-parameters shared by every parameter (the LR comes per group with each step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch's defaults except weight decay (torch: 0.01 too).
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW state for a list of parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates done so far (torch's `state["step"]`).
    pub step: u64,
    /// First moments, one per parameter.
    pub m: Vec<Vec<f32>>,
    /// Second moments, one per parameter.
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    /// Zero state for parameters of the given lengths.
    pub fn new(config: AdamWConfig, lengths: &[usize]) -> AdamW {
        AdamW {
            config,
            step: 0,
            m: lengths.iter().map(|&n| vec![0.0; n]).collect(),
            v: lengths.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update of every parameter; `lr[i]` is parameter `i`'s learning rate this step.
    pub fn update(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: &[f64]) {
        assert!(
            params.len() == self.m.len() && grads.len() == params.len() && lr.len() == params.len()
        );
        self.step += 1;
        for (i, ((p, g), (m, v))) in params
            .iter_mut()
            .zip(grads)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .enumerate()
        {
            assert_eq!(p.len(), g.len(), "parameter {i}: gradient length");
            let step = self.config.scalars(self.step, lr[i], 1.0);
            crate::backend::cpu::adamw::adamw(p, g, m, v, &step);
        }
    }
}

impl AdamWConfig {
    /// The f32 scalars of update `t` (1-based) at learning rate `lr`, gradients multiplied by
    /// `grad_scale`. torch evaluates these in Python floats (f64), the tensor ops in f32.
    pub fn scalars(&self, t: u64, lr: f64, grad_scale: f32) -> AdamWStep {
        let t = t as i32;
        AdamWStep {
            grad_scale,
            decay: (1.0 - lr * self.weight_decay) as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            bias2_sqrt: (1.0 - self.beta2.powi(t)).sqrt() as f32,
            eps: self.eps as f32,
            step_size: (lr / (1.0 - self.beta1.powi(t))) as f32,
        }
    }
}

/// AdamW with its moments on the device, beside the parameters (the model's own buffers) it
/// updates in place: the training loop's optimizer. A checkpoint downloads it into an
/// [`AdamW`] and a resumed run uploads one, bit for bit.
pub struct DeviceAdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Updates done so far.
    pub step: u64,
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
}

impl<B: Backend> DeviceAdamW<B> {
    /// The device copy of `host`.
    pub fn upload(backend: &B, host: &AdamW) -> DeviceAdamW<B> {
        let _adapters = backend.memory_scope(MemoryUse::Adapters);
        DeviceAdamW {
            config: host.config,
            step: host.step,
            m: host.m.iter().map(|m| backend.upload(m)).collect(),
            v: host.v.iter().map(|v| backend.upload(v)).collect(),
        }
    }

    /// The host copy (for a checkpoint).
    pub fn download(&self, backend: &B) -> AdamW {
        AdamW {
            config: self.config,
            step: self.step,
            m: self.m.iter().map(|m| backend.download(m)).collect(),
            v: self.v.iter().map(|v| backend.download(v)).collect(),
        }
    }

    /// One update of every parameter from `grads[i] · grad_scale`, `lr[i]` parameter `i`'s
    /// learning rate this step.
    pub fn update(
        &mut self,
        backend: &B,
        params: Vec<&mut B::Buf>,
        grads: &[B::Buf],
        lr: &[f64],
        grad_scale: f32,
    ) {
        assert!(
            params.len() == self.m.len() && grads.len() == params.len() && lr.len() == params.len()
        );
        self.step += 1;
        for (i, (p, (m, v))) in params
            .into_iter()
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
            .enumerate()
        {
            let step = self.config.scalars(self.step, lr[i], grad_scale);
            backend.adamw(p, &grads[i], m, v, &step);
        }
    }
}

/// torch's `clip_grad_norm_` factor for a global norm `norm`: `max_norm / (norm + 1e-6)` when
/// that is below one, else 1 (`max_norm <= 0` disables clipping).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    let factor = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && factor < 1.0 {
        factor
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: AdamWConfig = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };

    #[test]
    fn first_step_is_decay_plus_lr_times_sign() {
        // Step 1: m̂ = g and v̂ = g², so the Adam step is lr · g / (|g| + ε): lr · sign(g).
        let mut p = vec![vec![0.5f32, -1.0, 2.0, 0.0]];
        let g = vec![vec![0.1f32, -0.2, 0.0, 3.0]];
        let mut adam = AdamW::new(CONFIG, &[4]);
        adam.update(&mut p, &g, &[0.01]);
        let want = [0.5 * 0.999 - 0.01, -0.999 + 0.01, 2.0 * 0.999, -0.01];
        for (got, want) in p[0].iter().zip(want) {
            assert!((got - want).abs() < 1e-7, "{got} vs {want}");
        }
        assert_eq!(adam.step, 1);
        assert!((adam.m[0][3] - 0.3).abs() < 1e-7 && (adam.v[0][3] - 0.009).abs() < 1e-9);
    }

    #[test]
    fn three_steps_match_torch_adamw() {
        // torch 2.x, AdamW(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False).
        let grads = [
            [0.1f32, -0.2, 0.0, 3.0],
            [-0.3, 0.05, 1e-3, 2.0],
            [0.2, 0.2, -0.5, -1.0],
        ];
        let torch = [
            [
                0.4895000159740448,
                -0.9890000224113464,
                1.9980000257492065,
                -0.009999999776482582,
            ],
            [
                0.4939524233341217,
                -0.9833163619041443,
                1.9885607957839966,
                -0.019693521782755852,
            ],
            [
                0.493270605802536,
                -0.9841799736022949,
                1.9929488897323608,
                -0.02519274689257145,
            ],
        ];
        let mut p = vec![vec![0.5f32, -1.0, 2.0, 0.0]];
        let mut adam = AdamW::new(CONFIG, &[4]);
        for (g, want) in grads.iter().zip(torch) {
            adam.update(&mut p, &[g.to_vec()], &[0.01]);
            for (&got, want) in p[0].iter().zip(want) {
                assert!(
                    (got as f64 - want).abs() <= 2e-7 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
        let torch_v = [
            0.00013989002036396414,
            8.241754403570667e-05,
            0.00025000100140459836,
            0.01397800911217928,
        ];
        for (&got, want) in adam.v[0].iter().zip(torch_v) {
            assert!((got as f64 - want).abs() <= 1e-6 * want, "{got} vs {want}");
        }
    }

    #[test]
    fn each_parameter_uses_its_own_learning_rate() {
        let mut p = vec![vec![1.0f32], vec![1.0f32]];
        let g = vec![vec![1.0f32], vec![1.0f32]];
        let mut adam = AdamW::new(
            AdamWConfig {
                weight_decay: 0.0,
                ..CONFIG
            },
            &[1, 1],
        );
        adam.update(&mut p, &g, &[0.1, 0.01]);
        assert!(
            (p[0][0] - 0.9).abs() < 1e-6 && (p[1][0] - 0.99).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_leaves_smaller_norms() {
        // The norm the training loop takes: the root of the per-tensor squared norms.
        let g = [vec![3.0f32], vec![4.0f32]];
        let norm = crate::backend::cpu::adamw::squared_norms(&g.iter().collect::<Vec<_>>())
            .iter()
            .sum::<f64>()
            .sqrt();
        assert_eq!(norm, 5.0);
        assert!((norm * clip_factor(norm, 1.0) - 1.0).abs() < 1e-6);
        assert_eq!(clip_factor(0.5, 1.0), 1.0, "below the limit: untouched");
        assert_eq!(clip_factor(30.0, 0.0), 1.0, "max_norm 0 disables clipping");
    }
}
