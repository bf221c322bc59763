//! The header probe per format, fastindex beside the `imagesize` crate, and where the two
//! disagree on files Pillow opens (the answer to match is Pillow's `Image.open(path).size`).
//!
//! `cargo bench --bench header` first prints the disagreements (and fails if fastindex differs
//! from Pillow anywhere), then times both on one ordinary file per format: from the file (open,
//! read, parse: what phase 2 does per file) and from bytes already in memory (the parse alone).

mod common;

use std::hint::black_box;
use std::path::Path;

use criterion::{BenchmarkId, Criterion};
use fastindex::header::{probe_bytes, probe_path};

struct Case {
    file: String,
    pillow: Option<(u32, u32)>,
    format: Option<String>,
}

fn cases(dir: &Path) -> Vec<Case> {
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("cases.json");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("cases.json: JSON");
    let size = |v: &serde_json::Value| {
        let a = v.as_array()?;
        Some((a[0].as_u64()? as u32, a[1].as_u64()? as u32))
    };
    doc.as_array()
        .expect("a list")
        .iter()
        .map(|c| Case {
            file: c["file"].as_str().expect("file").to_string(),
            pillow: size(&c["size"]),
            format: c["format"].as_str().map(str::to_string),
        })
        .collect()
}

fn ours(path: &Path) -> Option<(u32, u32)> {
    probe_path(path).ok().map(|i| (i.width, i.height))
}

fn theirs(path: &Path) -> Option<(u32, u32)> {
    // imagesize answers in usize; a size that does not fit u32 is wrong anyway (shown as is).
    imagesize::size(path)
        .ok()
        .map(|s| (s.width as u32, s.height as u32))
}

fn show(size: Option<(u32, u32)>) -> String {
    size.map_or("error".into(), |(w, h)| format!("{w}x{h}"))
}

/// Print every file where fastindex and imagesize disagree; panic if fastindex is not Pillow.
fn compare_with_pillow(dir: &Path, cases: &[Case]) {
    let mut table = String::new();
    let (mut ours_ok, mut theirs_ok) = (0, 0);
    for c in cases {
        let path = dir.join(&c.file);
        let (a, b) = (ours(&path), theirs(&path));
        ours_ok += usize::from(a == c.pillow);
        theirs_ok += usize::from(b == c.pillow);
        if a != b {
            let who = match (a == c.pillow, b == c.pillow) {
                (true, false) => "fastindex",
                (false, true) => "imagesize",
                _ => "neither",
            };
            table += &format!(
                "| {} | {} | {} | {} | {who} |\n",
                c.file,
                show(c.pillow),
                show(a),
                show(b)
            );
        }
    }
    println!("\nHeader probe against Pillow, {} files:", cases.len());
    println!("fastindex matches Pillow on {ours_ok}, imagesize on {theirs_ok}.");
    println!("Where they disagree:\n");
    println!("| file | Pillow | fastindex | imagesize | matches Pillow |");
    println!("|---|---|---|---|---|");
    print!("{table}");
    println!();
    assert_eq!(
        ours_ok,
        cases.len(),
        "fastindex differs from Pillow (see the table above)"
    );
}

fn main() {
    let dir = common::header_cases();
    let cases = cases(&dir);
    compare_with_pillow(&dir, &cases);

    let mut c: Criterion = common::criterion();
    let typical: Vec<&Case> = cases
        .iter()
        .filter(|c| c.file.starts_with("typical/"))
        .collect();

    let mut g = c.benchmark_group("probe_file");
    for case in &typical {
        let path = dir.join(&case.file);
        let format = case.format.as_deref().unwrap_or("?");
        g.bench_with_input(BenchmarkId::new("fastindex", format), &path, |b, p| {
            b.iter(|| probe_path(black_box(p)).expect("probe"))
        });
        g.bench_with_input(BenchmarkId::new("imagesize", format), &path, |b, p| {
            b.iter(|| imagesize::size(black_box(p)).expect("imagesize"))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("probe_bytes");
    for case in &typical {
        let bytes = std::fs::read(dir.join(&case.file)).expect("read");
        let format = case.format.as_deref().unwrap_or("?");
        g.bench_with_input(BenchmarkId::new("fastindex", format), &bytes, |b, d| {
            b.iter(|| probe_bytes(black_box(d)).expect("probe"))
        });
        g.bench_with_input(BenchmarkId::new("imagesize", format), &bytes, |b, d| {
            b.iter(|| imagesize::blob_size(black_box(d)).expect("imagesize"))
        });
    }
    g.finish();

    c.final_summary();
}
