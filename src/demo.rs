//! `verdict demo`: the pipeline end to end on a built-in sample of real arena rows, so a
//! fresh clone shows what verdict does with one command and no downloads.

use crate::baseline::{self, BaselineConfig, BaselineModel, Feature};
use crate::data::folds::grouped_folds;
use crate::data::{BattleReader, ReadOptions};
use crate::metrics::{self, Probs};
use crate::submission::{write_predictions, Prediction};
use anyhow::{Context, Result};
use std::path::Path;

/// 300 real rows (see data/sample/NOTICE), embedded so the demo runs from anywhere.
pub const SAMPLE_CSV: &str = include_str!("../data/sample/arena-sample.csv");

/// Runs the demo, writing its outputs into `out`.
pub fn run(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let reader = BattleReader::new(
        SAMPLE_CSV.as_bytes(),
        "built-in sample",
        ReadOptions::default(),
    )?;
    let battles = reader.collect::<Result<Vec<_>>>()?;
    println!(
        "verdict demo: {} real arena rows (built-in sample; see data/sample/NOTICE)",
        battles.len()
    );

    // Hold out a fifth of the prompts as the "test set"; the rest is training data.
    let keys: Vec<u64> = battles.iter().map(|b| b.prompt_key()).collect();
    let fold = grouped_folds(&keys, 5, 0);
    let (train, test): (Vec<_>, Vec<_>) = battles
        .iter()
        .cloned()
        .zip(&fold)
        .partition(|(_, &f)| f != 0);
    let train: Vec<_> = train.into_iter().map(|(b, _)| b).collect();
    let test: Vec<_> = test.into_iter().map(|(b, _)| b).collect();
    println!(
        "split by prompt: {} training rows, {} held-out rows\n",
        train.len(),
        test.len()
    );

    let config = BaselineConfig {
        feature: Feature::Chars,
        buckets: None,
        smoothing: 10.0,
        tokenizer: None,
        seed: 0,
    };
    println!("[1/2] length-bucket baseline, 5-fold cross-validation on the training rows");
    let train_obs = baseline::observe(train.iter().cloned().map(Ok), config.feature, None)?;
    let cv = baseline::cross_validate(&train_obs, 5, &config)?;
    print!("{}", baseline::format_cv(&cv));

    println!("\n[2/2] fit on all training rows, predict the held-out rows");
    let model = BaselineModel::fit(&train_obs, &config);
    let probs = model.predict(&test)?;
    let truth = baseline::labels_of(&test)?;
    let scores = metrics::score(&probs, &truth);
    let prior = metrics::class_prior(&baseline::labels_of(&train)?);
    let prior_loss = metrics::log_loss(&vec![prior; test.len()], &truth);
    println!("buckets chosen by CV: {}", model.buckets);
    println!(
        "held-out log loss {:.5} (class prior {:.5}, uniform {:.5}), accuracy {:.3}",
        scores.log_loss,
        prior_loss,
        3f64.ln(),
        scores.accuracy
    );

    let submission = out.join("submission.csv");
    let rows: Vec<Prediction> = test
        .iter()
        .zip(&probs)
        .map(|(b, p): (_, &Probs)| Prediction {
            id: b.id.clone(),
            probs: *p,
        })
        .collect();
    write_predictions(&submission, &rows)?;
    let report = serde_json::json!({
        "rows": battles.len(),
        "train_rows": train.len(),
        "test_rows": test.len(),
        "baseline_cv": cv,
        "baseline_model": model,
        "held_out": scores,
        "held_out_prior_log_loss": prior_loss,
    });
    crate::atomic::write_json(&out.join("report.json"), &report)?;
    println!(
        "\nwrote {} and {}",
        submission.display(),
        out.join("report.json").display()
    );
    Ok(())
}
