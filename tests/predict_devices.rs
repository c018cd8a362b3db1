//! Prediction shared among several backends (`verdict predict --devices 0,1`), checked on the
//! CPU with two CPU backends standing in for two GPUs: the rows come back in input order
//! and equal to one backend's, and each backend did part of the work. Catches a merge that
//! concatenates per-device outputs, or a split that drops or repeats a batch.

use std::path::Path;
use verdict::backend::cpu::Cpu;
use verdict::backend::placement::{Job, Placement};
use verdict::data::format::{FormatOptions, Formatter};
use verdict::data::{read_battles, ReadOptions};
use verdict::model::config::Family;
use verdict::model::weights::Dtype;
use verdict::model::{init_checkpoint, Model};
use verdict::predict::{predict_battles, PredictJob, PredictOptions};
use verdict::quant::Quant;

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample/arena-sample.csv");

#[test]
fn two_backends_give_one_backends_rows_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("gemma2-tiny");
    init_checkpoint(Family::Gemma2, "tiny", 3, &model_dir, Dtype::F32).unwrap();
    let (mut battles, _) = read_battles(Path::new(SAMPLE), ReadOptions::default()).unwrap();
    battles.truncate(30);
    let format = FormatOptions {
        max_len: 96,
        prompt_cap: 32,
        min_part: 16,
        ..FormatOptions::default()
    };
    let formatter = Formatter::from_model_dir(&model_dir, format).unwrap();
    // Small batches: many of them, so both backends get several.
    let options = PredictOptions {
        tta_swap: true,
        batch_tokens: 400,
        base: None,
    };
    let model = Model::load(&Cpu, &model_dir, None, Quant::None).unwrap();
    let (one, one_stats) = predict_battles(&Cpu, &model, &formatter, &battles, options).unwrap();
    let job = |battles| PredictJob {
        model_dir: &model_dir,
        adapter_dir: None,
        quant: Quant::None,
        formatter: &formatter,
        battles,
        options,
    };
    let (two, stats) = job(&battles).run(&[Cpu, Cpu]).unwrap();
    assert_eq!(two, one, "same rows, same order, same bits");
    let ids: Vec<&str> = two.iter().map(|r| r.id.as_str()).collect();
    let given: Vec<&str> = battles.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, given);
    assert_eq!(stats.devices.len(), 2);
    assert!(
        stats
            .devices
            .iter()
            .all(|d| d.sequences > 0 && d.batches > 0),
        "each backend did part of the work: {:?}",
        stats.devices
    );
    let shared: usize = stats.devices.iter().map(|d| d.sequences).sum();
    assert_eq!(shared, stats.sequences);
    assert_eq!(stats.sequences, 2 * battles.len());
    assert_eq!(one_stats.devices.len(), 1);
    assert_eq!(one_stats.devices[0].backend.device, "cpu");
    assert_eq!(one_stats.devices[0].backend.peak_reserved_bytes, None);

    // The CLI's path: the placement opens the CPU backend and runs the same job.
    let (via_placement, _) = Placement::Cpu.run(job(&battles)).unwrap();
    assert_eq!(via_placement, one);
}
