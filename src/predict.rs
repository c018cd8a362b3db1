//! Prediction with a fine-tuned classifier: battles -> token ids -> length-sorted packed
//! batches -> score logits -> probabilities, optionally averaged with the swapped battle
//! (swap test-time augmentation). The batches can be shared among several backends (one
//! model copy per GPU, `verdict predict --devices 0,1`); the outputs keep the input order.

use crate::backend::cuda::Device;
use crate::backend::placement::{on_each, Job, Placement};
use crate::backend::{Backend, BackendInfo};
use crate::baseline::BaselineModel;
use crate::cli::range;
use crate::cli::DeviceArgs;
use crate::data::format::{FormatOptions, Formatter, View};
use crate::data::{read_battles, Battle, ReadArgs};
use crate::metrics::{softmax, Probs};
use crate::model::{HeadKind, Model, PackedBatch};
use crate::progress::Progress;
use crate::quant::{Quant, QuantArgs};
use crate::submission::{write_predictions, Prediction};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Where a run trained with `--on-baseline` keeps the baseline whose residual it learned.
pub const BASE_FILE: &str = "baseline.json";

/// How to run prediction.
#[derive(Debug, Clone, Copy)]
pub struct PredictOptions<'a> {
    /// Also classify each battle with A and B exchanged and average the two.
    pub tta_swap: bool,
    /// Most tokens in one packed batch.
    pub batch_tokens: usize,
    /// The baseline whose log-probabilities are added to the score logits (a model trained
    /// with `--on-baseline`); [`PredictJob`] reads it from the adapter folder itself.
    pub base: Option<&'a BaselineModel>,
}

/// The baseline of a run trained with `--on-baseline` (`None` for any other adapter folder).
pub fn load_base(adapter_dir: Option<&Path>) -> Result<Option<BaselineModel>> {
    match adapter_dir.map(|d| d.join(BASE_FILE)) {
        Some(path) if path.exists() => Ok(Some(BaselineModel::load(&path)?)),
        _ => Ok(None),
    }
}

/// One battle's outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct RowOutput {
    pub id: String,
    /// Final probabilities (A, B, tie), TTA-averaged if asked.
    pub probs: Probs,
    /// Score logits of the battle as given (with the base's log-probabilities added, if any).
    pub logits: [f32; 3],
    /// Score logits of the swapped battle, mapped back to (A, B, tie) of the original.
    pub swapped_logits: Option<[f32; 3]>,
}

/// Timing and size of a prediction run.
#[derive(Debug, Clone, Serialize)]
pub struct PredictStats {
    pub rows: usize,
    pub sequences: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub rows_per_second: f64,
    pub tokens_per_second: f64,
    /// Each backend's device, memory high-water mark and share of the work.
    pub devices: Vec<DeviceShare>,
}

/// One backend's part of a prediction run.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceShare {
    #[serde(flatten)]
    pub backend: BackendInfo,
    pub batches: usize,
    pub sequences: usize,
    pub tokens: usize,
}

/// The prediction-file rows of [`RowOutput`]s (their final probabilities).
pub fn predictions(rows: &[RowOutput]) -> Vec<Prediction> {
    rows.iter()
        .map(|r| Prediction {
            id: r.id.clone(),
            probs: r.probs,
        })
        .collect()
}

/// Maps a swapped battle's (A, B, tie) output back to the original battle's order.
pub fn unswap<T: Copy>(x: [T; 3]) -> [T; 3] {
    [x[1], x[0], x[2]]
}

/// Greedy packing of sequence indices, longest first, into batches of at most
/// `batch_tokens` tokens (a longer sequence gets a batch of its own).
pub fn length_sorted_batches(lengths: &[usize], batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut used = 0;
    for i in order {
        if batches.is_empty() || used + lengths[i] > batch_tokens {
            batches.push(Vec::new());
            used = 0;
        }
        batches.last_mut().expect("pushed").push(i);
        used += lengths[i];
    }
    batches
}

/// Where a run's batches went, for a summary line: `cuda:0 (Tesla T4, peak 812.0 MiB)`, with
/// each device's sequences when there are several.
pub fn describe_devices(devices: &[DeviceShare]) -> String {
    match devices {
        [one] => one.backend.to_string(),
        several => several
            .iter()
            .map(|d| format!("{}: {} sequences", d.backend, d.sequences))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Shares batches among `workers`, given each batch's tokens in the longest-first order of
/// [`length_sorted_batches`]: each batch goes to the worker with the fewest tokens so far
/// (ties: the lowest index), so every worker gets long and short batches alike. Returns each
/// worker's batch indices, ascending.
pub fn share_batches(batch_tokens: &[usize], workers: usize) -> Vec<Vec<usize>> {
    let mut shares = vec![Vec::new(); workers];
    let mut load = vec![0usize; workers];
    for (b, &tokens) in batch_tokens.iter().enumerate() {
        let w = (0..workers)
            .min_by_key(|&w| load[w])
            .expect("at least one worker");
        shares[w].push(b);
        load[w] += tokens;
    }
    shares
}

/// `verdict predict`'s model part as a [`Job`]: loads the classifier in `model_dir` (with
/// the adapter in `adapter_dir`) on every backend at once and predicts `battles` with the
/// batches shared among them ([`predict_battles_on`]).
pub struct PredictJob<'a> {
    pub model_dir: &'a Path,
    pub adapter_dir: Option<&'a Path>,
    pub quant: Quant,
    pub formatter: &'a Formatter,
    pub battles: &'a [Battle],
    /// Its `base` is replaced by the adapter folder's.
    pub options: PredictOptions<'a>,
}

impl Job for PredictJob<'_> {
    type Output = (Vec<RowOutput>, PredictStats);

    fn run<B: Backend>(self, backends: &[B]) -> Result<Self::Output> {
        let base = load_base(self.adapter_dir)?;
        let models = on_each(backends, |b| {
            Model::load(b, self.model_dir, self.adapter_dir, self.quant)
                .with_context(|| format!("loading {}", self.model_dir.display()))
        })?;
        let workers: Vec<(&B, &Model<B>)> = backends.iter().zip(&models).collect();
        let options = PredictOptions {
            base: base.as_ref(),
            ..self.options
        };
        predict_battles_on(&workers, self.formatter, self.battles, options)
    }
}

/// Classifies battles on one backend; outputs are in input order.
pub fn predict_battles<B: Backend>(
    backend: &B,
    model: &Model<B>,
    formatter: &Formatter,
    battles: &[Battle],
    options: PredictOptions,
) -> Result<(Vec<RowOutput>, PredictStats)> {
    predict_battles_on(&[(backend, model)], formatter, battles, options)
}

/// Classifies battles on several backends, each with its copy of the model (the same
/// checkpoint), one thread per backend: the length-sorted batches are shared out by
/// [`share_batches`] and each sequence's logits go back to its own index, so the outputs are
/// in input order whatever ran where.
pub fn predict_battles_on<B: Backend>(
    workers: &[(&B, &Model<B>)],
    formatter: &Formatter,
    battles: &[Battle],
    options: PredictOptions,
) -> Result<(Vec<RowOutput>, PredictStats)> {
    let model = workers.first().context("no backend to predict on")?.1;
    match model.spec.head {
        HeadKind::SequenceClassification { num_labels: 3 } => {}
        _ => bail!(
            "{} is not a 3-label sequence classifier; train one with `verdict train` first",
            model.spec.architecture
        ),
    }
    let views = View::whole(options.tta_swap);
    // Sequence i * views + v is battle i, as given (v = 0) or swapped (v = 1).
    let sequences = formatter.encode_views(battles, views, model.spec.decoder.vocab_size)?;
    let lengths: Vec<usize> = sequences.iter().map(Vec::len).collect();
    let batches = length_sorted_batches(&lengths, options.batch_tokens);
    let batch_tokens: Vec<usize> = batches
        .iter()
        .map(|b| b.iter().map(|&j| lengths[j]).sum())
        .collect();
    let shares = share_batches(&batch_tokens, workers.len());
    let work = Work {
        sequences: &sequences,
        battles,
        batch_tokens: options.batch_tokens,
        progress: Mutex::new(Progress::new("predict", sequences.len())),
        failed: AtomicBool::new(false),
    };
    let per_worker = std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter()
            .zip(&shares)
            .map(|(&(backend, model), share)| {
                let (work, batches) = (&work, &batches);
                s.spawn(move || {
                    let mine = share.iter().map(|&b| batches[b].as_slice());
                    let result = work.classify(backend, model, mine);
                    if result.is_err() {
                        work.failed.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Result<Vec<_>>>()
    })?;
    let mut logits = vec![[0f32; 3]; sequences.len()];
    for (j, l) in per_worker.into_iter().flatten() {
        logits[j] = l;
    }
    if let Some(base) = options.base {
        for (i, offsets) in base.log_prob_views(battles)?.into_iter().enumerate() {
            for (v, offset) in offsets.iter().take(views.len()).enumerate() {
                let l = &mut logits[i * views.len() + v];
                for k in 0..3 {
                    l[k] += offset[k];
                }
            }
        }
    }
    let devices = workers
        .iter()
        .zip(&shares)
        .map(|(&(backend, _), share)| DeviceShare {
            backend: backend.describe(),
            batches: share.len(),
            sequences: share.iter().map(|&b| batches[b].len()).sum(),
            tokens: share.iter().map(|&b| batch_tokens[b]).sum(),
        })
        .collect();
    let rows = battles
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let direct = logits[i * views.len()];
            let swapped = options
                .tta_swap
                .then(|| unswap(logits[i * views.len() + 1]));
            let p = softmax(direct.map(f64::from));
            let probs = match swapped {
                Some(s) => {
                    let q = softmax(s.map(f64::from));
                    [0, 1, 2].map(|k| (p[k] + q[k]) / 2.0)
                }
                None => p,
            };
            RowOutput {
                id: b.id.clone(),
                probs,
                logits: direct,
                swapped_logits: swapped,
            }
        })
        .collect();
    let seconds = work
        .progress
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .elapsed();
    let tokens = lengths.iter().sum();
    let stats = PredictStats {
        rows: battles.len(),
        sequences: sequences.len(),
        tokens,
        seconds,
        rows_per_second: battles.len() as f64 / seconds.max(1e-9),
        tokens_per_second: tokens as f64 / seconds.max(1e-9),
        devices,
    };
    Ok((rows, stats))
}

/// What the prediction threads share.
struct Work<'a> {
    sequences: &'a [Vec<u32>],
    battles: &'a [Battle],
    /// `--batch-tokens`, for the error message.
    batch_tokens: usize,
    progress: Mutex<Progress>,
    /// Set by the first thread that fails, so the others stop early.
    failed: AtomicBool,
}

impl Work<'_> {
    /// Logits of the sequences of `batches` on `backend`, by sequence index. Checks the
    /// backend after each batch, so a device error or out-of-memory stops at the batch that
    /// met it (and, through `failed`, the other threads at their next batch).
    fn classify<'b, B: Backend>(
        &self,
        backend: &B,
        model: &Model<B>,
        batches: impl Iterator<Item = &'b [usize]>,
    ) -> Result<Vec<(usize, [f32; 3])>> {
        let mut logits = Vec::new();
        for batch in batches {
            if self.failed.load(Ordering::Relaxed) {
                break;
            }
            let seqs: Vec<&[u32]> = batch
                .iter()
                .map(|&j| self.sequences[j].as_slice())
                .collect();
            let tokens = seqs.iter().map(|s| s.len()).sum();
            let out = model.classify(backend, &PackedBatch::new(&seqs));
            backend.check().with_context(|| {
                format!(
                    "classifying a batch of {} sequences, {tokens} tokens (--batch-tokens {})",
                    seqs.len(),
                    self.batch_tokens
                )
            })?;
            let batch_logits = out.logits.context("classifier returned no logits")?;
            for (&j, l) in batch.iter().zip(batch_logits) {
                if l.iter().any(|x| !x.is_finite()) {
                    bail!(
                        "battle {}: non-finite logits {l:?}",
                        self.battles[j % self.battles.len()].id
                    );
                }
                logits.push((j, [l[0], l[1], l[2]]));
            }
            let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
            progress.advance(batch.len(), tokens, "");
        }
        Ok(logits)
    }
}

/// Writes raw logits (`id,logit_a,logit_b,logit_tie` and, with swap TTA, the swapped
/// battle's logits mapped back to the original order) atomically, for ensembling.
pub fn write_logits(path: &Path, rows: &[RowOutput]) -> Result<()> {
    crate::atomic::write_with(path, |w| {
        let tta = rows.first().is_some_and(|r| r.swapped_logits.is_some());
        write!(w, "id,logit_a,logit_b,logit_tie")?;
        writeln!(
            w,
            "{}",
            if tta {
                ",swap_logit_a,swap_logit_b,swap_logit_tie"
            } else {
                ""
            }
        )?;
        for r in rows {
            write!(
                w,
                "{},{},{},{}",
                r.id, r.logits[0], r.logits[1], r.logits[2]
            )?;
            match r.swapped_logits {
                Some(s) => writeln!(w, ",{},{},{}", s[0], s[1], s[2])?,
                None => writeln!(w)?,
            }
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Command line

/// `--tta` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tta {
    /// Also classify each battle with A and B exchanged and average the two.
    Swap,
    /// Each battle as given only.
    None,
}

/// `verdict predict`'s flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model folder with tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter folder (e.g. a `verdict train` run).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Competition CSV to predict (test.csv's columns; labels, if any, are ignored).
    #[arg(long)]
    test: PathBuf,
    /// Submission CSV: id, winner_model_a, winner_model_b, winner_tie.
    #[arg(long)]
    out: PathBuf,
    /// Test-time augmentation.
    #[arg(long, value_enum, default_value_t = Tta::Swap)]
    tta: Tta,
    #[command(flatten)]
    format: FormatOptions,
    /// Most tokens in one packed batch.
    #[arg(long, allow_negative_numbers = true, value_parser = range::count, default_value_t = 8192)]
    batch_tokens: usize,
    /// Also write raw logits (for ensembling) here.
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Also write timing, sizes and each device's share and memory peak as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Several devices, e.g. 0,1 (Kaggle's two T4s; also cuda:0,cuda:1) or emu,emu (two
    /// emulated devices): one model copy per device, the batches shared among them, rows
    /// written in input order.
    #[arg(long, value_delimiter = ',', conflicts_with = "device", value_parser = Placement::devices_item)]
    devices: Vec<Device>,
    #[command(flatten)]
    read: ReadArgs,
    #[command(flatten)]
    quant: QuantArgs,
}

/// `verdict predict`: a prediction file (and optionally logits and timings).
pub fn run(args: &Args) -> Result<()> {
    crate::atomic::check_output_files(&[
        ("--out", Some(&args.out)),
        ("--logits-out", args.logits_out.as_deref()),
        ("--json", args.json.as_deref()),
    ])?;
    let placement = if args.devices.is_empty() {
        args.device.device.clone()
    } else {
        Placement::devices(&args.devices)?
    };
    let (battles, _) = read_battles(&args.test, args.read.options())?;
    let formatter = Formatter::from_model_dir(&args.model, args.format)?;
    let (rows, stats) = placement.run(PredictJob {
        model_dir: &args.model,
        adapter_dir: args.adapter.as_deref(),
        quant: args.quant.quant()?,
        formatter: &formatter,
        battles: &battles,
        options: PredictOptions {
            tta_swap: args.tta == Tta::Swap,
            batch_tokens: args.batch_tokens,
            base: None,
        },
    })?;
    write_predictions(&args.out, &predictions(&rows))?;
    if let Some(path) = &args.logits_out {
        write_logits(path, &rows)?;
    }
    if let Some(path) = &args.json {
        crate::atomic::write_json(path, &stats)?;
    }
    println!(
        "wrote {} predictions -> {} ({:.1} rows/s, {:.0} tokens/s) on {}",
        stats.rows,
        args.out.display(),
        stats.rows_per_second,
        stats.tokens_per_second,
        describe_devices(&stats.devices)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_the_token_budget_and_cover_every_sequence_once() {
        let lengths = [5, 100, 30, 30, 7, 250, 1];
        let batches = length_sorted_batches(&lengths, 64);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for b in &batches {
            let total: usize = b.iter().map(|&i| lengths[i]).sum();
            assert!(total <= 64 || b.len() == 1, "{b:?}");
        }
        assert_eq!(batches[0], vec![5], "longest first, alone when over budget");
    }

    #[test]
    fn shared_batches_cover_each_batch_once_and_balance_tokens() {
        // Longest first, as length_sorted_batches makes them.
        let tokens = [900, 800, 800, 700, 650, 640, 300, 120, 40];
        let shares = share_batches(&tokens, 2);
        let mut all: Vec<usize> = shares.concat();
        all.sort();
        assert_eq!(all, (0..tokens.len()).collect::<Vec<_>>());
        let load = |s: &Vec<usize>| s.iter().map(|&b| tokens[b]).sum::<usize>();
        let (a, b) = (load(&shares[0]), load(&shares[1]));
        assert!(a.abs_diff(b) <= 900, "{a} vs {b}: {shares:?}");
        assert_eq!(shares[0][0], 0, "the first batch goes to the first worker");
        assert_eq!(shares[1][0], 1, "the second to the idle second worker");
        assert!(shares.iter().all(|s| s.windows(2).all(|w| w[0] < w[1])));
    }

    #[test]
    fn more_workers_than_batches_leaves_some_idle() {
        let shares = share_batches(&[10, 5], 3);
        assert_eq!(shares, vec![vec![0], vec![1], vec![]]);
        assert_eq!(share_batches(&[], 2), vec![Vec::<usize>::new(); 2]);
    }

    #[test]
    fn unswap_exchanges_a_and_b_only() {
        assert_eq!(unswap([1, 2, 3]), [2, 1, 3]);
    }
}
