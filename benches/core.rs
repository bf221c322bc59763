//! Where phase 1 and phase 2 spend their time, step by step, on a folder given as argument:
//! `cargo bench --bench core -- bench-data/mixed_10000`. Prints a table.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Instant;

use fastindex::db::Store;
use fastindex::walk::{walk, WalkOptions};

fn main() {
    let arg = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_else(|| "bench-data/mixed_10000".into());
    let root = std::path::absolute(Path::new(&arg)).expect("a folder");
    let stop = AtomicBool::new(false);
    let dir = tempfile::tempdir().expect("a temp dir");
    let db = dir.path().join("b.db");
    let mut rows = Vec::new();

    let t = Instant::now();
    let report = walk(&root, &WalkOptions::default(), &stop).expect("walk");
    rows.push(("walk (parallel, sorted)", t.elapsed(), report.files.len()));

    let mut store = Store::open(db.to_str().expect("utf-8")).expect("store");
    let ds = store.create_dataset("b").expect("dataset");
    let job = store.create_job(ds, "images", "bench").expect("job");
    let (root_id, _, _) = store
        .root_for(ds, root.to_str().expect("utf-8"))
        .expect("root");
    let t = Instant::now();
    let (added, _) = store
        .insert_files(ds, job, root_id, b"", &report.files, &stop)
        .expect("insert");
    rows.push(("insert pending rows", t.elapsed(), added as usize));

    let t = Instant::now();
    let (again, _) = store
        .insert_files(ds, job, root_id, b"", &report.files, &stop)
        .expect("insert");
    rows.push((
        "insert again (all exist)",
        t.elapsed(),
        report.files.len() - again as usize,
    ));

    let t = Instant::now();
    let batch = store.pending_batch(ds, 0, usize::MAX >> 1).expect("batch");
    rows.push(("read pending rows", t.elapsed(), batch.len()));

    let t = Instant::now();
    let results = fastindex::scan::probe_files(&batch, &[]).expect("not stopped");
    rows.push(("probe headers (io pool)", t.elapsed(), results.len()));

    let t = Instant::now();
    store.record_probes(ds, &results, None).expect("record");
    rows.push(("record probe results", t.elapsed(), results.len()));

    let ds2 = store.create_dataset("b2").expect("dataset");
    let job2 = store.create_job(ds2, "images", "bench").expect("job");
    let (root2, _, _) = store
        .root_for(ds2, root.to_str().expect("utf-8"))
        .expect("root");
    store
        .insert_files(ds2, job2, root2, b"", &report.files, &stop)
        .expect("insert");
    let done = AtomicU64::new(0);
    let t = Instant::now();
    let n = store.probe_pending(ds2, &stop, &done, None).expect("probe");
    rows.push((
        "probe_pending, pipelined (= phase 2)",
        t.elapsed(),
        n as usize,
    ));
    println!("| step | ms | rows | µs/row |\n|---|---:|---:|---:|");
    for (name, d, n) in rows {
        let ms = d.as_secs_f64() * 1e3;
        println!(
            "| {name} | {ms:.1} | {n} | {:.2} |",
            ms * 1e3 / n.max(1) as f64
        );
    }
}
