//! NF4 (4-bit NormalFloat) weights, bit-exact with bitsandbytes 0.50.2 on CPU: quantize,
//! dequantize, load/save bnb-4bit checkpoint tensors.
//!
//! Place in the data flow: `model::weights` turns a bnb-4bit checkpoint (or an f32 weight
//! quantized on load) into an [`Nf4Weight`]; the CPU backend multiplies with it
//! (`backend/cpu/nf4.rs`, through [`Nf4Weight::dequantize_tile`]); the CUDA backend uploads
//! the same packed bytes and absmax tables (`kernels/nf4.cu`).
//!
//! # The format
//! A weight `W [rows, cols]` is flattened row-major (`n = rows · cols`) and cut into blocks of
//! `blocksize` consecutive elements. Blocks run across row ends, and the last block is short
//! when `blocksize` does not divide `n`. Each block keeps its absmax `max |w|`; each element
//! keeps the 4-bit index `q` of an entry of [`NF4_CODE`], and dequantizes to
//! `NF4_CODE[q] * absmax` (one f32 multiply). Element `2k` is the high nibble of byte `k`,
//! element `2k + 1` the low nibble; an odd `n` ends in a padding nibble 7 (the code 0.0).
//!
//! With double quantization the per-block f32 absmax is itself quantized to u8:
//! `offset = mean(absmax)`, and `absmax − offset` is quantized blockwise in blocks of 256
//! (`nested_blocksize`) with bitsandbytes' signed dynamic 8-bit map ([`dynamic_map_signed`]),
//! keeping one f32 `nested_absmax` per 256 blocks. A block's absmax is restored as
//! `nested_code[code] * nested_absmax[b / 256] + offset`, rounded to f32 after the multiply
//! and after the add. That costs `8 + 32/256` bits per block instead of 32: 4.127 bits per
//! parameter at blocksize 64 instead of 4.5.
//!
//! # bitsandbytes' rounding rules (0.50.2, CPU, f32 input)
//! 4-bit (`quantize_4bit`, the pure-torch "default" backend):
//! - a full block is scaled by the *reciprocal*, `w * (1 / max(absmax, 1e-38))`; the short
//!   last block is *divided*, `w / max(absmax, 1e-38)`, and stores the clamped absmax (an
//!   all-zero short block stores 1e-38; an all-zero full block stores 0);
//! - the code is `bucketize(scaled, midpoints)` with `midpoints[i] = (code[i] + code[i+1]) / 2`
//!   in f32: the number of midpoints strictly below the value, so a value exactly on a
//!   midpoint takes the lower code;
//! - an odd element count is padded with 0.0, i.e. nibble 7.
//!
//! 8-bit absmax quantization (`quantize_blockwise`, the native `quantize_cpu`) is not a
//! nearest-code search: the block is scaled by `1 / absmax` (f32 reciprocal, then multiply),
//! clamped to [-1, 1], mapped to one of 65536 grid cells by
//! `trunc(fma((v + 1) · 0.5, 65535, 0.5))`, and the cell's code is read from a table built by
//! walking the grid points `2i / 65535 − 1` past the code midpoints (a grid point exactly on
//! a midpoint takes the lower code). A block whose absmax is 0 gets code 0 everywhere.
//!
//! `offset` is torch's float32 `Tensor.mean()`: a cascade sum over 8-float vectors, divided by
//! `n` in f32 ([`torch_cpu_mean`]). Torch splits that sum across threads when there are more
//! than 32768 blocks and it runs with several threads, so bnb's offset for a large weight
//! depends on the machine that quantized it (by a few ulps); ours is torch's one-thread
//! value, and checkpoints carry their own offset anyway.
//!
//! Dequantization follows the flat-block rule above, as bnb's generic and CUDA paths do.
//! (bnb 0.50.2's native AVX512 CPU dequantizer indexes absmax per row and is wrong when
//! `cols` is not a multiple of `blocksize`; `tools/make_nf4_fixtures.py` documents this.)

use std::borrow::Cow;
use std::ops::Range;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, ensure, Context, Result};
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView, View};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

/// The 16 NF4 code values, as bitsandbytes stores them (`get_4bit_type("nf4")`).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The two code values of each packed byte: high nibble first.
const NF4_PAIRS: [[f32; 2]; 256] = {
    let mut pairs = [[0.0; 2]; 256];
    let mut byte = 0;
    while byte < 256 {
        pairs[byte] = [NF4_CODE[byte >> 4], NF4_CODE[byte & 0x0f]];
        byte += 1;
    }
    pairs
};

/// Elements per absmax block unless asked otherwise (bitsandbytes' default).
pub const DEFAULT_BLOCKSIZE: usize = 64;
/// Absmax values per nested block in double quantization (the only size bitsandbytes writes).
pub const NESTED_BLOCKSIZE: usize = 256;

/// The nibble bitsandbytes pads an odd element count with: the code of 0.0.
const PAD_NIBBLE: u8 = 7;
/// bitsandbytes clamps absmax to this before scaling, so an all-zero block scales to 0.
const ABSMAX_FLOOR: f32 = 1e-38;
/// Grid cells of bitsandbytes' 8-bit quantization table (`kLUTSize`).
const LUT_CELLS: usize = 65536;

/// How to quantize: the absmax blocksize and whether the absmax is double-quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nf4Options {
    /// Elements per absmax block: a power of two in 32..=4096.
    pub blocksize: usize,
    /// Quantize the absmax to u8 as well (bnb's `compress_statistics`, QLoRA's double quant).
    pub double_quant: bool,
}

impl Nf4Options {
    /// Fails unless the blocksize is one bitsandbytes accepts.
    pub fn check(self) -> Result<()> {
        check_blocksize(self.blocksize)
    }
}

impl Default for Nf4Options {
    /// QLoRA's setting: blocksize 64 with double quantization (4.127 bits per parameter).
    fn default() -> Self {
        Nf4Options {
            blocksize: DEFAULT_BLOCKSIZE,
            double_quant: true,
        }
    }
}

/// The per-block scales of an NF4 weight.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 absmax per block (`weight.absmax` as f32).
    F32(Vec<f32>),
    /// Double quantization: block `b`'s absmax is
    /// `nested_code[codes[b]] * nested_absmax[b / nested_blocksize] + offset`.
    Double {
        /// One u8 code per block (`weight.absmax` as u8).
        codes: Vec<u8>,
        /// One f32 scale per `nested_blocksize` blocks (`weight.nested_absmax`).
        nested_absmax: Vec<f32>,
        /// The 8-bit code table (`weight.nested_quant_map`; bnb's signed dynamic map).
        nested_code: Box<[f32; 256]>,
        /// The mean absmax subtracted before quantizing (`nested_offset`).
        offset: f32,
        /// Blocks per nested block (`nested_blocksize`, 256 in every bnb checkpoint).
        nested_blocksize: usize,
    },
}

impl Absmax {
    /// Number of quantization blocks described.
    pub fn blocks(&self) -> usize {
        match self {
            Absmax::F32(absmax) => absmax.len(),
            Absmax::Double { codes, .. } => codes.len(),
        }
    }

    /// The f32 absmax of block `b`, exactly as bitsandbytes restores it.
    #[inline]
    pub fn block(&self, b: usize) -> f32 {
        match self {
            Absmax::F32(absmax) => absmax[b],
            Absmax::Double {
                codes,
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize,
            } => nested_code[codes[b] as usize] * nested_absmax[b / nested_blocksize] + offset,
        }
    }

    /// Bytes held in memory (the double-quant code table and offset included).
    pub fn bytes(&self) -> usize {
        match self {
            Absmax::F32(absmax) => absmax.len() * 4,
            Absmax::Double {
                codes,
                nested_absmax,
                nested_code,
                ..
            } => codes.len() + nested_absmax.len() * 4 + nested_code.len() * 4 + 4,
        }
    }
}

/// A weight `[rows, cols]` (row-major, PyTorch's `[out_features, in_features]`) in NF4.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Weight {
    rows: usize,
    cols: usize,
    blocksize: usize,
    packed: Vec<u8>,
    absmax: Absmax,
    dtype: String,
}

impl Nf4Weight {
    /// Quantizes a row-major f32 `[rows, cols]` weight exactly as
    /// `bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics=double_quant,
    /// quant_type="nf4")` does on CPU.
    pub fn quantize(
        weights: &[f32],
        rows: usize,
        cols: usize,
        options: Nf4Options,
    ) -> Result<Self> {
        let blocksize = options.blocksize;
        check_blocksize(blocksize)?;
        ensure!(
            rows > 0 && cols > 0,
            "NF4 quantize: empty weight [{rows}, {cols}]"
        );
        ensure!(
            weights.len() == rows * cols,
            "NF4 quantize: {} values given for a [{rows}, {cols}] weight",
            weights.len()
        );
        if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
            bail!(
                "NF4 quantize: weight[{}, {}] is {}; only finite values can be quantized",
                i / cols,
                i % cols,
                weights[i]
            );
        }
        let bounds = nf4_midpoints();
        let n = weights.len();
        let mut packed = vec![0u8; n.div_ceil(2)];
        let mut absmax = vec![0f32; n.div_ceil(blocksize)];
        packed
            .par_chunks_mut(blocksize / 2)
            .zip(absmax.par_iter_mut())
            .zip(weights.par_chunks(blocksize))
            .for_each(|((bytes, absmax), block)| {
                *absmax = quantize_block(block, block.len() == blocksize, &bounds, bytes);
            });
        let absmax = if options.double_quant {
            double_quantize(&absmax)
        } else {
            Absmax::F32(absmax)
        };
        Ok(Nf4Weight {
            rows,
            cols,
            blocksize,
            packed,
            absmax,
            dtype: "float32".to_string(),
        })
    }

    /// A `[rows, cols]` weight of zero codes and scales with the buffers
    /// [`Nf4Weight::quantize`] would make (the same sizes, double quantization included):
    /// what a checkpoint without values (`verdict init --no-values`) loads as on an
    /// allocation-only device, which sizes device memory by it and never reads it.
    pub fn placeholder(rows: usize, cols: usize, options: Nf4Options) -> Result<Self> {
        let blocksize = options.blocksize;
        check_blocksize(blocksize)?;
        let n = rows * cols;
        let blocks = n.div_ceil(blocksize);
        let absmax = if options.double_quant {
            Absmax::Double {
                codes: vec![0; blocks],
                nested_absmax: vec![0.0; blocks.div_ceil(NESTED_BLOCKSIZE)],
                nested_code: Box::new(dynamic_map_signed()),
                offset: 0.0,
                nested_blocksize: NESTED_BLOCKSIZE,
            }
        } else {
            Absmax::F32(vec![0.0; blocks])
        };
        Ok(Nf4Weight {
            rows,
            cols,
            blocksize,
            packed: vec![0; n.div_ceil(2)],
            absmax,
            dtype: "float32".to_string(),
        })
    }

    /// Output features (rows of `W`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (columns of `W`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements per absmax block.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// The packed nibbles, `ceil(rows · cols / 2)` bytes (bnb's `weight` tensor).
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The per-block scales.
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }

    /// The dtype bitsandbytes would dequantize to (quant_state `dtype`, e.g. "bfloat16");
    /// informational: verdict always dequantizes to f32.
    pub fn dtype(&self) -> &str {
        &self.dtype
    }

    /// Bytes held in memory: packed nibbles plus absmax tables.
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.absmax.bytes()
    }

    /// Memory per parameter in bits (4.127 for blocksize 64 with double quant, 4.5 without).
    pub fn bits_per_param(&self) -> f64 {
        (self.bytes() * 8) as f64 / (self.rows * self.cols) as f64
    }

    /// The whole weight as row-major f32 `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        const CHUNK: usize = 1 << 14;
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, chunk)| self.dequantize_flat(i * CHUNK, chunk));
        out
    }

    /// Rows `rows` of the weight into `out` (`rows.len() · cols` values).
    pub fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        assert!(
            rows.start <= rows.end && rows.end <= self.rows,
            "NF4 rows {rows:?} outside 0..{}",
            self.rows
        );
        assert_eq!(
            out.len(),
            rows.len() * self.cols,
            "NF4 dequantize_rows: output is not [{}, {}]",
            rows.len(),
            self.cols
        );
        self.dequantize_flat(rows.start * self.cols, out);
    }

    /// The sub-matrix `W[rows, cols]` into `out`, row-major `[rows.len(), cols.len()]`.
    pub(crate) fn dequantize_tile(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        let width = cols.len();
        for (r, out_row) in rows.zip(out.chunks_exact_mut(width)) {
            self.dequantize_flat(r * self.cols + cols.start, out_row);
        }
    }

    /// Flat elements `start .. start + out.len()` of the row-major weight into `out`.
    fn dequantize_flat(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        let mut i = start;
        while i < end {
            let block = i / self.blocksize;
            let stop = ((block + 1) * self.blocksize).min(end);
            let scale = self.absmax.block(block);
            let seg = &mut out[i - start..stop - start];
            // Copy each byte's two code values, then scale the run in one vectorizable pass:
            // the same f32 products as NF4_CODE[q] * scale element by element.
            let (head, body) = seg.split_at_mut(i % 2);
            if let Some(first) = head.first_mut() {
                *first = NF4_CODE[(self.packed[i / 2] & 0x0f) as usize];
            }
            let first_byte = i.div_ceil(2);
            let (pairs, tail) = body.split_at_mut(body.len() / 2 * 2);
            let bytes = &self.packed[first_byte..first_byte + pairs.len() / 2];
            for (pair, &byte) in pairs.chunks_exact_mut(2).zip(bytes) {
                pair.copy_from_slice(&NF4_PAIRS[byte as usize]);
            }
            if let Some(last) = tail.first_mut() {
                *last = NF4_CODE[(self.packed[(stop - 1) / 2] >> 4) as usize];
            }
            for v in seg.iter_mut() {
                *v *= scale;
            }
            i = stop;
        }
    }

    /// Reads the bnb-4bit tensors of weight `name` (e.g. `model.layers.0.mlp.up_proj.weight`)
    /// from one safetensors file.
    pub fn from_bnb_safetensors(tensors: &SafeTensors<'_>, name: &str) -> Result<Self> {
        Self::from_bnb_tensors(name, |key| tensors.tensor(key).ok())
    }

    /// Reads the bnb-4bit tensors of weight `name` through `get` (which may search several
    /// shards): `name` (packed u8, any storage dtype is read as raw bytes), `name.absmax`,
    /// `name.quant_map`, `name.quant_state.bitsandbytes__nf4` (JSON), and with double
    /// quantization `name.nested_absmax` and `name.nested_quant_map`.
    pub fn from_bnb_tensors<'a>(
        name: &str,
        get: impl Fn(&str) -> Option<TensorView<'a>>,
    ) -> Result<Self> {
        let state_key = format!("{name}.quant_state.bitsandbytes__nf4");
        let Some(state_view) = get(&state_key) else {
            if get(&format!("{name}.quant_state.bitsandbytes__fp4")).is_some() {
                bail!("bnb-4bit weight {name}: quant_type fp4 is not supported (only nf4)");
            }
            bail!("bnb-4bit weight {name}: tensor `{state_key}` is missing");
        };
        let state: QuantState = serde_json::from_slice(state_view.data()).with_context(|| {
            format!("bnb-4bit weight {name}: `{state_key}` is not bitsandbytes quant_state JSON")
        })?;
        ensure!(
            state.quant_type == "nf4",
            "bnb-4bit weight {name}: `{state_key}` has quant_type {:?}; only nf4 is supported",
            state.quant_type
        );
        check_blocksize(state.blocksize)
            .with_context(|| format!("bnb-4bit weight {name}: `{state_key}`"))?;
        let [rows, cols] = state.shape[..] else {
            bail!(
                "bnb-4bit weight {name}: `{state_key}` has shape {:?}, expected 2-D [rows, cols]",
                state.shape
            );
        };
        ensure!(
            rows > 0 && cols > 0,
            "bnb-4bit weight {name}: `{state_key}` has empty shape {:?}",
            state.shape
        );
        let n = rows * cols;
        let blocks = n.div_ceil(state.blocksize);

        let tensor = |suffix: &str| {
            let key = format!("{name}{suffix}");
            get(&key)
                .map(|view| (key.clone(), view))
                .ok_or_else(|| anyhow!("bnb-4bit weight {name}: tensor `{key}` is missing"))
        };
        let (key, weight) = tensor("")?;
        ensure!(
            weight.data().len() == n.div_ceil(2),
            "bnb-4bit weight {name}: tensor `{key}` holds {} bytes ({:?} {:?}), expected {} packed bytes for shape [{rows}, {cols}] (U8 [{}, 1])",
            weight.data().len(),
            weight.dtype(),
            weight.shape(),
            n.div_ceil(2),
            n.div_ceil(2)
        );
        let (key, quant_map) = tensor(".quant_map")?;
        let quant_map = read_f32(&key, &quant_map, 16)?;
        ensure!(
            quant_map
                .iter()
                .zip(NF4_CODE)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "bnb-4bit weight {name}: tensor `{key}` is not the NF4 code table: {quant_map:?}"
        );

        let (absmax_key, absmax_view) = tensor(".absmax")?;
        let absmax = match (state.nested_offset, state.nested_blocksize) {
            (None, None) => Absmax::F32(read_f32(&absmax_key, &absmax_view, blocks)?),
            (Some(offset), Some(nested_blocksize)) => {
                ensure!(
                    nested_blocksize > 0,
                    "bnb-4bit weight {name}: `{state_key}` has nested_blocksize 0"
                );
                let codes = read_u8(&absmax_key, &absmax_view, blocks)?;
                let (key, view) = tensor(".nested_absmax")?;
                let nested_absmax = read_f32(&key, &view, blocks.div_ceil(nested_blocksize))?;
                let (key, view) = tensor(".nested_quant_map")?;
                let nested_code = read_f32(&key, &view, 256)?;
                Absmax::Double {
                    codes,
                    nested_absmax,
                    nested_code: nested_code.try_into().expect("length checked by read_f32"),
                    offset: offset as f32,
                    nested_blocksize,
                }
            }
            _ => bail!("bnb-4bit weight {name}: `{state_key}` has only one of nested_offset and nested_blocksize"),
        };
        Ok(Nf4Weight {
            rows,
            cols,
            blocksize: state.blocksize,
            packed: weight.data().to_vec(),
            absmax,
            dtype: state.dtype,
        })
    }

    /// The tensors a bitsandbytes checkpoint stores for this weight under `name`, the same
    /// keys, dtypes and shapes as `QuantState.as_dict(packed=True)`; write them with
    /// `safetensors::serialize`.
    pub fn to_bnb_tensors(&self, name: &str) -> Vec<(String, BnbTensor)> {
        let f32_tensor = |values: &[f32]| BnbTensor {
            dtype: Dtype::F32,
            shape: vec![values.len()],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let mut state = QuantState {
            quant_type: "nf4".to_string(),
            blocksize: self.blocksize,
            dtype: self.dtype.clone(),
            shape: vec![self.rows, self.cols],
            nested_blocksize: None,
            nested_dtype: None,
            nested_offset: None,
        };
        let mut out = vec![
            (
                name.to_string(),
                BnbTensor {
                    dtype: Dtype::U8,
                    shape: vec![self.packed.len(), 1],
                    data: self.packed.clone(),
                },
            ),
            (format!("{name}.quant_map"), f32_tensor(&NF4_CODE)),
        ];
        match &self.absmax {
            Absmax::F32(absmax) => out.push((format!("{name}.absmax"), f32_tensor(absmax))),
            Absmax::Double {
                codes,
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize,
            } => {
                out.push((
                    format!("{name}.absmax"),
                    BnbTensor {
                        dtype: Dtype::U8,
                        shape: vec![codes.len()],
                        data: codes.clone(),
                    },
                ));
                out.push((format!("{name}.nested_absmax"), f32_tensor(nested_absmax)));
                out.push((
                    format!("{name}.nested_quant_map"),
                    f32_tensor(&nested_code[..]),
                ));
                state.nested_blocksize = Some(*nested_blocksize);
                state.nested_dtype = Some("float32".to_string());
                state.nested_offset = Some(*offset as f64);
            }
        }
        let json = serde_json::to_vec(&state).expect("quant_state serializes");
        out.push((
            format!("{name}.quant_state.bitsandbytes__nf4"),
            BnbTensor {
                dtype: Dtype::U8,
                shape: vec![json.len()],
                data: json,
            },
        ));
        out
    }
}

/// One tensor of a bnb-4bit checkpoint, owned; `&BnbTensor` is a `safetensors::View`.
#[derive(Debug, Clone, PartialEq)]
pub struct BnbTensor {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

impl View for &BnbTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The JSON in `weight.quant_state.bitsandbytes__nf4` (bnb's `QuantState.as_dict` minus the
/// tensors), fields in bnb's order.
#[derive(Debug, Serialize, Deserialize)]
struct QuantState {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_blocksize: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_offset: Option<f64>,
}

/// `view` as `len` little-endian f32 values, or an error naming `key`.
fn read_f32(key: &str, view: &TensorView<'_>, len: usize) -> Result<Vec<f32>> {
    ensure!(
        view.dtype() == Dtype::F32 && view.data().len() == len * 4,
        "bnb-4bit tensor `{key}` is {:?} {:?}, expected F32 [{len}]",
        view.dtype(),
        view.shape()
    );
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// `view` as `len` bytes of dtype U8, or an error naming `key`.
fn read_u8(key: &str, view: &TensorView<'_>, len: usize) -> Result<Vec<u8>> {
    ensure!(
        view.dtype() == Dtype::U8 && view.data().len() == len,
        "bnb-4bit tensor `{key}` is {:?} {:?}, expected U8 [{len}]",
        view.dtype(),
        view.shape()
    );
    Ok(view.data().to_vec())
}

/// Accepts bitsandbytes' blocksizes: powers of two from 32 to 4096.
fn check_blocksize(blocksize: usize) -> Result<()> {
    ensure!(
        blocksize.is_power_of_two() && (32..=4096).contains(&blocksize),
        "NF4 blocksize must be a power of two in 32..=4096 (bitsandbytes' set), got {blocksize}"
    );
    Ok(())
}

/// bnb's 4-bit decision boundaries: `(code[i] + code[i+1]) / 2` in f32.
fn nf4_midpoints() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// Quantizes one block into `bytes` (`ceil(block.len() / 2)` of them) and returns the absmax
/// bnb stores for it (see the module doc for the full/short block difference).
fn quantize_block(block: &[f32], full: bool, bounds: &[f32; 15], bytes: &mut [u8]) -> f32 {
    let absmax = block.iter().fold(0f32, |m, w| m.max(w.abs()));
    let clamped = absmax.max(ABSMAX_FLOOR);
    let reciprocal = 1.0 / clamped;
    // bnb clamps the scaled value to [-1, 1] first; every midpoint lies inside, so the
    // count is the same without the clamp.
    let code = |w: f32| {
        let scaled = if full { w * reciprocal } else { w / clamped };
        bounds.iter().filter(|&&b| b < scaled).count() as u8
    };
    for (byte, pair) in bytes.iter_mut().zip(block.chunks(2)) {
        let low = pair.get(1).map_or(PAD_NIBBLE, |&w| code(w));
        *byte = (code(pair[0]) << 4) | low;
    }
    if full {
        absmax
    } else {
        clamped
    }
}

/// bnb's `quantize_4bit(..., compress_statistics=True)` step for the absmax: subtract the
/// mean, quantize blockwise (256) with the signed dynamic map.
fn double_quantize(absmax: &[f32]) -> Absmax {
    let offset = torch_cpu_mean(absmax);
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let lut = dynamic_map_lut();
    let mut codes = vec![0u8; absmax.len()];
    let nested_absmax = centred
        .chunks(NESTED_BLOCKSIZE)
        .zip(codes.chunks_mut(NESTED_BLOCKSIZE))
        .map(|(block, codes)| {
            let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            if absmax != 0.0 {
                let reciprocal = 1.0 / absmax;
                for (code, &v) in codes.iter_mut().zip(block) {
                    *code = lut[lut_cell(v * reciprocal)];
                }
            }
            absmax
        })
        .collect();
    Absmax::Double {
        codes,
        nested_absmax,
        nested_code: Box::new(dynamic_map_signed()),
        offset,
        nested_blocksize: NESTED_BLOCKSIZE,
    }
}

/// bnb's `norm_to_lut_index`: the grid cell of a scaled value. Its `x * 65535 + 0.5` is
/// compiled to one fused multiply-add (read from the 0.50.2 x86-64 binary). The unfused form
/// could differ only through a double rounding across an integer; a search over 3·10⁶
/// random values found none, so the fixtures cannot tell the two apart.
#[inline]
fn lut_cell(scaled: f32) -> usize {
    ((scaled.clamp(-1.0, 1.0) + 1.0) * 0.5).mul_add(65535.0, 0.5) as usize
}

/// bnb's `build_quantize_lut` for the signed dynamic map: grid cell -> 8-bit code.
fn dynamic_map_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let code = dynamic_map_signed();
        let midpoints: Vec<f32> = code.windows(2).map(|c| 0.5 * (c[0] + c[1])).collect();
        let mut index = 0;
        (0..LUT_CELLS)
            .map(|i| {
                let grid = (2.0 * i as f32) / (LUT_CELLS - 1) as f32 - 1.0;
                while index < midpoints.len() && midpoints[index] < grid {
                    index += 1;
                }
                index as u8
            })
            .collect()
    })
}

/// bitsandbytes' `create_dynamic_map(signed=True)` (the 8-bit map double quantization uses),
/// value for value: for exponent level `i` in 0..7, the midpoints of
/// `torch.linspace(0.1, 1, 2^i + 1)` (float32) scaled by `±10^(i−6)`, plus 0 and 1, sorted.
pub fn dynamic_map_signed() -> [f32; 256] {
    // Python's `10 ** (i - 6)`, a double, which torch rounds to f32 before multiplying.
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data = Vec::with_capacity(256);
    for (i, scale) in SCALES.iter().enumerate() {
        let bounds = torch_linspace(0.1, 1.0, (1 << i) + 1);
        let scale = *scale as f32;
        for pair in bounds.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data.try_into()
        .expect("the signed dynamic map has 256 entries")
}

/// torch's CPU `linspace(start, end, steps)` in float32: the first half counts up from
/// `start`, the second half down from `end`; `start + step * i` is compiled to an FMA.
fn torch_linspace(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (steps - 1) as f32;
    (0..steps)
        .map(|i| {
            if i < steps / 2 {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// torch's float32 `Tensor.mean()` of a contiguous vector on CPU with one thread: the
/// cascade sum of `SumKernel.cpp` (8-float vectors, the AVX2 kernel torch dispatches sums
/// to) divided by `n` in f32.
pub fn torch_cpu_mean(values: &[f32]) -> f32 {
    torch_cpu_sum(values) / values.len() as f32
}

/// torch's `cascade_sum` for a contiguous float32 row (`vectorized_inner_sum`).
fn torch_cpu_sum(values: &[f32]) -> f32 {
    const LANES: usize = 8;
    if values.len() < LANES {
        return cascade_row_sum::<1>(values)[0];
    }
    let vectors = values.len() / LANES;
    let lanes = cascade_row_sum::<LANES>(&values[..vectors * LANES]);
    let tail = values[vectors * LANES..]
        .iter()
        .fold(0f32, |acc, v| acc + v);
    lanes.iter().fold(tail, |acc, v| acc + v)
}

/// torch's `row_sum` over `values.len() / L` elements that are `L`-lane vectors: four
/// interleaved accumulators (`multi_row_sum`), leftovers into the first, then combined.
fn cascade_row_sum<const L: usize>(values: &[f32]) -> [f32; L] {
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    fn add<const L: usize>(acc: &mut [f32; L], v: &[f32; L]) {
        acc.iter_mut().zip(v).for_each(|(a, v)| *a += v);
    }
    let element = |e: usize| -> [f32; L] { std::array::from_fn(|l| values[e * L + l]) };
    let add_row = |acc: &mut [[f32; L]; ILP], row: usize| {
        for (k, a) in acc.iter_mut().enumerate() {
            add(a, &element(row * ILP + k));
        }
    };
    let size = values.len() / L;
    let rows = size / ILP;

    // multi_row_sum: level 0 sums runs of `level_step` rows, level j collects level j-1
    // every `level_step^j` rows.
    let ceil_log2 = if rows <= 2 {
        1
    } else {
        (usize::BITS - (rows - 1).leading_zeros()) as usize
    };
    let level_power = 4.max(ceil_log2 / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; L]; ILP]; LEVELS];
    let mut row = 0;
    while row + level_step <= rows {
        for _ in 0..level_step {
            add_row(&mut acc[0], row);
            row += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (up, low) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                add(up, low);
                *low = [0.0; L];
            }
            if row & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    for row in row..rows {
        add_row(&mut acc[0], row);
    }
    let (first, higher) = acc.split_at_mut(1);
    for level in higher.iter() {
        for (a, l) in first[0].iter_mut().zip(level) {
            add(a, l);
        }
    }

    // row_sum: leftover elements go to the first accumulator, then the four are combined.
    let [mut total, rest @ ..] = first[0];
    for e in rows * ILP..size {
        add(&mut total, &element(e));
    }
    for partial in &rest {
        add(&mut total, partial);
    }
    total
}
