//! The Python face of `watch`: a `Watcher` that follows folders of one dataset and applies
//! their changes to the store, on threads of its own (no GIL, no Python object touched there).

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::db;
use crate::error::{Error, Result};
use crate::py::{r, FsPath};
use crate::scan;
use crate::sync::SyncCounts;
use crate::walk::WalkOptions;
use crate::watch::{self, Sink, WatchOptions};

/// Applies a watcher's batches to the store, through a connection of its own.
struct StoreSink {
    store: db::Store,
    dataset_id: i64,
    walk: WalkOptions,
    /// The job each root's new rows belong to.
    jobs: HashMap<PathBuf, i64>,
    never: AtomicBool,
}

fn touched(c: &SyncCounts) -> u64 {
    c.added + c.changed + c.removed
}

impl StoreSink {
    /// A deleted dataset takes no more rows (and stops the watcher): looked up before each
    /// batch, a read by primary key.
    fn check_dataset(&self) -> Result<()> {
        match self.store.dataset(self.dataset_id)? {
            Some(_) => Ok(()),
            None => Err(Error::DatasetNotFound(
                format!("#{}", self.dataset_id),
                self.store.path.clone(),
            )),
        }
    }

    fn job(&mut self, root: &Path) -> Result<i64> {
        if let Some(id) = self.jobs.get(root) {
            return Ok(*id);
        }
        let id = self.store.watch_job(self.dataset_id, root)?;
        self.jobs.insert(root.to_path_buf(), id);
        Ok(id)
    }
}

impl Sink for StoreSink {
    fn sync_paths(&mut self, root: &Path, rel_paths: &[PathBuf]) -> Result<u64> {
        self.check_dataset()?;
        let job = self.job(root)?;
        let rels: Vec<Vec<u8>> = rel_paths
            .iter()
            .map(|p| p.as_os_str().as_bytes().to_vec())
            .collect();
        let c =
            self.store
                .sync_paths(self.dataset_id, job, root, &rels, &self.walk, &self.never)?;
        Ok(touched(&c))
    }

    fn sync_root(&mut self, root: &Path, stop: &AtomicBool) -> Result<u64> {
        self.check_dataset()?;
        let s = self.store.scan(
            self.dataset_id,
            root,
            self.walk.include_hidden,
            self.walk.follow_dir_links,
            stop,
        )?;
        Ok(s.added + s.changed + s.removed)
    }

    fn root_gone(&mut self, root: &Path) -> Result<u64> {
        self.check_dataset()?;
        self.store.root_missing(self.dataset_id, root, &self.never)
    }
}

/// Follows folders of a dataset live; see `fastindex.watch.Watcher`.
#[pyclass(module = "fastindex._core", frozen, name = "Watcher")]
pub struct Watcher {
    inner: Mutex<Option<watch::Watcher>>,
    shared: Arc<watch::Shared>,
    pid: u32,
}

#[pymethods]
impl Watcher {
    /// Watch `roots` (folders of the dataset) and apply their changes to the store at `db`.
    /// Blocks while the watches are placed (a walk of the folders; GIL released).
    #[new]
    #[pyo3(signature = (db, dataset_id, roots, *, queue=65_536, quiet_ms=50, max_delay_ms=250,
        max_batch=5_000, include_hidden=false, follow_links=false, catch_up=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        db: String,
        dataset_id: i64,
        roots: Vec<FsPath>,
        queue: usize,
        quiet_ms: u64,
        max_delay_ms: u64,
        max_batch: usize,
        include_hidden: bool,
        follow_links: bool,
        catch_up: bool,
    ) -> PyResult<Self> {
        let opts = WatchOptions {
            quiet: Duration::from_millis(quiet_ms),
            max_delay: Duration::from_millis(max_delay_ms),
            max_batch: max_batch.max(1),
            queue: queue.max(1),
            include_hidden,
            follow_links,
            catch_up,
        };
        let w = r(py.detach(|| -> Result<watch::Watcher> {
            let roots = roots
                .iter()
                .map(|p| scan::absolute_dir(&p.0))
                .collect::<Result<Vec<_>>>()?;
            let store = db::Store::open(&db)?;
            if store.dataset(dataset_id)?.is_none() {
                return Err(Error::DatasetNotFound(format!("#{dataset_id}"), db.clone()));
            }
            let sink = StoreSink {
                store,
                dataset_id,
                walk: WalkOptions {
                    include_hidden,
                    follow_dir_links: follow_links,
                    skip_dirs: Vec::new(),
                },
                jobs: HashMap::new(),
                never: AtomicBool::new(false),
            };
            watch::Watcher::start(roots, sink, opts)
        }))?;
        Ok(Watcher {
            shared: w.shared(),
            inner: Mutex::new(Some(w)),
            pid: std::process::id(),
        })
    }

    /// Stop following and join the watcher's thread (it ends within one batch, or one step
    /// of a full sync). Idempotent.
    fn stop(&self, py: Python<'_>) {
        py.detach(|| {
            let w = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(mut w) = w {
                w.stop();
            }
        });
    }

    /// Whether the watcher's thread runs (in this process: a forked child has none).
    #[getter]
    fn running(&self) -> bool {
        self.pid == std::process::id() && self.shared.stats().running
    }

    /// Wait (GIL released) until a batch or sync changed rows since generation `seen`, the
    /// watcher stopped, or `timeout` seconds passed; returns the generation.
    fn wait_change(&self, py: Python<'_>, seen: u64, timeout: f64) -> u64 {
        let t = Duration::try_from_secs_f64(timeout.max(0.0)).unwrap_or(Duration::from_secs(1));
        py.detach(|| self.shared.wait_change(seen, t))
    }

    /// The watcher's counters (see `fastindex.watch.Watcher.stats`).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.shared.stats();
        let d = PyDict::new(py);
        d.set_item("running", s.running && self.pid == std::process::id())?;
        d.set_item("events", s.events)?;
        d.set_item("dropped", s.dropped)?;
        d.set_item("overflows", s.overflows)?;
        d.set_item("batches", s.batches)?;
        d.set_item("full_syncs", s.full_syncs)?;
        d.set_item("paths", s.paths)?;
        d.set_item("changed", s.changed)?;
        d.set_item("errors", s.errors)?;
        d.set_item("generation", s.generation)?;
        d.set_item("last_error", s.last_error)?;
        let missing: Vec<std::ffi::OsString> = s
            .missing_roots
            .into_iter()
            .map(PathBuf::into_os_string)
            .collect();
        d.set_item("missing_roots", missing)?;
        d.set_item("last_sync", s.last_sync)?;
        Ok(d)
    }
}
