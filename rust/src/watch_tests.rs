//! The watcher on real file operations in a temporary folder, with a sink that records what
//! it is asked to apply.

use super::*;
use std::fs;

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Paths(Vec<PathBuf>),
    Root,
    Gone,
}

#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<Call>>>);

impl Collect {
    fn push(&self, c: Call) {
        self.0.lock().unwrap().push(c);
    }
    fn calls(&self) -> Vec<Call> {
        self.0.lock().unwrap().clone()
    }
    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
    fn count(&self, want: &Call) -> usize {
        self.calls().iter().filter(|c| *c == want).count()
    }
    fn batches(&self) -> usize {
        self.calls()
            .iter()
            .filter(|c| matches!(c, Call::Paths(_)))
            .count()
    }
    fn paths(&self) -> HashSet<PathBuf> {
        let mut all = HashSet::new();
        for c in self.calls() {
            if let Call::Paths(p) = c {
                all.extend(p);
            }
        }
        all
    }
    fn has(&self, rel: &str) -> bool {
        self.paths().contains(Path::new(rel))
    }
}

impl Sink for Collect {
    fn sync_paths(&mut self, _root: &Path, rel_paths: &[PathBuf]) -> Result<u64> {
        self.push(Call::Paths(rel_paths.to_vec()));
        Ok(rel_paths.len() as u64)
    }
    fn sync_root(&mut self, _root: &Path, _stop: &AtomicBool) -> Result<u64> {
        self.push(Call::Root);
        Ok(0)
    }
    fn root_gone(&mut self, _root: &Path) -> Result<u64> {
        self.push(Call::Gone);
        Ok(1)
    }
}

/// Wait for `f`, at most 10 s (a hang guard, not a timing).
fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "gave up waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start(root: &Path, opts: WatchOptions) -> (Watcher, Collect) {
    let sink = Collect::default();
    let catch_up = opts.catch_up;
    let w = Watcher::start(vec![fs::canonicalize(root).unwrap()], sink.clone(), opts).unwrap();
    if catch_up {
        until("the first full sync", || sink.count(&Call::Root) == 1);
    }
    (w, sink)
}

fn write(p: &Path, bytes: &[u8]) {
    fs::write(p, bytes).unwrap();
}

#[test]
fn new_files_are_applied_and_other_names_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, sink) = start(dir.path(), WatchOptions::default());
    write(&dir.path().join("notes.txt"), b"x");
    write(&dir.path().join(".hidden.jpg"), b"x");
    write(&dir.path().join("a.jpg"), b"x");
    until("a.jpg", || sink.has("a.jpg"));
    // queued before a.jpg, so already looked at
    assert!(!sink.has("notes.txt") && !sink.has(".hidden.jpg"));
    let s = w.stats();
    assert!(s.running && s.batches >= 1 && s.full_syncs == 1 && s.generation >= 1);
    w.stop();
    assert!(!w.stats().running);
}

#[test]
fn rename_delete_and_rewrite_name_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a.jpg"), b"one");
    let (_w, sink) = start(dir.path(), WatchOptions::default());
    fs::rename(dir.path().join("a.jpg"), dir.path().join("b.jpg")).unwrap();
    until("both names of a rename", || {
        sink.has("a.jpg") && sink.has("b.jpg")
    });
    sink.clear();
    write(&dir.path().join("b.jpg"), b"rewritten");
    until("a rewrite", || sink.has("b.jpg"));
    sink.clear();
    fs::remove_file(dir.path().join("b.jpg")).unwrap();
    until("a delete", || sink.has("b.jpg"));
}

#[test]
fn move_in_from_outside_and_a_new_folder() {
    let outside = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_w, sink) = start(dir.path(), WatchOptions::default());
    write(&outside.path().join("m.png"), b"x");
    fs::rename(outside.path().join("m.png"), dir.path().join("m.png")).unwrap();
    until("a file moved in", || sink.has("m.png"));
    fs::create_dir(dir.path().join("sub")).unwrap();
    for i in 0..50 {
        write(&dir.path().join(format!("sub/{i}.jpg")), b"x");
    }
    // The folder itself is named (its sync covers files made before its watch was placed).
    until("the new folder", || sink.has("sub"));
    // A file in a folder the same batch names is left to the folder's sync.
    for c in sink.calls() {
        if let Call::Paths(p) = c {
            if p.contains(&PathBuf::from("sub")) {
                assert!(
                    p.iter()
                        .all(|r| r == Path::new("sub") || !r.starts_with("sub")),
                    "{p:?}"
                );
            }
        }
    }
}

#[test]
fn a_burst_is_applied_in_few_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (w, sink) = start(dir.path(), WatchOptions::default());
    let n = 2_000;
    for i in 0..n {
        write(&dir.path().join(format!("f{i:05}.jpg")), b"x");
    }
    until("every file of the burst", || {
        let seen = sink.paths();
        (0..n).all(|i| seen.contains(&PathBuf::from(format!("f{i:05}.jpg"))))
    });
    let batches = sink.batches();
    assert!(batches * 20 <= n, "{batches} batches for {n} files");
    assert_eq!(w.stats().batches, batches as u64);
}

#[test]
fn a_full_queue_drops_events_and_syncs_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WatchOptions {
        queue: 1,
        catch_up: false,
        ..WatchOptions::default()
    };
    let (w, sink) = start(dir.path(), opts);
    for i in 0..300 {
        write(&dir.path().join(format!("f{i}.jpg")), b"x");
    }
    until("a full sync after the overflow", || {
        sink.count(&Call::Root) >= 1
    });
    let s = w.stats();
    assert!(
        s.dropped > 0 && s.overflows >= 1 && s.full_syncs >= 1,
        "{s:?}"
    );
}

#[test]
fn a_root_deleted_is_reported_and_watched_again_when_back() {
    let top = tempfile::tempdir().unwrap();
    let root = top.path().join("r");
    fs::create_dir(&root).unwrap();
    write(&root.join("a.jpg"), b"x");
    let (w, sink) = start(&root, WatchOptions::default());
    fs::remove_dir_all(&root).unwrap();
    until("the root reported gone", || sink.count(&Call::Gone) == 1);
    assert_eq!(
        w.stats().missing_roots,
        vec![fs::canonicalize(top.path()).unwrap().join("r")]
    );
    fs::create_dir(&root).unwrap();
    until("a full sync once it is back", || {
        sink.count(&Call::Root) == 2
    });
    assert!(w.stats().missing_roots.is_empty());
    sink.clear();
    write(&root.join("b.jpg"), b"x");
    until("a file in the new root", || sink.has("b.jpg"));
}

#[test]
fn stop_joins_and_wakes_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _sink) = start(dir.path(), WatchOptions::default());
    let shared = w.shared();
    let seen = shared.stats().generation;
    let waiter = std::thread::spawn(move || shared.wait_change(seen, Duration::from_secs(30)));
    let t0 = Instant::now();
    w.stop();
    waiter.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(!w.stats().running);
}

#[test]
fn a_missing_root_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let r = Watcher::start(
        vec![dir.path().join("nope")],
        Collect::default(),
        WatchOptions::default(),
    );
    assert!(matches!(r, Err(Error::Io { .. })));
}

/// A sink whose dataset was deleted.
struct Deleted;

impl Sink for Deleted {
    fn sync_paths(&mut self, _root: &Path, _rel: &[PathBuf]) -> Result<u64> {
        Err(Error::DatasetNotFound("#1".into(), "store".into()))
    }
    fn sync_root(&mut self, _root: &Path, _stop: &AtomicBool) -> Result<u64> {
        Ok(0)
    }
    fn root_gone(&mut self, _root: &Path) -> Result<u64> {
        Ok(0)
    }
}

#[test]
fn a_deleted_dataset_stops_the_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    let w = Watcher::start(vec![root], Deleted, WatchOptions::default()).unwrap();
    write(&dir.path().join("a.jpg"), b"x");
    until("the watcher to stop", || !w.stats().running);
    let err = w.stats().last_error.unwrap_or_default();
    assert!(err.starts_with("stopped: no dataset"), "{err}");
}
