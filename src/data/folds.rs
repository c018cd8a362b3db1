//! Cross-validation folds grouped by prompt: rows that share a prompt (the same question
//! put to different model pairs) always land in the same fold, so validation never sees a
//! prompt that training saw.

use crate::cli::range;
use crate::rng::Rng;
use anyhow::{bail, Result};
use std::collections::{HashMap, HashSet};

/// The prompt-grouped cross-validation that judges a fit out of fold (`ensemble`, `calibrate`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct FoldArgs {
    /// Prompt-grouped folds.
    #[arg(long, allow_negative_numbers = true, value_parser = range::count, default_value_t = 5)]
    pub folds: usize,
    /// Seed of the fold assignment.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Assigns each row a fold in `0..folds`; rows with equal group keys (see
/// [`super::Battle::prompt_key`]) share a fold; row counts are balanced.
pub fn grouped_folds(group_keys: &[u64], folds: usize, seed: u64) -> Vec<usize> {
    assert!(folds >= 2, "need at least two folds");
    let mut group_of: HashMap<u64, usize> = HashMap::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (i, &key) in group_keys.iter().enumerate() {
        let next = members.len();
        let g = *group_of.entry(key).or_insert(next);
        if g == next {
            members.push(Vec::new());
        }
        members[g].push(i);
    }
    // Shuffle, then place large groups first, each into the currently smallest fold.
    let mut order: Vec<usize> = (0..members.len()).collect();
    Rng::new(seed).shuffle(&mut order);
    order.sort_by_key(|&g| std::cmp::Reverse(members[g].len()));
    let mut sizes = vec![0usize; folds];
    let mut fold_of = vec![0usize; group_keys.len()];
    for g in order {
        let f = (0..folds).min_by_key(|&f| sizes[f]).expect("folds >= 2");
        sizes[f] += members[g].len();
        for &i in &members[g] {
            fold_of[i] = f;
        }
    }
    fold_of
}

/// A fold assignment with each fold's row lists.
pub struct Folds {
    /// Each row's fold.
    pub fold_of: Vec<usize>,
}

impl Folds {
    /// (training rows, held-out rows) of fold `f`, both ascending.
    pub fn split(&self, f: usize) -> (Vec<usize>, Vec<usize>) {
        (0..self.fold_of.len()).partition(|&i| self.fold_of[i] != f)
    }
}

/// Prompt-grouped folds over labelled battles; an error if some fold would be empty.
pub fn prompt_folds(battles: &[super::Battle], folds: usize, seed: u64) -> Result<Folds> {
    let keys: Vec<u64> = battles.iter().map(super::Battle::prompt_key).collect();
    let groups = keys.iter().collect::<HashSet<_>>().len();
    if folds < 2 || folds > groups {
        bail!(
            "--folds must be between 2 and the number of distinct prompts ({groups}), got {folds}"
        );
    }
    Ok(Folds {
        fold_of: grouped_folds(&keys, folds, seed),
    })
}
