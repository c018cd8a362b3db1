//! What build.rs embeds, checked without a GPU: every kernels/*.cu file is a module with its
//! exact source and an NVRTC-ready standalone source; a build made with
//! VERDICT_REQUIRE_KERNELS=1 (as CI does) carries, per module, CUDA 12 SASS for every target
//! arch and PTX that CUDA 12 drivers can JIT; and the loader picks among them by the driver's
//! rules.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use verdict::backend::cuda::kernels::{self, KernelImage, Target};

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

fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

/// Why `cubin` is not SASS for `sm_{arch}` that a CUDA 12 driver (R525+) loads, if it is not:
/// an ELF64 for NVIDIA's machine (EM_CUDA = 190) with CUDA's OS/ABI (0x33) and ABI version 7,
/// the arch in its flags' low byte and the toolkit (major·10 + minor) as its ELF version.
/// CUDA 13 writes ABI version 8 (OS/ABI 0x41), which drivers before R580 reject.
fn cuda12_sass_problem(cubin: &[u8], arch: u32) -> Option<String> {
    if cubin.len() < 64 || &cubin[..5] != b"\x7fELF\x02" {
        return Some("not an ELF64 file".into());
    }
    let (os_abi, abi_version) = (cubin[7], cubin[8]);
    let machine = u16_at(cubin, 18);
    let toolkit = u32_at(cubin, 20);
    let flags_arch = u32_at(cubin, 48) & 0xff;
    if machine != 190 {
        return Some(format!("ELF machine {machine}, not EM_CUDA (190)"));
    }
    if (os_abi, abi_version) != (0x33, 7) {
        return Some(format!(
            "OS/ABI {os_abi:#x} version {abi_version}: not CUDA 12's (0x33, 7)"
        ));
    }
    if !(120..130).contains(&toolkit) {
        return Some(format!("written by CUDA toolkit {toolkit}, not 12.x"));
    }
    if flags_arch != arch {
        return Some(format!("a cubin for sm_{flags_arch}, not sm_{arch}"));
    }
    None
}

// Catches a CI build that silently fell back to CPU-only, an image written by CUDA 13 (its
// cubins need driver R580; Kaggle's are CUDA 12), PTX with an ISA newer than CUDA 12 drivers
// JIT, a missing arch (a T4 needs sm_75 SASS; PTX lets newer GPUs JIT) and a misaligned image.
#[test]
fn images_match_the_build_mode_and_are_cuda_12_for_every_target_arch() {
    if !kernels::prebuilt() {
        assert!(
            !build_required_kernels(),
            "built with VERDICT_REQUIRE_KERNELS=1 but the binary carries no prebuilt kernels"
        );
        say("checking the CPU-only build: no module may carry an image (sources are checked by the other tests)");
        for module in kernels::modules() {
            assert!(
                module.images.is_empty(),
                "{}: CPU-only build carries images",
                module.name
            );
        }
        return;
    }
    say("checking the build with prebuilt kernels (CUDA 12 SASS sm_75/80/86/89/90 + compute_90 PTX)");
    let expected: Vec<Target> = SASS_ARCHS
        .into_iter()
        .map(Target::Sass)
        .chain([Target::Ptx(PTX_ARCH)])
        .collect();
    for module in kernels::modules() {
        let name = module.name;
        let targets: Vec<Target> = module.images.iter().map(|i| i.target).collect();
        assert_eq!(targets, expected, "{name}: embedded images");
        for image in module.images {
            let bytes = image.bytes;
            assert_eq!(
                bytes.as_ptr() as usize % 16,
                0,
                "{name} {}: not 16-byte aligned",
                image.target
            );
            match image.target {
                Target::Sass(arch) => {
                    if let Some(problem) = cuda12_sass_problem(bytes, arch) {
                        panic!("{name} {}: {problem}", image.target);
                    }
                }
                Target::Ptx(arch) => {
                    assert_eq!(bytes.last(), Some(&0), "{name}: PTX without its NUL");
                    let text = std::str::from_utf8(&bytes[..bytes.len() - 1])
                        .unwrap_or_else(|e| panic!("{name}: PTX is not UTF-8: {e}"));
                    let directive = |key: &str| {
                        text.lines()
                            .find_map(|l| l.strip_prefix(key))
                            .map(str::trim)
                            .unwrap_or_else(|| panic!("{name}: PTX has no {key}"))
                    };
                    // CUDA 12.0 to 12.9 write ISA 8.0 to 8.8; 9.x is CUDA 13's, which a CUDA
                    // 12 driver cannot JIT.
                    let isa = directive(".version ");
                    assert!(
                        isa.starts_with("8."),
                        "{name}: PTX ISA {isa}, not CUDA 12's 8.x"
                    );
                    assert_eq!(
                        directive(".target "),
                        format!("sm_{arch}"),
                        "{name}: PTX target"
                    );
                    assert!(text.contains(".entry "), "{name}: PTX without entry points");
                }
            }
        }
    }
}

/// A test image list: SASS for `sass`, PTX for `ptx`, in the order given.
fn images(sass: &[u32], ptx: &[u32]) -> Vec<KernelImage> {
    sass.iter()
        .map(|&arch| Target::Sass(arch))
        .chain(ptx.iter().map(|&arch| Target::Ptx(arch)))
        .map(|target| KernelImage { target, bytes: &[] })
        .collect()
}

// Catches a loader that does not follow CUDA's compatibility rules: SASS runs only on its own
// major at an equal or higher minor (sm_80 on sm_86, never sm_86 on sm_80 nor sm_80 on sm_90),
// PTX on its arch or newer, SASS before PTX, the highest fitting arch of each, whatever the
// order of the images; and a device nothing fits gets nothing (so NVRTC steps in).
#[test]
fn load_order_follows_the_drivers_compatibility_rules() {
    use Target::{Ptx, Sass};
    let shipped = images(&SASS_ARCHS, &[PTX_ARCH]);
    let shuffled = images(&[90, 80, 75, 89, 86], &[PTX_ARCH]);
    let sparse = images(&[80, 75], &[90, 75]);
    // (what the case is, the images, the device's compute capability, the expected order)
    type Case<'a> = (&'a str, &'a [KernelImage], (i32, i32), &'a [Target]);
    let cases: &[Case] = &[
        (
            "T4: its own SASS; compute_90 PTX is above it",
            &shipped,
            (7, 5),
            &[Sass(75)],
        ),
        ("A100: its own SASS", &shipped, (8, 0), &[Sass(80)]),
        (
            "A10/RTX 30: its own SASS, not sm_80's",
            &shipped,
            (8, 6),
            &[Sass(86)],
        ),
        (
            "Orin (sm_87): the highest lower minor",
            &shipped,
            (8, 7),
            &[Sass(86)],
        ),
        ("L4/RTX 40: its own SASS", &shipped, (8, 9), &[Sass(89)]),
        (
            "H100: SASS, then PTX",
            &shipped,
            (9, 0),
            &[Sass(90), Ptx(90)],
        ),
        (
            "B200 (sm_100): no SASS of major 10, PTX",
            &shipped,
            (10, 0),
            &[Ptx(90)],
        ),
        ("RTX 50 (sm_120): PTX", &shipped, (12, 0), &[Ptx(90)]),
        ("V100 (sm_70): nothing fits", &shipped, (7, 0), &[]),
        ("P100 (sm_60): nothing fits", &shipped, (6, 0), &[]),
        (
            "order of the images does not matter",
            &shuffled,
            (8, 9),
            &[Sass(89)],
        ),
        (
            "sm_86 without its SASS: sm_80's, then the lower PTX",
            &sparse,
            (8, 6),
            &[Sass(80), Ptx(75)],
        ),
        (
            "sm_90 without its SASS: never sm_80's, the highest PTX",
            &sparse,
            (9, 0),
            &[Ptx(90)],
        ),
        ("no images (CPU-only build)", &[], (8, 0), &[]),
    ];
    for (case, images, compute_capability, expected) in cases {
        let order: Vec<Target> = kernels::load_order(images, *compute_capability)
            .into_iter()
            .map(|image| image.target)
            .collect();
        assert_eq!(&order, expected, "{case}");
    }
}
