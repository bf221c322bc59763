//! Following folders live: file-system events under a dataset's roots become batched syncs of
//! the paths they name.
//!
//! notify (inotify on Linux) reports events on its own thread; the handler there only filters
//! them and queues their paths on a bounded queue. One batch thread gathers the paths,
//! debounced, and applies each batch with one `Sink::sync_paths` call per root, so a burst of
//! 10k new files costs a few short transactions, not 10k. Whatever may have been missed (the
//! kernel's event queue or this one overflowed, notify failed, nobody watched before the start)
//! is caught up by a full sync of the root. A root that disappears is handed to
//! `Sink::root_gone`, and watched and synced again once it is back.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{Config, Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};

use crate::error::{Error, Result};
use crate::walk::is_image_name;

/// The longest the batch thread sleeps between two looks at its stop flag.
const IDLE_SLICE: Duration = Duration::from_millis(50);
/// How long a failed sync waits before it is tried again (a full disk must not spin).
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// A batch is applied once no event came for this long,
    pub quiet: Duration,
    /// or this long after its first event, so a steady stream of events is applied too,
    pub max_delay: Duration,
    /// or once it names this many paths.
    pub max_batch: usize,
    /// Paths queued between notify's thread and the batch thread. Past it, events are
    /// dropped and a full sync catches up, as after the kernel's own overflow.
    pub queue: usize,
    /// Also take names starting with `.` (the walk's rule).
    pub include_hidden: bool,
    /// Enter symlinked folders (the walk's option).
    pub follow_links: bool,
    /// Sync every root in full first: changes made while nobody watched.
    pub catch_up: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            quiet: Duration::from_millis(50),
            max_delay: Duration::from_millis(250),
            max_batch: 5_000,
            queue: 65_536,
            include_hidden: false,
            follow_links: false,
            catch_up: true,
        }
    }
}

/// What applies the batches: the store (`py_watch`), or a collector in the tests. Called on
/// the batch thread only. `Error::DatasetNotFound` from any call stops the watcher: its
/// dataset was deleted.
pub trait Sink: Send + 'static {
    /// Apply the sync rules to `rel_paths` (relative to `root`, sorted, each once); a path
    /// that is a folder stands for its whole subtree. Returns the rows it changed.
    fn sync_paths(&mut self, root: &Path, rel_paths: &[PathBuf]) -> Result<u64>;
    /// Sync all of `root`; may return early (`Error::Cancelled`) once `stop` is set.
    fn sync_root(&mut self, root: &Path, stop: &AtomicBool) -> Result<u64>;
    /// `root` itself is gone (deleted, or moved away). Returns the rows it changed.
    fn root_gone(&mut self, root: &Path) -> Result<u64>;
}

/// Counters of one watcher, readable from any thread.
#[derive(Default)]
pub struct Shared {
    stop: AtomicBool,
    running: AtomicBool,
    /// Events may have been lost: the next step of the batch thread is a full sync.
    overflowed: AtomicBool,
    /// Paths the batch thread took off the queue (see `Handler::last`).
    taken: AtomicU64,
    events: AtomicU64,
    dropped: AtomicU64,
    overflows: AtomicU64,
    batches: AtomicU64,
    full_syncs: AtomicU64,
    paths: AtomicU64,
    changed: AtomicU64,
    errors: AtomicU64,
    state: Mutex<State>,
    /// Wakes `wait_change`: a batch changed rows, or the watcher stopped.
    changes: Condvar,
}

#[derive(Default)]
struct State {
    /// Bumped by every applied batch or sync that changed rows.
    generation: u64,
    last_error: Option<String>,
    missing_roots: Vec<PathBuf>,
    /// Unix time of the last batch or sync applied.
    last_sync: Option<f64>,
}

/// A copy of a watcher's counters.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub running: bool,
    /// Paths queued by notify's thread (reads are not counted: they change nothing; nor is
    /// the same path again right after itself).
    pub events: u64,
    /// Paths dropped because the queue was full.
    pub dropped: u64,
    /// Times events were lost (this queue or the kernel's overflowed, notify failed).
    pub overflows: u64,
    /// `sync_paths` calls: one per root and batch.
    pub batches: u64,
    pub full_syncs: u64,
    /// Paths handed to `sync_paths`.
    pub paths: u64,
    /// Rows changed by batches and syncs.
    pub changed: u64,
    pub errors: u64,
    pub generation: u64,
    pub last_error: Option<String>,
    pub missing_roots: Vec<PathBuf>,
    pub last_sync: Option<f64>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// A sync applied `changed` rows: say when, and wake the waiters if it changed any.
    fn applied(&self, changed: u64) {
        self.changed.fetch_add(changed, Ordering::Relaxed);
        let mut st = self.state();
        st.last_sync = Some(crate::db::now());
        if changed > 0 {
            st.generation += 1;
            self.changes.notify_all();
        }
    }

    fn error(&self, msg: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.state().last_error = Some(msg);
    }

    fn lost_events(&self) {
        if !self.overflowed.swap(true, Ordering::Relaxed) {
            self.overflows.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> Stats {
        let st = self.state();
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            running: self.running.load(Ordering::Relaxed),
            events: n(&self.events),
            dropped: n(&self.dropped),
            overflows: n(&self.overflows),
            batches: n(&self.batches),
            full_syncs: n(&self.full_syncs),
            paths: n(&self.paths),
            changed: n(&self.changed),
            errors: n(&self.errors),
            generation: st.generation,
            last_error: st.last_error.clone(),
            missing_roots: st.missing_roots.clone(),
            last_sync: st.last_sync,
        }
    }

    /// Wait until the generation differs from `seen` or the watcher stops, at most `timeout`;
    /// returns the generation.
    pub fn wait_change(&self, seen: u64, timeout: Duration) -> u64 {
        let st = self.state();
        let (st, _) = self
            .changes
            .wait_timeout_while(st, timeout, |st| {
                st.generation == seen && self.running.load(Ordering::Relaxed)
            })
            .unwrap_or_else(|p| p.into_inner());
        st.generation
    }
}

/// A running watcher; stopped (and its thread joined) by `stop` or on drop.
pub struct Watcher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// The process that started the thread: a forked child has no such thread to join.
    pid: u32,
}

impl Watcher {
    /// Watch `roots` (absolute, links resolved) recursively and apply their changes to `sink`
    /// on a thread of its own. Returns once the watches are in place (the walk that places
    /// them visits every folder), so a change made after it returns is seen.
    pub fn start<S: Sink>(roots: Vec<PathBuf>, sink: S, opts: WatchOptions) -> Result<Watcher> {
        if roots.is_empty() {
            return Err(Error::InvalidArgument("watch: no folder to watch".into()));
        }
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::sync_channel(opts.queue.max(1));
        let handler = Handler {
            tx,
            shared: Arc::clone(&shared),
            sent: 0,
            last: None,
        };
        let config = Config::default().with_follow_symlinks(opts.follow_links);
        let mut notify =
            RecommendedWatcher::new(handler, config).map_err(|e| watch_error(&roots[0], e))?;
        let mut ids = Vec::with_capacity(roots.len());
        for root in &roots {
            notify
                .watch(root, RecursiveMode::Recursive)
                .map_err(|e| watch_error(root, e))?;
            ids.push(dir_id(root));
        }
        shared.running.store(true, Ordering::Relaxed);
        let n = roots.len();
        let batcher = Batcher {
            full: vec![opts.catch_up; n],
            gone: vec![false; n],
            ids,
            roots,
            sink,
            opts,
            rx,
            notify,
            shared: Arc::clone(&shared),
            retry_at: None,
        };
        let thread = std::thread::Builder::new()
            .name("fastindex-watch".into())
            .spawn(move || batcher.run())
            .map_err(|e| Error::InvalidArgument(format!("cannot start a thread: {e}")))?;
        Ok(Watcher {
            shared,
            thread: Some(thread),
            pid: std::process::id(),
        })
    }

    /// The counters, shared: a caller can wait on them without holding the watcher.
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Stop and join the batch thread (within one step: a batch, or a full sync that checks
    /// the stop flag). Events after this are not applied.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if self.pid == std::process::id() {
                let _ = t.join();
            }
        }
        self.shared.running.store(false, Ordering::Relaxed);
        let _st = self.shared.state();
        self.shared.changes.notify_all();
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop();
    }
}

fn watch_error(root: &Path, e: notify::Error) -> Error {
    match e.kind {
        notify::ErrorKind::Io(io) => Error::io(root, io),
        notify::ErrorKind::PathNotFound => {
            Error::io(root, std::io::Error::from(std::io::ErrorKind::NotFound))
        }
        notify::ErrorKind::MaxFilesWatch => Error::InvalidArgument(format!(
            "{}: too many folders to watch: raise fs.inotify.max_user_watches",
            root.display()
        )),
        other => Error::InvalidArgument(format!("{}: cannot watch: {other:?}", root.display())),
    }
}

/// `(device, inode)` of a folder: a root deleted and made again is another folder, whose
/// watch must be placed anew.
fn dir_id(p: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(p)
        .ok()
        .filter(std::fs::Metadata::is_dir)
        .map(|m| (m.dev(), m.ino()))
}

/// Runs on notify's thread: keep it short. Reads change nothing and are dropped here (the
/// probe and the thumbnails open every file).
struct Handler {
    tx: SyncSender<PathBuf>,
    shared: Arc<Shared>,
    /// Paths queued so far.
    sent: u64,
    /// The path queued last, and its number: a file being written comes as create,
    /// modify(s) and close in a row, and one entry in the queue stands for them all while
    /// the batch thread has not taken it yet (an event after it took it is queued again, so
    /// the file's last write is always seen).
    last: Option<(PathBuf, u64)>,
}

impl notify::EventHandler for Handler {
    fn handle_event(&mut self, event: notify::Result<Event>) {
        let event = match event {
            Ok(ev) => ev,
            Err(e) => {
                // A watch that could not be placed (the watch limit), a read error: some
                // events may be lost.
                self.shared.error(format!("watch: {e}"));
                self.shared.lost_events();
                return;
            }
        };
        if event.need_rescan() {
            self.shared.lost_events();
            return;
        }
        match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return,
            // The two paths also come as a `From` and a `To` event.
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => return,
            _ => {}
        }
        for path in event.paths {
            if let Some((last, n)) = &self.last {
                if *last == path && self.shared.taken.load(Ordering::SeqCst) <= *n {
                    continue;
                }
            }
            match self.tx.try_send(path.clone()) {
                Ok(()) => {
                    self.shared.events.fetch_add(1, Ordering::Relaxed);
                    self.last = Some((path, self.sent));
                    self.sent += 1;
                }
                Err(TrySendError::Full(_)) => {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                    self.shared.lost_events();
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

/// The batch thread's state.
struct Batcher<S: Sink> {
    roots: Vec<PathBuf>,
    ids: Vec<Option<(u64, u64)>>,
    /// The root needs a full sync (the start, lost events, a failed batch).
    full: Vec<bool>,
    /// The root does not exist now; it is looked for again each idle slice.
    gone: Vec<bool>,
    sink: S,
    opts: WatchOptions,
    rx: Receiver<PathBuf>,
    notify: RecommendedWatcher,
    shared: Arc<Shared>,
    /// No sync is tried again before this (the last one failed).
    retry_at: Option<Instant>,
}

/// What one path of a batch is, relative to its root.
struct Change {
    rel: PathBuf,
    is_dir: bool,
}

impl<S: Sink> Batcher<S> {
    fn run(mut self) {
        while !self.shared.stopped() {
            if self.shared.overflowed.swap(false, Ordering::Relaxed) {
                // Every root is synced in full next; what the queue still holds is covered.
                self.drain();
                self.full.iter_mut().for_each(|f| *f = true);
            }
            self.look_for_roots();
            if self.may_retry() && self.full.iter().zip(&self.gone).any(|(f, g)| *f && !*g) {
                self.full_syncs();
                continue;
            }
            match self.take(IDLE_SLICE) {
                Ok(first) => {
                    let batch = self.gather(first);
                    if !self.shared.overflowed.load(Ordering::Relaxed) {
                        self.apply(batch);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // notify's thread is gone (it is owned here, so only if it failed)
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(IDLE_SLICE),
            }
        }
        self.shared.running.store(false, Ordering::Relaxed);
        let _st = self.shared.state();
        self.shared.changes.notify_all();
    }

    fn may_retry(&self) -> bool {
        match self.retry_at {
            Some(t) => Instant::now() >= t,
            None => true,
        }
    }

    /// The dataset is gone: nothing more can be applied, and the watcher stops.
    fn fatal(&self, e: &Error) -> bool {
        if !matches!(e, Error::DatasetNotFound(..)) {
            return false;
        }
        self.shared.error(format!("stopped: {e}"));
        self.shared.stop.store(true, Ordering::Relaxed);
        true
    }

    fn failed(&mut self, msg: String) {
        self.shared.error(msg);
        self.retry_at = Some(Instant::now() + RETRY_AFTER);
    }

    fn take(&self, wait: Duration) -> std::result::Result<PathBuf, RecvTimeoutError> {
        let p = self.rx.recv_timeout(wait)?;
        self.shared.taken.fetch_add(1, Ordering::SeqCst);
        Ok(p)
    }

    fn drain(&self) {
        for _ in 0..self.opts.queue.max(1) {
            if self.rx.try_recv().is_err() {
                break;
            }
            self.shared.taken.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Paths until the batch is quiet, old enough or big enough.
    fn gather(&self, first: PathBuf) -> HashSet<PathBuf> {
        let t0 = Instant::now();
        let mut batch = HashSet::from([first]);
        while batch.len() < self.opts.max_batch
            && !self.shared.stopped()
            && !self.shared.overflowed.load(Ordering::Relaxed)
        {
            let Some(left) = self.opts.max_delay.checked_sub(t0.elapsed()) else {
                break;
            };
            match self.take(self.opts.quiet.min(left)) {
                Ok(p) => {
                    batch.insert(p);
                }
                Err(_) => break,
            }
        }
        batch
    }

    /// The root a path lies in (the deepest, if roots nest), and the path relative to it.
    fn locate<'p>(&self, path: &'p Path) -> Option<(usize, &'p Path)> {
        self.roots
            .iter()
            .enumerate()
            .filter_map(|(i, r)| path.strip_prefix(r).ok().map(|rel| (i, rel)))
            .max_by_key(|(i, _)| self.roots[*i].as_os_str().len())
    }

    /// Whether the path may name a sample or a folder of samples.
    fn classify(&self, abs: &Path, rel: &Path) -> Option<Change> {
        let hidden = rel
            .components()
            .any(|c| c.as_os_str().as_bytes().first() == Some(&b'.'));
        if hidden && !self.opts.include_hidden {
            return None;
        }
        let name = rel.file_name()?.as_bytes();
        let meta = if self.opts.follow_links {
            std::fs::metadata(abs)
        } else {
            std::fs::symlink_metadata(abs)
        };
        let is_dir = meta.as_ref().is_ok_and(std::fs::Metadata::is_dir);
        // A name that is gone and not an image's may have been a folder of samples.
        (is_dir || is_image_name(name) || meta.is_err()).then(|| Change {
            rel: rel.to_path_buf(),
            is_dir,
        })
    }

    fn apply(&mut self, batch: HashSet<PathBuf>) {
        let mut by_root: BTreeMap<usize, Vec<Change>> = BTreeMap::new();
        let mut selves = Vec::new();
        for abs in &batch {
            let Some((i, rel)) = self.locate(abs) else {
                continue;
            };
            if self.gone[i] {
                continue;
            }
            if rel.as_os_str().is_empty() {
                selves.push(i);
            } else if let Some(c) = self.classify(abs, rel) {
                by_root.entry(i).or_default().push(c);
            }
        }
        for (i, changes) in by_root {
            let rels = collapse(changes);
            self.shared.batches.fetch_add(1, Ordering::Relaxed);
            self.shared
                .paths
                .fetch_add(rels.len() as u64, Ordering::Relaxed);
            match self.sink.sync_paths(&self.roots[i], &rels) {
                Ok(n) => self.shared.applied(n),
                Err(e) if self.fatal(&e) => return,
                Err(e) => {
                    self.full[i] = true;
                    self.failed(format!("sync of {}: {e}", self.roots[i].display()));
                }
            }
        }
        for i in selves {
            self.root_event(i);
        }
    }

    /// An event on a root itself: it may be gone, or another folder now.
    fn root_event(&mut self, i: usize) {
        let id = dir_id(&self.roots[i]);
        if id.is_some() && id == self.ids[i] {
            return; // its attributes changed, nothing more
        }
        let _ = self.notify.unwatch(&self.roots[i]);
        if id.is_none() {
            self.lose_root(i);
        } else if !self.rewatch(i) {
            self.gone[i] = true; // tried again each idle slice
        }
    }

    fn lose_root(&mut self, i: usize) {
        self.gone[i] = true;
        self.full[i] = false;
        let root = self.roots[i].clone();
        self.shared.state().missing_roots.push(root.clone());
        match self.sink.root_gone(&root) {
            Ok(n) => self.shared.applied(n),
            Err(e) if self.fatal(&e) => {}
            Err(e) => self.shared.error(format!("{}: {e}", root.display())),
        }
    }

    /// Watch a root again (it is back, or another folder took its place) and sync it in full.
    fn rewatch(&mut self, i: usize) -> bool {
        if self
            .notify
            .watch(&self.roots[i], RecursiveMode::Recursive)
            .is_err()
        {
            return false;
        }
        self.ids[i] = dir_id(&self.roots[i]);
        self.gone[i] = false;
        self.full[i] = true;
        let root = &self.roots[i];
        self.shared.state().missing_roots.retain(|r| r != root);
        true
    }

    fn look_for_roots(&mut self) {
        for i in 0..self.roots.len() {
            if self.gone[i] && dir_id(&self.roots[i]).is_some() {
                self.rewatch(i);
            }
        }
    }

    fn full_syncs(&mut self) {
        self.retry_at = None;
        for i in 0..self.roots.len() {
            if !self.full[i] || self.gone[i] || self.shared.stopped() {
                continue;
            }
            match self.sink.sync_root(&self.roots[i], &self.shared.stop) {
                Ok(n) => {
                    self.full[i] = false;
                    self.shared.full_syncs.fetch_add(1, Ordering::Relaxed);
                    self.shared.applied(n);
                }
                Err(_) if self.shared.stopped() => return,
                Err(e) if self.fatal(&e) => return,
                Err(_) if dir_id(&self.roots[i]).is_none() => {
                    let _ = self.notify.unwatch(&self.roots[i]);
                    self.lose_root(i);
                }
                Err(e) => self.failed(format!("sync of {}: {e}", self.roots[i].display())),
            }
        }
    }
}

impl crate::db::Store {
    /// Every row under `root` (a folder of the dataset, or one inside one) becomes `missing`:
    /// the folder itself is gone. In short transactions; returns how many rows changed.
    pub fn root_missing(&mut self, dataset_id: i64, root: &Path, stop: &AtomicBool) -> Result<u64> {
        let (root_id, prefix, _nested) = self.root_for_path(dataset_id, root)?;
        // No row was seen on disk: all of them are gone.
        let seen = crate::sync::Seen::upto(self.max_sample_id()?);
        self.mark_unseen_missing(dataset_id, root_id, &prefix, &seen, &[], stop)
    }
}

/// The relative paths of a batch, sorted, without those inside a folder of the batch (the
/// folder's sync covers them).
fn collapse(changes: Vec<Change>) -> Vec<PathBuf> {
    let dirs: HashSet<PathBuf> = changes
        .iter()
        .filter(|c| c.is_dir)
        .map(|c| c.rel.clone())
        .collect();
    let mut rels: Vec<PathBuf> = changes
        .into_iter()
        .filter(|c| !c.rel.ancestors().skip(1).any(|a| dirs.contains(a)))
        .map(|c| c.rel)
        .collect();
    rels.sort();
    rels.dedup();
    rels
}

#[cfg(test)]
#[path = "watch_tests.rs"]
mod tests;
