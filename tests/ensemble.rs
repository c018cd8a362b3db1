//! Ensemble weights on synthetic data with a known optimum: labels are drawn from a known
//! mixture of members, so the fitted weights must recover the mixing weight, a useless
//! member must get ~0, and the cross-validated mode choice must pick the true mode.

mod common;

use common::draw;
use verdict::data::{Battle, Turn, Winner};
use verdict::ensemble::{
    apply_ensemble, fit_ensemble, fit_ensemble_files, fit_weights, format_ensemble_report,
    objective, EnsembleConfig, EnsembleModel, MemberTable, Mode,
};
use verdict::metrics::softmax;
use verdict::metrics::Probs;
use verdict::rng::Rng;
use verdict::submission::{read_predictions, write_predictions, Prediction};

const ROWS: usize = 20_000;

fn random_probs(rng: &mut Rng, scale: f64) -> Probs {
    softmax([0; 3].map(|_| scale * rng.normal()))
}

/// Labelled battles, two rows per prompt, so folds are genuinely grouped.
fn battles(truth: &[Winner]) -> Vec<Battle> {
    truth
        .iter()
        .enumerate()
        .map(|(i, &w)| Battle {
            id: format!("id{i}"),
            model_a: None,
            model_b: None,
            turns: vec![Turn {
                prompt: Some(format!("prompt {}", i / 2)),
                response_a: Some("a".into()),
                response_b: Some("b".into()),
            }],
            winner: Some(w),
        })
        .collect()
}

/// Three members (two informative, one pure noise) and labels drawn from the `mode`
/// mixture of the first two with weight `alpha` on member 0.
fn mixture(mode: Mode, alpha: f64, seed: u64) -> (Vec<Vec<Probs>>, Vec<Winner>) {
    let mut rng = Rng::new(seed);
    let mut members: Vec<Vec<Probs>> = (0..3).map(|_| Vec::with_capacity(ROWS)).collect();
    let mut truth = Vec::with_capacity(ROWS);
    for _ in 0..ROWS {
        let p1 = random_probs(&mut rng, 1.5);
        let p2 = random_probs(&mut rng, 1.5);
        let noise = random_probs(&mut rng, 1.5);
        let p = match mode {
            Mode::Probability => [0, 1, 2].map(|k| alpha * p1[k] + (1.0 - alpha) * p2[k]),
            Mode::Logit => {
                softmax([0, 1, 2].map(|k| alpha * p1[k].ln() + (1.0 - alpha) * p2[k].ln()))
            }
        };
        truth.push(draw(&mut rng, &p));
        members[0].push(p1);
        members[1].push(p2);
        members[2].push(noise);
    }
    (members, truth)
}

#[test]
fn both_modes_recover_the_mixing_weight_and_zero_a_useless_member() {
    for (mode, seed) in [(Mode::Probability, 1), (Mode::Logit, 2)] {
        let (members, truth) = mixture(mode, 0.3, seed);
        let fit = fit_weights(mode, &MemberTable::new(&members), &truth);
        eprintln!(
            "{mode:?} mixture 0.3/0.7/0: fitted {:?}, gap {:e}, {} iterations",
            fit.weights, fit.gap, fit.iterations
        );
        // ±0.03 is about 3 standard errors of the weight at 20k rows.
        assert!(
            (fit.weights[0] - 0.3).abs() < 0.03,
            "{mode:?}: {:?}",
            fit.weights
        );
        assert!(
            (fit.weights[1] - 0.7).abs() < 0.03,
            "{mode:?}: {:?}",
            fit.weights
        );
        assert!(
            fit.weights[2] < 0.02,
            "{mode:?}: noise member weight {:?}",
            fit.weights
        );
        assert!(
            fit.gap <= 1e-10,
            "{mode:?}: not converged: gap {:e}",
            fit.gap
        );
    }
}

#[test]
fn cross_validation_picks_the_mode_that_generated_the_labels() {
    for true_mode in Mode::ALL {
        let (members, truth) = mixture(true_mode, 0.4, 3);
        let names = vec!["m1".to_string(), "m2".into(), "noise".into()];
        let report = fit_ensemble(
            &names,
            &members,
            &battles(&truth),
            &EnsembleConfig::default(),
        )
        .unwrap();
        eprintln!(
            "labels from {true_mode:?} mixture:\n{}",
            format_ensemble_report(&report)
        );
        assert_eq!(report.model.mode, true_mode);
        let chosen = report.modes.iter().find(|m| m.mode == true_mode).unwrap();
        assert_eq!(
            report.model.weights, chosen.fit.weights,
            "final weights are the all-rows fit"
        );
        assert_eq!(chosen.fold_log_loss.len(), 5);
        // Out of fold is honest: never better than the in-sample fit by much, and both beat
        // every single member.
        let best_member = report
            .members
            .iter()
            .map(|m| m.log_loss)
            .fold(f64::INFINITY, f64::min);
        assert!(chosen.out_of_fold_log_loss < best_member - 0.01);
        assert!(chosen.out_of_fold_log_loss >= chosen.fit.log_loss - 1e-3);
        assert_eq!(report.out_of_fold.len(), ROWS);
        assert_eq!(report.out_of_fold[7].id, "id7");
    }
}

/// Golden-section search of the 1-D loss w ↦ L((w, 1 − w)), to compare the optimiser with.
fn golden_section(mode: Mode, table: &MemberTable, truth: &[Winner]) -> (f64, f64) {
    let f = |w: f64| objective(mode, table, truth, &[w, 1.0 - w], false).loss;
    let (mut a, mut b) = (0.0, 1.0);
    let r = (5f64.sqrt() - 1.0) / 2.0;
    while b - a > 1e-10 {
        let (c, d) = (b - r * (b - a), a + r * (b - a));
        if f(c) < f(d) {
            b = d;
        } else {
            a = c;
        }
    }
    let w = (a + b) / 2.0;
    (w, f(w))
}

#[test]
fn optimiser_matches_a_one_dimensional_search_tightly_in_both_modes() {
    for mode in Mode::ALL {
        let (members, truth) = mixture(mode, 0.62, 4);
        let table = MemberTable::new(&members[..2]);
        let fit = fit_weights(mode, &table, &truth);
        let (w, loss) = golden_section(mode, &table, &truth);
        eprintln!(
            "{mode:?}: newton {:.9} vs golden {w:.9}, {} iterations, gap {:e}",
            fit.weights[0], fit.iterations, fit.gap
        );
        assert!(
            (fit.weights[0] - w).abs() < 1e-6,
            "{mode:?}: {} vs {w}",
            fit.weights[0]
        );
        assert!(
            fit.log_loss <= loss + 1e-12,
            "{mode:?}: {} vs {loss}",
            fit.log_loss
        );
        assert!(
            fit.iterations < 30,
            "{mode:?}: {} iterations",
            fit.iterations
        );
    }
}

#[test]
fn optimiser_reaches_the_boundary_when_a_member_is_dominated() {
    // The labels come from p; member 0 is p blurred toward uniform, member 1 is blurred
    // further. Any share of member 1 blurs more, so its optimal weight is exactly 0.
    // (The truth itself would not do here: in probability mode every direction has zero
    // expected slope at the true distribution, so its neighbours win by sampling noise.)
    let (members, truth) = mixture(Mode::Probability, 1.0, 5);
    let blur = |a: f64| -> Vec<Probs> {
        members[0]
            .iter()
            .map(|p| p.map(|v| a * v + (1.0 - a) / 3.0))
            .collect()
    };
    let table = MemberTable::new(&[blur(0.8), blur(0.5)]);
    for mode in Mode::ALL {
        let fit = fit_weights(mode, &table, &truth);
        eprintln!(
            "{mode:?}: dominated member weight {:e}, {} iterations, gap {:e}",
            fit.weights[1], fit.iterations, fit.gap
        );
        assert!(fit.weights[1] < 1e-8, "{mode:?}: {:?}", fit.weights);
        assert!(fit.gap <= 1e-10, "{mode:?}: gap {:e}", fit.gap);
    }
}

#[test]
fn fitting_is_deterministic_bit_for_bit() {
    let (members, truth) = mixture(Mode::Logit, 0.5, 6);
    let names = vec!["a".to_string(), "b".into(), "c".into()];
    let b = battles(&truth);
    let r1 = fit_ensemble(&names, &members, &b, &EnsembleConfig::default()).unwrap();
    let r2 = fit_ensemble(&names, &members, &b, &EnsembleConfig::default()).unwrap();
    assert_eq!(
        serde_json::to_string(&r1).unwrap(),
        serde_json::to_string(&r2).unwrap()
    );
}

#[test]
fn objective_gradient_and_hessian_match_finite_differences() {
    let (members, truth) = mixture(Mode::Probability, 0.5, 7);
    let small: Vec<Vec<Probs>> = members.iter().map(|m| m[..500].to_vec()).collect();
    let table = MemberTable::new(&small);
    let truth = &truth[..500];
    let w = [0.2, 0.5, 0.3];
    for mode in Mode::ALL {
        let at = objective(mode, &table, truth, &w, true);
        let h = 1e-5;
        for a in 0..3 {
            let mut plus = w;
            let mut minus = w;
            plus[a] += h;
            minus[a] -= h;
            let op = objective(mode, &table, truth, &plus, false);
            let om = objective(mode, &table, truth, &minus, false);
            let g = (op.loss - om.loss) / (2.0 * h);
            assert!(
                (g - at.grad[a]).abs() < 1e-6,
                "{mode:?} grad[{a}]: {g} vs {}",
                at.grad[a]
            );
            let gp = objective(mode, &table, truth, &plus, true).grad;
            let gm = objective(mode, &table, truth, &minus, true).grad;
            for b in 0..3 {
                let hd = (gp[b] - gm[b]) / (2.0 * h);
                let exact = at.hessian[a * 3 + b];
                assert!(
                    (hd - exact).abs() < 1e-5 * (1.0 + exact.abs()),
                    "{mode:?} H[{a}{b}]: {hd} vs {exact}"
                );
            }
        }
    }
}

fn write(path: &std::path::Path, ids: &[String], probs: &[Probs]) {
    let rows: Vec<Prediction> = ids
        .iter()
        .zip(probs)
        .map(|(id, p)| Prediction {
            id: id.clone(),
            probs: *p,
        })
        .collect();
    write_predictions(path, &rows).unwrap();
}

fn write_labels(path: &std::path::Path, battles: &[Battle]) {
    let mut text = String::from("id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n");
    for b in battles {
        let w = b.winner.unwrap().index();
        let flags: Vec<&str> = (0..3).map(|k| if k == w { "1" } else { "0" }).collect();
        let prompt = b.turns[0].prompt.as_deref().unwrap();
        text += &format!(
            "{},x,y,\"[\"\"{prompt}\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",{}\n",
            b.id,
            flags.join(",")
        );
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn files_are_joined_by_id_and_the_model_applies_to_reordered_test_files() {
    let dir = tempfile::tempdir().unwrap();
    let (members, truth) = mixture(Mode::Probability, 0.3, 8);
    let n = 2000;
    let b = battles(&truth[..n]);
    let ids: Vec<String> = b.iter().map(|b| b.id.clone()).collect();
    let labels = dir.path().join("valid.csv");
    write_labels(&labels, &b);
    // Member files in different row orders: the join is by id, not by position.
    let mut paths = Vec::new();
    for (k, m) in members.iter().enumerate() {
        let mut order: Vec<usize> = (0..n).collect();
        Rng::new(k as u64).shuffle(&mut order);
        let path = dir.path().join(format!("m{k}.csv"));
        let oids: Vec<String> = order.iter().map(|&i| ids[i].clone()).collect();
        let op: Vec<Probs> = order.iter().map(|&i| m[i]).collect();
        write(&path, &oids, &op);
        paths.push(path);
    }
    let report = fit_ensemble_files(
        &paths,
        &labels,
        Default::default(),
        &EnsembleConfig::default(),
    )
    .unwrap();
    let in_memory: Vec<Vec<Probs>> = members.iter().map(|m| m[..n].to_vec()).collect();
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let direct = fit_ensemble(&names, &in_memory, &b, &EnsembleConfig::default()).unwrap();
    // Files round the probabilities through text, so compare loosely.
    for (x, y) in report.model.weights.iter().zip(&direct.model.weights) {
        assert!(
            (x - y).abs() < 1e-6,
            "{:?} vs {:?}",
            report.model.weights,
            direct.model.weights
        );
    }

    let model_path = dir.path().join("ens.json");
    report.model.save(&model_path).unwrap();
    let model = EnsembleModel::load(&model_path).unwrap();
    assert_eq!(model.members, report.model.members);
    assert_eq!(model.mode, report.model.mode);
    // serde_json's default float parser may differ from the written value in the last bit.
    for (x, y) in model.weights.iter().zip(&report.model.weights) {
        assert!((x - y).abs() <= 1e-15, "{x} vs {y}");
    }
    let out = dir.path().join("ens.csv");
    assert_eq!(apply_ensemble(&model, &paths, &out).unwrap(), n);
    let written = read_predictions(&out).unwrap();
    let first = read_predictions(&paths[0]).unwrap();
    let expected = model.predict(&in_memory).unwrap();
    for (row, f) in written.iter().zip(&first) {
        assert_eq!(row.id, f.id, "rows follow the first file's order");
        let i: usize = row.id[2..].parse().unwrap();
        for (got, want) in row.probs.iter().zip(&expected[i]) {
            assert!((got - want).abs() < 1e-9, "{}: {got} vs {want}", row.id);
        }
    }
}

#[test]
fn join_errors_name_the_file_and_the_id() {
    let dir = tempfile::tempdir().unwrap();
    let truth = vec![Winner::A, Winner::B, Winner::Tie, Winner::A];
    let b = battles(&truth);
    let labels = dir.path().join("valid.csv");
    write_labels(&labels, &b);
    let p = [[0.4, 0.4, 0.2]; 4];
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let good = dir.path().join("good.csv");
    write(&good, &ids(&["id0", "id1", "id2", "id3"]), &p);
    let cases = [
        (
            "missing.csv",
            ids(&["id0", "id1", "id2"]),
            "no prediction for id id3",
        ),
        (
            "extra.csv",
            ids(&["id0", "id1", "id2", "id3", "id9"]),
            "id id9 is not in",
        ),
        (
            "twice.csv",
            ids(&["id0", "id1", "id1", "id3"]),
            "id id1 appears twice",
        ),
    ];
    for (name, row_ids, message) in cases {
        let path = dir.path().join(name);
        write(&path, &row_ids, &vec![[0.4, 0.4, 0.2]; row_ids.len()]);
        let config = EnsembleConfig { folds: 2, seed: 0 };
        let err = fit_ensemble_files(&[good.clone(), path], &labels, Default::default(), &config)
            .unwrap_err()
            .to_string();
        assert!(err.contains(name) && err.contains(message), "{name}: {err}");
    }
    let model = EnsembleModel {
        members: vec!["a".into(), "b".into()],
        mode: Mode::Logit,
        weights: vec![0.5, 0.5],
    };
    let err = apply_ensemble(
        &model,
        std::slice::from_ref(&good),
        &dir.path().join("o.csv"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("2 members"), "{err}");
}

#[test]
fn load_refuses_weights_that_are_not_convex() {
    let weights = r#"{"members":["a","b"],"mode":"logit","weights":[0.7,0.7]}"#;
    let (_dir, path) = common::temp_file("bad.json", weights);
    let err = EnsembleModel::load(&path).unwrap_err().to_string();
    assert!(err.contains("sum to 1"), "{err}");
}
