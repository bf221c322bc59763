//! Phase 1 and phase 2 step by step on one folder: the walk (fastindex's own walker beside the
//! `walkdir` and `jwalk` crates doing the same job), the batched insert of pending rows, reading
//! them back, the header probe, recording its results, and phase 2 end to end.
//!
//! `cargo bench --bench core` walks a generated tree of 100,000 small images (see
//! `common/mod.rs`); `FASTINDEX_BENCH_DIR=bench-data/mixed_100000 cargo bench --bench core`
//! measures another folder. Filter as criterion does: `cargo bench --bench core -- walk`.
//!
//! Why fastindex keeps its own walker: on 100,000 files the crates took, in the median of 9
//! runs (2 cores shared with other work, so each run was noisy), 1.36x (walkdir) and 1.74x
//! (jwalk) its time, never within 10% in jwalk's case and in 2 of 9 runs in walkdir's. Its
//! stat is `fstatat` on the folder's descriptor (`DirEntry::metadata`) where both crates stat
//! by full path, and it does what they leave to the caller: names as bytes, problems as rows,
//! folder links entered once by device and inode, other roots skipped, a stop flag.

mod common;

use std::hint::black_box;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};

use criterion::{BatchSize, Criterion, SamplingMode, Throughput};
use fastindex::db::Store;
use fastindex::walk::{is_image_name, walk, FileEntry, WalkOptions};

/// What the walk keeps of a file, from its metadata (links followed, as the walk does).
fn entry(rel: &Path, meta: &std::fs::Metadata) -> FileEntry {
    FileEntry {
        rel_path: rel.as_os_str().as_bytes().to_vec(),
        size: meta.len(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
    }
}

fn sorted(mut files: Vec<FileEntry>) -> Vec<FileEntry> {
    files.sort_unstable_by(|a, b| a.rel_path.cmp(&b.rel_path));
    files
}

fn hidden(name: &std::ffi::OsStr) -> bool {
    name.as_bytes().first() == Some(&b'.')
}

/// The walk's job with `walkdir` (one thread): image files, hidden names skipped, stat each.
fn with_walkdir(root: &Path) -> Vec<FileEntry> {
    let mut files = Vec::new();
    let it = walkdir::WalkDir::new(root)
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !hidden(e.file_name()));
    for e in it.flatten() {
        let kind = e.file_type();
        if (kind.is_file() || kind.is_symlink()) && is_image_name(e.file_name().as_bytes()) {
            if let Ok(meta) = std::fs::metadata(e.path()) {
                if meta.is_file() {
                    let rel = e.path().strip_prefix(root).expect("under the root");
                    files.push(entry(rel, &meta));
                }
            }
        }
    }
    sorted(files)
}

/// The same with `jwalk`: folders read in parallel on rayon, each file's stat done there too.
fn with_jwalk(root: &Path) -> Vec<FileEntry> {
    type Stat = Option<std::fs::Metadata>;
    let walker = jwalk::WalkDirGeneric::<((), Stat)>::new(root)
        .skip_hidden(true)
        .process_read_dir(|_, _, _, children| {
            for child in children.iter_mut().flatten() {
                let kind = child.file_type;
                if (kind.is_file() || kind.is_symlink())
                    && is_image_name(child.file_name.as_bytes())
                {
                    child.client_state =
                        std::fs::metadata(child.path()).ok().filter(|m| m.is_file());
                }
            }
        });
    let mut files = Vec::new();
    for e in walker.into_iter().flatten() {
        if let Some(meta) = &e.client_state {
            let path = e.path();
            let rel = path.strip_prefix(root).expect("under the root");
            files.push(entry(rel, meta));
        }
    }
    sorted(files)
}

fn own(root: &Path) -> Vec<FileEntry> {
    walk(root, &WalkOptions::default(), &AtomicBool::new(false))
        .expect("walk")
        .files
}

/// A store in a temp folder with one dataset (and a job and the root) to insert into.
struct Fresh {
    _dir: tempfile::TempDir,
    store: Store,
    ds: i64,
    job: i64,
    root: i64,
}

fn fresh(root: &Path, files: Option<&[FileEntry]>) -> Fresh {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut store = Store::open(dir.path().join("b.db").to_str().expect("utf-8")).expect("store");
    let ds = store.create_dataset("b").expect("dataset");
    let job = store.create_job(ds, "images", "bench").expect("job");
    let (root_id, _, _) = store
        .root_for(ds, root.to_str().expect("utf-8"))
        .expect("root");
    if let Some(files) = files {
        let stop = AtomicBool::new(false);
        store
            .insert_files(ds, job, root_id, b"", files, &stop)
            .expect("insert");
    }
    Fresh {
        _dir: dir,
        store,
        ds,
        job,
        root: root_id,
    }
}

fn bench_walk(c: &mut Criterion, root: &Path, files: &[FileEntry]) {
    // The three must find the same files, or the comparison means nothing.
    assert!(with_walkdir(root) == files, "walkdir found other files");
    assert!(with_jwalk(root) == files, "jwalk found other files");
    let mut g = c.benchmark_group(format!("walk_{}", files.len()));
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    g.throughput(Throughput::Elements(files.len() as u64));
    g.bench_function("fastindex", |b| b.iter(|| own(black_box(root))));
    g.bench_function("walkdir", |b| b.iter(|| with_walkdir(black_box(root))));
    g.bench_function("jwalk", |b| b.iter(|| with_jwalk(black_box(root))));
    g.finish();
}

fn bench_store(c: &mut Criterion, root: &Path, files: &[FileEntry]) {
    let stop = AtomicBool::new(false);
    let mut g = c.benchmark_group(format!("store_{}", files.len()));
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    g.throughput(Throughput::Elements(files.len() as u64));

    g.bench_function("insert pending rows", |b| {
        b.iter_batched_ref(
            || fresh(root, None),
            |f| {
                f.store
                    .insert_files(f.ds, f.job, f.root, b"", files, &stop)
                    .expect("insert")
            },
            BatchSize::PerIteration,
        )
    });

    let mut full = fresh(root, Some(files));
    g.bench_function("insert again (all exist)", |b| {
        b.iter(|| {
            let (added, _) = full
                .store
                .insert_files(full.ds, full.job, full.root, b"", files, &stop)
                .expect("insert");
            assert_eq!(added, 0);
        })
    });
    g.bench_function("read pending rows", |b| {
        b.iter(|| full.store.pending_batch(full.ds, 0, usize::MAX >> 1))
    });
    let batch = full
        .store
        .pending_batch(full.ds, 0, usize::MAX >> 1)
        .expect("batch");
    g.bench_function("probe headers (io pool)", |b| {
        b.iter(|| fastindex::scan::probe_files(black_box(&batch), &[]).expect("not stopped"))
    });
    let results = fastindex::scan::probe_files(&batch, &[]).expect("not stopped");
    g.bench_function("record probe results", |b| {
        b.iter_batched_ref(
            || fresh(root, Some(files)),
            |f| f.store.record_probes(f.ds, &results, None).expect("record"),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("probe_pending, pipelined (= phase 2)", |b| {
        b.iter_batched_ref(
            || fresh(root, Some(files)),
            |f| {
                let done = AtomicU64::new(0);
                f.store
                    .probe_pending(f.ds, &stop, &done, None)
                    .expect("probe")
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn main() {
    let root = common::tree();
    let files = own(&root);
    assert!(!files.is_empty(), "{}: no image files", root.display());
    let mut c = common::criterion();
    bench_walk(&mut c, &root, &files);
    bench_store(&mut c, &root, &files);
    c.final_summary();
}
