//! `verdict bundle --out DIR`: the folder to upload as a Kaggle dataset (issue #18) — this
//! binary, a README and two notebooks: offline inference (`verdict predict` on the
//! competition's test.csv with an attached model and adapter, writing
//! /kaggle/working/submission.csv, on the GPUs when there are any, else on the CPU) and
//! training on a T4 (`verdict train`).
//!
//! Place in the data flow: after training, before a Kaggle submission; nothing reads it back.
//! tools/check-bundle.sh opens a bundle and checks it (glibc bound, kernel images, no Python
//! or libtorch at run time, and both notebooks run end to end on the CPU with tiny fixtures
//! standing in for the Kaggle inputs through the `VERDICT_*` variables the notebooks read).

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};

/// Flags of `verdict bundle`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Folder to write (must not exist, or be empty): verdict, README.md,
    /// verdict-predict.ipynb, verdict-train-t4.ipynb.
    #[arg(long)]
    pub out: PathBuf,
    /// The binary to put in the bundle [default: this verdict].
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

/// The notebook that predicts the competition's test set.
pub const PREDICT_NOTEBOOK: &str = "verdict-predict.ipynb";
/// The notebook that trains an adapter on a T4.
pub const TRAIN_NOTEBOOK: &str = "verdict-train-t4.ipynb";

/// Writes the bundle.
pub fn run(args: &Args) -> Result<()> {
    crate::atomic::check_output("--out", &args.out, true)?;
    if args.out.is_dir() {
        let entries = fs::read_dir(&args.out)
            .with_context(|| format!("cannot list --out {}", args.out.display()))?;
        ensure!(
            entries.count() == 0,
            "--out {}: the folder is not empty; give a new or empty folder",
            args.out.display()
        );
    }
    let binary = match &args.binary {
        Some(path) => path.clone(),
        None => std::env::current_exe().context("cannot find this verdict binary")?,
    };
    if !binary.is_file() {
        bail!("--binary {}: no such file", binary.display());
    }
    fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let target = args.out.join("verdict");
    fs::copy(&binary, &target)
        .with_context(|| format!("cannot copy {} to {}", binary.display(), target.display()))?;
    set_executable(&target)?;
    let kernels = crate::backend::cuda::kernels::prebuilt();
    write_text(&args.out.join("README.md"), &readme(kernels))?;
    write_text(
        &args.out.join(PREDICT_NOTEBOOK),
        &notebook_text(&predict_notebook())?,
    )?;
    write_text(
        &args.out.join(TRAIN_NOTEBOOK),
        &notebook_text(&train_notebook())?,
    )?;
    println!(
        "wrote {}: verdict ({:.1} MiB, {}), README.md, {PREDICT_NOTEBOOK}, {TRAIN_NOTEBOOK}",
        args.out.display(),
        fs::metadata(&target)?.len() as f64 / (1 << 20) as f64,
        if kernels {
            "prebuilt kernels"
        } else {
            "no prebuilt kernels: CPU, or NVRTC at run time"
        }
    );
    Ok(())
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    crate::atomic::write_bytes(path, text.as_bytes())
}

#[cfg(unix)]
fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", path.display()))
}

#[cfg(not(unix))]
fn set_executable(_path: &Path) -> Result<()> {
    Ok(())
}

fn readme(kernels: bool) -> String {
    format!(
        "# verdict for Kaggle\n\n\
         Upload this folder as a Kaggle dataset and attach it to a notebook, with the model\n\
         (a Hugging Face checkpoint folder: config.json, tokenizer.json, *.safetensors) and,\n\
         for prediction, the LoRA adapter folder that `verdict train` wrote.\n\n\
         - `verdict`: the binary (Linux x86-64, glibc 2.35 or newer; no Python, no libtorch).\n  \
           Kernels: {}.\n\
         - `{PREDICT_NOTEBOOK}`: offline inference. Runs `verdict predict` on the\n  \
           competition's test.csv with swap TTA on up to two GPUs (`--devices 0,1`), or on the\n  \
           CPU when there is no GPU, and writes /kaggle/working/submission.csv. Internet off.\n\
         - `{TRAIN_NOTEBOOK}`: trains a LoRA adapter with NF4 weights on a T4\n  \
           (`verdict train --quant nf4 --heads three`) into /kaggle/working/run.\n\n\
         The notebooks find their inputs under /kaggle/input (the first verdict binary, model\n\
         folder, adapter folder, test.csv and train.csv there); the `VERDICT_*` variables in\n\
         their first cell override each path.\n\n\
         Kaggle's drivers are CUDA 12: the embedded kernels are built with CUDA 12.4 (NVRTC),\n\
         whose machine code loads on every driver since R525. A card with none of the\n\
         embedded archs' machine code gets the PTX compiled by its driver, or else compiled at\n\
         start with the NVRTC library that Kaggle's PyTorch install brings\n\
         (site-packages/nvidia/cuda_nvrtc). `VERDICT_NVRTC=/path/libnvrtc.so.12` names another;\n\
         `VERDICT_KERNELS=nvrtc` forces run-time compilation.\n",
        if kernels {
            "prebuilt by CUDA 12.4 (SASS sm_75, 80, 86, 89, 90 and compute_90 PTX), with NVRTC \
             as the fallback"
        } else {
            "none prebuilt (built without NVRTC 12): compiled with NVRTC at run time"
        }
    )
}

/// A notebook (nbformat 4) of these cells: `("markdown" | "code", text)`.
fn notebook(cells: &[(&str, &str)]) -> Value {
    let cells: Vec<Value> = cells
        .iter()
        .map(|&(kind, text)| {
            let source: Vec<String> = text.split_inclusive('\n').map(String::from).collect();
            if kind == "code" {
                json!({"cell_type": "code", "execution_count": null, "metadata": {},
                       "outputs": [], "source": source})
            } else {
                json!({"cell_type": "markdown", "metadata": {}, "source": source})
            }
        })
        .collect();
    json!({
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
            "kaggle": {"accelerator": "nvidiaTeslaT4", "isInternetEnabled": false}
        },
        "nbformat": 4,
        "nbformat_minor": 5
    })
}

fn notebook_text(value: &Value) -> Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

/// The cells both notebooks start with: finding the inputs, the binary and the GPUs.
const COMMON_CELLS: &str = r#"# Inputs: found under /kaggle/input, each overridable by an environment variable.
import csv, glob, os, shlex, shutil, subprocess, sys

def found(pattern, what, variable):
    """$variable, or the first file matching `pattern` under /kaggle/input."""
    if os.environ.get(variable):
        return os.environ[variable]
    matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not matches:
        raise SystemExit(f"no {what} under /kaggle/input ({pattern}); attach it or set {variable}")
    return matches[0]

def folder(pattern, what, variable):
    """$variable, or the folder of the first file matching `pattern` under /kaggle/input."""
    if os.environ.get(variable):
        return os.environ[variable]
    return os.path.dirname(found(pattern, what, variable))

BINARY = found("/kaggle/input/**/verdict", "verdict binary (this bundle)", "VERDICT_BINARY")
MODEL = folder("/kaggle/input/**/config.json", "model folder", "VERDICT_MODEL")
WORK = os.environ.get("VERDICT_WORK", "/kaggle/working")
print("binary:", BINARY, "\nmodel:", MODEL, "\nwork:", WORK)
"#;

const BINARY_CELL: &str = r#"# Kaggle's inputs are read-only and lose the executable bit: run a copy.
os.makedirs(WORK, exist_ok=True)
VERDICT = os.path.join(WORK, "verdict")
shutil.copyfile(BINARY, VERDICT)
os.chmod(VERDICT, 0o755)
subprocess.run([VERDICT, "--version"], check=True)

def gpus():
    """The number of NVIDIA GPUs here (0 without a driver, or with VERDICT_FORCE_CPU=1)."""
    if os.environ.get("VERDICT_FORCE_CPU") == "1":
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines())

GPUS = gpus()
print(f"{GPUS} GPU(s)")
"#;

fn predict_notebook() -> Value {
    let settings = format!(
        "{COMMON_CELLS}ADAPTER = folder(\"/kaggle/input/**/adapter_config.json\", \
         \"LoRA adapter folder\", \"VERDICT_ADAPTER\")\n\
         TEST = found(\"/kaggle/input/**/test.csv\", \"competition test.csv\", \"VERDICT_TEST\")\n\
         SUBMISSION = os.environ.get(\"VERDICT_OUT\", os.path.join(WORK, \"submission.csv\"))\n\
         # More flags for verdict predict, e.g. \"--max-len 2048 --batch-tokens 16384\".\n\
         EXTRA = shlex.split(os.environ.get(\"VERDICT_PREDICT_ARGS\", \"\"))\n\
         print(\"adapter:\", ADAPTER, \"\\ntest:\", TEST, \"\\nsubmission:\", SUBMISSION)\n"
    );
    let predict = r#"# Predict on the GPUs (Kaggle: two T4s) or, without one, on the CPU; a GPU run that
# fails is retried on the CPU, so a submission is always written.
def predict(device_flags):
    command = [VERDICT, "predict", "--model", MODEL, "--adapter", ADAPTER, "--test", TEST,
               "--out", SUBMISSION, "--tta", "swap", *device_flags, *EXTRA]
    print("$", " ".join(shlex.quote(c) for c in command), flush=True)
    return subprocess.run(command).returncode

if GPUS:
    status = predict(["--devices", ",".join(str(i) for i in range(min(GPUS, 2)))])
    if status != 0:
        print(f"GPU prediction failed (exit {status}); predicting on the CPU", flush=True)
        status = predict(["--device", "cpu"])
else:
    status = predict(["--device", "cpu"])
if status != 0:
    raise SystemExit(f"verdict predict failed (exit {status})")
"#;
    let check = r#"# The submission: one row per test row, three probabilities that sum to 1.
with open(TEST, newline="", encoding="utf-8") as f:
    test_ids = [row["id"] for row in csv.DictReader(f)]
with open(SUBMISSION, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
assert [r["id"] for r in rows] == test_ids, "submission ids differ from test.csv's"
for r in rows:
    total = sum(float(r[k]) for k in ("winner_model_a", "winner_model_b", "winner_tie"))
    assert abs(total - 1) < 1e-3, f"row {r['id']}: probabilities sum to {total}"
print(f"{SUBMISSION}: {len(rows)} rows")
print(open(SUBMISSION, encoding="utf-8").read()[:500])
"#;
    notebook(&[
        (
            "markdown",
            "# verdict: offline inference\n\nAttach the verdict bundle, the model folder and the \
             adapter folder; internet off. Writes /kaggle/working/submission.csv.\n",
        ),
        ("code", &settings),
        ("code", BINARY_CELL),
        ("code", predict),
        ("code", check),
    ])
}

fn train_notebook() -> Value {
    let settings = format!(
        "{COMMON_CELLS}TRAIN = found(\"/kaggle/input/**/train.csv\", \"competition train.csv\", \"VERDICT_TRAIN\")\n\
         RUN = os.environ.get(\"VERDICT_RUN\", os.path.join(WORK, \"run\"))\n\
         # A T4 has 16 GB and f16 tensor cores: NF4 weights, LoRA r 16, three heads.\n\
         ARGS = shlex.split(os.environ.get(\"VERDICT_TRAIN_ARGS\", \
         \"--quant nf4 --lora-r 16 --heads three --max-len 1024 --epochs 1\"))\n\
         print(\"train:\", TRAIN, \"\\nrun:\", RUN, \"\\nargs:\", ARGS)\n"
    );
    let train = r#"# Train on the first GPU (a T4); without one, on the CPU (only for small checks).
device = ["--device", "cuda:0"] if GPUS else ["--device", "cpu"]
command = [VERDICT, "train", "--model", MODEL, "--train", TRAIN, "--out", RUN, *device, *ARGS]
print("$", " ".join(shlex.quote(c) for c in command), flush=True)
status = subprocess.run(command).returncode
if status != 0:
    raise SystemExit(f"verdict train failed (exit {status})")
"#;
    let check = r#"# The adapter to attach to the inference notebook (save this run's output as a dataset).
for name in ("adapter_config.json", "adapter_model.safetensors"):
    path = os.path.join(RUN, name)
    assert os.path.isfile(path), f"no {path}"
    print(path, os.path.getsize(path), "bytes")
"#;
    notebook(&[
        (
            "markdown",
            "# verdict: train a LoRA adapter on a T4\n\nAttach the verdict bundle, the model \
             folder and the competition data. The adapter lands in /kaggle/working/run.\n",
        ),
        ("code", &settings),
        ("code", BINARY_CELL),
        ("code", train),
        ("code", check),
    ])
}
