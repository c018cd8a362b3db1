//! Safetensors checkpoints: memory-mapped reading (one file or HF shards with an index) and
//! streaming writing.
//!
//! Place in the data flow: after `config`, the decoder, heads and adapters pull their tensors
//! from a [`Checkpoint`] by HF name, each with the shape the spec expects; values arrive as
//! f32 whatever the stored float type, and bitsandbytes 4-bit weights as [`Nf4Weight`]s.
//! Every tensor must be consumed, so a tensor the model would ignore (a bias from a config we
//! misread, say) is an error rather than a silent skip.
//!
//! Memory: a tensor's pages are handed back to the kernel once it has been taken, so loading
//! (and quantizing on load) never holds more than the loaded model plus one tensor's worth
//! of the mapped file.

use crate::quant::nf4::Nf4Weight;
use anyhow::{bail, ensure, Context, Result};
use memmap2::{Mmap, UncheckedAdvice};
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A float storage type of checkpoint tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    /// `x` rounded to this type (round to nearest even), back in f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Dtype::F32 => x,
            Dtype::F16 => half::f16::from_f32(x).to_f32(),
            Dtype::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    /// The safetensors header name ("F32", "F16", "BF16").
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
        }
    }

    /// The config.json name ("float32", "float16", "bfloat16").
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
        }
    }

    /// Appends `values` encoded as little-endian elements of this type.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            Dtype::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
            Dtype::F16 => out.extend(
                values
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes()),
            ),
            Dtype::BF16 => out.extend(
                values
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()),
            ),
        }
    }

    fn from_safetensors(d: safetensors::Dtype) -> Option<Dtype> {
        match d {
            safetensors::Dtype::F32 => Some(Dtype::F32),
            safetensors::Dtype::F16 => Some(Dtype::F16),
            safetensors::Dtype::BF16 => Some(Dtype::BF16),
            _ => None,
        }
    }

    /// `bytes` (little-endian elements of this type) as f32 into `out`.
    fn decode_into(self, bytes: &[u8], out: &mut [f32]) {
        let n = self.size();
        debug_assert_eq!(bytes.len(), out.len() * n);
        // Big tensors (a 256k-token embedding) dominate load time: convert in parallel.
        out.par_chunks_mut(1 << 16)
            .zip(bytes.par_chunks(n << 16))
            .for_each(|(out, bytes)| {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(n)) {
                    *o = match self {
                        Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                        Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                        // bf16 is the top half of an f32: widening is an exact shift.
                        Dtype::BF16 => {
                            f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
                        }
                    };
                }
            });
    }
}

impl std::str::FromStr for Dtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Dtype> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "f16" | "float16" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::BF16),
            _ => bail!("unknown dtype {s:?} (expected f32, f16 or bf16)"),
        }
    }
}

/// Elements converted between two releases of the mapped pages in [`Checkpoint::take`].
const RELEASE_ELEMENTS: usize = 1 << 24;

/// The tensors a bitsandbytes NF4 weight `name` is stored as: `name` followed by these.
const BNB_4BIT_PARTS: [&str; 6] = [
    "",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
];

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Where tensor data starts: after the 8-byte length and the JSON header.
    data_start: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: &Path) -> Result<Shard> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the file is only read; a checkpoint modified while we run is outside our contract.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid safetensors file ({} bytes; truncated?): {e:?}",
                path.display(),
                map.len()
            )
        })?;
        Ok(Shard {
            path: path.to_path_buf(),
            data_start: 8 + header_len,
            map,
            metadata,
        })
    }

    fn info(&self, name: &str) -> &TensorInfo {
        self.metadata
            .info(name)
            .expect("tensor listed in the shard's own header")
    }

    /// The stored bytes of tensor `name`.
    fn bytes(&self, name: &str) -> &[u8] {
        let (start, end) = self.info(name).data_offsets;
        &self.map[self.data_start + start..self.data_start + end]
    }

    /// Drops this process's mapping of tensor `name`'s pages (they stay in the page cache), so
    /// a tensor already converted stops counting towards the resident set.
    fn release(&self, name: &str) {
        let (start, end) = self.info(name).data_offsets;
        self.release_range(self.data_start + start, end - start);
    }

    /// [`Shard::release`] for `len` bytes of the file from `offset`.
    fn release_range(&self, offset: usize, len: usize) {
        // SAFETY: the mapping is a read-only view of the file: after MADV_DONTNEED a read
        // faults the same bytes back in, so borrows of the range stay valid. Failure only
        // means the pages stay resident.
        let _ = unsafe {
            self.map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len)
        };
    }
}

/// The tensors of a checkpoint (or adapter) by name, across shards, memory-mapped.
pub struct Checkpoint {
    /// Folder or file, for messages.
    source: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    location: BTreeMap<String, usize>,
    /// Names not yet taken, for [`Checkpoint::finish`].
    unused: BTreeSet<String>,
    /// Some shard is marked [`NO_VALUES_KEY`]: shapes only, no values.
    no_values: bool,
    /// [`Checkpoint::allow_placeholders`] was called.
    placeholders: bool,
}

/// The `__metadata__` key (value [`NO_VALUES`]) of a safetensors file that holds shapes but
/// no values (`verdict init --no-values`): its header is real, its data region a hole of the
/// right length. Taking a tensor from it is an error unless the loader asked for
/// placeholders ([`Checkpoint::allow_placeholders`]: an allocation-only device, which never
/// reads them).
pub const NO_VALUES_KEY: &str = "verdict.values";
/// See [`NO_VALUES_KEY`].
pub const NO_VALUES: &str =
    "none: shapes only, the data region is a hole (verdict init --no-values)";

impl Checkpoint {
    /// Opens an HF model folder: `model.safetensors`, or the shards named by
    /// `model.safetensors.index.json` (`model-0000x-of-0000y.safetensors`).
    pub fn open_dir(dir: &Path) -> Result<Checkpoint> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            return Checkpoint::open_files(dir, &[single]);
        }
        ensure!(
            index.exists(),
            "{}: neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        );
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let parsed: Index = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a safetensors index", index.display()))?;
        let files: BTreeSet<&String> = parsed.weight_map.values().collect();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        let checkpoint = Checkpoint::open_files(dir, &paths)?;
        for (name, file) in &parsed.weight_map {
            let found = checkpoint
                .location
                .get(name)
                .map(|&s| &checkpoint.shards[s].path);
            ensure!(
                found == Some(&dir.join(file)),
                "{}: index puts tensor {name} in {file}, but it is {}",
                index.display(),
                found.map_or("in no shard".to_string(), |p| format!("in {}", p.display()))
            );
        }
        Ok(checkpoint)
    }

    /// Opens one safetensors file (a PEFT `adapter_model.safetensors`).
    pub fn open_file(path: &Path) -> Result<Checkpoint> {
        Checkpoint::open_files(path, &[path.to_path_buf()])
    }

    fn open_files(source: &Path, paths: &[PathBuf]) -> Result<Checkpoint> {
        let shards = paths
            .iter()
            .map(|p| Shard::open(p))
            .collect::<Result<Vec<_>>>()?;
        let mut location = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.metadata.tensors().into_keys() {
                if let Some(other) = location.insert(name.clone(), i) {
                    bail!(
                        "tensor {name} is in both {} and {}",
                        shards[other].path.display(),
                        shard.path.display()
                    );
                }
            }
        }
        let unused = location.keys().cloned().collect();
        let no_values = shards.iter().any(|s| {
            s.metadata
                .metadata()
                .as_ref()
                .is_some_and(|m| m.contains_key(NO_VALUES_KEY))
        });
        Ok(Checkpoint {
            source: source.to_path_buf(),
            shards,
            location,
            unused,
            no_values,
            placeholders: false,
        })
    }

    /// False for a checkpoint of shapes only (see [`NO_VALUES_KEY`]).
    pub fn holds_values(&self) -> bool {
        !self.no_values
    }

    /// Lets [`Checkpoint::take`] hand out zeros for a checkpoint without values: for a
    /// loader on an allocation-only device, which allocates what it uploads but never writes
    /// or reads it (the zeros are never touched: a fresh zeroed allocation of the host).
    pub fn allow_placeholders(&mut self) {
        self.placeholders = true;
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    /// The stored float type of `name`.
    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        let shard = self.shard_of(name)?;
        let info = shard.info(name);
        Dtype::from_safetensors(info.dtype).with_context(|| {
            format!(
                "{}: tensor {name}: dtype {:?}, expected F32, F16 or BF16",
                shard.path.display(),
                info.dtype
            )
        })
    }

    /// Takes tensor `name` as f32, checking that its shape is `shape`.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let dtype = self.dtype(name)?;
        let shard = self.shard_of(name)?;
        let info = shard.info(name);
        ensure!(
            info.shape == shape,
            "{}: tensor {name}: expected shape {shape:?}, found {:?}",
            shard.path.display(),
            info.shape
        );
        if self.no_values {
            ensure!(
                self.placeholders,
                "{}: tensor {name}: the file holds shapes but no values (written by `verdict \
                 init --no-values`); only --device emu --emu-alloc-only can load it",
                shard.path.display()
            );
            let len = shape.iter().product();
            self.unused.remove(name);
            return Ok(vec![0.0; len]);
        }
        let bytes = shard.bytes(name);
        let offset = shard.data_start + info.data_offsets.0;
        let mut values = vec![0.0f32; bytes.len() / dtype.size()];
        // A slice at a time, each slice's pages handed back once converted: the mapped file
        // adds at most one slice to the resident set (a 256k-vocabulary bf16 embedding would
        // otherwise add 1.2 GB on top of its f32 copy).
        let chunk = RELEASE_ELEMENTS * dtype.size();
        for (i, (out, bytes)) in values
            .chunks_mut(RELEASE_ELEMENTS)
            .zip(bytes.chunks(chunk))
            .enumerate()
        {
            dtype.decode_into(bytes, out);
            // A NaN or infinite weight would surface much later as "non-finite logits" for
            // whichever tokens touch it; here it names the tensor and the element.
            if let Some(j) = out.iter().position(|v| !v.is_finite()) {
                bail!(
                    "{}: tensor {name}: element {} is {} (a corrupt or diverged checkpoint)",
                    shard.path.display(),
                    i * RELEASE_ELEMENTS + j,
                    out[j]
                );
            }
            shard.release_range(offset + i * chunk, bytes.len());
        }
        self.unused.remove(name);
        Ok(values)
    }

    /// Whether `name` is stored as a bitsandbytes 4-bit weight (nf4 or fp4): its
    /// `quant_state` tensor is present.
    pub fn is_bnb_4bit(&self, name: &str) -> bool {
        ["nf4", "fp4"]
            .iter()
            .any(|t| self.contains(&format!("{name}.quant_state.bitsandbytes__{t}")))
    }

    /// Takes the bitsandbytes NF4 weight `name` (its packed bytes, absmax tables, code tables
    /// and quant_state, across shards), checking that it is `[rows, cols]`.
    pub fn take_nf4(&mut self, name: &str, rows: usize, cols: usize) -> Result<Nf4Weight> {
        let view = |key: &str| -> Option<TensorView<'_>> {
            let shard = self.shard_of(key).ok()?;
            let info = shard.info(key);
            TensorView::new(info.dtype, info.shape.clone(), shard.bytes(key)).ok()
        };
        let weight = Nf4Weight::from_bnb_tensors(name, view)
            .with_context(|| format!("{}", self.source.display()))?;
        ensure!(
            (weight.rows(), weight.cols()) == (rows, cols),
            "{}: bnb-4bit weight {name}: expected shape [{rows}, {cols}], quant_state says [{}, {}]",
            self.source.display(),
            weight.rows(),
            weight.cols()
        );
        for part in BNB_4BIT_PARTS {
            let key = format!("{name}{part}");
            if let Ok(shard) = self.shard_of(&key) {
                shard.release(&key);
                self.unused.remove(&key);
            }
        }
        Ok(weight)
    }

    /// Fails if any tensor was never taken, except those in `ignorable`.
    pub fn finish(&self, ignorable: impl Fn(&str) -> bool) -> Result<()> {
        let left: Vec<&String> = self.unused.iter().filter(|n| !ignorable(n)).collect();
        ensure!(
            left.is_empty(),
            "{}: {} tensor(s) the model does not use (unsupported settings?): {}",
            self.source.display(),
            left.len(),
            left.iter()
                .take(8)
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(())
    }

    fn shard_of(&self, name: &str) -> Result<&Shard> {
        match self.location.get(name) {
            Some(&i) => Ok(&self.shards[i]),
            None => bail!(
                "{}: tensor {name} not found ({} tensors present)",
                self.source.display(),
                self.location.len()
            ),
        }
    }
}

/// Name, stored type and shape of a tensor to write.
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

/// Writes named f32 tensors to a safetensors file.
pub fn write_f32_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    fill: impl Fn(usize) -> Vec<f32>,
) -> Result<()> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(name, shape)| TensorSpec {
            name: name.clone(),
            dtype: Dtype::F32,
            shape: shape.clone(),
        })
        .collect();
    write_safetensors(path, &specs, fill)
}

/// Writes a safetensors file tensor by tensor, so a model larger than memory can be
/// written: `fill(i)` returns tensor `i`'s f32 values (converted to its dtype here).
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorSpec],
    fill: impl Fn(usize) -> Vec<f32>,
) -> Result<()> {
    write_safetensors_with(path, tensors, Some(&fill))
}

/// [`write_safetensors`] without values: the real header (marked [`NO_VALUES_KEY`]) and a
/// data region of the right length left as a hole (a sparse file: no disk blocks, no time).
pub fn write_safetensors_shapes(path: &Path, tensors: &[TensorSpec]) -> Result<()> {
    write_safetensors_with(path, tensors, None::<&fn(usize) -> Vec<f32>>)
}

fn write_safetensors_with(
    path: &Path,
    tensors: &[TensorSpec],
    fill: Option<&impl Fn(usize) -> Vec<f32>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    let metadata = match fill {
        Some(_) => serde_json::json!({"format": "pt"}),
        None => serde_json::json!({"format": "pt", NO_VALUES_KEY: NO_VALUES}),
    };
    header.insert("__metadata__".into(), metadata);
    let mut offset = 0;
    for t in tensors {
        let bytes = t.shape.iter().product::<usize>() * t.dtype.size();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.safetensors_name(), "shape": t.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header)?;
    // Pad the header with spaces so tensor data starts 8-byte aligned, as safetensors does.
    header.resize(header.len().next_multiple_of(8), b' ');
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    let Some(fill) = fill else {
        let file = w.into_inner()?;
        file.set_len((8 + header.len() + offset) as u64)
            .with_context(|| format!("cannot size {}", path.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot flush {}", path.display()))?;
        return Ok(());
    };
    let mut bytes = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let values = fill(i);
        ensure!(
            values.len() == t.shape.iter().product::<usize>(),
            "tensor {}: {} values for shape {:?}",
            t.name,
            values.len(),
            t.shape
        );
        bytes.clear();
        t.dtype.encode(&values, &mut bytes);
        w.write_all(&bytes)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    w.into_inner()?
        .sync_all()
        .with_context(|| format!("cannot flush {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_one(dir: &Path, dtype: Dtype, values: &[f32]) -> PathBuf {
        let path = dir.join("model.safetensors");
        let spec = TensorSpec {
            name: "w".into(),
            dtype,
            shape: vec![2, values.len() / 2],
        };
        write_safetensors(&path, &[spec], |_| values.to_vec()).unwrap();
        path
    }

    #[test]
    fn round_trips_each_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let values = [1.0, -2.5, 0.333, 65504.0];
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            write_one(dir.path(), dtype, &values);
            let mut c = Checkpoint::open_dir(dir.path()).unwrap();
            assert_eq!(c.dtype("w").unwrap(), dtype);
            let back = c.take("w", &[2, 2]).unwrap();
            let expected: Vec<f32> = values.iter().map(|&v| dtype.round(v)).collect();
            assert_eq!(back, expected, "{dtype:?}");
        }
    }

    #[test]
    fn wrong_shape_names_file_tensor_and_both_shapes() {
        let dir = tempfile::tempdir().unwrap();
        write_one(dir.path(), Dtype::F32, &[0.0; 6]);
        let err = Checkpoint::open_dir(dir.path())
            .unwrap()
            .take("w", &[3, 2])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.safetensors")
                && err.contains("tensor w")
                && err.contains("[3, 2]")
                && err.contains("[2, 3]"),
            "{err}"
        );
    }

    #[test]
    fn truncated_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_one(dir.path(), Dtype::F32, &[0.0; 6]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = Checkpoint::open_dir(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn untaken_tensor_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        write_one(dir.path(), Dtype::F32, &[0.0; 4]);
        let c = Checkpoint::open_dir(dir.path()).unwrap();
        assert!(c.finish(|_| false).unwrap_err().to_string().contains(": w"));
        c.finish(|n| n == "w").unwrap();
    }
}
