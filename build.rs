//! Build script: compiles every `kernels/*.cu` into a fatbin and generates
//! `$OUT_DIR/kernels.rs`, which `src/kernels.rs` includes.
//!
//! - nvcc is looked for in `$NVCC`, `$CUDA_HOME/bin`, `PATH`, then the folder made by
//!   `tools/install-nvcc.sh` (`$VERDICT_NVCC_VENV`, default `$HOME/.cache/verdict/nvcc-venv`).
//! - Each fatbin holds SASS for sm_75, sm_80, sm_86, sm_89, sm_90 and PTX for compute_90 (so a
//!   newer GPU can JIT it). ptxas's register/spill report per file goes to
//!   `$OUT_DIR/<name>.ptxas.txt` and `target/kernels-report/`, with a summary table there.
//! - Without nvcc, or if a compile fails, the build warns and goes CPU-only: no fatbins, sources
//!   still embedded. `VERDICT_REQUIRE_KERNELS=1` (set by CI) makes both a build error.
//!
//! std only, so the script itself builds in a moment.

use std::collections::HashSet;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Instant;

const SASS_ARCHS: [u32; 5] = [75, 80, 86, 89, 90];
const PTX_ARCH: u32 = 90;
const NVCC_FLAGS: &[&str] = &[
    "--fatbin",
    "-std=c++17",
    "-O3",
    "-Xptxas",
    "-v",
    // ~6x smaller fatbins; the driver inflates them at load time.
    "-Xfatbin",
    "-compress-all",
];
const FATBIN_MAGIC: [u8; 4] = 0xBA55_ED50u32.to_le_bytes();
const ENV_VARS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "PATH",
    "HOME",
    "VERDICT_NVCC_VENV",
    "VERDICT_REQUIRE_KERNELS",
    // read by nvcc itself
    "NVCC_CCBIN",
    "NVCC_PREPEND_FLAGS",
    "NVCC_APPEND_FLAGS",
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

    let prebuilt = match find_nvcc() {
        Ok(nvcc) => {
            println!("cargo:rerun-if-changed={}", nvcc.display());
            match compile_all(&nvcc, &kernels, &out_dir) {
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
                "nvcc not found (looked at: {looked_at}); run tools/install-nvcc.sh or set NVCC"
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

/// nvcc's path, or the list of places looked at. An `NVCC` that names no file stops the
/// build: a wrong explicit setting should not quietly become a CPU-only build.
fn find_nvcc() -> Result<PathBuf, String> {
    if let Some(nvcc) = env_var("NVCC").filter(|v| !v.is_empty()) {
        let nvcc = PathBuf::from(nvcc);
        if !nvcc.is_file() {
            fail(&format!("NVCC={} is not a file", nvcc.display()));
        }
        return Ok(nvcc);
    }
    let mut candidates = Vec::new();
    if let Some(cuda_home) = env_var("CUDA_HOME").filter(|v| !v.is_empty()) {
        candidates.push(Path::new(&cuda_home).join("bin").join("nvcc"));
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|dir| dir.join("nvcc")));
    }
    let venv = env_var("VERDICT_NVCC_VENV")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env_var("HOME").map(|home| Path::new(&home).join(".cache/verdict/nvcc-venv")));
    if let Some(venv) = &venv {
        candidates.extend(venv_nvcc(venv));
    }
    if let Some(found) = candidates.iter().find(|c| c.is_file()) {
        return Ok(found.clone());
    }
    let mut places = vec![
        "$NVCC".to_string(),
        "$CUDA_HOME/bin".to_string(),
        "PATH".to_string(),
    ];
    if let Some(venv) = venv {
        places.push(format!(
            "{}/lib/python3.*/site-packages/nvidia/cu13/bin",
            venv.display()
        ));
    }
    Err(places.join(", "))
}

/// `<venv>/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc`, for each python3.* present.
fn venv_nvcc(venv: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("python3."))
        .map(|entry| entry.path().join("site-packages/nvidia/cu13/bin/nvcc"))
        .collect();
    found.sort();
    found
}

/// Compiles every kernel file, several at a time; on failure, the first failing file's
/// nvcc output.
fn compile_all(nvcc: &Path, kernels: &[KernelFile], out_dir: &Path) -> Result<(), String> {
    if kernels.is_empty() {
        return Ok(());
    }
    let jobs = env_var("NUM_JOBS")
        .and_then(|j| j.parse::<usize>().ok())
        .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // Files run side by side; cores left over go to nvcc's own per-arch threads.
    let workers = jobs.min(kernels.len());
    let nvcc_threads = (jobs / workers).max(1);
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<Result<String, String>>> =
        (0..kernels.len()).map(|_| None).collect();
    thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(kernel) = kernels.get(index) else {
                            break;
                        };
                        done.push((index, compile_one(nvcc, kernel, out_dir, nvcc_threads)));
                    }
                    done
                })
            })
            .collect();
        for handle in handles {
            for (index, result) in handle.join().expect("kernel compile thread panicked") {
                results[index] = Some(result);
            }
        }
    });
    let seconds = started.elapsed().as_secs_f64();

    let mut reports = Vec::new();
    for (kernel, result) in kernels.iter().zip(results) {
        reports.push((kernel, result.expect("every kernel file was compiled")?));
    }
    let mut entries = Vec::new();
    for (kernel, report) in &reports {
        write(&out_dir.join(format!("{}.ptxas.txt", kernel.name)), report);
        for entry in parse_ptxas(report) {
            if entry.spill_stores > 0 || entry.spill_loads > 0 {
                println!(
                    "cargo:warning=kernels/{}.cu: {} spills on {} ({} bytes stored, {} loaded; see target/kernels-report/{}.ptxas.txt)",
                    kernel.name, entry.function, entry.arch, entry.spill_stores, entry.spill_loads, kernel.name
                );
            }
            entries.push((kernel.name.as_str(), entry));
        }
        // ptxas repeats a warning once per arch; once is enough.
        let mut warned = HashSet::new();
        for line in report.lines().filter(|l| l.contains("warning")) {
            if warned.insert(line) {
                println!("cargo:warning=kernels/{}.cu: {line}", kernel.name);
            }
        }
    }
    let mut summary = format!(
        "{} kernel file(s) compiled by {} in {seconds:.1} s ({workers} at a time, nvcc --threads {nvcc_threads})\n\n",
        kernels.len(),
        nvcc.display()
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

/// Runs nvcc on one file; returns its ptxas report, or an error holding nvcc's message.
fn compile_one(
    nvcc: &Path,
    kernel: &KernelFile,
    out_dir: &Path,
    nvcc_threads: usize,
) -> Result<String, String> {
    let fatbin = out_dir.join(format!("{}.fatbin", kernel.name));
    let mut command = Command::new(nvcc);
    command.args(NVCC_FLAGS);
    for arch in SASS_ARCHS {
        command
            .arg("-gencode")
            .arg(format!("arch=compute_{arch},code=sm_{arch}"));
    }
    command
        .arg("-gencode")
        .arg(format!("arch=compute_{PTX_ARCH},code=compute_{PTX_ARCH}"));
    command.arg("--threads").arg(nvcc_threads.to_string());
    command.arg("-o").arg(&fatbin).arg(&kernel.path);
    let output = command
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        return Err(format!(
            "nvcc failed on kernels/{}.cu ({}):\n{text}",
            kernel.name, output.status
        ));
    }
    let bytes =
        fs::read(&fatbin).map_err(|e| format!("nvcc wrote no {}: {e}", fatbin.display()))?;
    if !bytes.starts_with(&FATBIN_MAGIC) {
        return Err(format!(
            "{} does not start with the fatbin magic",
            fatbin.display()
        ));
    }
    Ok(text)
}

/// Reads ptxas's `-v` lines: "Compiling entry function 'f' for 'sm_80'", then
/// "N bytes stack frame, N bytes spill stores, N bytes spill loads", then "Used N registers".
/// nvcc prints each arch's block whole, so the last named function and arch are current.
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

/// The Rust source that `src/kernels.rs` includes: `PREBUILT` and `MODULES`.
fn generated_module(kernels: &[KernelFile], prebuilt: bool) -> String {
    let mut out = String::from("// @generated by build.rs from kernels/*.cu; do not edit.\n\n");
    if prebuilt && !kernels.is_empty() {
        out.push_str(
            "/// Gives an embedded fatbin 16-byte alignment (include_bytes! data has none), so the driver never parses a misaligned image.\n\
             #[repr(C, align(16))]\nstruct Aligned<T: ?Sized>(T);\n\n",
        );
        for kernel in kernels {
            let _ = writeln!(
                out,
                "static FATBIN_{}: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{}.fatbin\")));",
                kernel.name.to_uppercase(),
                kernel.name
            );
        }
        out.push('\n');
    }
    let _ = writeln!(out, "const PREBUILT: bool = {prebuilt};\n");
    out.push_str("static MODULES: &[KernelModule] = &[\n");
    for kernel in kernels {
        let fatbin = if prebuilt {
            format!("Some(&FATBIN_{}.0)", kernel.name.to_uppercase())
        } else {
            "None".to_string()
        };
        let _ = write!(
            out,
            "    KernelModule {{\n        name: \"{name}\",\n        fatbin: {fatbin},\n        \
             source: include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/kernels/{name}.cu\")),\n        \
             standalone_source: include_str!(concat!(env!(\"OUT_DIR\"), \"/{name}.standalone.cu\")),\n    }},\n",
            name = kernel.name
        );
    }
    out.push_str("];\n");
    out
}
