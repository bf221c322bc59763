//! Data the criterion benchmarks read, made once under `bench-data/` and reused.
//!
//! Settings come from the environment, because criterion reads the command line itself
//! (a bare argument there is a benchmark name filter):
//! - `FASTINDEX_BENCH_DATA`: where generated data goes (default `bench-data/`), as for the
//!   Python benchmarks (`benches/datagen.py`);
//! - `FASTINDEX_BENCH_DIR`: a folder to walk and probe instead of the generated tree
//!   (`make bench` passes `mixed_100000`, the real JPEG/PNG files `benches/bench_scan.py` makes);
//! - `FASTINDEX_BENCH_FILES`: how many files the generated tree holds (default 100,000);
//! - `PYTHON`: the interpreter with Pillow that writes the header cases (default `python3`).

#![allow(dead_code)] // each bench uses its part of this module

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn data_root() -> PathBuf {
    match std::env::var_os("FASTINDEX_BENCH_DATA") {
        Some(dir) => std::path::absolute(dir).expect("FASTINDEX_BENCH_DATA: a path"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-data"),
    }
}

/// The folder `benches/header_cases.py` fills: `typical/`, `small/`, `edge/`, `cases.json`.
pub fn header_cases() -> PathBuf {
    let dir = data_root().join("header_cases");
    if dir.join("cases.json").exists() {
        return dir;
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/header_cases.py");
    let status = Command::new(&python)
        .arg(&script)
        .arg(&dir)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        status.success(),
        "{python} {} failed ({status}): it needs Pillow; set PYTHON to an interpreter that has it",
        script.display()
    );
    dir
}

/// The folder the walk and store benchmarks use: `FASTINDEX_BENCH_DIR`, or a generated tree
/// of `FASTINDEX_BENCH_FILES` small images of the six formats, 1,000 per folder.
pub fn tree() -> PathBuf {
    if let Ok(given) = std::env::var("FASTINDEX_BENCH_DIR") {
        let path = std::path::absolute(&given).expect("FASTINDEX_BENCH_DIR: a path");
        assert!(path.is_dir(), "FASTINDEX_BENCH_DIR={given}: not a folder");
        return path;
    }
    let n: usize = std::env::var("FASTINDEX_BENCH_FILES")
        .map(|v| v.parse().expect("FASTINDEX_BENCH_FILES: a number"))
        .unwrap_or(100_000);
    let dir = data_root().join(format!("tree_{n}"));
    let marker = dir.join(".complete");
    if marker.exists() {
        return dir;
    }
    let small = header_cases().join("small");
    let mut sources: Vec<PathBuf> = fs::read_dir(&small)
        .expect("header_cases/small")
        .map(|e| e.expect("entry").path())
        .collect();
    sources.sort();
    for i in 0..n {
        let src = &sources[i % sources.len()];
        let ext = src.extension().and_then(|e| e.to_str()).unwrap_or("bin");
        let sub = dir.join(format!("d{:04}/e{:02}", i / 1000, (i / 100) % 10));
        if i % 100 == 0 {
            fs::create_dir_all(&sub).expect("mkdir");
        }
        let dst = sub.join(format!("img_{i:07}.{ext}"));
        // Hard links cost no space; the walk and the header probe see ordinary files.
        if fs::hard_link(src, &dst).is_err() && !dst.exists() {
            fs::copy(src, &dst).expect("copy");
        }
    }
    fs::write(&marker, b"ok").expect("marker");
    dir
}

/// Short runs by default: these benchmarks compare implementations side by side, and the
/// machines they run on are often shared. `--measurement-time` etc. still override.
pub fn criterion() -> criterion::Criterion {
    criterion::Criterion::default()
        .without_plots()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2))
        .configure_from_args()
}
