//! Cross-validation folds grouped by prompt: rows that share a prompt (the same question
//! put to different model pairs) always land in the same fold, so validation never sees a
//! prompt that training saw.

use super::Battle;
use crate::rng::Rng;
use std::collections::HashMap;

/// Assigns each battle a fold in `0..folds`, grouping by prompt text, balancing row counts.
pub fn grouped_folds(battles: &[Battle], folds: usize, seed: u64) -> Vec<usize> {
    assert!(folds >= 2, "need at least two folds");
    let mut group_of: HashMap<String, usize> = HashMap::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (i, b) in battles.iter().enumerate() {
        let next = members.len();
        let g = *group_of.entry(b.prompt_text()).or_insert(next);
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
    let mut fold_of = vec![0usize; battles.len()];
    for g in order {
        let f = (0..folds).min_by_key(|&f| sizes[f]).expect("folds >= 2");
        sizes[f] += members[g].len();
        for &i in &members[g] {
            fold_of[i] = f;
        }
    }
    fold_of
}
