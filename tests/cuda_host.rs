//! The CUDA backend's host logic, checked without a GPU: pool bookkeeping, launch shapes,
//! packed-batch key ranges, device and kernel-source parsing, the no-GPU selftest exit path,
//! and (where an NVRTC library is on the path) that every embedded kernel source compiles
//! with NVRTC, as the run-time fallback needs. Each test names the mistake it catches.

use std::collections::HashMap;
mod common;

use std::process::Command;
use verdict::backend::cuda::gemm::GemmKernel;
use verdict::backend::cuda::launch::{self, LaunchConfig};
use verdict::backend::cuda::nf4::{self, MmaOperands};
use verdict::backend::cuda::pool::{self, AllocError, Block, DeviceMemory, Pool};
use verdict::backend::cuda::{self, Device, KernelSource, Probe};
use verdict::backend::cuda::{attention, gemm, rmsnorm};

/// Device memory on the host: hands out increasing addresses, can be told to run out.
#[derive(Default)]
struct FakeMemory {
    next: u64,
    live: HashMap<u64, usize>,
    capacity: Option<usize>,
    released: usize,
}

impl FakeMemory {
    fn live_bytes(&self) -> usize {
        self.live.values().sum()
    }
}

impl DeviceMemory for FakeMemory {
    fn allocate(&mut self, bytes: usize) -> Result<u64, AllocError> {
        if self.capacity.is_some_and(|c| self.live_bytes() + bytes > c) {
            return Err(AllocError::OutOfMemory);
        }
        self.next += 1 << 32;
        self.live.insert(self.next, bytes);
        Ok(self.next)
    }

    fn release(&mut self, ptr: u64, bytes: usize) {
        assert_eq!(
            self.live.remove(&ptr),
            Some(bytes),
            "released a block it did not hand out"
        );
        self.released += 1;
    }
}

#[test]
fn pool_rounds_small_and_large_requests_to_their_classes() {
    assert_eq!(
        pool::block_size(0),
        512,
        "a zero-byte request still gets a block"
    );
    assert_eq!(pool::block_size(1), 512);
    assert_eq!(pool::block_size(513), 1024);
    assert_eq!(pool::block_size(1 << 20), 1 << 20);
    assert_eq!(
        pool::block_size((1 << 20) + 1),
        2 << 20,
        "past 1 MiB: 2 MiB classes"
    );
    assert_eq!(pool::block_size((4 << 20) + 1), 6 << 20);
}

#[test]
fn pool_reuses_a_freed_block_instead_of_allocating() {
    let mut pool = Pool::new(FakeMemory::default());
    let a = pool.allocate(1000).unwrap();
    pool.free(a);
    let b = pool.allocate(900).unwrap();
    assert_eq!(b, a, "same size class: the cached block comes back");
    let stats = pool.stats();
    assert_eq!((stats.device_allocations, stats.reuses), (1, 1));
    assert_eq!((stats.in_use_bytes, stats.cached_bytes), (1024, 0));
}

#[test]
fn pool_never_hands_out_a_block_much_larger_than_asked() {
    // A freed 4 MiB block must not serve a 512-byte request (it would pin 4 MiB for it), but
    // may serve a request up to 25% smaller.
    let mut pool = Pool::new(FakeMemory::default());
    let big = pool.allocate(4 << 20).unwrap();
    pool.free(big);
    let small = pool.allocate(512).unwrap();
    assert_ne!(small.ptr, big.ptr);
    let close = pool.allocate((4 << 20) - (1 << 20)).unwrap();
    assert_eq!(close, big, "3.x MiB rounds to 4 MiB: the cached block fits");
}

#[test]
fn pool_high_water_marks_count_in_use_and_reserved_bytes() {
    let mut pool = Pool::new(FakeMemory::default());
    let a = pool.allocate(3 << 20).unwrap(); // 4 MiB class
    let b = pool.allocate(1 << 20).unwrap(); // 1 MiB
    pool.free(a);
    let c = pool.allocate(100).unwrap();
    let stats = pool.stats();
    assert_eq!(stats.peak_in_use_bytes, (4 << 20) + (1 << 20));
    assert_eq!(stats.in_use_bytes, (1 << 20) + 512);
    assert_eq!(stats.cached_bytes, 4 << 20);
    assert_eq!(stats.peak_reserved_bytes, (4 << 20) + (1 << 20) + 512);
    pool.free(b);
    pool.free(c);
    assert_eq!(pool.stats().in_use_bytes, 0);
    assert_eq!(
        pool.stats().peak_in_use_bytes,
        (4 << 20) + (1 << 20),
        "peaks never go down"
    );
}

#[test]
fn pool_gives_the_cache_back_and_retries_when_the_device_is_full() {
    let memory = FakeMemory {
        capacity: Some(8 << 20),
        ..FakeMemory::default()
    };
    let mut pool = Pool::new(memory);
    let a = pool.allocate(6 << 20).unwrap();
    pool.free(a);
    // 6 MiB cached + 4 MiB new > 8 MiB: only emptying the cache makes room.
    let b = pool.allocate(4 << 20).unwrap();
    assert_ne!(b.ptr, a.ptr);
    assert_eq!(pool.stats().cache_flushes, 1);
    assert_eq!(pool.stats().cached_bytes, 0);
    assert_eq!(pool.memory().released, 1);
    // Nothing cached to give back: out of memory is reported, not retried forever.
    assert!(matches!(
        pool.allocate(6 << 20),
        Err(AllocError::OutOfMemory)
    ));
}

#[test]
fn pool_releases_every_cached_block_when_dropped() {
    let mut pool = Pool::new(FakeMemory::default());
    let blocks: Vec<Block> = (0..5)
        .map(|i| pool.allocate(1000 * (i + 1)).unwrap())
        .collect();
    for b in blocks {
        pool.free(b);
    }
    pool.release_cached();
    assert!(pool.memory().live.is_empty(), "a cached block leaked");
}

#[test]
fn launch_shapes_cover_every_item_with_whole_warps() {
    let c = LaunchConfig::per_item("t", 1, 256).unwrap();
    assert_eq!((c.grid, c.block), ((1, 1, 1), (256, 1, 1)));
    let c = LaunchConfig::per_item("t", 257, 256).unwrap();
    assert_eq!(c.grid.0, 2, "257 items need a second block");
    assert!(c.threads() >= 257);
    assert_eq!(
        launch::row_threads(1, rmsnorm::RMSNORM_MAX_THREADS),
        32,
        "a block reduction needs a whole warp"
    );
    assert_eq!(launch::row_threads(33, rmsnorm::RMSNORM_MAX_THREADS), 64);
    assert_eq!(
        launch::row_threads(333, rmsnorm::RMSNORM_MAX_THREADS),
        256,
        "capped at the kernels' launch bound"
    );
    assert_eq!(launch::row_threads(64, rmsnorm::RMSNORM_MAX_THREADS), 64);
}

#[test]
fn gemm_grid_tiles_odd_shapes_and_puts_rows_on_y() {
    // Both kernels tile out in 64 x 64 blocks: 256 threads on CUDA cores, 4 warps on tensor
    // cores.
    let f16 = GemmKernel::Mma(MmaOperands::F16);
    for (kernel, threads) in [
        (GemmKernel::F32, gemm::GEMM_THREADS),
        (f16, nf4::NF4_MMA_THREADS),
    ] {
        let c = LaunchConfig::gemm("t", kernel, 333, 1000).unwrap();
        assert_eq!(
            c.grid,
            (16, 6, 1),
            "ceil(1000/64) column tiles, ceil(333/64) row tiles"
        );
        assert_eq!(c.block, (threads, 1, 1));
        assert_eq!(
            LaunchConfig::gemm("t", kernel, 1, 3).unwrap().grid,
            (1, 1, 1)
        );
    }
}

#[test]
fn grids_past_cuda_limits_are_errors_naming_the_setting() {
    // gridDim.y is at most 65535: attention with 70000 heads, or a GEMM of 65536 row tiles.
    let err = LaunchConfig::flash_attention("attention", 30, 70_000).unwrap_err();
    assert!(err.to_string().contains("--batch-tokens"), "{err}");
    let kernel = GemmKernel::for_arch((7, 5));
    assert!(LaunchConfig::gemm("linear", kernel, 65_536 * 64, 8).is_err());
    assert!(LaunchConfig::gemm("linear", kernel, 65_535 * 64, 8).is_ok());
    assert!(launch::to_u32("dim", 1 << 32).is_err());
}

#[test]
fn attention_tiles_restart_at_each_sequence() {
    // Two sequences [0, 3) and [3, 5) in tiles of 2 rows: no tile holds rows of both, so no
    // block sees a key of the other sequence.
    assert_eq!(
        attention::tiles(&[0, 3, 5], 2).unwrap(),
        [0, 0, 3, 2, 0, 3, 3, 3, 5]
    );
}

#[test]
fn attention_tiles_allow_empty_sequences_and_reject_bad_cu_seqlens() {
    assert_eq!(attention::tiles(&[0, 0, 2, 2], 64).unwrap(), [0, 0, 2]);
    assert!(
        attention::check_cu_seqlens(&[1, 3], 3).is_err(),
        "must start at 0"
    );
    assert!(
        attention::check_cu_seqlens(&[0, 3, 2, 4], 4).is_err(),
        "must not decrease"
    );
    assert!(
        attention::check_cu_seqlens(&[0, 3], 4).is_err(),
        "must end at the token count"
    );
    assert!(attention::check_cu_seqlens(&[0, 0, 3], 3).is_ok());
}

#[test]
fn device_strings_parse_as_the_cli_documents() {
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
    assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
    for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA", "cuda0", ""] {
        assert!(bad.parse::<Device>().is_err(), "{bad:?} was accepted");
    }
    assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
}

#[test]
fn kernel_source_follows_verdict_kernels() {
    assert_eq!(
        KernelSource::from_env_value(None).unwrap(),
        KernelSource::Auto
    );
    assert_eq!(
        KernelSource::from_env_value(Some("")).unwrap(),
        KernelSource::Auto
    );
    assert_eq!(
        KernelSource::from_env_value(Some("nvrtc")).unwrap(),
        KernelSource::Nvrtc
    );
    assert_eq!(
        KernelSource::from_env_value(Some("prebuilt")).unwrap(),
        KernelSource::Prebuilt
    );
    assert!(
        KernelSource::from_env_value(Some("NVRTC")).is_err(),
        "a typo must not fall back silently"
    );
}

#[test]
fn selftest_without_a_gpu_says_so_and_exits_3() {
    let Some(report) =
        common::no_device_report(&["selftest"], "no CUDA device: selftest needs a GPU")
    else {
        return;
    };
    assert_eq!(report["status"], "no_device");
    // --device cpu is a usage error, not "no device".
    let output = Command::new(env!("CARGO_BIN_EXE_verdict"))
        .args(["selftest", "--device", "cpu"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn opening_cuda_without_a_gpu_is_an_error_not_a_panic() {
    if let Probe::Devices(n) = cuda::probe() {
        common::skip(
            "opening CUDA without a GPU",
            &format!("this machine has {n} CUDA device(s)"),
        );
        return;
    }
    let err = cuda::Cuda::new(0)
        .err()
        .expect("no device, yet CUDA opened");
    assert!(err.to_string().starts_with("no CUDA device"), "{err}");
}

#[test]
fn nvrtc_compiles_every_embedded_kernel_source_to_a_cubin() {
    // The run-time fallback compiles `standalone_source` with the machine's NVRTC (Kaggle:
    // CUDA 12), with no include path, to SASS for the device's sm_XY. CI installs
    // nvidia-cuda-nvrtc-cu12 into tools/install-nvcc.sh's venv, where verdict looks for it
    // (cuda::nvrtc_candidates), so this runs there. build.rs already compiles every file for
    // every arch with the same NVRTC, so each file is compiled here for one arch, in turn:
    // every file and every arch through this path, at a fifth of the time.
    let Some((major, minor)) = cuda::nvrtc_version() else {
        common::skip(
            "the NVRTC compile check",
            "no libnvrtc on the library path nor in the pip places verdict looks",
        );
        return;
    };
    use rayon::prelude::*;
    let started = std::time::Instant::now();
    let archs = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0)];
    let modules = verdict::backend::cuda::kernels::modules();
    assert!(
        modules.len() >= archs.len(),
        "fewer kernel files than archs"
    );
    let jobs: Vec<_> = modules
        .iter()
        .zip(archs.iter().cycle())
        .map(|(module, &arch)| (module, arch))
        .collect();
    // NVRTC is thread-safe across programs: the compiles share the cores.
    jobs.par_iter().for_each(|&(module, arch)| {
        {
            let cubin = cuda::compile_nvrtc(module, arch).unwrap_or_else(|e| {
                panic!("NVRTC {major}.{minor}, sm_{}{}: {e:#}", arch.0, arch.1)
            });
            // An ELF for NVIDIA's machine (EM_CUDA = 190) naming the arch in its flags' low byte.
            assert_eq!(&cubin[..4], b"\x7fELF", "{}: not an ELF", module.name);
            assert_eq!(
                u16::from_le_bytes([cubin[18], cubin[19]]),
                190,
                "{}: not a CUDA ELF",
                module.name
            );
            assert_eq!(
                u32::from_le_bytes([cubin[48], cubin[49], cubin[50], cubin[51]]) & 0xff,
                (arch.0 * 10 + arch.1) as u32,
                "{}: a cubin for another arch than sm_{}{}",
                module.name,
                arch.0,
                arch.1
            );
        }
    });
    eprintln!(
        "cuda_host: NVRTC {major}.{minor} compiled every kernel file to a cubin \
         ({} compiles, sm_75, 80, 86, 89, 90 in turn) in {:.1} s",
        jobs.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Catches: the split by use not following blocks to their free (a reused block counted
/// twice, or under the use of its first life), or the split not taken at the high-water mark.
#[test]
fn pool_counts_bytes_by_use_and_keeps_the_split_at_the_peak() {
    use verdict::backend::MemoryUse;
    let mut pool = Pool::new(FakeMemory::default());
    let weights = pool.allocate_for(4 << 20, MemoryUse::Weights).unwrap();
    let saved = pool
        .allocate_for(2 << 20, MemoryUse::SavedActivations)
        .unwrap();
    let temp = pool.allocate_for(6 << 20, MemoryUse::Workspace).unwrap();
    pool.free_for(temp, MemoryUse::Workspace);
    // The freed 6 MiB block serves the recomputation now: counted under its new use.
    let again = pool
        .allocate_for(6 << 20, MemoryUse::Recomputation)
        .unwrap();
    assert_eq!(again.ptr, temp.ptr, "the cached block is reused");
    let usage = pool.usage();
    assert_eq!(usage.now[MemoryUse::Workspace.index()], 0);
    assert_eq!(usage.now[MemoryUse::Recomputation.index()], 6 << 20);
    // Peak 12 MiB, reached first with the workspace block, last with the recomputation.
    assert_eq!(pool.stats().peak_in_use_bytes, 12 << 20);
    assert_eq!(usage.at_peak[MemoryUse::Recomputation.index()], 6 << 20);
    assert_eq!(usage.at_peak.iter().sum::<usize>(), 12 << 20);
    pool.free_for(again, MemoryUse::Recomputation);
    pool.free_for(saved, MemoryUse::SavedActivations);
    let usage = pool.usage();
    assert_eq!(usage.now[MemoryUse::Weights.index()], 4 << 20);
    assert_eq!(usage.now.iter().sum::<usize>(), pool.stats().in_use_bytes);
    assert_eq!(
        usage.at_peak[MemoryUse::Weights.index()],
        4 << 20,
        "the peak split stays"
    );
    pool.free_for(weights, MemoryUse::Weights);
}
