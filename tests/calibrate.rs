//! Calibration on synthetic data with a known answer: a known temperature is recovered,
//! the threshold-and-multiplier rule is found where labels follow it and switched off
//! where predictions are already calibrated, and degenerate-row rules fire on the rows
//! the CSV marks.

mod common;

use common::draw;
use verdict::calibrate::{
    apply_calibration_files, degeneracy, fit_calibration, fit_calibration_files, fit_temperature,
    fit_threshold, format_calibration_report, Calibration, CalibrationConfig, Degeneracy, Step,
    StepKind,
};
use verdict::data::{Battle, Side, Turn, Winner};
use verdict::metrics::softmax;
use verdict::metrics::Probs;
use verdict::rng::Rng;
use verdict::submission::{read_predictions, write_predictions, Prediction};

const ROWS: usize = 20_000;

fn battle(i: usize, a: Option<&str>, b: Option<&str>, winner: Winner) -> Battle {
    Battle {
        id: format!("id{i}"),
        model_a: None,
        model_b: None,
        turns: vec![Turn {
            prompt: Some(format!("prompt {}", i / 2)),
            response_a: a.map(str::to_string),
            response_b: b.map(str::to_string),
        }],
        winner: Some(winner),
    }
}

/// Ordinary battles (distinct non-empty responses) with the given labels.
fn battles(truth: &[Winner]) -> Vec<Battle> {
    battles_with(truth, |i, w| {
        battle(i, Some("answer a"), Some("answer b"), w)
    })
}

/// `battle_of(i, winner)` for each label in order.
fn battles_with(truth: &[Winner], battle_of: impl Fn(usize, Winner) -> Battle) -> Vec<Battle> {
    truth
        .iter()
        .enumerate()
        .map(|(i, &w)| battle_of(i, w))
        .collect()
}

/// True probabilities from random logits (spread like a decent arena model's) and labels.
fn truth_and_labels(seed: u64, n: usize) -> (Vec<Probs>, Vec<Winner>) {
    let mut rng = Rng::new(seed);
    let p: Vec<Probs> = (0..n)
        .map(|_| softmax([0; 3].map(|_| 1.2 * rng.normal())))
        .collect();
    let labels = p.iter().map(|q| draw(&mut rng, q)).collect();
    (p, labels)
}

/// The seed's rule with given values, as the "truth" a calibrator should find.
fn threshold_rule(p: &Probs, threshold: f64, m_ab: f64, m_tie: f64) -> Probs {
    Step::Threshold {
        threshold,
        multiplier_ab: m_ab,
        multiplier_tie: m_tie,
    }
    .apply(p, Degeneracy::Normal)
}

#[test]
fn fitted_temperature_recovers_a_known_overconfidence() {
    let (p, labels) = truth_and_labels(1, ROWS);
    for t0 in [1.6, 0.7] {
        // Predictions p^T0: over-confident for T0 > 1, under-confident for T0 < 1;
        // dividing their logits by T = T0 gives back p.
        let preds: Vec<Probs> = p.iter().map(|q| softmax(q.map(|v| t0 * v.ln()))).collect();
        let t = fit_temperature(&preds, &labels);
        eprintln!("T0 {t0}: fitted T {t:.4}");
        assert!((t - t0).abs() < 0.04 * t0, "T0 {t0}: fitted {t}");
    }
}

#[test]
fn seed_rule_multiplies_the_confident_class_and_renormalises() {
    let q = threshold_rule(&[0.8, 0.15, 0.05], 0.75, 1.125, 1.325);
    let expected = [0.9 / 1.1, 0.15 / 1.1, 0.05 / 1.1];
    for k in 0..3 {
        assert!((q[k] - expected[k]).abs() < 1e-12, "{q:?}");
    }
    let tie = threshold_rule(&[0.1, 0.1, 0.8], 0.75, 1.125, 1.325);
    assert!((tie[2] - 1.06 / 1.26).abs() < 1e-12, "{tie:?}");
    let below = threshold_rule(&[0.7, 0.2, 0.1], 0.75, 1.125, 1.325);
    assert!(
        (below[0] - 0.7).abs() < 1e-12,
        "below the threshold: unchanged"
    );
}

#[test]
fn threshold_fit_recovers_the_rule_that_generated_the_labels_and_is_kept() {
    // 100k rows: at 20k the multipliers still wander by ±0.1 from seed to seed.
    let (q, _) = truth_and_labels(2, 100_000);
    let mut rng = Rng::new(20);
    let labels: Vec<Winner> = q
        .iter()
        .map(|p| draw(&mut rng, &threshold_rule(p, 0.7, 1.25, 1.5)))
        .collect();
    let Step::Threshold {
        threshold,
        multiplier_ab,
        multiplier_tie,
    } = fit_threshold(&q, &labels)
    else {
        panic!("not a threshold step")
    };
    eprintln!("fitted threshold {threshold}, x{multiplier_ab:.4} A/B, x{multiplier_tie:.4} tie (true 0.7, 1.25, 1.5)");
    assert!((threshold - 0.7).abs() <= 0.02, "{threshold}");
    assert!((multiplier_ab - 1.25).abs() < 0.08, "{multiplier_ab}");
    assert!((multiplier_tie - 1.5).abs() < 0.15, "{multiplier_tie}");

    let report =
        fit_calibration(&q, &battles(&labels), &CalibrationConfig::default(), None).unwrap();
    eprintln!("{}", format_calibration_report(&report));
    let step = report
        .steps
        .iter()
        .find(|s| s.step == StepKind::Threshold)
        .unwrap();
    assert!(step.kept, "the rule must help out of fold here");
    assert!(step.out_of_fold_after < step.out_of_fold_before);
    assert!(report.out_of_fold_log_loss < report.raw_log_loss - 0.001);
    assert!(report
        .calibration
        .steps
        .iter()
        .any(|s| matches!(s, Step::Threshold { .. })));
}

#[test]
fn calibrated_predictions_keep_no_step() {
    // Labels drawn from the predictions themselves: nothing can help out of fold, and the
    // saved calibration must be empty. Three data sets, so a pass is not one lucky draw.
    for seed in [3, 4, 5] {
        let (p, labels) = truth_and_labels(seed, ROWS);
        let report =
            fit_calibration(&p, &battles(&labels), &CalibrationConfig::default(), None).unwrap();
        eprintln!("seed {seed}:\n{}", format_calibration_report(&report));
        let t = &report.steps[0];
        let Some(Step::Temperature { temperature }) = t.fitted else {
            panic!("temperature is always fitted")
        };
        assert!((temperature - 1.0).abs() < 0.04, "T {temperature}");
        let th = report
            .steps
            .iter()
            .find(|s| s.step == StepKind::Threshold)
            .unwrap();
        assert!(
            th.in_sample_after <= th.in_sample_before,
            "in sample a fit never hurts"
        );
        assert!(
            !th.kept,
            "seed {seed}: threshold rule kept on calibrated data"
        );
        assert!(
            report.calibration.steps.is_empty(),
            "{:?}",
            report.calibration
        );
        for rule in &report.steps[2..] {
            assert!(
                rule.fitted.is_none() && !rule.kept,
                "no degenerate rows here"
            );
        }
    }
}

#[test]
fn degeneracy_reads_the_response_texts() {
    let b = |a: Option<&str>, bb: Option<&str>| degeneracy(&battle(0, a, bb, Winner::A));
    assert_eq!(b(Some("same"), Some("same")), Degeneracy::Identical);
    assert_eq!(
        b(Some(" same\n"), Some("same")),
        Degeneracy::Identical,
        "outer whitespace"
    );
    assert_eq!(b(None, Some("")), Degeneracy::Identical, "both empty");
    assert_eq!(b(None, Some("text")), Degeneracy::Empty(Side::A));
    assert_eq!(b(Some("text"), Some("  ")), Degeneracy::Empty(Side::B));
    assert_eq!(b(Some("x"), Some("y")), Degeneracy::Normal);
    let mut multi = battle(0, Some("same"), Some("same"), Winner::A);
    multi.turns.push(Turn {
        prompt: Some("again".into()),
        response_a: Some("first".into()),
        response_b: None,
    });
    assert_eq!(
        degeneracy(&multi),
        Degeneracy::Empty(Side::B),
        "an empty later turn"
    );
}

/// Ordinary rows with calibrated predictions, plus identical-response rows (mostly ties)
/// and one-empty-side rows (the other side mostly wins) whose predictions know nothing.
fn with_degenerate_rows(seed: u64) -> (Vec<Probs>, Vec<Battle>) {
    let (p, labels) = truth_and_labels(seed, 6000);
    let mut rng = Rng::new(seed + 100);
    let mut preds = Vec::new();
    let mut rows = Vec::new();
    for (i, (q, &w)) in p.iter().zip(&labels).enumerate() {
        let (a, b, w, q) = match i % 20 {
            0 => {
                let w = draw(&mut rng, &[0.2, 0.2, 0.6]);
                (Some("same text"), Some("same text"), w, [0.4, 0.4, 0.2])
            }
            1 | 2 => {
                let empty_a = i % 20 == 1;
                // The non-empty side wins 80%, ties 15%.
                let w = match draw(&mut rng, &[0.05, 0.8, 0.15]) {
                    Winner::A if empty_a => Winner::A,
                    Winner::A => Winner::B,
                    Winner::B if empty_a => Winner::B,
                    Winner::B => Winner::A,
                    Winner::Tie => Winner::Tie,
                };
                let (a, b) = if empty_a {
                    (None, Some("text"))
                } else {
                    (Some("text"), Some(""))
                };
                (a, b, w, [0.4, 0.4, 0.2])
            }
            _ => (Some("answer a"), Some("answer b"), w, *q),
        };
        preds.push(q);
        rows.push(battle(i, a, b, w));
    }
    (preds, rows)
}

#[test]
fn degenerate_rules_fit_their_rows_and_help_out_of_fold() {
    let (preds, rows) = with_degenerate_rows(6);
    let report = fit_calibration(&preds, &rows, &CalibrationConfig::default(), None).unwrap();
    eprintln!("{}", format_calibration_report(&report));
    assert_eq!(report.degenerate.identical, 300);
    assert_eq!(report.degenerate.empty_a + report.degenerate.empty_b, 600);
    let identical = &report.steps[2];
    assert_eq!(identical.step, StepKind::IdenticalResponses);
    assert!(identical.kept);
    assert_eq!(identical.rows_hit, 300);
    let (before, after) = identical.hit_rows_out_of_fold.unwrap();
    assert!(after < before - 0.05, "{before} -> {after}");
    let Some(Step::IdenticalResponses { probs }) = identical.fitted else {
        panic!()
    };
    assert_eq!(probs[0], probs[1], "A and B are exchangeable");
    assert!((probs[2] - 0.6).abs() < 0.07, "{probs:?}");
    let empty = &report.steps[3];
    assert!(empty.kept);
    assert_eq!(empty.rows_hit, 600);
    let Some(Step::EmptyResponse { probs }) = empty.fitted else {
        panic!()
    };
    assert!((probs[1] - 0.8).abs() < 0.05, "other side wins: {probs:?}");
    assert!(probs[0] < 0.1, "empty side wins: {probs:?}");
}

#[test]
fn a_rule_whose_rows_behave_like_any_other_is_switched_off() {
    // Identical responses here, but the predictions are calibrated on those rows too: a
    // constant vector can only lose information.
    let (p, labels) = truth_and_labels(7, 6000);
    let rows = battles_with(&labels, |i, w| {
        let text = if i % 10 == 0 { "same" } else { "other" };
        battle(i, Some("same"), Some(text), w)
    });
    let report = fit_calibration(&p, &rows, &CalibrationConfig::default(), None).unwrap();
    let identical = &report.steps[2];
    assert_eq!(identical.rows_hit, 600);
    assert!(!identical.kept, "{}", format_calibration_report(&report));
}

#[test]
fn a_rule_with_too_few_rows_is_not_fitted() {
    let (p, labels) = truth_and_labels(9, 2000);
    let rows = battles_with(&labels, |i, w| match i % 200 {
        // 10 identical-response rows, all ties: striking, but too few to trust.
        0 => battle(i, Some("same"), Some("same"), Winner::Tie),
        _ => battle(i, Some("a"), Some("b"), w),
    });
    let config = CalibrationConfig::default();
    let report = fit_calibration(&p, &rows, &config, None).unwrap();
    assert_eq!(report.degenerate.identical, 10);
    let identical = &report.steps[2];
    assert!(identical.fitted.is_none() && !identical.kept);
    assert!(format_calibration_report(&report).contains("fewer than 20 rows"));
}

fn csv_field(json_list: &[Option<&str>]) -> String {
    let items: Vec<String> = json_list
        .iter()
        .map(|s| match s {
            Some(t) => serde_json::to_string(t).unwrap(),
            None => "null".into(),
        })
        .collect();
    format!("\"[{}]\"", items.join(",").replace('"', "\"\""))
}

fn write_csv(path: &std::path::Path, rows: &[Battle], labelled: bool) {
    let mut text = String::from("id,prompt,response_a,response_b");
    if labelled {
        text += ",winner_model_a,winner_model_b,winner_tie";
    }
    text += "\n";
    for b in rows {
        let t = &b.turns[0];
        text += &format!(
            "{},{},{},{}",
            b.id,
            csv_field(&[t.prompt.as_deref()]),
            csv_field(&[t.response_a.as_deref()]),
            csv_field(&[t.response_b.as_deref()])
        );
        if labelled {
            let w = b.winner.unwrap().index();
            for k in 0..3 {
                text += if k == w { ",1" } else { ",0" };
            }
        }
        text += "\n";
    }
    std::fs::write(path, text).unwrap();
}

fn write_preds(path: &std::path::Path, rows: &[Battle], preds: &[Probs]) {
    let p: Vec<Prediction> = rows
        .iter()
        .zip(preds)
        .map(|(b, q)| Prediction {
            id: b.id.clone(),
            probs: *q,
        })
        .collect();
    write_predictions(path, &p).unwrap();
}

#[test]
fn files_round_trip_and_rules_need_the_test_csv() {
    let dir = tempfile::tempdir().unwrap();
    let (preds, rows) = with_degenerate_rows(8);
    let labels = dir.path().join("valid.csv");
    write_csv(&labels, &rows, true);
    let pred_path = dir.path().join("p.csv");
    // Predictions in reverse order: the join is by id.
    let rev_rows: Vec<Battle> = rows.iter().rev().cloned().collect();
    let rev_preds: Vec<Probs> = preds.iter().rev().copied().collect();
    write_preds(&pred_path, &rev_rows, &rev_preds);
    let png = dir.path().join("reliability.png");
    let report = fit_calibration_files(
        &pred_path,
        &labels,
        Default::default(),
        &CalibrationConfig::default(),
        Some(&png),
    )
    .unwrap();
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    assert!(report.calibration.needs_texts());

    let saved = dir.path().join("calib.json");
    report.calibration.save(&saved).unwrap();
    let calibration = Calibration::load(&saved).unwrap();
    assert_eq!(calibration.steps.len(), report.calibration.steps.len());

    let out = dir.path().join("out.csv");
    let err = apply_calibration_files(&calibration, &pred_path, None, Default::default(), &out)
        .unwrap_err();
    assert!(err.to_string().contains("degenerate-row rule"), "{err}");

    // The "test" CSV is the same rows without labels.
    let test_csv = dir.path().join("test.csv");
    write_csv(&test_csv, &rows, false);
    let summary = apply_calibration_files(
        &calibration,
        &pred_path,
        Some(&test_csv),
        Default::default(),
        &out,
    )
    .unwrap();
    assert_eq!(summary.rows, rows.len());
    assert_eq!(summary.rule_rows, 900);
    let written = read_predictions(&out).unwrap();
    assert_eq!(written[0].id, "id0", "rows follow the CSV order");
    let identical_probs = calibration
        .steps
        .iter()
        .find_map(|s| match s {
            Step::IdenticalResponses { probs } => Some(*probs),
            _ => None,
        })
        .unwrap();
    for (got, want) in written[0].probs.iter().zip(identical_probs) {
        assert!(
            (got - want).abs() < 1e-12,
            "row id0 has identical responses"
        );
    }
}

#[test]
fn load_refuses_invalid_values() {
    let steps = r#"{"steps":[{"step":"temperature","temperature":-1.0}]}"#;
    let (_dir, path) = common::temp_file("bad.json", steps);
    let err = Calibration::load(&path).unwrap_err().to_string();
    assert!(err.contains("temperature"), "{err}");
}
