//! Build script: compiles every `kernels/*.cu` with NVRTC 12.x into the images the binary
//! embeds, and generates `$OUT_DIR/kernels.rs`, which `src/backend/cuda/kernels.rs` includes.
//!
//! - libnvrtc.so.12 is looked for at `$VERDICT_NVRTC`, in `$CUDA_HOME/lib64`, then in the
//!   folder made by `tools/install-nvcc.sh` (`$VERDICT_NVCC_VENV`, default
//!   `$HOME/.cache/verdict/nvcc-venv`), pip's `nvidia/cuda_nvrtc/lib`; it is opened with
//!   dlopen, so nothing links against it.
//! - Each file becomes SASS cubins for sm_75, sm_80, sm_86, sm_89, sm_90 and PTX for
//!   compute_90, one NVRTC compile each, all side by side. Why NVRTC 12 and not nvcc: CUDA 12
//!   cubins load on every driver since R525 (Kaggle's), CUDA 13's need R580, and PyPI has no
//!   CUDA 12 nvcc (`nvidia-cuda-nvcc-cu12` ships only ptxas and libnvvm); NVRTC 12 is on PyPI
//!   and runs the same front end and ptxas. The images are embedded one by one, not as a
//!   fatbin (only CUDA 13's `fatbinary` is on PyPI, and whether older drivers read its
//!   containers cannot be checked without one); the loader picks among them by the driver's
//!   own rules (`kernels::load_order`).
//! - ptxas's register/spill report per file (`--ptxas-options=-v`) goes to
//!   `$OUT_DIR/<name>.ptxas.txt` and `target/kernels-report/`, with a summary table there.
//! - Without NVRTC 12, or if a compile fails, the build warns and goes CPU-only: no images,
//!   sources still embedded (run time compiles them with NVRTC). `VERDICT_REQUIRE_KERNELS=1`
//!   (set by CI) makes both a build error.
//!
//! This half needs no crate (NVRTC through dlopen); the emulator's half uses `cc`.

use std::collections::HashSet;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::Instant;

/// SASS for every arch verdict tunes for: the T4 (sm_75), A100 (sm_80), the RTX 30 (sm_86)
/// and 40 (sm_89) series, H100 (sm_90).
const SASS_ARCHS: [u32; 5] = [75, 80, 86, 89, 90];
/// PTX for newer GPUs (no SASS of their major, e.g. sm_100, sm_120), which the driver
/// JIT-compiles. compute_90, not compute_75: the bf16 tensor-core paths exist only for
/// `__CUDA_ARCH__ >= 800`, and the host picks them on such a card.
const PTX_ARCH: u32 = 90;
/// As the run-time NVRTC compile (`compile_nvrtc`) uses, plus ptxas's report.
const NVRTC_OPTIONS: &[&str] = &["-std=c++17", "--ptxas-options=-v"];
const ENV_VARS: &[&str] = &[
    "VERDICT_NVRTC",
    "CUDA_HOME",
    "HOME",
    "VERDICT_NVCC_VENV",
    "VERDICT_REQUIRE_KERNELS",
];

#[path = "kernels/emu/build.rs"]
mod emulator;

/// One `kernels/<name>.cu` file.
struct KernelFile {
    name: String,
    path: PathBuf,
}

/// ptxas's numbers for one entry function on one arch.
struct PtxasEntry {
    function: String,
    arch: String,
    registers: u32,
    stack_bytes: u32,
    spill_stores: u32,
    spill_loads: u32,
}

fn main() {
    let manifest_dir =
        PathBuf::from(env_var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env_var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir = manifest_dir.join("kernels");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", kernel_dir.display());
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let require = match env_var("VERDICT_REQUIRE_KERNELS").as_deref() {
        None | Some("") | Some("0") => false,
        Some("1") => true,
        Some(other) => fail(&format!(
            "VERDICT_REQUIRE_KERNELS must be 0 or 1, found {other:?}"
        )),
    };
    let (kernels, headers) = discover(&kernel_dir);
    for path in kernels.iter().map(|k| &k.path).chain(&headers) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let mut standalone_sources = Vec::new();
    for kernel in &kernels {
        let standalone = inline_local_includes(&kernel.path, &mut HashSet::new());
        write(
            &out_dir.join(format!("{}.standalone.cu", kernel.name)),
            &standalone,
        );
        standalone_sources.push(standalone);
    }
    emulator::build(
        &manifest_dir,
        &out_dir,
        &kernels,
        &standalone_sources,
        require,
    );

    let prebuilt = match find_nvrtc() {
        Ok(library) => {
            println!("cargo:rerun-if-changed={}", library.display());
            match nvrtc::Nvrtc::open(&library)
                .and_then(|nvrtc| compile_all(&nvrtc, &library, &kernels, &out_dir))
            {
                Ok(()) => true,
                Err(message) if require => fail(&message),
                Err(message) => {
                    warn_lines(&format!(
                        "{message}\nbuilding CPU-only (no prebuilt kernels)"
                    ));
                    false
                }
            }
        }
        Err(looked_at) => {
            let message = format!(
                "libnvrtc.so.12 not found (looked at: {looked_at}); run tools/install-nvcc.sh \
                 or set VERDICT_NVRTC"
            );
            if require {
                fail(&format!("VERDICT_REQUIRE_KERNELS=1 but {message}"));
            }
            warn_lines(&format!(
                "{message}; building CPU-only (no prebuilt kernels)"
            ));
            false
        }
    };
    write(
        &out_dir.join("kernels.rs"),
        &generated_module(&kernels, prebuilt),
    );
}

fn env_var(name: &str) -> Option<String> {
    env::var(name).ok()
}

/// Stops the build with `message` (cargo shows a failing build script's stderr).
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

fn warn_lines(message: &str) {
    for line in message.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning={line}");
    }
}

fn write(path: &Path, contents: &str) {
    if let Err(e) = fs::write(path, contents) {
        fail(&format!("cannot write {}: {e}", path.display()));
    }
}

/// The `*.cu` files (sorted by name) and `*.cuh` headers in `kernels/`.
fn discover(kernel_dir: &Path) -> (Vec<KernelFile>, Vec<PathBuf>) {
    let entries = fs::read_dir(kernel_dir)
        .unwrap_or_else(|e| fail(&format!("cannot list {}: {e}", kernel_dir.display())));
    let mut kernels = Vec::new();
    let mut headers = Vec::new();
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| fail(&format!("cannot list {}: {e}", kernel_dir.display())))
            .path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cu") => {
                let name = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("")
                    .to_string();
                let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if !valid {
                    fail(&format!(
                        "{}: kernel file names must be lowercase letters, digits and '_' \
                         (they become Rust identifiers)",
                        path.display()
                    ));
                }
                kernels.push(KernelFile { name, path });
            }
            Some("cuh") => headers.push(path),
            _ => {}
        }
    }
    kernels.sort_by(|a, b| a.name.cmp(&b.name));
    headers.sort();
    (kernels, headers)
}

/// The text of `path` with each `#include "x"` of a file beside it replaced by that file's
/// text (once per file, as include guards would), framed by `#line` markers so NVRTC's
/// messages still name the original file and line.
fn inline_local_includes(path: &Path, seen: &mut HashSet<PathBuf>) -> String {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", path.display())));
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
    let mut out = String::with_capacity(text.len());
    for (index, line) in text.lines().enumerate() {
        let included = line
            .trim_start()
            .strip_prefix("#include")
            .map(str::trim)
            .and_then(|rest| rest.strip_prefix('"'))
            .and_then(|rest| rest.split('"').next());
        match included {
            Some(header) => {
                let header_path = path.with_file_name(header);
                if !header_path.is_file() {
                    fail(&format!(
                        "{}:{}: #include \"{header}\" is not in kernels/",
                        path.display(),
                        index + 1
                    ));
                }
                if seen.insert(header_path.clone()) {
                    let _ = writeln!(out, "#line 1 \"{header}\"");
                    out.push_str(&inline_local_includes(&header_path, seen));
                }
                let _ = writeln!(out, "#line {} \"{file_name}\"", index + 2);
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// libnvrtc.so.12's path, or the list of places looked at. A `VERDICT_NVRTC` that names no
/// file stops the build: a wrong explicit setting should not quietly become a CPU-only build.
fn find_nvrtc() -> Result<PathBuf, String> {
    if let Some(library) = env_var("VERDICT_NVRTC").filter(|v| !v.is_empty()) {
        let library = PathBuf::from(library);
        if !library.is_file() {
            fail(&format!(
                "VERDICT_NVRTC={} is not a file",
                library.display()
            ));
        }
        return Ok(library);
    }
    let mut candidates = Vec::new();
    if let Some(cuda_home) = env_var("CUDA_HOME").filter(|v| !v.is_empty()) {
        candidates.push(Path::new(&cuda_home).join("lib64/libnvrtc.so.12"));
    }
    let venv = env_var("VERDICT_NVCC_VENV")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env_var("HOME").map(|home| Path::new(&home).join(".cache/verdict/nvcc-venv")));
    if let Some(venv) = &venv {
        candidates.extend(venv_nvrtc(venv));
    }
    if let Some(found) = candidates.iter().find(|c| c.is_file()) {
        return Ok(found.clone());
    }
    let mut places = vec!["$VERDICT_NVRTC".to_string(), "$CUDA_HOME/lib64".to_string()];
    if let Some(venv) = venv {
        places.push(format!(
            "{}/lib/python3.*/site-packages/nvidia/cuda_nvrtc/lib",
            venv.display()
        ));
    }
    Err(places.join(", "))
}

/// `<venv>/lib/python3.*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12`, for each
/// python3.* present.
fn venv_nvrtc(venv: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("python3."))
        .map(|entry| {
            entry
                .path()
                .join("site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12")
        })
        .collect();
    found.sort();
    found
}

/// What one NVRTC compile of a kernel file produces.
#[derive(Clone, Copy)]
enum Target {
    /// A cubin for sm_XY.
    Sass(u32),
    /// PTX for compute_XY.
    Ptx(u32),
}

impl Target {
    fn all() -> impl Iterator<Item = Target> {
        SASS_ARCHS
            .into_iter()
            .map(Target::Sass)
            .chain([Target::Ptx(PTX_ARCH)])
    }

    /// The file in OUT_DIR holding `kernel`'s image for this target.
    fn file_name(self, kernel: &str) -> String {
        match self {
            Target::Sass(arch) => format!("{kernel}.sm_{arch}.cubin"),
            Target::Ptx(arch) => format!("{kernel}.compute_{arch}.ptx"),
        }
    }
}

/// Compiles every kernel file for every target, one NVRTC compile per (file, target), as many
/// side by side as cargo allows (NVRTC is thread-safe across programs); on failure, the first
/// failing compile's log.
fn compile_all(
    nvrtc: &nvrtc::Nvrtc,
    library: &Path,
    kernels: &[KernelFile],
    out_dir: &Path,
) -> Result<(), String> {
    let (major, minor) = nvrtc.version()?;
    if major != 12 {
        return Err(format!(
            "{} is NVRTC {major}.{minor}; the embedded kernels need NVRTC 12.x (CUDA 12 cubins \
             load on every driver since R525, CUDA 13's need R580); tools/install-nvcc.sh \
             installs 12.4",
            library.display()
        ));
    }
    if kernels.is_empty() {
        return Ok(());
    }
    let jobs = env_var("NUM_JOBS")
        .and_then(|j| j.parse::<usize>().ok())
        .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let sources: Vec<String> = kernels
        .iter()
        .map(|k| {
            fs::read_to_string(out_dir.join(format!("{}.standalone.cu", k.name))).unwrap_or_else(
                |e| fail(&format!("cannot read {}'s standalone source: {e}", k.name)),
            )
        })
        .collect();
    // The longest sources first, so the last compiles to finish are short ones.
    let mut tasks: Vec<(usize, Target)> = (0..kernels.len())
        .flat_map(|k| Target::all().map(move |t| (k, t)))
        .collect();
    tasks.sort_by_key(|&(k, _)| std::cmp::Reverse(sources[k].len()));
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let logs: Mutex<Vec<Vec<(Target, String)>>> = Mutex::new(vec![Vec::new(); kernels.len()]);
    let first_error: Mutex<Option<String>> = Mutex::new(None);
    thread::scope(|scope| {
        for _ in 0..jobs.min(tasks.len()) {
            scope.spawn(|| {
                while let Some(&(k, target)) = tasks.get(next.fetch_add(1, Ordering::Relaxed)) {
                    match compile_one(nvrtc, &kernels[k], &sources[k], target, out_dir) {
                        Ok(log) => logs.lock().unwrap()[k].push((target, log)),
                        Err(e) => {
                            first_error.lock().unwrap().get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(error) = first_error.into_inner().unwrap() {
        return Err(error);
    }
    let seconds = started.elapsed().as_secs_f64();

    let mut entries = Vec::new();
    for (kernel, mut logs) in kernels.iter().zip(logs.into_inner().unwrap()) {
        // In target order: SASS by arch, then PTX.
        logs.sort_by_key(|(target, _)| match *target {
            Target::Sass(arch) => arch,
            Target::Ptx(arch) => 1000 + arch,
        });
        let report: String = logs.iter().map(|(_, log)| log.as_str()).collect();
        write(&out_dir.join(format!("{}.ptxas.txt", kernel.name)), &report);
        for entry in parse_ptxas(&report) {
            if entry.spill_stores > 0 || entry.spill_loads > 0 {
                println!(
                    "cargo:warning=kernels/{}.cu: {} spills on {} ({} bytes stored, {} loaded; see target/kernels-report/{}.ptxas.txt)",
                    kernel.name, entry.function, entry.arch, entry.spill_stores, entry.spill_loads, kernel.name
                );
            }
            entries.push((kernel.name.as_str(), entry));
        }
        // The front end and ptxas repeat a warning once per target; once is enough.
        let mut warned = HashSet::new();
        for line in report.lines().filter(|l| l.contains("warning")) {
            if warned.insert(line) {
                println!("cargo:warning=kernels/{}.cu: {line}", kernel.name);
            }
        }
    }
    let mut summary = format!(
        "{} kernel file(s) compiled by NVRTC {major}.{minor} ({}) to {} images in {seconds:.1} s \
         ({} compiles at a time)\n\n",
        kernels.len(),
        library.display(),
        tasks.len(),
        jobs.min(tasks.len())
    );
    println!("kernel compile: {}", summary.trim_end());
    let _ = writeln!(
        summary,
        "{:<10} {:<36} {:<6} {:>5} {:>6} {:>12} {:>11}",
        "file", "kernel", "arch", "regs", "stack", "spill stores", "spill loads"
    );
    entries.sort_by(|(fa, a), (fb, b)| (fa, &a.function, &a.arch).cmp(&(fb, &b.function, &b.arch)));
    for (file, e) in &entries {
        let _ = writeln!(
            summary,
            "{:<10} {:<36} {:<6} {:>5} {:>6} {:>12} {:>11}",
            file, e.function, e.arch, e.registers, e.stack_bytes, e.spill_stores, e.spill_loads
        );
    }
    write(&out_dir.join("ptxas-summary.txt"), &summary);
    publish_reports(out_dir, kernels);
    Ok(())
}

/// Compiles one kernel file for one target into OUT_DIR; returns NVRTC's log (ptxas's report
/// for a cubin), or an error holding it.
fn compile_one(
    nvrtc: &nvrtc::Nvrtc,
    kernel: &KernelFile,
    source: &str,
    target: Target,
    out_dir: &Path,
) -> Result<String, String> {
    let arch = match target {
        Target::Sass(arch) => format!("--gpu-architecture=sm_{arch}"),
        Target::Ptx(arch) => format!("--gpu-architecture=compute_{arch}"),
    };
    let mut options = vec![arch.as_str()];
    options.extend(NVRTC_OPTIONS);
    let (log, image) = nvrtc.compile(
        source,
        &format!("{}.cu", kernel.name),
        &options,
        matches!(target, Target::Sass(_)),
    );
    let image = image.map_err(|e| {
        format!(
            "NVRTC failed on kernels/{}.cu ({arch}): {e}\n{log}",
            kernel.name
        )
    })?;
    let valid = match target {
        Target::Sass(_) => image.starts_with(b"\x7fELF"),
        Target::Ptx(_) => image.ends_with(b"\0") && image.windows(9).any(|w| w == b".version "),
    };
    if !valid {
        return Err(format!(
            "NVRTC returned no {} for kernels/{}.cu ({arch})",
            if matches!(target, Target::Sass(_)) {
                "ELF cubin"
            } else {
                "NUL-terminated PTX"
            },
            kernel.name
        ));
    }
    let path = out_dir.join(target.file_name(&kernel.name));
    fs::write(&path, &image).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(log)
}

/// Reads ptxas's `-v` lines: "Compiling entry function 'f' for 'sm_80'", then
/// "N bytes stack frame, N bytes spill stores, N bytes spill loads", then "Used N registers".
/// Each target's log is one arch's block, so the last named function and arch are current.
fn parse_ptxas(report: &str) -> Vec<PtxasEntry> {
    fn number_before(line: &str, label: &str) -> u32 {
        line.find(label)
            .and_then(|end| line[..end].split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
    let mut entries: Vec<PtxasEntry> = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut quoted = rest.split('\'');
            let function = quoted.next().unwrap_or("?").to_string();
            let arch = quoted.nth(1).unwrap_or("?").to_string();
            entries.push(PtxasEntry {
                function,
                arch,
                registers: 0,
                stack_bytes: 0,
                spill_stores: 0,
                spill_loads: 0,
            });
        } else if let Some(entry) = entries.last_mut() {
            if line.contains("bytes spill stores") {
                entry.stack_bytes = number_before(line, "bytes stack frame");
                entry.spill_stores = number_before(line, "bytes spill stores");
                entry.spill_loads = number_before(line, "bytes spill loads");
            } else if line.contains("registers") {
                entry.registers = number_before(line, "registers");
            }
        }
    }
    entries
}

/// Copies the reports to `target/kernels-report/` (found from OUT_DIR,
/// `target/<profile>/build/verdict-<hash>/out`), where a person looks for them.
fn publish_reports(out_dir: &Path, kernels: &[KernelFile]) {
    let Some(target_dir) = out_dir
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|n| n == "build"))
        .and_then(|build| build.parent()?.parent())
    else {
        println!(
            "cargo:warning=cannot find the target folder above {}; ptxas reports stay there",
            out_dir.display()
        );
        return;
    };
    let report_dir = target_dir.join("kernels-report");
    if let Err(e) = fs::create_dir_all(&report_dir) {
        println!("cargo:warning=cannot create {}: {e}", report_dir.display());
        return;
    }
    // Reports of kernel files that no longer exist would mislead.
    for stale in fs::read_dir(&report_dir).into_iter().flatten().flatten() {
        if stale.file_name().to_string_lossy().ends_with(".ptxas.txt") {
            let _ = fs::remove_file(stale.path());
        }
    }
    let names = kernels
        .iter()
        .map(|k| format!("{}.ptxas.txt", k.name))
        .chain(["ptxas-summary.txt".to_string()]);
    for name in names {
        if let Err(e) = fs::copy(out_dir.join(&name), report_dir.join(&name)) {
            println!(
                "cargo:warning=cannot copy {name} to {}: {e}",
                report_dir.display()
            );
        }
    }
}

/// The Rust source that `src/backend/cuda/kernels.rs` includes: `PREBUILT` and `MODULES`.
fn generated_module(kernels: &[KernelFile], prebuilt: bool) -> String {
    let mut out = String::from("// @generated by build.rs from kernels/*.cu; do not edit.\n\n");
    if prebuilt && !kernels.is_empty() {
        out.push_str(
            "/// Gives an embedded image 16-byte alignment (include_bytes! data has none), so the driver never parses a misaligned ELF.\n\
             #[repr(C, align(16))]\nstruct Aligned<T: ?Sized>(T);\n\n",
        );
        for kernel in kernels {
            for target in Target::all() {
                let file = target.file_name(&kernel.name);
                let _ = writeln!(
                    out,
                    "static {}: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{file}\")));",
                    image_static(&file)
                );
            }
        }
        out.push('\n');
    }
    let _ = writeln!(out, "const PREBUILT: bool = {prebuilt};\n");
    out.push_str("static MODULES: &[KernelModule] = &[\n");
    for kernel in kernels {
        let mut images = String::new();
        if prebuilt {
            for target in Target::all() {
                let (kind, arch) = match target {
                    Target::Sass(arch) => ("Sass", arch),
                    Target::Ptx(arch) => ("Ptx", arch),
                };
                let _ = write!(
                    images,
                    "\n            KernelImage {{ target: Target::{kind}({arch}), bytes: &{}.0 }},",
                    image_static(&target.file_name(&kernel.name))
                );
            }
            images.push_str("\n        ");
        }
        let _ = write!(
            out,
            "    KernelModule {{\n        name: \"{name}\",\n        images: &[{images}],\n        \
             source: include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/kernels/{name}.cu\")),\n        \
             standalone_source: include_str!(concat!(env!(\"OUT_DIR\"), \"/{name}.standalone.cu\")),\n    }},\n",
            name = kernel.name
        );
    }
    out.push_str("];\n");
    out
}

/// The static holding an image file: `nf4.sm_75.cubin` becomes `NF4_SM_75_CUBIN`.
fn image_static(file: &str) -> String {
    file.to_uppercase().replace('.', "_")
}

/// NVRTC's C API, opened with dlopen (std already links libdl on glibc targets), so the build
/// script needs no crate and nothing links against CUDA.
mod nvrtc {
    use std::ffi::{c_char, c_int, c_void, CStr, CString};
    use std::path::Path;

    extern "C" {
        fn dlopen(file: *const c_char, mode: c_int) -> *mut c_void;
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
        fn dlerror() -> *const c_char;
    }
    const RTLD_NOW: c_int = 2;

    type Program = *mut c_void;
    type Status = c_int;
    type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status;
    type ErrorStringFn = unsafe extern "C" fn(Status) -> *const c_char;
    type CreateProgramFn = unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> Status;
    type CompileProgramFn = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> Status;
    type DestroyProgramFn = unsafe extern "C" fn(*mut Program) -> Status;
    /// The size of one of a program's outputs (log, cubin, PTX).
    type SizeFn = unsafe extern "C" fn(Program, *mut usize) -> Status;
    /// Copies that output into a buffer of that size.
    type CopyFn = unsafe extern "C" fn(Program, *mut c_char) -> Status;

    /// The entry points used, resolved once; the library stays loaded for the script's life.
    pub struct Nvrtc {
        version: VersionFn,
        error_string: ErrorStringFn,
        create_program: CreateProgramFn,
        compile_program: CompileProgramFn,
        destroy_program: DestroyProgramFn,
        log: (SizeFn, CopyFn),
        cubin: (SizeFn, CopyFn),
        ptx: (SizeFn, CopyFn),
    }

    impl Nvrtc {
        pub fn open(library: &Path) -> Result<Nvrtc, String> {
            let path = CString::new(library.as_os_str().as_encoded_bytes())
                .map_err(|_| format!("{} holds a NUL byte", library.display()))?;
            // SAFETY: a NUL-terminated path; dlerror's message is read before any other dl call.
            let handle = unsafe { dlopen(path.as_ptr(), RTLD_NOW) };
            if handle.is_null() {
                let why = unsafe { dlerror() };
                let why = if why.is_null() {
                    "unknown error".into()
                } else {
                    unsafe { CStr::from_ptr(why) }.to_string_lossy()
                };
                return Err(format!("cannot load {}: {why}", library.display()));
            }
            macro_rules! symbol {
                ($name:literal: $type:ty) => {{
                    // SAFETY: a live handle and a NUL-terminated name.
                    let address = unsafe { dlsym(handle, concat!($name, "\0").as_ptr().cast()) };
                    if address.is_null() {
                        return Err(format!("{} has no {}", library.display(), $name));
                    }
                    // SAFETY: NVRTC's function of this name has the field's signature in every
                    // release since 11.1 (nvrtc.h).
                    unsafe { std::mem::transmute::<*mut c_void, $type>(address) }
                }};
            }
            Ok(Nvrtc {
                version: symbol!("nvrtcVersion": VersionFn),
                error_string: symbol!("nvrtcGetErrorString": ErrorStringFn),
                create_program: symbol!("nvrtcCreateProgram": CreateProgramFn),
                compile_program: symbol!("nvrtcCompileProgram": CompileProgramFn),
                destroy_program: symbol!("nvrtcDestroyProgram": DestroyProgramFn),
                log: (
                    symbol!("nvrtcGetProgramLogSize": SizeFn),
                    symbol!("nvrtcGetProgramLog": CopyFn),
                ),
                cubin: (
                    symbol!("nvrtcGetCUBINSize": SizeFn),
                    symbol!("nvrtcGetCUBIN": CopyFn),
                ),
                ptx: (
                    symbol!("nvrtcGetPTXSize": SizeFn),
                    symbol!("nvrtcGetPTX": CopyFn),
                ),
            })
        }

        /// (major, minor).
        pub fn version(&self) -> Result<(i32, i32), String> {
            let (mut major, mut minor) = (0, 0);
            // SAFETY: writes two ints.
            self.check(unsafe { (self.version)(&mut major, &mut minor) })?;
            Ok((major, minor))
        }

        /// Compiles `source` with `options`; returns the log, and the cubin (`cubin`) or the
        /// NUL-terminated PTX, or the error.
        pub fn compile(
            &self,
            source: &str,
            name: &str,
            options: &[&str],
            cubin: bool,
        ) -> (String, Result<Vec<u8>, String>) {
            let c_source = match CString::new(source) {
                Ok(s) => s,
                Err(_) => return (String::new(), Err("the source holds a NUL byte".into())),
            };
            let c_name = CString::new(name).expect("kernel file names have no NUL");
            let c_options: Vec<CString> = options
                .iter()
                .map(|o| CString::new(*o).expect("options have no NUL"))
                .collect();
            let option_ptrs: Vec<*const c_char> = c_options.iter().map(|o| o.as_ptr()).collect();
            let mut program: Program = std::ptr::null_mut();
            // SAFETY: NUL-terminated strings alive across the call; no headers.
            let created = unsafe {
                (self.create_program)(
                    &mut program,
                    c_source.as_ptr(),
                    c_name.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                )
            };
            if let Err(e) = self.check(created) {
                return (String::new(), Err(e));
            }
            // SAFETY: a live program and `option_ptrs.len()` NUL-terminated options.
            let compiled = self.check(unsafe {
                (self.compile_program)(program, option_ptrs.len() as c_int, option_ptrs.as_ptr())
            });
            let log = self
                .read(program, self.log)
                .map(|bytes| {
                    String::from_utf8_lossy(&bytes)
                        .trim_end_matches('\0')
                        .to_string()
                })
                .unwrap_or_default();
            let image = compiled
                .and_then(|()| self.read(program, if cubin { self.cubin } else { self.ptx }));
            // SAFETY: the program is live and not used after this.
            unsafe { (self.destroy_program)(&mut program) };
            (log, image)
        }

        /// Reads one output of `program` through its size and copy functions.
        fn read(
            &self,
            program: Program,
            (size, copy): (SizeFn, CopyFn),
        ) -> Result<Vec<u8>, String> {
            let mut bytes = 0usize;
            // SAFETY: a live program; `copy` writes exactly the size `size` reported.
            self.check(unsafe { size(program, &mut bytes) })?;
            let mut buffer = vec![0u8; bytes];
            self.check(unsafe { copy(program, buffer.as_mut_ptr().cast()) })?;
            Ok(buffer)
        }

        fn check(&self, status: Status) -> Result<(), String> {
            if status == 0 {
                return Ok(());
            }
            // SAFETY: NVRTC returns a static NUL-terminated string for every status.
            let text = unsafe { CStr::from_ptr((self.error_string)(status)) };
            Err(format!("{} ({status})", text.to_string_lossy()))
        }
    }
}
