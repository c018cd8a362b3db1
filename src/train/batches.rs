//! Training batches: which examples go together, in which order, reproducible from
//! (seed, epoch) alone.
//!
//! Place in the data flow: token ids (one length per training example; with swap pairs an
//! example is a battle plus its A/B swap, so both views land in the same batch) -> here ->
//! optimizer steps of `grad_accum` packed batches each.
//!
//! Each epoch: shuffle the examples with a generator seeded by (seed, epoch); cut the
//! shuffled order into chunks of about [`CHUNK_BATCHES`] batches' worth of tokens; sort each
//! chunk by length (longest first) and pack it first-fit under the token budget, so batches
//! are nearly full (fewer micro-batches per epoch) and long sequences share batches with
//! other long ones; finally shuffle the batches of the epoch so long and short batches mix.
//! Nothing depends on process state, which is what makes `--resume` exact.

use crate::rng::Rng;

/// A chunk holds about this many batches' worth of tokens: large enough to find similar
/// lengths, small enough that the order stays random at the scale of an epoch.
pub const CHUNK_BATCHES: usize = 32;

/// A seed for stream `tag` number `index` of a run seeded with `seed` (data order per epoch,
/// dropout per micro-batch, initialisations): independent streams from one user seed.
pub fn derive_seed(seed: u64, tag: &str, index: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in tag.as_bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let mut rng = Rng::new(seed ^ h.rotate_left(17) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
    rng.next_u64()
}

/// The batches of one epoch: indices into `lengths`, each batch's total at most
/// `batch_tokens` unless a single example is longer (it then forms a batch alone).
pub fn epoch_batches(
    lengths: &[usize],
    batch_tokens: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = Rng::new(derive_seed(seed, "data-order", epoch as u64));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut order);
    let chunk_tokens = batch_tokens.saturating_mul(CHUNK_BATCHES);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let mut end = start;
        let mut tokens = 0;
        while end < order.len() && (end == start || tokens < chunk_tokens) {
            tokens += lengths[order[end]];
            end += 1;
        }
        let chunk = &mut order[start..end];
        // Stable: equal lengths keep their shuffled order.
        chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        // First-fit decreasing: each example joins the first batch of the chunk with room.
        let mut used: Vec<usize> = Vec::new();
        let first = batches.len();
        for &i in chunk.iter() {
            match used.iter().position(|&u| u + lengths[i] <= batch_tokens) {
                Some(b) => {
                    used[b] += lengths[i];
                    batches[first + b].push(i);
                }
                None => {
                    used.push(lengths[i]);
                    batches.push(vec![i]);
                }
            }
        }
        start = end;
    }
    rng.shuffle(&mut batches);
    batches
}

/// Where an optimizer step's batches are: epoch, and the step's index within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub epoch: usize,
    pub step_in_epoch: usize,
}

/// The whole run's data order: every epoch's batches, grouped `grad_accum` to a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub epochs: Vec<Vec<Vec<usize>>>,
    pub grad_accum: usize,
    /// Optimizer steps the run makes (all epochs, capped by `--max-steps`).
    pub total_steps: usize,
}

impl Plan {
    /// Plans `epochs` epochs of `lengths` (at most `max_steps` steps if given).
    pub fn new(
        lengths: &[usize],
        batch_tokens: usize,
        grad_accum: usize,
        epochs: usize,
        max_steps: Option<usize>,
        seed: u64,
    ) -> Plan {
        assert!(grad_accum >= 1, "grad_accum must be at least 1");
        let epochs: Vec<Vec<Vec<usize>>> = (0..epochs)
            .map(|e| epoch_batches(lengths, batch_tokens, seed, e))
            .collect();
        let all: usize = epochs.iter().map(|b| b.len().div_ceil(grad_accum)).sum();
        Plan {
            epochs,
            grad_accum,
            total_steps: max_steps.map_or(all, |m| m.min(all)),
        }
    }

    /// Steps in epoch `e` (the last may have fewer than `grad_accum` batches).
    pub fn steps_in_epoch(&self, e: usize) -> usize {
        self.epochs[e].len().div_ceil(self.grad_accum)
    }

    /// The position of optimizer step `step` (1-based).
    pub fn position(&self, step: usize) -> Position {
        assert!(
            step >= 1 && step <= self.total_steps,
            "step {step} outside 1..={}",
            self.total_steps
        );
        let mut k = step - 1;
        for e in 0..self.epochs.len() {
            let n = self.steps_in_epoch(e);
            if k < n {
                return Position {
                    epoch: e,
                    step_in_epoch: k,
                };
            }
            k -= n;
        }
        unreachable!("total_steps never exceeds the planned steps")
    }

    /// The batches of optimizer step `step` (1-based).
    pub fn step_batches(&self, step: usize) -> &[Vec<usize>] {
        let p = self.position(step);
        let batches = &self.epochs[p.epoch];
        let start = p.step_in_epoch * self.grad_accum;
        &batches[start..(start + self.grad_accum).min(batches.len())]
    }

    /// Epochs done after step `step`, as a fraction (for logs).
    pub fn epoch_progress(&self, step: usize) -> f64 {
        let p = self.position(step);
        p.epoch as f64 + (p.step_in_epoch + 1) as f64 / self.steps_in_epoch(p.epoch) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths(n: usize, seed: u64) -> Vec<usize> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| 5 + rng.below(300)).collect()
    }

    #[test]
    fn every_example_appears_once_per_epoch_within_budget() {
        let lengths = lengths(500, 1);
        for epoch in 0..3 {
            let batches = epoch_batches(&lengths, 1000, 7, epoch);
            let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
            seen.sort();
            assert_eq!(seen, (0..500).collect::<Vec<_>>());
            for b in &batches {
                assert!(b.iter().map(|&i| lengths[i]).sum::<usize>() <= 1000);
            }
        }
    }

    #[test]
    fn oversized_example_gets_a_batch_of_its_own() {
        let batches = epoch_batches(&[10, 5000, 20], 100, 0, 0);
        assert!(batches.contains(&vec![1]), "{batches:?}");
        assert_eq!(batches.len(), 2);
    }

    #[test]
    fn order_depends_on_seed_and_epoch_only() {
        let lengths = lengths(300, 2);
        assert_eq!(
            epoch_batches(&lengths, 800, 3, 1),
            epoch_batches(&lengths, 800, 3, 1)
        );
        assert_ne!(
            epoch_batches(&lengths, 800, 3, 1),
            epoch_batches(&lengths, 800, 3, 2)
        );
        assert_ne!(
            epoch_batches(&lengths, 800, 3, 1),
            epoch_batches(&lengths, 800, 4, 1)
        );
    }

    #[test]
    fn length_sorting_packs_tighter_than_a_random_order() {
        // Catches packing in shuffled order (no bucketing): far more, emptier batches.
        let lengths = lengths(2000, 5);
        let budget = 1024;
        let bucketed = epoch_batches(&lengths, budget, 0, 0).len();
        let mut unsorted = 0;
        let mut used = budget + 1;
        for &l in &lengths {
            if used + l > budget {
                unsorted += 1;
                used = 0;
            }
            used += l;
        }
        let total: usize = lengths.iter().sum();
        let ideal = total.div_ceil(budget);
        assert!(
            bucketed < unsorted,
            "bucketed {bucketed}, unsorted {unsorted}"
        );
        assert!(
            (bucketed as f64) < ideal as f64 * 1.1,
            "bucketed {bucketed}, ideal {ideal}"
        );
    }

    #[test]
    fn plan_positions_cover_epochs_in_order_with_accumulation() {
        let lengths = lengths(100, 3);
        let plan = Plan::new(&lengths, 400, 3, 2, None, 9);
        let per_epoch: Vec<usize> = (0..2).map(|e| plan.steps_in_epoch(e)).collect();
        assert_eq!(plan.total_steps, per_epoch.iter().sum::<usize>());
        let mut seen = [Vec::new(), Vec::new()];
        for step in 1..=plan.total_steps {
            let p = plan.position(step);
            seen[p.epoch].extend(plan.step_batches(step).iter().flatten().copied());
            assert!(plan.step_batches(step).len() <= 3);
        }
        for s in &mut seen {
            s.sort();
            assert_eq!(*s, (0..100).collect::<Vec<_>>());
        }
        assert_eq!(
            plan.position(per_epoch[0] + 1),
            Position {
                epoch: 1,
                step_in_epoch: 0
            }
        );
        assert_eq!(Plan::new(&lengths, 400, 3, 2, Some(4), 9).total_steps, 4);
    }
}
