//! NF4 against bitsandbytes 0.50.2 itself (`tests/fixtures/nf4/bnb_nf4.safetensors`, written by
//! `tools/make_nf4_fixtures.py`): packed bytes, absmax, double-quant tables and dequantized
//! values must be bit-identical; the dequant-matmuls must equal dequantize-then-matmul.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use verdict::backend::cpu::nf4::{matmul_dyw, matmul_xwt};
use verdict::quant::nf4::{
    dynamic_map_signed, torch_cpu_mean, Absmax, Nf4Options, Nf4Weight, NF4_CODE,
};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/nf4/bnb_nf4.safetensors"
);

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn load() -> Fixture {
        Fixture {
            bytes: std::fs::read(FIXTURE)
                .expect("run tools/make_nf4_fixtures.py to create the NF4 fixture"),
        }
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("fixture is safetensors")
    }

    /// Every case in both modes: `("<case>.plain" or "<case>.dq", our quantization of
    /// `<case>.input` with the case's blocksize)`. Cases are named `..._bs<blocksize>...`.
    fn quantized(&self) -> Vec<(String, Nf4Weight)> {
        let st = self.tensors();
        let (_, metadata) = SafeTensors::read_metadata(&self.bytes).unwrap();
        let info: serde_json::Value =
            serde_json::from_str(&metadata.metadata().as_ref().unwrap()["info"]).unwrap();
        let mut out = Vec::new();
        for case in info["cases"].as_array().unwrap() {
            let case = case.as_str().unwrap();
            let blocksize = case.split("_bs").nth(1).unwrap().split('_').next().unwrap();
            let input = st.tensor(&format!("{case}.input")).unwrap();
            for (mode, double_quant) in [("plain", false), ("dq", true)] {
                let options = Nf4Options {
                    blocksize: blocksize.parse().unwrap(),
                    double_quant,
                };
                let (rows, cols) = (input.shape()[0], input.shape()[1]);
                let w = Nf4Weight::quantize(&f32s(&input), rows, cols, options).unwrap();
                out.push((format!("{case}.{mode}"), w));
            }
        }
        out
    }
}

fn f32s(view: &TensorView<'_>) -> Vec<f32> {
    assert_eq!(view.dtype(), Dtype::F32);
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn packed_nibbles_and_f32_absmax_equal_bnb_bytes_catches_rounding_tie_padding_and_zero_block_bugs()
{
    let fixture = Fixture::load();
    let st = fixture.tensors();
    for (prefix, w) in fixture.quantized() {
        let packed = st.tensor(&format!("{prefix}.weight")).unwrap();
        assert_eq!(w.packed(), packed.data(), "{prefix}: packed nibbles differ");
        if let Absmax::F32(absmax) = w.absmax() {
            let expected = f32s(&st.tensor(&format!("{prefix}.weight.absmax")).unwrap());
            assert_eq!(bits(absmax), bits(&expected), "{prefix}: absmax differs");
        }
    }
}

#[test]
fn double_quant_codes_offset_and_nested_absmax_equal_bnb_catches_8bit_lut_and_mean_bugs() {
    let fixture = Fixture::load();
    let st = fixture.tensors();
    for (prefix, w) in fixture.quantized() {
        let Absmax::Double {
            codes,
            nested_absmax,
            nested_code,
            offset,
            nested_blocksize,
        } = w.absmax()
        else {
            continue;
        };
        let tensor = |suffix: &str| st.tensor(&format!("{prefix}.weight.{suffix}")).unwrap();
        assert_eq!(
            codes,
            tensor("absmax").data(),
            "{prefix}: absmax codes differ"
        );
        let expected = f32s(&tensor("nested_absmax"));
        assert_eq!(
            bits(nested_absmax),
            bits(&expected),
            "{prefix}: nested absmax differs"
        );
        let expected = f32s(&tensor("nested_quant_map"));
        assert_eq!(
            bits(&nested_code[..]),
            bits(&expected),
            "{prefix}: nested map differs"
        );
        let state: serde_json::Value =
            serde_json::from_slice(tensor("quant_state.bitsandbytes__nf4").data()).unwrap();
        let bnb_offset = state["nested_offset"].as_f64().unwrap() as f32;
        assert_eq!(
            offset.to_bits(),
            bnb_offset.to_bits(),
            "{prefix}: offset differs"
        );
        assert_eq!(
            Some(*nested_blocksize as u64),
            state["nested_blocksize"].as_u64()
        );
    }
}

#[test]
fn dequantized_values_equal_bnb_exactly_catches_block_indexing_and_nibble_order_bugs() {
    let fixture = Fixture::load();
    let st = fixture.tensors();
    for (prefix, ours) in fixture.quantized() {
        let expected = bits(&f32s(&st.tensor(&format!("{prefix}.dequant")).unwrap()));
        let ours = bits(&ours.dequantize());
        assert_eq!(ours, expected, "{prefix}: dequantize of our quantization");
        let loaded = Nf4Weight::from_bnb_safetensors(&st, &format!("{prefix}.weight")).unwrap();
        let loaded = bits(&loaded.dequantize());
        assert_eq!(loaded, expected, "{prefix}: dequantize of bnb's tensors");
    }
}

#[test]
fn loading_bnb_tensors_gives_our_quantization_catches_quant_state_parsing_bugs() {
    let fixture = Fixture::load();
    let st = fixture.tensors();
    for (prefix, ours) in fixture.quantized() {
        let loaded = Nf4Weight::from_bnb_safetensors(&st, &format!("{prefix}.weight")).unwrap();
        assert_eq!(loaded, ours, "{prefix}");
        assert_eq!(loaded.dtype(), "float32");
    }
}

#[test]
fn to_bnb_tensors_writes_bnb_bytes_and_reloads_catches_serialization_bugs() {
    let fixture = Fixture::load();
    let st = fixture.tensors();
    for (prefix, ours) in fixture.quantized() {
        let name = format!("{prefix}.weight");
        let written = ours.to_bnb_tensors(&name);
        for (key, tensor) in &written {
            let bnb = st
                .tensor(key)
                .unwrap_or_else(|_| panic!("bnb has no tensor {key}"));
            if key.ends_with("bitsandbytes__nf4") {
                // Same JSON; Python's separators (", ", ": ") make bnb's a few bytes longer.
                let ours: serde_json::Value = serde_json::from_slice(&tensor.data).unwrap();
                let theirs: serde_json::Value = serde_json::from_slice(bnb.data()).unwrap();
                assert_eq!(ours, theirs, "{key}");
            } else {
                let layout = (tensor.dtype, &tensor.shape[..]);
                assert_eq!(layout, (bnb.dtype(), bnb.shape()), "{key}");
                assert_eq!(tensor.data, bnb.data(), "{key}");
            }
        }
        let named = written.iter().map(|(k, t)| (k.as_str(), t));
        let bytes = safetensors::serialize(named, None).unwrap();
        let reread = SafeTensors::deserialize(&bytes).unwrap();
        let reloaded = Nf4Weight::from_bnb_safetensors(&reread, &name).unwrap();
        assert_eq!(reloaded, ours, "{name}");
    }
}

#[test]
fn dynamic_map_equals_bnb_create_dynamic_map_catches_linspace_fma_and_scale_rounding() {
    let fixture = Fixture::load();
    let st = fixture.tensors();
    let expected = f32s(&st.tensor("dynamic_map").unwrap());
    assert_eq!(bits(&dynamic_map_signed()), bits(&expected));
    assert_eq!(
        bits(&NF4_CODE),
        bits(&f32s(&st.tensor("nf4_code").unwrap()))
    );
}

#[test]
fn torch_mean_emulation_equals_torch_catches_cascade_sum_order_bugs() {
    let fixture = Fixture::load();
    let st = fixture.tensors();
    let lengths = st.tensor("torch_mean.lengths").unwrap();
    let lengths: Vec<usize> = lengths
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize)
        .collect();
    let expected = f32s(&st.tensor("torch_mean.values").unwrap());
    for (n, expected) in lengths.into_iter().zip(expected) {
        let probe: Vec<f32> = (0..n)
            .map(|i| ((i as f64 * 0.6180339887).fract() * 3.0) as f32)
            .collect();
        assert_eq!(
            torch_cpu_mean(&probe).to_bits(),
            expected.to_bits(),
            "mean of {n} values"
        );
    }
}

#[test]
fn value_on_a_midpoint_takes_the_lower_code_catches_round_half_up() {
    // absmax 1.0 makes the scaled value the value itself; 62 values sit on midpoint 8
    // (between codes 8 and 9) and must all get code 8.
    let midpoint = (NF4_CODE[8] + NF4_CODE[9]) / 2.0;
    let mut w = vec![midpoint; 64];
    w[0] = 1.0;
    w[1] = -1.0;
    let q = Nf4Weight::quantize(
        &w,
        1,
        64,
        Nf4Options {
            blocksize: 64,
            double_quant: false,
        },
    )
    .unwrap();
    assert_eq!(q.packed()[0], 0xf0);
    assert!(
        q.packed()[1..].iter().all(|&b| b == 0x88),
        "{:x?}",
        q.packed()
    );
}

#[test]
fn zero_blocks_store_zero_or_the_1e38_floor_catches_division_by_zero() {
    // 100 zeros at blocksize 64: a full block (absmax 0) and a short one (absmax 1e-38).
    let q = Nf4Weight::quantize(
        &[0.0; 100],
        4,
        25,
        Nf4Options {
            blocksize: 64,
            double_quant: false,
        },
    )
    .unwrap();
    let Absmax::F32(absmax) = q.absmax() else {
        unreachable!()
    };
    assert_eq!(absmax, &[0.0, 1e-38]);
    assert!(
        q.packed().iter().all(|&b| b == 0x77),
        "zeros must get code 7 (0.0)"
    );
    assert!(q.dequantize().iter().all(|&v| v == 0.0));
}

#[test]
fn odd_element_count_is_padded_with_nibble_7_catches_packing_overrun() {
    let w = [NF4_CODE[13], -1.0, 1.0];
    let q = Nf4Weight::quantize(
        &w,
        1,
        3,
        Nf4Options {
            blocksize: 32,
            double_quant: false,
        },
    )
    .unwrap();
    assert_eq!(q.packed(), &[0xd0, 0xf7]);
    assert_eq!(q.dequantize(), vec![NF4_CODE[13], -1.0, 1.0]);
}

/// Deterministic Gaussian-ish weights with row scales over three decades (xorshift + CLT).
fn random_weight(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..rows)
        .flat_map(|_| {
            let scale = 10f64.powf(-3.0 * uniform());
            (0..cols)
                .map(|_| (((0..4).map(|_| uniform()).sum::<f64>() - 2.0) * 1.7 * scale) as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn round_trip_error_stays_within_half_the_widest_code_gap_catches_wrong_scale_or_code() {
    // The widest NF4 gap is between -1 and -0.696: no value may land further than half of it
    // (times the block absmax) from its dequantized value, plus the absmax's own error. Double
    // quant restores an absmax to within half the widest dynamic-map gap (0.014, near ±1)
    // times its nested absmax, the largest |absmax - offset| of its 256 blocks: small blocks
    // next to large ones lose much of their relative precision, as in bnb.
    let half_gap = (NF4_CODE[1] - NF4_CODE[0]) / 2.0;
    for (rows, cols, blocksize) in [(37, 300, 64), (64, 128, 128), (5, 4097, 4096), (9, 33, 32)] {
        let w = random_weight(rows, cols, (rows * cols) as u64);
        for double_quant in [false, true] {
            let q = Nf4Weight::quantize(
                &w,
                rows,
                cols,
                Nf4Options {
                    blocksize,
                    double_quant,
                },
            )
            .unwrap();
            let dq = q.dequantize();
            let (mut err2, mut sum2) = (0f64, 0f64);
            for (b, (block, back)) in w.chunks(blocksize).zip(dq.chunks(blocksize)).enumerate() {
                let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let restored = q.absmax().block(b);
                match q.absmax() {
                    Absmax::F32(_) => assert_eq!(restored, absmax),
                    Absmax::Double { nested_absmax, .. } => {
                        let allowed = 0.0075 * nested_absmax[b / 256] + 1e-6 * absmax;
                        assert!(
                            (restored - absmax).abs() <= allowed,
                            "block {b}: absmax {absmax} restored {restored}"
                        );
                    }
                }
                let bound = half_gap * absmax + (restored - absmax).abs() + 1e-6 * absmax;
                for (&v, &r) in block.iter().zip(back) {
                    assert!(
                        (v - r).abs() <= bound,
                        "[{rows},{cols}] bs {blocksize} dq {double_quant}: {v} -> {r}"
                    );
                    err2 += ((v - r) as f64).powi(2);
                    sum2 += (v as f64).powi(2);
                }
            }
            let relative_rms = (err2 / sum2).sqrt();
            assert!(relative_rms < 0.12, "relative RMS error {relative_rms}");
        }
    }
}

#[test]
fn bad_blocksize_is_an_error_catches_silent_misquantization() {
    let w = vec![1.0f32; 256];
    for blocksize in [0, 16, 48, 96, 8192] {
        let err = Nf4Weight::quantize(
            &w,
            16,
            16,
            Nf4Options {
                blocksize,
                double_quant: false,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("blocksize"), "{err}");
    }
    assert!(
        Nf4Weight::quantize(&w, 16, 15, Nf4Options::default()).is_err(),
        "length mismatch"
    );
    assert!(
        Nf4Weight::quantize(&[f32::NAN; 4], 2, 2, Nf4Options::default()).is_err(),
        "NaN input"
    );
}

/// Looks tensors up in an owned map, so tests can drop or damage one.
fn lookup<'a>(
    tensors: &'a HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
) -> impl Fn(&str) -> Option<TensorView<'a>> {
    move |key| {
        tensors
            .get(key)
            .map(|(dtype, shape, data)| TensorView::new(*dtype, shape.clone(), data).unwrap())
    }
}

#[test]
fn missing_or_truncated_tensors_are_errors_naming_the_tensor_catches_silent_garbage_loads() {
    let w = random_weight(10, 70, 7);
    let name = "model.layers.0.mlp.up_proj.weight";
    for double_quant in [false, true] {
        let q = Nf4Weight::quantize(
            &w,
            10,
            70,
            Nf4Options {
                blocksize: 64,
                double_quant,
            },
        )
        .unwrap();
        let tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = q
            .to_bnb_tensors(name)
            .into_iter()
            .map(|(k, t)| (k, (t.dtype, t.shape, t.data)))
            .collect();
        assert_eq!(
            Nf4Weight::from_bnb_tensors(name, lookup(&tensors)).unwrap(),
            q
        );
        for key in tensors.keys() {
            let mut missing = tensors.clone();
            missing.remove(key);
            let err = Nf4Weight::from_bnb_tensors(name, lookup(&missing)).unwrap_err();
            assert!(
                err.to_string().contains(key.as_str()),
                "missing {key}: {err:#}"
            );

            if key.ends_with("bitsandbytes__nf4") {
                continue;
            }
            let mut truncated = tensors.clone();
            let (dtype, shape, data) = truncated.get_mut(key).unwrap();
            let element = dtype.bitsize() / 8;
            data.truncate(data.len() - element);
            *shape = vec![data.len() / element];
            let err = Nf4Weight::from_bnb_tensors(name, lookup(&truncated)).unwrap_err();
            assert!(
                err.to_string().contains(key.as_str()),
                "truncated {key}: {err:#}"
            );
        }
    }
}

#[test]
fn fp4_and_bad_quant_state_are_rejected_catches_loading_the_wrong_code_table() {
    let q = Nf4Weight::quantize(&random_weight(4, 64, 3), 4, 64, Nf4Options::default()).unwrap();
    let name = "w";
    let tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = q
        .to_bnb_tensors(name)
        .into_iter()
        .map(|(k, t)| (k, (t.dtype, t.shape, t.data)))
        .collect();
    let state_key = "w.quant_state.bitsandbytes__nf4";

    let mut fp4 = tensors.clone();
    let state = fp4.remove(state_key).unwrap();
    fp4.insert("w.quant_state.bitsandbytes__fp4".into(), state);
    let err = Nf4Weight::from_bnb_tensors(name, lookup(&fp4)).unwrap_err();
    assert!(err.to_string().contains("fp4"), "{err}");

    for (from, to) in [
        ("\"blocksize\":64", "\"blocksize\":48"),
        ("[4,64]", "[256]"),
        ("{", "["),
    ] {
        let mut bad = tensors.clone();
        let (_, shape, data) = bad.get_mut(state_key).unwrap();
        *data = String::from_utf8(data.clone())
            .unwrap()
            .replacen(from, to, 1)
            .into_bytes();
        *shape = vec![data.len()];
        let err = Nf4Weight::from_bnb_tensors(name, lookup(&bad)).unwrap_err();
        assert!(
            format!("{err:#}").contains(state_key),
            "{from}->{to}: {err:#}"
        );
    }
}

#[test]
fn dequantize_rows_equals_the_slice_of_dequantize_catches_odd_offset_bugs() {
    let (rows, cols) = (9, 37); // odd cols: every other row starts on a low nibble
    let q = Nf4Weight::quantize(
        &random_weight(rows, cols, 11),
        rows,
        cols,
        Nf4Options::default(),
    )
    .unwrap();
    let all = q.dequantize();
    for range in [0..1, 1..2, 1..4, 3..9, 0..9, 4..4] {
        let mut out = vec![f32::NAN; range.len() * cols];
        q.dequantize_rows(range.clone(), &mut out);
        assert_eq!(
            bits(&out),
            bits(&all[range.start * cols..range.end * cols]),
            "rows {range:?}"
        );
    }
}

/// `a [m, k] · b [k, n]` in f64, and `Σ |a||b|` for the error bound.
fn reference_matmul(
    a: &[f32],
    b: impl Fn(usize, usize) -> f32,
    m: usize,
    k: usize,
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut exact = vec![0f64; m * n];
    let mut magnitude = vec![0f64; m * n];
    for i in 0..m {
        for kk in 0..k {
            let x = a[i * k + kk] as f64;
            for j in 0..n {
                let y = b(kk, j) as f64;
                exact[i * n + j] += x * y;
                magnitude[i * n + j] += (x * y).abs();
            }
        }
    }
    (exact, magnitude)
}

fn assert_close(ours: &[f32], exact: &[f64], magnitude: &[f64], k: usize, what: &str) {
    // f32 dot products of length k: |error| <= k · eps · Σ|x·w| (loose by design, but far
    // below any real indexing mistake, which is O(Σ|x·w|)).
    let tol = k as f64 * f32::EPSILON as f64;
    for (i, ((&o, &e), &mag)) in ours.iter().zip(exact).zip(magnitude).enumerate() {
        assert!(
            (o as f64 - e).abs() <= tol * mag + 1e-30,
            "{what}: element {i}: {o} vs {e} (scale {mag})"
        );
    }
}

#[test]
fn dequant_matmuls_equal_dequantize_then_matmul_catches_tile_edge_bugs() {
    for (m, rows, cols, blocksize) in [
        (1, 70, 300, 64),
        (7, 130, 257, 32),
        (333, 65, 513, 128),
        (2, 3, 5, 64),
    ] {
        let q = Nf4Weight::quantize(
            &random_weight(rows, cols, (m + rows) as u64),
            rows,
            cols,
            Nf4Options {
                blocksize,
                double_quant: true,
            },
        )
        .unwrap();
        let w = q.dequantize();
        let shape = format!("m={m} [{rows},{cols}]");

        let x = random_weight(m, cols, 5);
        let mut y = vec![f32::NAN; m * rows];
        matmul_xwt(&x, m, &q, &mut y);
        let (exact, magnitude) = reference_matmul(&x, |kk, j| w[j * cols + kk], m, cols, rows);
        assert_close(&y, &exact, &magnitude, cols, &format!("xwt {shape}"));

        let dy = random_weight(m, rows, 6);
        let mut dx = vec![f32::NAN; m * cols];
        matmul_dyw(&dy, m, &q, &mut dx);
        let (exact, magnitude) = reference_matmul(&dy, |kk, j| w[kk * cols + j], m, rows, cols);
        assert_close(&dx, &exact, &magnitude, rows, &format!("dyw {shape}"));
    }
    let q = Nf4Weight::quantize(&random_weight(4, 64, 1), 4, 64, Nf4Options::default()).unwrap();
    matmul_xwt(&[], 0, &q, &mut []);
    matmul_dyw(&[], 0, &q, &mut []);
}

#[test]
fn bits_per_parameter_of_a_gemma2_mlp_weight() {
    let (rows, cols) = (2304, 9216);
    let w = random_weight(rows, cols, 1);
    let plain = Nf4Weight::quantize(
        &w,
        rows,
        cols,
        Nf4Options {
            blocksize: 64,
            double_quant: false,
        },
    )
    .unwrap();
    let double = Nf4Weight::quantize(
        &w,
        rows,
        cols,
        Nf4Options {
            blocksize: 64,
            double_quant: true,
        },
    )
    .unwrap();
    println!(
        "bits/param [{rows}x{cols}] bs64: plain {:.4}, double quant {:.4}",
        plain.bits_per_param(),
        double.bits_per_param()
    );
    assert_eq!(plain.bits_per_param(), 4.5);
    assert!(
        (double.bits_per_param() - 4.127).abs() < 0.001,
        "{}",
        double.bits_per_param()
    );
}
