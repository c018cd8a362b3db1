//! The emulated device's host side: names, sizes, memory (fresh blocks hold NaN, the pool's
//! high-water mark and out-of-memory as on a card of the chosen size), copies checked against
//! live allocations, timings refused, and the half-precision conversions bit-exact.

mod common;

use verdict::backend::cuda::attention::FlashBackward;
use verdict::backend::cuda::emu::{self, parse_size, EmuArch};
use verdict::backend::cuda::nf4::MmaOperands;
use verdict::backend::cuda::{Cuda, Device};
use verdict::backend::placement::Placement;
use verdict::backend::{AttentionParams, Backend};
use verdict::model::weights::Dtype;

fn emulated(memory: usize) -> Option<Cuda> {
    if !common::emulator_or_skip("an emulated-device check") {
        return None;
    }
    Some(Cuda::emulated(0, EmuArch::Sm75, memory, None).unwrap())
}

#[test]
fn device_names_choose_the_compute_capability() {
    assert_eq!("emu".parse::<Device>().unwrap(), Device::Emu(EmuArch::Sm75));
    assert_eq!(
        "emu:sm80".parse::<Device>().unwrap(),
        Device::Emu(EmuArch::Sm80)
    );
    assert_eq!(
        "emu:sm90".parse::<Device>().unwrap(),
        Device::Emu(EmuArch::Sm90)
    );
    assert_eq!(Device::Emu(EmuArch::Sm80).to_string(), "emu:sm80");
    assert_eq!(
        "emu".parse::<Placement>().unwrap(),
        Placement::Emu(vec![EmuArch::Sm75])
    );
    let err = "emu:sm70".parse::<Device>().unwrap_err().to_string();
    assert!(err.contains("sm75, sm80 or sm90"), "{err}");
    assert_eq!(EmuArch::Sm75.compute_capability(), (7, 5));
    assert_eq!(EmuArch::Sm90.compute_capability(), (9, 0));
}

#[test]
fn memory_sizes_read_as_powers_of_1024() {
    assert_eq!(parse_size("16GiB").unwrap(), 16 << 30);
    assert_eq!(parse_size("16G").unwrap(), 16 << 30);
    assert_eq!(parse_size("512M").unwrap(), 512 << 20);
    assert_eq!(parse_size("1.5k").unwrap(), 1536);
    assert_eq!(parse_size("1000000").unwrap(), 1_000_000);
    assert!(parse_size("lots").is_err());
    assert!(parse_size("3X").is_err());
    assert!(parse_size("0").is_err());
}

#[test]
fn fresh_blocks_hold_the_nan_pattern_and_zeros_are_written() {
    let Some(cuda) = emulated(64 << 20) else {
        return;
    };
    let block = cuda.copy(&cuda.upload(&[1.0; 300]));
    assert!(cuda.download(&block).iter().all(|v| *v == 1.0));
    // `zeros` must write its zeros: a fresh block holds all bits set, a NaN.
    assert!(cuda.download(&cuda.zeros(1000)).iter().all(|v| *v == 0.0));
    cuda.check().unwrap();
}

#[test]
fn out_of_memory_is_the_pools_error_at_the_chosen_size() {
    let Some(cuda) = emulated(64 << 20) else {
        return;
    };
    let fits = cuda.zeros(10 << 20); // 40 MiB
    assert!(cuda.check().is_ok());
    let _too_much = cuda.zeros(10 << 20); // another 40 MiB of a 64 MiB device
    let err = format!("{:#}", cuda.check().unwrap_err());
    assert!(
        err.contains("CUDA out of memory") && err.contains("of 64.0 MiB"),
        "{err}"
    );
    assert!(err.contains("--batch-tokens"), "{err}");
    drop(fits);
    let peak = cuda.pool_stats().peak_in_use_bytes;
    assert!((40 << 20..48 << 20).contains(&peak), "peak {peak}");
}

#[test]
fn atomic_attention_backward_refuses_a_16bit_dq_by_name() {
    // The atomic backward adds into dq with f32 atomicAdd: a 16-bit dq must be refused by
    // name, never written through as if it were f32.
    let Some(cuda) = emulated(64 << 20) else {
        return;
    };
    let params = AttentionParams {
        heads: 1,
        kv_heads: 1,
        head_dim: 8,
        scale: 0.35,
        softcap: None,
        window: None,
    };
    let x = cuda.upload(&[0.5; 16]); // 2 tokens of one head of 8
    let lse = cuda.upload(&[0.0; 2]);
    let mut dq = cuda.upload_as(&[0.0; 16], Dtype::F16);
    let (mut dk, mut dv) = (cuda.zeros(16), cuda.zeros(16));
    cuda.flash_attention_backward(
        [&mut dq, &mut dk, &mut dv],
        [&x, &x, &lse, &x, &x, &x],
        &[0, 2],
        &params,
        MmaOperands::F16,
        FlashBackward::Atomic,
    );
    let err = format!("{:#}", cuda.check().unwrap_err());
    assert!(
        err.contains("dq") && err.contains("F16") && err.contains("f32 only"),
        "{err}"
    );
}

#[test]
fn timing_is_refused_on_the_emulated_device() {
    let Some(cuda) = emulated(64 << 20) else {
        return;
    };
    let err = cuda.time_each(2, |_| Ok(())).unwrap_err().to_string();
    assert!(
        err.contains("emulated") && err.contains("nothing is timed"),
        "{err}"
    );
}

#[test]
fn conversions_match_round_to_nearest_even_bit_for_bit() {
    let Some((to_f16, from_f16, to_bf16)) = emu::conversions() else {
        common::skip("the conversion check", "this build has no emulated device");
        return;
    };
    // Every f16 value back to f32 exactly (NaNs to the canonical NaN).
    for h in 0..=u16::MAX {
        let want = half::f16::from_bits(h).to_f32();
        let got = from_f16(h);
        if want.is_nan() {
            assert!(got.is_nan(), "f16 {h:#06x}");
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "f16 {h:#06x}");
        }
    }
    // f32 patterns: every exponent with spread mantissas, the halfway cases, subnormals,
    // overflow, infinities and NaN.
    let mut patterns: Vec<u32> = (0..1u32 << 20)
        .map(|i| i.wrapping_mul(4099).wrapping_mul(0x9E37_79B9))
        .collect();
    for e in 0..256u32 {
        for m in [
            0u32, 1, 0xfff, 0x1000, 0x1001, 0x2000, 0x3000, 0x7fff, 0x8000, 0x8001, 0x18000,
            0x7fffff,
        ] {
            patterns.push(e << 23 | m);
            patterns.push(1 << 31 | e << 23 | m);
        }
    }
    for bits in patterns {
        let x = f32::from_bits(bits);
        let (f16, bf16) = (to_f16(x), to_bf16(x));
        if x.is_nan() {
            assert_eq!(f16, 0x7fff, "{bits:#010x}");
            assert_eq!(bf16, 0x7fff, "{bits:#010x}");
            continue;
        }
        assert_eq!(
            f16,
            half::f16::from_f32(x).to_bits(),
            "f16 of {bits:#010x} ({x:e})"
        );
        assert_eq!(
            bf16,
            half::bf16::from_f32(x).to_bits(),
            "bf16 of {bits:#010x} ({x:e})"
        );
    }
}

#[test]
fn bench_refuses_the_emulated_device() {
    // Every case list, the flash attention benches (issue #16) alone on the sm_80 path too:
    // emulated timings mean nothing, whichever kernels a case would run.
    for args in [
        &["--device", "emu", "--preset", "tiny"][..],
        &[
            "--device",
            "emu:sm80",
            "--preset",
            "2b",
            "--ops",
            "attention,attention_backward",
        ][..],
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_verdict"))
            .args(["bench", "kernels"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "bench ran on the emulator: {stderr}"
        );
        assert!(stderr.contains("refuses the emulated device"), "{stderr}");
    }
}
