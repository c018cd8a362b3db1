//! Atomic file output: write a temporary file beside the target, flush it to disk, then
//! rename it over the target, so a kill at any moment leaves the old file or the new one —
//! never half of one. Also the reader of what [`write_json`] writes.

use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The temporary path used while `path` is being written (same folder, so rename is atomic).
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Whether an output can go to `path`: nothing on the way to it is a file, and `path` itself
/// is not a folder (`want_dir: false`) or not a file (`want_dir: true`). Commands check every
/// output flag before any work, so a bad path fails in a second, naming its flag, not after
/// an hour of training as "Not a directory". Creates nothing.
pub fn check_output(flag: &str, path: &Path, want_dir: bool) -> Result<()> {
    let kind = if want_dir { "folder" } else { "file" };
    if let Ok(meta) = fs::metadata(path) {
        anyhow::ensure!(
            meta.is_dir() == want_dir,
            "{flag} {}: is a {}, but this output is a {kind}",
            path.display(),
            if meta.is_dir() { "folder" } else { "file" }
        );
        return Ok(());
    }
    // The nearest existing ancestor must be a folder (the rest is created on writing).
    if let Some(existing) = path.ancestors().skip(1).find(|a| a.exists()) {
        anyhow::ensure!(
            existing.is_dir(),
            "{flag} {}: {} is a file, so the {kind} cannot be created under it",
            path.display(),
            existing.display()
        );
    }
    Ok(())
}

/// [`check_output`] of each file output a command was given (`None`: the flag is absent).
pub fn check_output_files(outputs: &[(&str, Option<&Path>)]) -> Result<()> {
    for &(flag, path) in outputs {
        if let Some(path) = path {
            check_output(flag, path, false)?;
        }
    }
    Ok(())
}

/// Writes `path` atomically with whatever `fill` writes.
pub fn write_with(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create folder {}", dir.display()))?;
    }
    let tmp = temp_path(path);
    let result = (|| {
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::new(file);
        fill(&mut w)?;
        let file = w
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot flush {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |w| Ok(w.write_all(bytes)?))
}

/// Writes `value` as pretty JSON to `path` atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    write_with(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value)?;
        Ok(w.write_all(b"\n")?)
    })
}

/// Reads `path` as JSON into a `T`; errors name the file and say what it should have been
/// (`what`, e.g. "a baseline model").
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not {what}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_keeps_old_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.csv");
        write_bytes(&path, b"old").unwrap();
        let err = write_with(&path, |w| {
            w.write_all(b"half")?;
            anyhow::bail!("killed midway")
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file left behind"
        );
    }
}
