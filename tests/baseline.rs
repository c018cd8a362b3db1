//! Length-bucket baseline and grouped folds on synthetic data with a known answer.

mod common;

use verdict::baseline::{
    cross_validate, observe, BaselineConfig, BaselineModel, Feature, Observation,
};
use verdict::data::folds::grouped_folds;
use verdict::data::{Battle, Turn, Winner};
use verdict::metrics::log_loss;
use verdict::rng::Rng;

fn battle(id: usize, prompt: &str, len_a: usize, len_b: usize, winner: Winner) -> Battle {
    Battle {
        id: id.to_string(),
        model_a: Some("x".into()),
        model_b: Some("y".into()),
        turns: vec![Turn {
            prompt: Some(prompt.into()),
            response_a: Some("a".repeat(len_a)),
            response_b: Some("b".repeat(len_b)),
        }],
        winner: Some(winner),
    }
}

/// Battles where the longer answer wins with probability 0.8, ties never happen, and equal
/// lengths do not occur: the ideal two-bucket model predicts (0.8, 0.2, 0) / (0.2, 0.8, 0).
fn synthetic(n: usize, seed: u64) -> Vec<Battle> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let (a, b) = (1 + rng.below(100), 1 + rng.below(100));
            let b = if a == b { b + 1 } else { b };
            let longer_wins = rng.uniform() < 0.8;
            let winner = if (a > b) == longer_wins {
                Winner::A
            } else {
                Winner::B
            };
            battle(i, &format!("prompt {}", i % (n / 3)), a, b, winner)
        })
        .collect()
}

fn obs(battles: &[Battle]) -> Vec<Observation> {
    observe(battles.iter().cloned().map(Ok), Feature::Chars, None).unwrap()
}

fn config(buckets: Option<usize>) -> BaselineConfig {
    BaselineConfig {
        feature: Feature::Chars,
        buckets,
        smoothing: 1.0,
        tokenizer: None,
        seed: 0,
    }
}

#[test]
fn recovers_known_bucket_probabilities() {
    let battles = synthetic(20_000, 1);
    let model = BaselineModel::fit(&obs(&battles), &config(Some(2)));
    // Two signed buckets (A longer / B longer) are one bucket of |difference|.
    assert_eq!(model.bucket_probs.len(), 1);
    let longer_a = model.predict_value(30.0);
    let longer_b = model.predict_value(-30.0);
    assert!(
        (longer_a[0] - 0.8).abs() < 0.01 && (longer_a[1] - 0.2).abs() < 0.01,
        "{longer_a:?}"
    );
    assert!((longer_b[1] - 0.8).abs() < 0.01, "{longer_b:?}");
    assert!(
        longer_a[2] < 0.001,
        "no ties in the data, only smoothing mass: {longer_a:?}"
    );
}

#[test]
fn swap_augmentation_makes_predictions_mirror_symmetric() {
    let battles = synthetic(2_000, 2);
    let model = BaselineModel::fit(&obs(&battles), &config(Some(10)));
    for v in [-70.0, -20.0, -3.0, 3.0, 20.0, 70.0] {
        let (p, q) = (model.predict_value(v), model.predict_value(-v));
        assert!(
            (p[0] - q[1]).abs() < 1e-9 && (p[2] - q[2]).abs() < 1e-9,
            "v={v}: {p:?} vs {q:?}"
        );
    }
}

#[test]
fn bucket_probabilities_sum_to_one_and_smoothing_pulls_to_prior() {
    let battles = synthetic(300, 3);
    let sharp = BaselineModel::fit(
        &obs(&battles),
        &BaselineConfig {
            smoothing: 0.0,
            ..config(Some(5))
        },
    );
    let smooth = BaselineModel::fit(
        &obs(&battles),
        &BaselineConfig {
            smoothing: 1e6,
            ..config(Some(5))
        },
    );
    for p in sharp.bucket_probs.iter().chain(&smooth.bucket_probs) {
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
    for p in &smooth.bucket_probs {
        assert!(
            (p[0] - smooth.prior[0]).abs() < 1e-3,
            "huge smoothing must give the prior"
        );
    }
}

#[test]
fn auto_buckets_beat_the_prior_and_record_trials() {
    let battles = synthetic(2_000, 4);
    let model = BaselineModel::fit(&obs(&battles), &config(None));
    assert_eq!(
        model.bucket_trials.len(),
        verdict::baseline::BUCKET_CANDIDATES.len()
    );
    let best = model
        .bucket_trials
        .iter()
        .map(|t| t.cv_log_loss)
        .fold(f64::INFINITY, f64::min);
    assert!(
        best < 0.7,
        "ideal loss is about 0.50, prior about 0.69: {best}"
    );
    let test = synthetic(2_000, 5);
    let truth: Vec<Winner> = test.iter().map(|b| b.winner.unwrap()).collect();
    let loss = log_loss(&model.predict(&test).unwrap(), &truth);
    assert!(
        loss < 0.53,
        "held-out loss should approach the ideal 0.500: {loss}"
    );
}

#[test]
fn grouped_folds_never_split_a_prompt_and_are_balanced() {
    let battles = synthetic(999, 6);
    let keys: Vec<u64> = battles.iter().map(|b| b.prompt_key()).collect();
    let folds = grouped_folds(&keys, 5, 7);
    let mut fold_of_prompt = std::collections::HashMap::new();
    for (b, &f) in battles.iter().zip(&folds) {
        assert_eq!(
            *fold_of_prompt.entry(b.prompt_key()).or_insert(f),
            f,
            "prompt split across folds"
        );
    }
    let sizes: Vec<usize> = (0..5)
        .map(|f| folds.iter().filter(|&&x| x == f).count())
        .collect();
    assert!(
        sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 3,
        "{sizes:?}"
    );
    assert_eq!(folds, grouped_folds(&keys, 5, 7), "same seed, same folds");
}

#[test]
fn words_feature_counts_whitespace_words() {
    let mut b = battle(0, "p", 0, 0, Winner::A);
    b.turns[0].response_a = Some("one two  three".into());
    b.turns[0].response_b = None;
    let v = verdict::baseline::feature_values(&[b], Feature::Words, None).unwrap();
    assert_eq!(v, [3.0]);
}

#[test]
fn tokens_feature_without_tokenizer_is_a_clear_error() {
    let e = verdict::baseline::feature_values(&synthetic(3, 8), Feature::Tokens, None).unwrap_err();
    assert!(e.to_string().contains("--tokenizer"), "{e}");
}

#[test]
fn cross_validation_on_real_rows_beats_the_class_prior() {
    let Some(path) = common::arena_dev() else {
        return;
    };
    let (battles, _) = verdict::data::read_battles(&path, Default::default()).unwrap();
    let report = cross_validate(
        &obs(&battles),
        5,
        &BaselineConfig {
            smoothing: 10.0,
            ..config(None)
        },
    )
    .unwrap();
    eprintln!(
        "arena-dev 5-fold: baseline {:.5}, prior {:.5}",
        report.log_loss, report.prior_log_loss
    );
    assert!(
        report.log_loss < report.prior_log_loss - 0.02,
        "{} vs {}",
        report.log_loss,
        report.prior_log_loss
    );
}

#[test]
fn few_prompts_are_an_error_or_a_fit_never_a_panic() {
    // Issue #19: one prompt group, or more folds than prompts, indexed an empty fold.
    let one_prompt: Vec<Battle> = (0..6)
        .map(|i| battle(i, "the same prompt", 10 + i, 20, Winner::A))
        .collect();
    let rows = obs(&one_prompt);
    let err = cross_validate(&rows, 3, &config(None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("number of distinct prompts (1)"), "{err}");
    // Fitting with automatic buckets on one prompt has nothing to cross-validate: the fewest
    // buckets.
    let model = BaselineModel::fit(&rows, &config(None));
    assert!(model.bucket_trials.is_empty());
    let three_prompts: Vec<Battle> = (0..9)
        .map(|i| battle(i, &format!("prompt {}", i % 3), 10 + i, 20, Winner::B))
        .collect();
    let err = cross_validate(&obs(&three_prompts), 4, &config(None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("number of distinct prompts (3)"), "{err}");
    assert!(cross_validate(&obs(&three_prompts), 3, &config(None)).is_ok());
}
