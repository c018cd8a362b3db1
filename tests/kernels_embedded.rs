//! What build.rs embeds, checked without a GPU: every kernels/*.cu file is a module with its
//! exact source and an NVRTC-ready standalone source, and a build made with
//! VERDICT_REQUIRE_KERNELS=1 (as CI does) carries a fatbin with SASS for every target arch.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use verdict::backend::cuda::kernels::{self, KernelModule};

const FATBIN_MAGIC: u32 = 0xBA55_ED50;
const SASS_ARCHS: [u32; 5] = [75, 80, 86, 89, 90];
const PTX_ARCH: u32 = 90;

/// `kernels/<name>.<extension>` files in the repository, by name, with their text.
fn repo_files(extension: &str) -> BTreeMap<String, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("readable kernels/ entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == extension))
        .map(|path| {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let text = fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            (name, text)
        })
        .collect()
}

/// Whether this test binary was compiled in a build that had to produce kernels.
fn build_required_kernels() -> bool {
    option_env!("VERDICT_REQUIRE_KERNELS") == Some("1")
}

/// Prints past the test harness's capture, so the build mode shows in every `cargo test` run.
fn say(message: &str) {
    let _ = writeln!(std::io::stderr(), "kernels_embedded: {message}");
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

/// (kind, arch) of each entry of a fatbin; kind 1 is PTX, 2 is SASS (an ELF cubin).
fn fatbin_entries(module: &KernelModule, fatbin: &[u8]) -> Vec<(u16, u32)> {
    assert!(
        fatbin.len() >= 16,
        "{}: fatbin of {} bytes has no header",
        module.name,
        fatbin.len()
    );
    assert_eq!(
        u32_at(fatbin, 0),
        FATBIN_MAGIC,
        "{}: fatbin magic",
        module.name
    );
    let header_size = u16::from_le_bytes([fatbin[6], fatbin[7]]) as usize;
    let end = header_size + u64_at(fatbin, 8) as usize;
    assert_eq!(
        end,
        fatbin.len(),
        "{}: fatbin header size + payload size vs file size",
        module.name
    );
    let mut entries = Vec::new();
    let mut offset = header_size;
    while offset < end {
        let kind = u16::from_le_bytes([fatbin[offset], fatbin[offset + 1]]);
        let entry_header_size = u32_at(fatbin, offset + 4) as usize;
        let payload_size = u64_at(fatbin, offset + 8) as usize;
        entries.push((kind, u32_at(fatbin, offset + 28)));
        offset += entry_header_size + payload_size;
    }
    assert_eq!(
        offset, end,
        "{}: fatbin entries overrun the payload",
        module.name
    );
    entries
}

// Catches a kernel file that build.rs did not discover (or a module left over from a
// deleted file), and an embedded source that is not the file in the repository.
#[test]
fn every_kernel_file_is_a_module_with_its_exact_source() {
    let files = repo_files("cu");
    assert!(
        files.contains_key("nf4"),
        "kernels/nf4.cu is missing from the repository"
    );
    let names: Vec<&str> = kernels::modules().iter().map(|m| m.name).collect();
    assert_eq!(
        names,
        files.keys().map(String::as_str).collect::<Vec<_>>(),
        "embedded modules vs kernels/*.cu"
    );
    for (name, text) in &files {
        let module = kernels::module(name).unwrap_or_else(|| panic!("no module {name}"));
        assert_eq!(
            module.source, text,
            "kernels/{name}.cu: embedded source differs from the file"
        );
    }
    assert!(kernels::module("no_such_kernel").is_none());
}

// Catches a standalone source that still needs an include path (NVRTC has none) or that
// lost a header's text on the way.
#[test]
fn standalone_sources_inline_every_local_header() {
    let headers = repo_files("cuh");
    for module in kernels::modules() {
        for line in module.standalone_source.lines() {
            assert!(
                !line.trim_start().starts_with("#include \""),
                "{}: standalone source still includes a local file: {line}",
                module.name
            );
        }
        for (header, text) in &headers {
            if module
                .source
                .contains(&format!("#include \"{header}.cuh\""))
            {
                assert!(
                    module.standalone_source.contains(text.as_str()),
                    "{}: standalone source lacks {header}.cuh",
                    module.name
                );
            }
        }
        // The file's own lines all appear, in order.
        let mut standalone_lines = module.standalone_source.lines();
        for line in module
            .source
            .lines()
            .filter(|l| !l.trim_start().starts_with("#include \""))
        {
            assert!(
                standalone_lines.any(|s| s == line),
                "{}: standalone source lacks, or reorders, the line {line:?}",
                module.name
            );
        }
    }
}

// Catches a CI build that silently fell back to CPU-only, a fatbin that is not one, and
// missing arch targets (a T4 needs sm_75 SASS; PTX lets newer GPUs JIT).
#[test]
fn fatbins_match_the_build_mode_and_cover_every_target_arch() {
    if !kernels::prebuilt() {
        assert!(
            !build_required_kernels(),
            "built with VERDICT_REQUIRE_KERNELS=1 but the binary carries no prebuilt kernels"
        );
        say("checking the CPU-only build: no module may carry a fatbin (sources are checked by the other tests)");
        for module in kernels::modules() {
            assert!(
                module.fatbin.is_none(),
                "{}: CPU-only build carries a fatbin",
                module.name
            );
        }
        return;
    }
    say("checking the build with prebuilt kernels (sm_75/80/86/89/90 SASS + compute_90 PTX)");
    for module in kernels::modules() {
        let fatbin = module
            .fatbin
            .unwrap_or_else(|| panic!("{}: prebuilt build lacks its fatbin", module.name));
        let entries = fatbin_entries(module, fatbin);
        let mut sass: Vec<u32> = entries
            .iter()
            .filter(|(kind, _)| *kind == 2)
            .map(|&(_, arch)| arch)
            .collect();
        sass.sort_unstable();
        assert_eq!(
            sass, SASS_ARCHS,
            "{}: SASS archs in the fatbin",
            module.name
        );
        let ptx: Vec<u32> = entries
            .iter()
            .filter(|(kind, _)| *kind == 1)
            .map(|&(_, arch)| arch)
            .collect();
        assert_eq!(ptx, [PTX_ARCH], "{}: PTX archs in the fatbin", module.name);
    }
}
