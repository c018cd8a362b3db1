//! `verdict inspect`: what a loaded model holds in memory, component by component.
//!
//! Place in the data flow: loads a checkpoint exactly as `logits`, `predict` and `train` do
//! (same [`Quant`]), then walks the CPU model: parameters, bytes and storage of the
//! embedding, each projection kind over all layers, the norms and the head, the bits per
//! parameter of the quantized projections, and the process's peak resident memory.

use crate::backend::cpu::Cpu;
use crate::backend::{Weight, WeightData};
use crate::model::peft::Projection;
use crate::model::{Head, Model};
use crate::quant::{Quant, QuantArgs};
use anyhow::Result;
use serde::Serialize;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Parameters and memory of one component.
#[derive(Debug, Clone, Serialize)]
pub struct Component {
    /// `embed_tokens`, `q_proj` ... `down_proj` (all layers), `norms`, `score` or `lm_head`.
    pub name: String,
    /// Tensors summed (one per layer for a projection).
    pub tensors: usize,
    pub params: usize,
    /// Bytes held in memory (NF4: packed nibbles plus absmax tables).
    pub bytes: usize,
    /// Storage: `f32`, `nf4 bs64 dq` (blocksize, double quant), or several joined by `+`.
    pub dtype: String,
    pub bits_per_param: f64,
}

/// Parameters and bytes of a group of components.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Totals {
    pub params: usize,
    pub bytes: usize,
    pub bits_per_param: f64,
}

/// The `verdict inspect` report.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub model: String,
    pub architecture: String,
    pub layers: usize,
    /// What `--quant` asked for.
    pub quant: String,
    /// `quantization_config` of a bitsandbytes 4-bit checkpoint, if it is one.
    pub checkpoint_quantization: Option<String>,
    pub components: Vec<Component>,
    pub total: Totals,
    /// The NF4 or bf16 projections alone; `None` when nothing is quantized.
    pub quantized_projections: Option<Totals>,
    /// Wall time of `Model::load`.
    pub load_seconds: f64,
    /// The process's peak resident set after loading (Linux `VmHWM`), bytes.
    pub peak_rss_bytes: Option<u64>,
}

/// `verdict inspect`'s flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face model folder (config.json, safetensors).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    quant: QuantArgs,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `verdict inspect`: the memory report as a table or JSON.
pub fn run(args: &Args) -> Result<()> {
    let report = run_inspect(&args.model, args.quant.quant()?)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", format_memory_report(&report));
    }
    Ok(())
}

/// Loads `model_dir` on the CPU as `quant` says and reports its memory.
pub fn run_inspect(model_dir: &Path, quant: Quant) -> Result<MemoryReport> {
    let start = Instant::now();
    let model = Model::load(&Cpu, model_dir, None, quant)?;
    let load_seconds = start.elapsed().as_secs_f64();
    let mut report = memory_report(&model, quant);
    report.model = model_dir.display().to_string();
    report.load_seconds = load_seconds;
    report.peak_rss_bytes = peak_rss_bytes();
    Ok(report)
}

/// The memory held by `model`, loaded with `quant` (load time and RSS left empty).
pub fn memory_report(model: &Model<Cpu>, quant: Quant) -> MemoryReport {
    let decoder = &model.decoder;
    let mut components = vec![component("embed_tokens", [&decoder.embed_tokens])];
    let mut quantized: Vec<&Weight<Cpu>> = Vec::new();
    for p in Projection::ALL {
        let weights: Vec<&Weight<Cpu>> = (0..decoder.num_layers())
            .map(|l| &decoder.projection(l, p).weight)
            .collect();
        quantized.extend(
            weights
                .iter()
                .filter(|w| matches!(w.data, WeightData::Nf4(_) | WeightData::Bf16(_))),
        );
        components.push(component(p.peft_name(), weights));
    }
    let norms = decoder.norm_weights();
    let norm_params = norms.iter().map(|n| n.len()).sum();
    components.push(Component {
        name: "norms".into(),
        tensors: norms.len(),
        params: norm_params,
        bytes: norm_params * 4,
        dtype: "f32".into(),
        bits_per_param: 32.0,
    });
    match &model.head {
        Head::Score(w) => components.push(component("score", [w])),
        Head::Lm(lm) => {
            if let Some(w) = &lm.weight {
                components.push(component("lm_head", [w]));
            }
        }
    }
    let total = totals(components.iter().map(|c| (c.params, c.bytes)));
    let quantized_projections =
        (!quantized.is_empty()).then(|| totals(quantized.iter().map(|w| (params(w), bytes(w)))));
    MemoryReport {
        model: String::new(),
        architecture: model.spec.architecture.clone(),
        layers: decoder.num_layers(),
        quant: match quant {
            Quant::None => "none".into(),
            Quant::Bf16 => "bf16".into(),
            Quant::Nf4(o) => format!(
                "nf4 (blocksize {}, double quant {})",
                o.blocksize,
                if o.double_quant { "on" } else { "off" }
            ),
        },
        checkpoint_quantization: model.spec.bnb_4bit.as_ref().map(|b| {
            format!(
                "bitsandbytes 4-bit nf4 (double quant {}, compute dtype {})",
                if b.double_quant { "on" } else { "off" },
                b.compute_dtype.as_deref().unwrap_or("unset")
            )
        }),
        components,
        total,
        quantized_projections,
        load_seconds: 0.0,
        peak_rss_bytes: None,
    }
}

/// The report as a table.
pub fn format_memory_report(r: &MemoryReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} ({}, {} layers), --quant {}",
        r.model, r.architecture, r.layers, r.quant
    );
    if let Some(q) = &r.checkpoint_quantization {
        let _ = writeln!(s, "checkpoint: {q}");
    }
    let _ = writeln!(
        s,
        "{:<14} {:>7} {:>15} {:>11}  {:<12} {:>10}",
        "component", "tensors", "params", "memory", "dtype", "bits/param"
    );
    for c in &r.components {
        let _ = writeln!(
            s,
            "{:<14} {:>7} {:>15} {:>11}  {:<12} {:>10.3}",
            c.name,
            c.tensors,
            c.params,
            human_bytes(c.bytes as u64),
            c.dtype,
            c.bits_per_param
        );
    }
    let _ = writeln!(
        s,
        "{:<14} {:>7} {:>15} {:>11}  {:<12} {:>10.3}",
        "total",
        "",
        r.total.params,
        human_bytes(r.total.bytes as u64),
        "",
        r.total.bits_per_param
    );
    if let Some(q) = &r.quantized_projections {
        let _ = writeln!(
            s,
            "quantized projections: {} params, {}, {:.4} bits/param",
            q.params,
            human_bytes(q.bytes as u64),
            q.bits_per_param
        );
    }
    let _ = write!(s, "loaded in {:.1} s", r.load_seconds);
    if let Some(rss) = r.peak_rss_bytes {
        let _ = write!(s, ", peak resident memory {}", human_bytes(rss));
    }
    s.push('\n');
    s
}

/// `bytes` in B, KiB, MiB or GiB.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

fn params(w: &Weight<Cpu>) -> usize {
    w.out_features * w.in_features
}

fn bytes(w: &Weight<Cpu>) -> usize {
    match &w.data {
        WeightData::Dense(values) => values.len() * 4,
        WeightData::Nf4(q) => q.bytes(),
        WeightData::Bf16(w) => w.bytes(),
        WeightData::Half(never) => match *never {},
    }
}

fn storage(w: &Weight<Cpu>) -> String {
    match &w.data {
        WeightData::Dense(_) => "f32".into(),
        WeightData::Nf4(q) => {
            let double = matches!(q.absmax(), crate::quant::nf4::Absmax::Double { .. });
            format!("nf4 bs{}{}", q.blocksize(), if double { " dq" } else { "" })
        }
        WeightData::Bf16(_) => "bf16".into(),
        WeightData::Half(never) => match *never {},
    }
}

/// One row summing `weights`.
fn component<'a>(name: &str, weights: impl IntoIterator<Item = &'a Weight<Cpu>>) -> Component {
    let weights: Vec<&Weight<Cpu>> = weights.into_iter().collect();
    let mut kinds: Vec<String> = weights.iter().map(|w| storage(w)).collect();
    kinds.dedup();
    let t = totals(weights.iter().map(|w| (params(w), bytes(w))));
    Component {
        name: name.into(),
        tensors: weights.len(),
        params: t.params,
        bytes: t.bytes,
        dtype: kinds.join("+"),
        bits_per_param: t.bits_per_param,
    }
}

fn totals(items: impl Iterator<Item = (usize, usize)>) -> Totals {
    let (params, bytes) = items.fold((0, 0), |(p, b), (ip, ib)| (p + ip, b + ib));
    Totals {
        params,
        bytes,
        bits_per_param: if params == 0 {
            0.0
        } else {
            (bytes * 8) as f64 / params as f64
        },
    }
}

/// The peak resident set size of this process (`VmHWM` in /proc/self/status), if readable.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
