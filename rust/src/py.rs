//! The Python boundary: copy arguments out, run the work with the GIL released, convert back.
//! The only file (with lib.rs) that knows about pyo3.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::coco::CocoSummary;
use crate::db::{self, Progress, STATUSES};
use crate::error::Error;
use crate::header::{self, ImageInfo};
use crate::query::{AnnotationRow, CategoryRow, SampleFilter, SampleRow};
use crate::scan::{self, ScanSummary};
use crate::throughput;

/// Map a core error to the exception class of the same name in `fastindex.errors` (defined in
/// Python so they can also derive from `ValueError`, `LookupError`, ...).
fn to_py(e: Error) -> PyErr {
    let class = match &e {
        Error::InvalidArgument(_) => "InvalidArgumentError",
        Error::DatasetNotFound(..) => "DatasetNotFoundError",
        Error::DatasetExists(..) => "DatasetExistsError",
        Error::Image { .. } => "ImageError",
        Error::Coco { .. } => "CocoError",
        Error::SchemaVersion { .. } => "SchemaVersionError",
        Error::Store { .. } | Error::NotAStore(_) | Error::BadStore { .. } => "StoreError",
        Error::LeaseLost { .. } => "LeaseLostError",
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            "PathNotFoundError"
        }
        Error::Io { .. } => "InvalidArgumentError",
        Error::ObjectStore { .. } => "ObjectStoreError",
        Error::Cancelled => "CancelledError",
    };
    let msg = e.to_string();
    Python::attach(
        |py| match py.import("fastindex.errors").and_then(|m| m.getattr(class)) {
            Ok(cls) => match cls.call1((msg.clone(),)) {
                Ok(inst) => PyErr::from_value(inst),
                Err(err) => err,
            },
            Err(_) => PyRuntimeError::new_err(msg),
        },
    )
}

type Res<T> = PyResult<T>;

/// A row of a worker batch as Python gets it: `(id, path, orientation, attempts)`.
type BatchRow = (i64, std::ffi::OsString, i64, i64);

pub(crate) fn r<T>(v: crate::error::Result<T>) -> Res<T> {
    v.map_err(to_py)
}

/// The longest the calling thread waits, GIL released, between two signal checks.
const WAIT_SLICE: Duration = Duration::from_millis(50);
/// How often a waiting caller renews what its call holds (`db::Heartbeat`).
const BEAT_EVERY: Duration = Duration::from_secs(5);

/// Set when the worker's closure has returned (or panicked): the waiting caller wakes at once.
#[derive(Default)]
struct Finished {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Finished {
    fn set(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }
    fn wait(&self, slice: Duration) -> bool {
        let g = self.done.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, slice, |d| !*d)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }
}

struct SetOnDrop<'a>(&'a Finished);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.set();
    }
}

/// Run `work` on a worker thread and wait for it on the calling thread, interruptibly.
///
/// CPython delivers signals only to the main thread, and `py.check_signals()` anywhere else is
/// a no-op, so the long work cannot check for Ctrl-C itself. The caller waits in slices of at
/// most `WAIT_SLICE` with the GIL released and checks for signals between them; on a signal
/// (a `KeyboardInterrupt` from the handler) it sets `stop`, joins the worker (whose loops
/// check `stop` often enough to end within ~0.2 s) and returns the signal's exception. Every
/// `BEAT_EVERY` it runs `beat` (GIL released) to renew what the call holds in the store.
pub(crate) fn run_interruptibly<T: Send>(
    py: Python<'_>,
    stop: &AtomicBool,
    mut beat: Option<db::Heartbeat>,
    work: impl FnOnce() -> crate::error::Result<T> + Send,
) -> Res<T> {
    let finished = Finished::default();
    std::thread::scope(|scope| {
        let finished = &finished;
        let worker = std::thread::Builder::new()
            .name("fastindex-call".into())
            .spawn_scoped(scope, move || {
                let _done = SetOnDrop(finished);
                work()
            })
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start a thread: {e}")))?;
        let mut last_beat = Instant::now();
        loop {
            if py.detach(|| finished.wait(WAIT_SLICE)) {
                break;
            }
            if let Err(signal) = py.check_signals() {
                stop.store(true, Ordering::Relaxed);
                // What the worker did until it stopped is committed and consistent; its
                // result (`Cancelled`, mostly) says nothing the signal does not.
                let _ = py.detach(|| worker.join());
                return Err(signal);
            }
            if let Some(b) = beat.as_mut() {
                if last_beat.elapsed() >= BEAT_EVERY {
                    py.detach(|| b.beat());
                    last_beat = Instant::now();
                }
            }
        }
        match py.detach(|| worker.join()) {
            Ok(result) => r(result),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(PyRuntimeError::new_err(format!(
                    "fastindex worker thread panicked (a bug): {msg}"
                )))
            }
        }
    })
}

/// A flag that long calls check between steps; set it to cancel them.
#[pyclass(module = "fastindex._core", frozen)]
#[derive(Clone, Default)]
pub struct StopFlag {
    flag: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
}

#[pymethods]
impl StopFlag {
    #[new]
    fn new() -> Self {
        Self::default()
    }
    fn set(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }
    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
    /// Rows processed so far by the call that holds this flag.
    #[getter]
    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

/// A path argument: `str` (with surrogates from os.fsdecode), `bytes` or any `os.PathLike`,
/// taken byte for byte.
pub struct FsPath(pub PathBuf);

impl<'a, 'py> FromPyObject<'a, 'py> for FsPath {
    type Error = PyErr;

    fn extract(ob: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        use std::os::unix::ffi::OsStrExt;
        let fspath = ob.py().import("os")?.getattr("fspath")?.call1((ob,))?;
        if let Ok(b) = fspath.cast::<PyBytes>() {
            return Ok(FsPath(PathBuf::from(std::ffi::OsStr::from_bytes(
                b.as_bytes(),
            ))));
        }
        Ok(FsPath(fspath.extract::<PathBuf>()?))
    }
}

fn info_dict<'py>(py: Python<'py>, i: &ImageInfo) -> Res<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("width", i.width)?;
    d.set_item("height", i.height)?;
    d.set_item("format", i.format.name())?;
    d.set_item("orientation", i.orientation)?;
    Ok(d)
}

/// `(width, height)` from the header of the image at `path`.
#[pyfunction]
pub fn image_size(py: Python<'_>, path: FsPath) -> Res<(u32, u32)> {
    let path = path.0;
    let info = py.detach(|| {
        header::probe_path(&path).map_err(|reason| Error::image(&path, reason.to_string()))
    });
    let info = r(info)?;
    Ok((info.width, info.height))
}

/// Width, height, format and EXIF orientation from the header of the image at `path`.
#[pyfunction]
pub fn probe_image<'py>(py: Python<'py>, path: FsPath) -> Res<Bound<'py, PyDict>> {
    let path = path.0;
    let info = py.detach(|| {
        header::probe_path(&path).map_err(|reason| Error::image(&path, reason.to_string()))
    });
    info_dict(py, &r(info)?)
}

/// The same, for an image held in memory.
#[pyfunction]
pub fn probe_bytes<'py>(py: Python<'py>, data: &[u8]) -> Res<Bound<'py, PyDict>> {
    let info = header::probe_bytes(data)
        .map_err(|reason| Error::image(Path::new("<bytes>"), reason.to_string()));
    info_dict(py, &r(info)?)
}

/// One connection to a store. Calls release the GIL; calls on one `Store` take turns.
#[pyclass(module = "fastindex._core", frozen)]
pub struct Store {
    inner: Mutex<db::Store>,
    #[pyo3(get)]
    path: String,
    /// `inner.job_owner()`, readable while a long call holds `inner`.
    job_owner: String,
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, db::Store> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn sample_dict<'py>(py: Python<'py>, s: SampleRow) -> Res<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", s.id)?;
    d.set_item("dataset_id", s.dataset_id)?;
    d.set_item("job_id", s.job_id)?;
    // str via os.fsdecode (surrogateescape): open() of root/path reaches the same bytes
    d.set_item("root", s.root.into_os_string())?;
    d.set_item("path", s.path.into_os_string())?;
    d.set_item("size_bytes", s.size_bytes)?;
    d.set_item("mtime_ns", s.mtime_ns)?;
    d.set_item("status", s.status)?;
    d.set_item("width", s.width)?;
    d.set_item("height", s.height)?;
    d.set_item("format", s.format)?;
    d.set_item("orientation", s.orientation)?;
    d.set_item("error", s.error)?;
    d.set_item("coco_width", s.coco_width)?;
    d.set_item("coco_height", s.coco_height)?;
    d.set_item("size_mismatch", s.size_mismatch)?;
    Ok(d)
}

fn sample_dicts<'py>(py: Python<'py>, rows: Vec<SampleRow>) -> Res<Vec<Bound<'py, PyDict>>> {
    rows.into_iter().map(|s| sample_dict(py, s)).collect()
}

type AnnotationTuple = (
    i64,
    i64,
    String,
    Option<String>,
    (f64, f64, f64, f64),
    Option<f64>,
    bool,
    Option<String>,
);

fn annotation_tuple(a: AnnotationRow) -> AnnotationTuple {
    let [x, y, w, h] = a.bbox;
    (
        a.id,
        a.sample_id,
        a.category,
        a.supercategory,
        (x, y, w, h),
        a.area,
        a.iscrowd,
        a.segmentation,
    )
}

fn progress_dict<'py>(py: Python<'py>, p: &Progress) -> Res<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("dataset_id", p.dataset_id)?;
    d.set_item("total", p.total())?;
    for (name, n) in STATUSES.iter().zip(p.counts) {
        d.set_item(*name, n)?;
    }
    d.set_item(
        "status",
        if p.is_complete() {
            "complete"
        } else {
            "in_progress"
        },
    )?;
    let errors = PyDict::new(py);
    for (phase, msg) in &p.errors {
        errors.set_item(phase, msg)?;
    }
    d.set_item("errors", errors)?;
    let phases = throughput::phases(p);
    let by_phase = PyDict::new(py);
    for ph in &phases {
        let one = PyDict::new(py);
        one.set_item("done", ph.done)?;
        one.set_item("total", ph.total)?;
        one.set_item("rate", ph.rate)?;
        one.set_item("eta_s", ph.eta_s)?;
        by_phase.set_item(ph.name, one)?;
    }
    d.set_item("phases", by_phase)?;
    let top = throughput::limiting(&phases);
    d.set_item("rate", top.and_then(|ph| ph.rate))?;
    d.set_item("eta_s", top.and_then(|ph| ph.eta_s))?;
    d.set_item("rate_phase", top.map(|ph| ph.name))?;
    Ok(d)
}

fn scan_dict(py: Python<'_>, s: ScanSummary) -> Res<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("job_id", s.job_id)?;
    d.set_item("found", s.found)?;
    d.set_item("added", s.added)?;
    d.set_item("existing", s.existing)?;
    d.set_item("changed", s.changed)?;
    d.set_item("removed", s.removed)?;
    d.set_item("unchanged", s.unchanged)?;
    d.set_item("errors", PyList::new(py, s.errors)?)?;
    Ok(d)
}

type DatasetTuple = (i64, String, f64, Option<String>);

fn dataset_tuple(d: db::DatasetRow) -> DatasetTuple {
    (d.id, d.name, d.created_at, d.embed_spec)
}

#[pymethods]
impl Store {
    /// Open or create the store at `path` (blocks on the file; releases the GIL).
    #[new]
    fn new(py: Python<'_>, path: String) -> Res<Self> {
        let inner = r(py.detach(|| db::Store::open(&path)))?;
        let job_owner = inner.job_owner().to_string();
        Ok(Store {
            inner: Mutex::new(inner),
            path,
            job_owner,
        })
    }

    fn create_dataset(&self, py: Python<'_>, name: String) -> Res<i64> {
        r(py.detach(|| self.lock().create_dataset(&name)))
    }

    /// `(id, created)`: the dataset named `name`, created in the same transaction if absent.
    fn find_or_create_dataset(&self, py: Python<'_>, name: String) -> Res<(i64, bool)> {
        r(py.detach(|| self.lock().find_or_create_dataset(&name)))
    }

    /// Remove a dataset and all its rows (never files on disk).
    fn delete_dataset(&self, py: Python<'_>, dataset_id: i64) -> Res<()> {
        r(py.detach(|| self.lock().delete_dataset(dataset_id)))
    }

    fn find_dataset(&self, py: Python<'_>, name: String) -> Res<Option<DatasetTuple>> {
        Ok(r(py.detach(|| self.lock().find_dataset(&name)))?.map(dataset_tuple))
    }

    fn dataset(&self, py: Python<'_>, dataset_id: i64) -> Res<Option<DatasetTuple>> {
        Ok(r(py.detach(|| self.lock().dataset(dataset_id)))?.map(dataset_tuple))
    }

    fn list_datasets(&self, py: Python<'_>) -> Res<Vec<DatasetTuple>> {
        Ok(r(py.detach(|| self.lock().list_datasets()))?
            .into_iter()
            .map(dataset_tuple)
            .collect())
    }

    /// Phase 1 for a folder, or an object-store root (`s3://bucket/prefix/`); returns after
    /// the rows are committed.
    #[pyo3(signature = (dataset_id, root, *, include_hidden=false, follow_links=false, stop=None))]
    fn scan<'py>(
        &self,
        py: Python<'py>,
        dataset_id: i64,
        root: FsPath,
        include_hidden: bool,
        follow_links: bool,
        stop: Option<StopFlag>,
    ) -> Res<Bound<'py, PyDict>> {
        let stop = stop.unwrap_or_default();
        let beat = db::Heartbeat::jobs(&self.path, &self.job_owner);
        let s: ScanSummary = run_interruptibly(py, &stop.flag, Some(beat), || {
            if let Some(uri) = crate::remote::ObjectUri::from_path(&root.0) {
                let uri = uri?;
                return self
                    .lock()
                    .scan_objects(dataset_id, &uri, include_hidden, &stop.flag);
            }
            let root = scan::absolute_dir(&root.0)?;
            self.lock()
                .scan(dataset_id, &root, include_hidden, follow_links, &stop.flag)
        })?;
        scan_dict(py, s)
    }

    /// The same as `scan` (a full sync of the folder), under the name a watcher calls after
    /// it lost events.
    #[pyo3(signature = (dataset_id, root, *, include_hidden=false, follow_links=false, stop=None))]
    fn sync_root<'py>(
        &self,
        py: Python<'py>,
        dataset_id: i64,
        root: FsPath,
        include_hidden: bool,
        follow_links: bool,
        stop: Option<StopFlag>,
    ) -> Res<Bound<'py, PyDict>> {
        self.scan(py, dataset_id, root, include_hidden, follow_links, stop)
    }

    /// Sync a few paths under `root` (see `_core.pyi`) in one short transaction.
    #[pyo3(signature = (dataset_id, root, rel_paths, *, job_id=None, include_hidden=false,
        follow_links=false, stop=None))]
    #[allow(clippy::too_many_arguments)]
    fn sync_paths<'py>(
        &self,
        py: Python<'py>,
        dataset_id: i64,
        root: FsPath,
        rel_paths: Vec<FsPath>,
        job_id: Option<i64>,
        include_hidden: bool,
        follow_links: bool,
        stop: Option<StopFlag>,
    ) -> Res<Bound<'py, PyDict>> {
        use std::os::unix::ffi::OsStrExt;
        let stop = stop.unwrap_or_default();
        let rels: Vec<Vec<u8>> = rel_paths
            .into_iter()
            .map(|p| p.0.as_os_str().as_bytes().to_vec())
            .collect();
        let opts = crate::walk::WalkOptions {
            include_hidden,
            follow_dir_links: follow_links,
            skip_dirs: Vec::new(),
        };
        let (job, c) = run_interruptibly(py, &stop.flag, None, || {
            let root = scan::absolute_dir(&root.0)?;
            let mut store = self.lock();
            let job = match job_id {
                Some(j) => j,
                None => store.watch_job(dataset_id, &root)?,
            };
            let c = store.sync_paths(dataset_id, job, &root, &rels, &opts, &stop.flag)?;
            Ok((job, c))
        })?;
        let d = PyDict::new(py);
        d.set_item("job_id", job)?;
        d.set_item("added", c.added)?;
        d.set_item("changed", c.changed)?;
        d.set_item("removed", c.removed)?;
        d.set_item("unchanged", c.unchanged)?;
        Ok(d)
    }

    /// Failed rows back to `pending`; returns how many.
    fn retry_failed(&self, py: Python<'_>, dataset_id: i64) -> Res<u64> {
        r(py.detach(|| self.lock().retry_failed(dataset_id)))
    }

    /// Parse, check and ingest a COCO file (nothing is written if it is malformed).
    #[pyo3(signature = (dataset_id, annotations_json, images_root, *, stop=None))]
    fn ingest_coco<'py>(
        &self,
        py: Python<'py>,
        dataset_id: i64,
        annotations_json: String,
        images_root: String,
        stop: Option<StopFlag>,
    ) -> Res<Bound<'py, PyDict>> {
        let stop = stop.unwrap_or_default();
        let beat = db::Heartbeat::jobs(&self.path, &self.job_owner);
        let s: CocoSummary = run_interruptibly(py, &stop.flag, Some(beat), || {
            // A bucket URI is taken as it is (the ingest parses and checks it).
            let remote = |s: &str| crate::remote::is_object_path(Path::new(s));
            let root = if remote(&images_root) {
                PathBuf::from(&images_root)
            } else {
                scan::absolute_dir(&images_root)?
            };
            let json = if remote(&annotations_json) {
                PathBuf::from(&annotations_json)
            } else {
                std::path::absolute(&annotations_json)
                    .map_err(|e| Error::io(Path::new(&annotations_json), e))?
            };
            self.lock()
                .ingest_coco(dataset_id, &json, &root, &stop.flag)
        })?;
        let d = PyDict::new(py);
        d.set_item("job_id", s.job_id)?;
        d.set_item("images", s.images)?;
        d.set_item("added", s.added)?;
        d.set_item("existing", s.existing)?;
        d.set_item("annotations", s.annotations)?;
        d.set_item("categories", s.categories)?;
        d.set_item("missing", PyList::new(py, s.missing)?)?;
        d.set_item("rejected", PyList::new(py, s.rejected)?)?;
        d.set_item("annotations_skipped", s.annotations_skipped)?;
        Ok(d)
    }

    /// Phase 2: probe pending rows until none is left. Blocks; the work runs on a worker
    /// thread while this thread waits with the GIL released and checks for signals (Ctrl-C
    /// raises `KeyboardInterrupt` within ~0.2 s); stops early (raising `CancelledError`) once
    /// `stop` is set. Returns the number of rows probed.
    ///
    /// With `lease=(owner, ttl)` the `probe` lease is taken first, renewed with every batch
    /// (and every few seconds while a batch runs), and each batch is committed only while
    /// no other owner holds it: `LeaseLostError` once another process took it over.
    #[pyo3(signature = (dataset_id, *, stop=None, lease=None))]
    fn probe_pending(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        stop: Option<StopFlag>,
        lease: Option<(String, f64)>,
    ) -> Res<u64> {
        let stop = stop.unwrap_or_default();
        let beat = lease
            .as_ref()
            .map(|(owner, _)| db::Heartbeat::lease(&self.path, dataset_id, "probe", owner));
        run_interruptibly(py, &stop.flag, beat, || {
            let lease = lease.as_ref().map(|(o, ttl)| (o.as_str(), *ttl));
            self.lock()
                .probe_pending(dataset_id, &stop.flag, &stop.done, lease)
        })
    }

    /// Counts by status for a dataset (or one job of it), with `status` and phase `errors`.
    #[pyo3(signature = (dataset_id, job_id=None))]
    fn progress<'py>(
        &self,
        py: Python<'py>,
        dataset_id: i64,
        job_id: Option<i64>,
    ) -> Res<Bound<'py, PyDict>> {
        let p = r(py.detach(|| self.lock().progress(dataset_id, job_id)))?;
        progress_dict(py, &p)
    }

    /// Samples in id order that match the filters (all when none is given), paged by key:
    /// up to `limit` rows with ids above `after_id`.
    #[pyo3(signature = (dataset_id, *, status=None, limit=-1, after_id=0,
        format=None, min_width=None, max_width=None, min_height=None, max_height=None,
        path_glob=None, category=None, has_annotations=None))]
    #[allow(clippy::too_many_arguments)]
    fn samples<'py>(
        &self,
        py: Python<'py>,
        dataset_id: i64,
        status: Option<String>,
        limit: i64,
        after_id: i64,
        format: Option<String>,
        min_width: Option<i64>,
        max_width: Option<i64>,
        min_height: Option<i64>,
        max_height: Option<i64>,
        path_glob: Option<String>,
        category: Option<String>,
        has_annotations: Option<bool>,
    ) -> Res<Vec<Bound<'py, PyDict>>> {
        let limit = if limit < 0 { i64::MAX } else { limit };
        let filter = SampleFilter {
            status,
            format,
            min_width,
            max_width,
            min_height,
            max_height,
            path_glob,
            category,
            has_annotations,
        };
        let rows = r(py.detach(|| self.lock().samples(dataset_id, &filter, limit, after_id)))?;
        sample_dicts(py, rows)
    }

    /// `{"format": {name: n}, "category": {name: n}}`: samples per value, from counters.
    fn facets<'py>(&self, py: Python<'py>, dataset_id: i64) -> Res<Bound<'py, PyDict>> {
        let f = r(py.detach(|| self.lock().facets(dataset_id)))?;
        let d = PyDict::new(py);
        for (key, pairs) in [("format", f.formats), ("category", f.categories)] {
            let inner = PyDict::new(py);
            for (name, n) in pairs {
                inner.set_item(name, n)?;
            }
            d.set_item(key, inner)?;
        }
        Ok(d)
    }

    /// The folders the dataset's samples were added from (their paths are relative to them).
    fn roots(&self, py: Python<'_>, dataset_id: i64) -> Res<Vec<std::ffi::OsString>> {
        let dirs = r(py.detach(|| self.lock().root_dirs(dataset_id)))?;
        let mut dirs: Vec<(i64, PathBuf)> = dirs.into_iter().collect();
        dirs.sort();
        // str via os.fsdecode, as sample roots are
        Ok(dirs.into_iter().map(|(_, p)| p.into_os_string()).collect())
    }

    /// `(id, name, supercategory, coco_id)` of each category, in id order.
    fn categories(&self, py: Python<'_>, dataset_id: i64) -> Res<Vec<CategoryRow>> {
        r(py.detach(|| self.lock().categories(dataset_id)))
    }

    /// Boxes of the samples with ids in `(after_id, upto_id]`, in (sample, id) order.
    fn annotations_between(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        after_id: i64,
        upto_id: i64,
    ) -> Res<Vec<AnnotationTuple>> {
        let rows = r(py.detach(|| {
            self.lock()
                .annotations_between(dataset_id, after_id, upto_id)
        }))?;
        Ok(rows.into_iter().map(annotation_tuple).collect())
    }

    fn samples_by_id<'py>(&self, py: Python<'py>, ids: Vec<i64>) -> Res<Vec<Bound<'py, PyDict>>> {
        let rows = r(py.detach(|| self.lock().samples_by_id(&ids)))?;
        sample_dicts(py, rows)
    }

    #[pyo3(signature = (dataset_id, sample_id=None))]
    fn annotations(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        sample_id: Option<i64>,
    ) -> Res<Vec<AnnotationTuple>> {
        let rows = r(py.detach(|| self.lock().annotations(dataset_id, sample_id)))?;
        Ok(rows.into_iter().map(annotation_tuple).collect())
    }

    /// `(dataset_id, kind, source, added, existing, warnings_json)` of a job.
    fn job(&self, py: Python<'_>, job_id: i64) -> Res<Option<db::JobRow>> {
        r(py.detach(|| self.lock().job(job_id)))
    }

    fn coco_missing(&self, py: Python<'_>, job_id: i64) -> Res<Vec<(i64, String)>> {
        r(py.detach(|| self.lock().coco_missing(job_id)))
    }

    #[pyo3(signature = (dataset_id, phase, message=None))]
    fn set_phase_error(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        phase: String,
        message: Option<String>,
    ) -> Res<()> {
        r(py.detach(|| {
            self.lock()
                .set_phase_error(dataset_id, &phase, message.as_deref())
        }))
    }

    fn acquire_lease(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        phase: String,
        owner: String,
        ttl: f64,
    ) -> Res<bool> {
        r(py.detach(|| self.lock().acquire_lease(dataset_id, &phase, &owner, ttl)))
    }

    /// Renew `owner`'s lease; False (and nothing changed) if another owner holds it or none.
    fn renew_lease(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        phase: String,
        owner: String,
        ttl: f64,
    ) -> Res<bool> {
        r(py.detach(|| self.lock().renew_lease(dataset_id, &phase, &owner, ttl)))
    }

    fn release_lease(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        phase: String,
        owner: String,
    ) -> Res<()> {
        r(py.detach(|| self.lock().release_lease(dataset_id, &phase, &owner)))
    }

    fn register_model(
        &self,
        py: Python<'_>,
        name: String,
        pretrained: String,
        dim: i64,
    ) -> Res<i64> {
        r(py.detach(|| self.lock().register_model(&name, &pretrained, dim)))
    }

    /// `(id, name, pretrained, dim)` of every model with embeddings in this store.
    fn models(&self, py: Python<'_>) -> Res<Vec<(i64, String, String, i64)>> {
        r(py.detach(|| self.lock().models()))
    }

    #[pyo3(signature = (dataset_id, spec, model_id=None))]
    fn set_embed_spec(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        spec: Option<String>,
        model_id: Option<i64>,
    ) -> Res<()> {
        r(py.detach(|| {
            self.lock()
                .set_embed_spec(dataset_id, spec.as_deref(), model_id)
        }))
    }

    /// Move up to `limit` indexed rows with id above `after` to `embedding`; returns
    /// `[(id, absolute path)]` in id order. Keep the last id as the next `after`.
    /// With `owner`, only while no other owner holds the `embed` lease (`LeaseLostError`).
    #[pyo3(signature = (dataset_id, limit, after=0, *, owner=None))]
    fn claim_for_embedding(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        limit: usize,
        after: i64,
        owner: Option<String>,
    ) -> Res<Vec<(i64, PathBuf)>> {
        r(py.detach(|| {
            self.lock()
                .claim_for_embedding(dataset_id, limit, after, owner.as_deref())
        }))
    }

    /// Store float16 vectors (`ids.len() * dim * 2` bytes) and mark those rows `ready`;
    /// `failed` is `[(id, reason)]`. With `owner`, only while no other owner holds the
    /// `embed` lease (`LeaseLostError` and nothing written otherwise).
    #[pyo3(signature = (dataset_id, model_id, ids, vectors, failed=Vec::new(), *, owner=None))]
    #[allow(clippy::too_many_arguments)]
    fn finish_embeddings(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        model_id: i64,
        ids: Vec<i64>,
        vectors: &[u8],
        failed: Vec<(i64, String)>,
        owner: Option<String>,
    ) -> Res<()> {
        r(py.detach(|| {
            self.lock().finish_embeddings(
                dataset_id,
                model_id,
                &ids,
                vectors,
                &failed,
                owner.as_deref(),
            )
        }))
    }

    /// With `owner`, only unless another owner holds the `embed` lease (`LeaseLostError`).
    #[pyo3(signature = (dataset_id, ids=None, *, owner=None))]
    fn release_claims(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        ids: Option<Vec<i64>>,
        owner: Option<String>,
    ) -> Res<u64> {
        r(py.detach(|| {
            self.lock()
                .release_claims(dataset_id, ids.as_deref(), owner.as_deref())
        }))
    }

    /// A batch of up to `limit` rows for a worker (see `batches.rs`): `(batch id, [(id,
    /// path, orientation, attempts)])`, no rows when none is left.
    fn claim_batch(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        limit: usize,
        after: i64,
        owner: String,
    ) -> Res<(i64, Vec<BatchRow>)> {
        let (batch, rows) =
            r(py.detach(|| self.lock().claim_batch(dataset_id, limit, after, &owner)))?;
        // str via os.fsdecode, not pathlib.Path: a Path object per row costs microseconds,
        // and the paths only travel on to the workers
        let rows = rows
            .into_iter()
            .map(|(id, p, o, a)| (id, p.into_os_string(), o, a))
            .collect();
        Ok((batch, rows))
    }

    /// Commit a batch's results; only rows still out under `batch` change. Returns how many.
    #[pyo3(signature = (dataset_id, model_id, batch, ids, vectors, failed, *, owner))]
    #[allow(clippy::too_many_arguments)]
    fn commit_batch(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        model_id: i64,
        batch: i64,
        ids: Vec<i64>,
        vectors: &[u8],
        failed: Vec<(i64, String)>,
        owner: String,
    ) -> Res<u64> {
        r(py.detach(|| {
            self.lock()
                .commit_batch(dataset_id, model_id, batch, &ids, vectors, &failed, &owner)
        }))
    }

    /// Give a batch's rows back: `(back to indexed, failed)`.
    #[pyo3(signature = (dataset_id, batch, ids, *, worker_died, max_attempts, owner))]
    #[allow(clippy::too_many_arguments)]
    fn release_batch(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        batch: i64,
        ids: Vec<i64>,
        worker_died: bool,
        max_attempts: i64,
        owner: String,
    ) -> Res<(u64, u64)> {
        r(py.detach(|| {
            self.lock()
                .release_batch(dataset_id, batch, &ids, worker_died, max_attempts, &owner)
        }))
    }

    /// How many embeddings were stored after `after` (to size the arrays of a reader).
    #[pyo3(signature = (dataset_id, model_id, after=0))]
    fn count_embeddings(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        model_id: i64,
        after: i64,
    ) -> Res<i64> {
        r(py.detach(|| self.lock().count_embeddings(dataset_id, model_id, after)))
    }

    /// Read up to `len(ids)` embeddings stored after `after` straight into `ids` (writable
    /// int64 buffer) and `out` (writable bytes, `len(ids)` rows); returns `(cursor, rows)`.
    fn read_embeddings(
        &self,
        py: Python<'_>,
        dataset_id: i64,
        model_id: i64,
        after: i64,
        ids: PyBuffer<i64>,
        out: PyBuffer<u8>,
    ) -> Res<(i64, usize)> {
        for (name, readonly, contiguous) in [
            ("ids", ids.readonly(), ids.is_c_contiguous()),
            ("out", out.readonly(), out.is_c_contiguous()),
        ] {
            if readonly || !contiguous {
                return Err(to_py(Error::InvalidArgument(format!(
                    "read_embeddings: {name} must be a writable C-contiguous buffer"
                ))));
            }
        }
        // The buffers stay alive (and exported) for the whole call; the GIL is released
        // while SQLite reads, so the pointers cross into the closure as plain addresses.
        let (ids_at, ids_len) = (ids.buf_ptr() as usize, ids.item_count());
        let (out_at, out_len) = (out.buf_ptr() as usize, out.item_count());
        r(py.detach(|| {
            // SAFETY: both regions are writable, contiguous and held by `ids`/`out` until
            // this function returns; fastindex does not touch them from Python meanwhile.
            let ids = unsafe { std::slice::from_raw_parts_mut(ids_at as *mut i64, ids_len) };
            let out = unsafe { std::slice::from_raw_parts_mut(out_at as *mut u8, out_len) };
            self.lock()
                .read_embeddings(dataset_id, model_id, after, ids, out)
        }))
    }

    /// `(cursor, ids, float16 bytes)` of embeddings stored after `cursor`.
    #[pyo3(signature = (dataset_id, model_id, after=0))]
    fn load_embeddings<'py>(
        &self,
        py: Python<'py>,
        dataset_id: i64,
        model_id: i64,
        after: i64,
    ) -> Res<(i64, Vec<i64>, Bound<'py, PyBytes>)> {
        let (cursor, ids, bytes) =
            r(py.detach(|| self.lock().load_embeddings(dataset_id, model_id, after)))?;
        Ok((cursor, ids, PyBytes::new(py, &bytes)))
    }
}
