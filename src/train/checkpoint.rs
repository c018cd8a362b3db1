//! Checkpoints: everything a killed run needs to continue as if it had never stopped.
//!
//! Place in the data flow: the loop saves every `--save-every` steps and at the end; `--resume`
//! loads the newest. A run folder looks like
//! ```text
//! RUN/train_config.json                 the run's configuration (written once, first)
//! RUN/adapter_config.json               the newest adapter, so RUN is itself a PEFT folder
//! RUN/adapter_model.safetensors
//! RUN/checkpoints/step-00000100/        adapter_config.json, adapter_model.safetensors,
//!                                       trainer_state.safetensors (AdamW m and v of every
//!                                       parameter, the parameters outside the adapter),
//!                                       trainer_state.json (step, data position, clock)
//! RUN/metrics.jsonl  RUN/loss.png  RUN/summary.json
//! ```
//! A checkpoint is written in full to a hidden temporary folder, flushed, and renamed to
//! `step-N` (one atomic rename), so the newest `step-*` folder is always complete; older ones
//! are deleted only afterwards. Parameters and moments are stored as f32, exactly as held,
//! which is what makes a resumed run bit-identical to an uninterrupted one. The data order
//! is not stored: it is a function of (seed, epoch) (see `batches`).

use crate::model::peft::{self, in_adapter, write_adapter, AdapterSettings};
use crate::model::weights::write_f32_tensors;
use crate::model::weights::Checkpoint;
use crate::train::batches::Position;
use crate::train::optimizer::{AdamW, AdamWConfig};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

/// Folder of the checkpoints inside a run.
pub const CHECKPOINTS: &str = "checkpoints";

/// The loop's position and counters at a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Steps the run makes in all.
    pub total_steps: usize,
    /// Data position of the last step done (`None` before the first).
    pub position: Option<Position>,
    /// Training seconds so far (resumed runs continue the clock).
    pub elapsed_s: f64,
    /// Training tokens seen so far.
    pub tokens_seen: u64,
    /// Hash of the training token ids: resuming on different data is refused.
    pub data_fingerprint: u64,
    /// Every trainable parameter's name and shape, in order.
    pub params: Vec<(String, Vec<usize>)>,
    /// The loss scaler after the last step, on a device whose gradients pass through f16
    /// (`train::scaler`); `None` elsewhere.
    #[serde(default)]
    pub loss_scaler: Option<crate::train::scaler::LossScaler>,
    /// AdamW updates done: fewer than `step` when the loss scaler skipped steps. `None`
    /// (older checkpoints): `step`.
    #[serde(default)]
    pub optimizer_steps: Option<u64>,
}

impl TrainerState {
    /// AdamW updates done so far.
    pub fn updates(&self) -> u64 {
        self.optimizer_steps.unwrap_or(self.step as u64)
    }
}

/// The folder name of step `step`'s checkpoint.
pub fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// Writes step `state.step`'s checkpoint into `run/checkpoints/step-N` atomically, then
/// makes it the run's top-level adapter and removes older checkpoints. Returns its folder.
pub fn save(
    run: &Path,
    settings: &AdapterSettings,
    params: &[Vec<f32>],
    adam: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let root = run.join(CHECKPOINTS);
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = step_dir_name(state.step);
    let tmp = root.join(format!(".{name}.tmp.{}", std::process::id()));
    let dest = root.join(&name);
    let written = write_checkpoint(&tmp, settings, params, adam, state);
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!("cannot write checkpoint {}", tmp.display())));
    }
    if dest.exists() {
        // Only after a resume that redid steps up to a checkpoint it already had.
        fs::remove_dir_all(&dest).with_context(|| format!("cannot replace {}", dest.display()))?;
    }
    fs::rename(&tmp, &dest)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
    sync_dir(&root)?;
    publish(run, &dest)?;
    remove_all_but(&root, &name)?;
    Ok(dest)
}

/// Makes checkpoint `dir`'s adapter the run's top-level adapter. Each file is replaced
/// atomically and the config never changes within a run, so the pair is always consistent.
pub fn publish(run: &Path, dir: &Path) -> Result<()> {
    for file in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
        let from = dir.join(file);
        let bytes = fs::read(&from).with_context(|| format!("cannot read {}", from.display()))?;
        crate::atomic::write_bytes(&run.join(file), &bytes)?;
    }
    Ok(())
}

fn write_checkpoint(
    dir: &Path,
    settings: &AdapterSettings,
    params: &[Vec<f32>],
    adam: &AdamW,
    state: &TrainerState,
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let names: Vec<String> = state.params.iter().map(|p| p.0.clone()).collect();
    let shapes: Vec<Vec<usize>> = state.params.iter().map(|p| p.1.clone()).collect();
    ensure!(
        params.len() == names.len() && adam.m.len() == names.len(),
        "checkpoint: parameter count mismatch"
    );
    write_adapter(dir, settings, &names, &shapes, params)?;
    // The parameters outside the adapter, then both moments of every parameter.
    let own: Vec<usize> = (0..names.len())
        .filter(|&i| !in_adapter(&names[i]))
        .collect();
    let mut tensors: Vec<(String, Vec<usize>)> = own
        .iter()
        .map(|&i| (format!("param/{}", names[i]), shapes[i].clone()))
        .collect();
    for kind in ["exp_avg", "exp_avg_sq"] {
        tensors
            .extend((0..names.len()).map(|i| (format!("{kind}/{}", names[i]), shapes[i].clone())));
    }
    let n = names.len();
    write_f32_tensors(&dir.join("trainer_state.safetensors"), &tensors, |k| {
        if k < own.len() {
            params[own[k]].clone()
        } else if k < own.len() + n {
            adam.m[k - own.len()].clone()
        } else {
            adam.v[k - own.len() - n].clone()
        }
    })?;
    ensure!(
        adam.step == state.updates(),
        "optimizer has done {} steps, the trainer state says {}",
        adam.step,
        state.updates()
    );
    crate::atomic::write_json(&dir.join("trainer_state.json"), state)?;
    sync_dir(dir)
}

/// Flushes a folder's entries (renames, new files) to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot flush folder {}", dir.display()))
}

/// Removes every entry of `root` except `keep`: older checkpoints and the temporary folders
/// of killed saves.
fn remove_all_but(root: &Path, keep: &str) -> Result<()> {
    for entry in fs::read_dir(root).with_context(|| format!("cannot list {}", root.display()))? {
        let entry = entry?;
        if entry.file_name() != keep {
            fs::remove_dir_all(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// The newest complete checkpoint of a run, if any (temporary folders are ignored).
pub fn latest(run: &Path) -> Result<Option<PathBuf>> {
    let root = run.join(CHECKPOINTS);
    if !root.exists() {
        return Ok(None);
    }
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in fs::read_dir(&root).with_context(|| format!("cannot list {}", root.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if !matches!(&best, Some((b, _)) if *b >= step) {
            best = Some((step, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Everything a checkpoint restores.
pub struct Restored {
    pub state: TrainerState,
    pub params: Vec<Vec<f32>>,
    pub adam: AdamW,
}

/// Loads checkpoint `dir`, checking its parameters are exactly `expected` (name, shape) in order.
pub fn load(
    dir: &Path,
    expected: &[(String, Vec<usize>)],
    adam_config: AdamWConfig,
) -> Result<Restored> {
    let path = dir.join("trainer_state.json");
    let state: TrainerState = crate::atomic::read_json(&path, "a trainer state")?;
    if state.params != expected {
        let first = state.params.iter().zip(expected).find(|(a, b)| a != b);
        bail!(
            "{}: the checkpoint's {} parameters differ from the model's {} (first difference: {:?})",
            dir.display(),
            state.params.len(),
            expected.len(),
            first
        );
    }
    let mut adapter = Checkpoint::open_file(&dir.join("adapter_model.safetensors"))?;
    let mut own = Checkpoint::open_file(&dir.join("trainer_state.safetensors"))?;
    let mut params = Vec::with_capacity(expected.len());
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for (name, shape) in expected {
        params.push(if in_adapter(name) {
            adapter.take(name, shape)?
        } else {
            own.take(&format!("param/{name}"), shape)?
        });
        m.push(own.take(&format!("exp_avg/{name}"), shape)?);
        v.push(own.take(&format!("exp_avg_sq/{name}"), shape)?);
    }
    adapter.finish(|_| false)?;
    own.finish(|_| false)?;
    let adam = AdamW {
        config: adam_config,
        step: state.updates(),
        m,
        v,
    };
    Ok(Restored {
        state,
        params,
        adam,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Fixture = (
        AdapterSettings,
        Vec<(String, Vec<usize>)>,
        Vec<Vec<f32>>,
        AdamW,
    );

    fn fixture() -> Fixture {
        let settings = AdapterSettings {
            r: 2,
            lora_alpha: 4.0,
            lora_dropout: 0.0,
            use_rslora: false,
            target_modules: vec!["q_proj".into()],
            base_model: "base".into(),
            layers_to_transform: None,
        };
        let params = vec![
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string(),
                vec![2, 3],
            ),
            ("base_model.model.score.weight".to_string(), vec![3, 1]),
            ("aux_model_a.weight".to_string(), vec![2, 1]),
        ];
        let values: Vec<Vec<f32>> = params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (0..p.1.iter().product::<usize>())
                    .map(|j| (i * 10 + j) as f32 * 0.1 + 1e-7)
                    .collect()
            })
            .collect();
        let mut adam = AdamW::new(
            AdamWConfig::default(),
            &values.iter().map(Vec::len).collect::<Vec<_>>(),
        );
        adam.update(&mut values.clone(), &values, &[0.1; 3]);
        (settings, params, values, adam)
    }

    fn state(step: usize, params: &[(String, Vec<usize>)]) -> TrainerState {
        TrainerState {
            step,
            total_steps: 10,
            position: Some(Position {
                epoch: 0,
                step_in_epoch: step - 1,
            }),
            elapsed_s: 1.5,
            tokens_seen: 99,
            data_fingerprint: 7,
            params: params.to_vec(),
            loss_scaler: None,
            optimizer_steps: None,
        }
    }

    /// A step skipped by the loss scaler leaves AdamW one update behind the loop: the
    /// checkpoint keeps both counts and the scaler, and a resumed AdamW continues from its
    /// own count (bias corrections), not the loop's.
    #[test]
    fn skipped_steps_and_the_loss_scaler_survive_a_checkpoint() {
        let run = tempfile::tempdir().unwrap();
        let (settings, params, values, adam) = fixture();
        let mut scaler = crate::train::scaler::LossScaler::new(65536.0, 2);
        scaler.update(true);
        let skipped = TrainerState {
            loss_scaler: Some(scaler),
            optimizer_steps: Some(adam.step),
            ..state(2, &params)
        };
        let dir = save(run.path(), &settings, &values, &adam, &skipped).unwrap();
        let back = load(&dir, &params, AdamWConfig::default()).unwrap();
        assert_eq!((back.adam.step, back.state.step), (1, 2));
        assert_eq!(back.state.loss_scaler, Some(scaler));
        let wrong = TrainerState {
            optimizer_steps: None,
            ..skipped
        };
        let err = save(run.path(), &settings, &values, &adam, &wrong).unwrap_err();
        assert!(
            format!("{err:#}").contains("optimizer has done 1 steps"),
            "{err:#}"
        );
    }

    #[test]
    fn old_trainer_states_read_with_no_scaler_and_one_update_per_step() {
        let mut json = serde_json::to_value(state(3, &[])).unwrap();
        let fields = json.as_object_mut().unwrap();
        fields.remove("loss_scaler");
        fields.remove("optimizer_steps");
        let old: TrainerState = serde_json::from_value(json).unwrap();
        assert_eq!((old.loss_scaler, old.updates()), (None, 3));
    }

    #[test]
    fn save_then_load_restores_every_bit() {
        let run = tempfile::tempdir().unwrap();
        let (settings, params, values, adam) = fixture();
        let dir = save(run.path(), &settings, &values, &adam, &state(1, &params)).unwrap();
        assert_eq!(latest(run.path()).unwrap(), Some(dir.clone()));
        let back = load(&dir, &params, AdamWConfig::default()).unwrap();
        assert_eq!(back.params, values);
        assert_eq!(back.adam, adam);
        assert_eq!(back.state, state(1, &params));
        assert!(
            run.path().join("adapter_model.safetensors").exists(),
            "top-level adapter"
        );
        let adapter = Checkpoint::open_file(&run.path().join("adapter_model.safetensors")).unwrap();
        let names: Vec<&str> = adapter.names().collect();
        assert_eq!(
            names,
            [
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                "base_model.model.score.weight"
            ],
            "aux heads stay out of the PEFT adapter"
        );
    }

    #[test]
    fn a_newer_checkpoint_replaces_older_ones_and_killed_saves_are_ignored() {
        let run = tempfile::tempdir().unwrap();
        let (settings, params, values, mut adam) = fixture();
        save(run.path(), &settings, &values, &adam, &state(1, &params)).unwrap();
        // A save killed midway leaves only a hidden temporary folder.
        let half = run.path().join(CHECKPOINTS).join(".step-00000002.tmp.1");
        fs::create_dir_all(&half).unwrap();
        fs::write(half.join("adapter_model.safetensors"), b"half").unwrap();
        assert!(latest(run.path())
            .unwrap()
            .unwrap()
            .ends_with("step-00000001"));
        adam.step = 3;
        let newest = save(run.path(), &settings, &values, &adam, &state(3, &params)).unwrap();
        let left: Vec<_> = fs::read_dir(run.path().join(CHECKPOINTS))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [newest.file_name().unwrap()]);
    }

    #[test]
    fn loading_into_a_different_model_names_the_first_difference() {
        let run = tempfile::tempdir().unwrap();
        let (settings, params, values, adam) = fixture();
        let dir = save(run.path(), &settings, &values, &adam, &state(1, &params)).unwrap();
        let mut other = params.clone();
        other[1].1 = vec![3, 2];
        let err = load(&dir, &other, AdamWConfig::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("score.weight") && err.contains("differ"),
            "{err}"
        );
    }
}
