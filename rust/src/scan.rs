//! Phase 1 (walk + insert `pending` rows) and phase 2 (probe headers, mark `indexed`/`failed`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rayon::prelude::*;
use rusqlite::params;
use std::os::unix::ffi::OsStrExt;

use crate::db::{bump, bump_moves, Store, FAILED, INDEXED, PENDING};
use crate::error::{Error, Result, StoreContext};
use crate::header::{self, ImageInfo};
use crate::leases::hold_lease;
use crate::paths::{join_rel, path_bytes, SqlPath};
use crate::sync::{insert_pending, Seen, SyncCounts};
use crate::throughput;
use crate::walk::{self, FileEntry, Problem, WalkOptions};

/// Rows per transaction when inserting scanned files: small enough that a stop (Ctrl-C) is
/// seen within ~20 ms, and that other writers wait no longer than that.
const INSERT_CHUNK: usize = 16_384;
/// Files the writer gathers from the walk before it sorts and writes them (in transactions
/// of `INSERT_CHUNK`): with the batches in flight (`CHANNEL_BATCHES` of up to
/// `walk::SINK_BATCH` files), what bounds phase 1's memory at any number of files (~10 MB).
/// The walk hands files over roughly in path order (it enters folders in name order), and
/// sorted runs this long keep the path index's inserts near its end: written in the walk's
/// own order, they cost ~10% more CPU than the old walk-all, sort-all, insert-all.
const WRITE_BUFFER: usize = 1 << 16;
/// Batches in flight between the walk and the store.
const CHANNEL_BATCHES: usize = 16;

/// Rows probed between two store writes. Phase 2 holds at most three batches at once (one
/// being probed, one in the channel, one being written): its memory does not grow with the
/// dataset.
pub const PROBE_BATCH: usize = 8192;

/// The next rows of phase 2's queue. `status = 'pending'` is literal, so that SQLite walks the
/// partial index of pending rows (`samples_pending`) and never the dataset.
pub(crate) const PENDING_BATCH: &str =
    "SELECT id, job_id, root_id, path, size_bytes, mtime_ns FROM samples
     WHERE dataset_id = ?1 AND status = 'pending' AND id > ?2 ORDER BY id LIMIT ?3";

#[derive(Debug, Clone, Default)]
pub struct ScanSummary {
    pub job_id: i64,
    pub found: u64,
    /// New rows (`pending`, or `failed` for what the walk could not take).
    pub added: u64,
    /// Rows already there (`changed + unchanged`).
    pub existing: u64,
    /// Rows back to `pending`: their file changed, came back, or is readable again.
    pub changed: u64,
    /// Rows that became `missing` (their file is gone).
    pub removed: u64,
    /// Rows left as they were (not written).
    pub unchanged: u64,
    pub errors: Vec<String>,
}

pub use crate::pools::io_pool;

/// Absolute, canonical form of a folder the caller named; fails if it is not a folder. Any
/// bytes the file system allows are a name.
pub fn absolute_dir(path: impl AsRef<Path>) -> Result<PathBuf> {
    let p = path.as_ref();
    if p.as_os_str().is_empty() {
        return Err(Error::InvalidArgument("images path: empty".into()));
    }
    // The real path (links resolved) is the root's identity: the same folder reached through
    // a symlink is the same root, so nothing is added twice.
    let real = std::fs::canonicalize(p).map_err(|e| Error::io(p, e))?;
    let meta = std::fs::metadata(&real).map_err(|e| Error::io(&real, e))?;
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{}: not a folder",
            real.display()
        )));
    }
    Ok(real)
}

impl Store {
    /// Phase 1, and the sync of a folder indexed before: walk `root`, add a `pending` row for
    /// each new image file, put changed ones back to `pending` and mark the rows of deleted
    /// ones `missing` (see `sync.rs`). Returns once every row is committed.
    ///
    /// Memory stays bounded at any number of files: the walk streams its files through a
    /// bounded channel, and this thread sorts them in runs of `WRITE_BUFFER` and writes them
    /// in transactions of `INSERT_CHUNK`. A folder with rows is synced chunk by chunk (see
    /// `Store::sync_chunk`), then its rows the walk did not see are marked `missing` (only
    /// after a complete walk).
    pub fn scan(
        &mut self,
        dataset_id: i64,
        root: &Path,
        include_hidden: bool,
        follow_links: bool,
        stop: &AtomicBool,
    ) -> Result<ScanSummary> {
        // The job is there (and `in_progress`) while the walk runs; a walk or insert that
        // fails removes it again, so a bad root leaves nothing behind. Its `source` is a label
        // (the root's own row keeps the exact bytes).
        walk::check_root(root)?;
        let job_id = self.create_job(dataset_id, "images", &root.to_string_lossy())?;
        let opts = WalkOptions {
            include_hidden,
            follow_dir_links: follow_links,
            skip_dirs: Vec::new(),
        };
        match self.scan_job(dataset_id, job_id, root, &opts, stop) {
            Ok(s) => Ok(s),
            Err(e) => {
                let _ = self.drop_job(job_id);
                Err(e)
            }
        }
    }

    fn scan_job(
        &mut self,
        dataset_id: i64,
        job_id: i64,
        root: &Path,
        opts: &WalkOptions,
        stop: &AtomicBool,
    ) -> Result<ScanSummary> {
        let (root_id, prefix, nested) = self.root_for_path(dataset_id, root)?;
        // Files under other roots of this dataset are already there, under those roots.
        let nested: Vec<Vec<u8>> = nested
            .iter()
            .filter_map(|n| n.strip_prefix(root).ok())
            .map(|r| join_rel(r.as_os_str().as_bytes(), b""))
            .collect();
        let outside = |rel: &[u8]| !nested.iter().any(|n| rel.starts_with(n));
        // A folder with no rows yet is only inserted into; one indexed before is synced.
        let fresh = !self.has_rows_under(root_id, &prefix)?;
        let mut seen = Seen::upto(if fresh { 0 } else { self.max_sample_id()? });
        let mut s = ScanSummary {
            job_id,
            ..Default::default()
        };
        let mut counts = SyncCounts::default();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<FileEntry>>(CHANNEL_BATCHES);
        let tail = std::thread::scope(|scope| -> Result<walk::WalkTail> {
            let walker = scope.spawn(move || {
                let send = move |batch: Vec<FileEntry>| tx.send(batch).is_ok();
                walk::walk_into(root, opts, stop, &send)
            });
            let mut chunk: Vec<FileEntry> = Vec::new();
            let mut write = |buffer: &mut Vec<FileEntry>, this: &mut Store| -> Result<()> {
                buffer.sort_unstable_by(|a, b| a.rel_path.cmp(&b.rel_path));
                for chunk in buffer.chunks(INSERT_CHUNK) {
                    if stop.load(Ordering::Relaxed) {
                        return Err(Error::Cancelled);
                    }
                    counts += if fresh {
                        this.insert_chunk(dataset_id, job_id, root_id, &prefix, chunk)?
                    } else {
                        this.sync_chunk(dataset_id, job_id, root_id, &prefix, chunk, &mut seen)?
                    };
                }
                buffer.clear();
                Ok(())
            };
            let written: Result<()> = loop {
                let Ok(mut batch) = rx.recv() else {
                    break write(&mut chunk, self);
                };
                if !nested.is_empty() {
                    batch.retain(|f| outside(&f.rel_path));
                }
                s.found += batch.len() as u64;
                chunk.append(&mut batch);
                if chunk.len() >= WRITE_BUFFER {
                    if let Err(e) = write(&mut chunk, self) {
                        break Err(e);
                    }
                }
            };
            // The walk stops at its next batch once no one receives.
            drop(rx);
            let walked = walker
                .join()
                .unwrap_or_else(|_| Err(Error::InvalidArgument("walk panicked".into())));
            match (written, walked) {
                (Err(e), _) | (Ok(()), Err(e)) => Err(e),
                (Ok(()), Ok(tail)) => Ok(tail),
            }
        })?;
        let problems: Vec<Problem> = tail
            .problems
            .into_iter()
            .filter(|p| outside(&p.rel_path))
            .collect();
        s.found += problems.len() as u64;
        let (failed, known) =
            self.insert_problems(dataset_id, job_id, root_id, &prefix, &problems, &mut seen)?;
        counts.added += failed;
        counts.unchanged += known;
        if !fresh {
            // Only after a complete walk: a stopped one has not seen everything.
            let keep: Vec<Vec<u8>> = tail
                .unreadable_dirs
                .iter()
                .map(|d| join_rel(&prefix, d))
                .collect();
            counts.removed +=
                self.mark_unseen_missing(dataset_id, root_id, &prefix, &seen, &keep, stop)?;
        }
        s.added = counts.added;
        s.changed = counts.changed;
        s.unchanged = counts.unchanged;
        s.removed = counts.removed;
        s.existing = counts.changed + counts.unchanged;
        s.errors = tail.errors;
        self.finish_job(job_id, s.added, s.existing, &s.errors)?;
        Ok(s)
    }

    pub(crate) fn finish_job(
        &mut self,
        job_id: i64,
        added: u64,
        existing: u64,
        warnings: &[String],
    ) -> Result<()> {
        let warnings = serde_json::to_string(warnings).unwrap_or_else(|_| "[]".into());
        self.conn
            .execute(
                "UPDATE jobs SET added = ?2, existing = ?3, warnings = ?4, running_owner = NULL WHERE id = ?1",
                params![job_id, added as i64, existing as i64, warnings],
            )
            .store(&self.path)?;
        Ok(())
    }

    /// Insert files (sorted by path) in transactions of `INSERT_CHUNK` rows, as phase 1 does
    /// on a folder with no rows yet; a path already in the root is left as it is. Stops
    /// (`Cancelled`) between chunks once `stop` is set. Returns `(added, existing)`.
    pub fn insert_files(
        &mut self,
        dataset_id: i64,
        job_id: i64,
        root_id: i64,
        prefix: &[u8],
        files: &[FileEntry],
        stop: &AtomicBool,
    ) -> Result<(u64, u64)> {
        let mut added = 0;
        for chunk in files.chunks(INSERT_CHUNK) {
            if stop.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            added += self
                .insert_chunk(dataset_id, job_id, root_id, prefix, chunk)?
                .added;
        }
        Ok((added, files.len() as u64 - added))
    }

    /// Insert one sorted chunk of a walk (paths relative to the walked folder, which is
    /// `prefix` inside the root) in one transaction; a path already in the root is left as it
    /// is. Paths are stored byte for byte (see [`crate::paths`]).
    fn insert_chunk(
        &mut self,
        dataset_id: i64,
        job_id: i64,
        root_id: i64,
        prefix: &[u8],
        files: &[FileEntry],
    ) -> Result<SyncCounts> {
        if files.is_empty() {
            return Ok(SyncCounts::default());
        }
        let path = self.path.clone();
        let joined: Vec<Vec<u8>> = if prefix.is_empty() {
            Vec::new()
        } else {
            files
                .iter()
                .map(|f| join_rel(prefix, &f.rel_path))
                .collect()
        };
        let tx = self.immediate()?;
        let rows = files.iter().enumerate().map(|(i, f)| {
            let rel = if prefix.is_empty() {
                f.rel_path.as_slice()
            } else {
                joined[i].as_slice()
            };
            (rel, f.size, f.mtime_ns, None)
        });
        let added = insert_pending(&tx, dataset_id, job_id, root_id, rows).store(&path)?;
        tx.commit().store(&path)?;
        Ok(SyncCounts {
            added,
            unchanged: files.len() as u64 - added,
            ..Default::default()
        })
    }

    /// What the walk could not take becomes `failed` rows with the reason, in one
    /// transaction; a path already in the root is left as it is (and marked in `seen`).
    /// Returns `(added, existing)`.
    fn insert_problems(
        &mut self,
        dataset_id: i64,
        job_id: i64,
        root_id: i64,
        prefix: &[u8],
        problems: &[Problem],
        seen: &mut Seen,
    ) -> Result<(u64, u64)> {
        if problems.is_empty() {
            return Ok((0, 0));
        }
        let path = self.path.clone();
        let tx = self.immediate()?;
        let mut n = 0i64;
        {
            // What is there already stays as it is (and is not missing).
            for p in problems {
                if let Some(id) = crate::sync::row_id(&tx, root_id, &join_rel(prefix, &p.rel_path))
                    .store(&path)?
                {
                    seen.set(id);
                }
            }
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO samples (dataset_id, job_id, root_id, path, status, error)
                     VALUES (?1, ?2, ?3, ?4, 'failed', ?5) ON CONFLICT (root_id, path) DO NOTHING",
                )
                .store(&path)?;
            for p in problems {
                let rel = join_rel(prefix, &p.rel_path);
                n += st
                    .execute(params![
                        dataset_id,
                        job_id,
                        root_id,
                        SqlPath(&rel),
                        p.reason
                    ])
                    .store(&path)? as i64;
            }
        }
        bump(&tx, dataset_id, job_id, FAILED, n).store(&path)?;
        tx.commit().store(&path)?;
        Ok((n as u64, problems.len() as u64 - n as u64))
    }

    /// Up to `limit` pending rows of a dataset with id above `after`, in id order: O(limit)
    /// at any dataset size (the `samples_pending` index holds only the queue).
    pub fn pending_batch(&self, dataset_id: i64, after: i64, limit: usize) -> Result<Vec<Pending>> {
        let roots = self.root_dirs(dataset_id)?;
        let mut st = self.conn.prepare_cached(PENDING_BATCH).store(&self.path)?;
        let mut rows = st
            .query(params![dataset_id, after, limit as i64])
            .store(&self.path)?;
        let mut out = Vec::with_capacity(limit.min(65_536));
        while let Some(r) = rows.next().store(&self.path)? {
            let root_id: i64 = r.get(2).store(&self.path)?;
            let rel = r.get_ref(3).store(&self.path)?;
            let rel = path_bytes(rel)
                .map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(3, rel.data_type(), e.into())
                })
                .store(&self.path)?;
            let root = roots.get(&root_id).map_or(Path::new(""), PathBuf::as_path);
            out.push(Pending {
                id: r.get(0).store(&self.path)?,
                job_id: r.get(1).store(&self.path)?,
                path: root.join(walk::rel_as_path(rel)),
                stamp: (r.get(4).store(&self.path)?, r.get(5).store(&self.path)?),
            });
        }
        Ok(out)
    }

    /// Write probe results in one transaction. Only rows still `pending` change, so two
    /// probers racing on the same rows never count a row twice, and only while the row's
    /// size and mtime are those the batch was read with: a sync that found the file changed
    /// meanwhile (a rewrite under `watch`) wins, and the row is probed again. With `lease_owner`, the
    /// results are written only while no other owner holds the dataset's `probe` lease
    /// (checked, and renewed or taken if free, in the same transaction), else `LeaseLost` and
    /// nothing is written.
    pub fn record_probes(
        &mut self,
        dataset_id: i64,
        results: &[Probed],
        lease_owner: Option<&str>,
    ) -> Result<()> {
        self.record_probes_since(dataset_id, results, lease_owner, crate::db::now())
    }

    /// [`Store::record_probes`] for probing that began at `started` (the phase's rate is
    /// measured from then if it was idle before).
    fn record_probes_since(
        &mut self,
        dataset_id: i64,
        results: &[Probed],
        lease_owner: Option<&str>,
        started: f64,
    ) -> Result<()> {
        let path = self.path.clone();
        let tx = self.immediate()?;
        if let Some(owner) = lease_owner {
            hold_lease(&tx, &path, dataset_id, "probe", owner)?;
        }
        let mut indexed: HashMap<i64, i64> = HashMap::new();
        let mut failed: HashMap<i64, i64> = HashMap::new();
        let mut formats: HashMap<&'static str, i64> = HashMap::new();
        {
            let mut ok = tx
                .prepare_cached(
                    "UPDATE samples SET status = 'indexed', width = ?2, height = ?3, format = ?4,
                         orientation = ?5, error = NULL,
                         size_mismatch = (coco_width IS NOT NULL AND (coco_width != ?2 OR coco_height != ?3))
                     WHERE id = ?1 AND status = 'pending' AND size_bytes IS ?6 AND mtime_ns IS ?7",
                )
                .store(&path)?;
            let mut bad = tx
                .prepare_cached(
                    "UPDATE samples SET status = 'failed', error = ?2
                     WHERE id = ?1 AND status = 'pending' AND size_bytes IS ?3 AND mtime_ns IS ?4",
                )
                .store(&path)?;
            for p in results {
                let (changed, counter) = match &p.result {
                    Ok(i) => (
                        ok.execute(params![
                            p.id,
                            i.width,
                            i.height,
                            i.format.name(),
                            i.orientation,
                            p.stamp.0,
                            p.stamp.1
                        ])
                        .store(&path)?,
                        &mut indexed,
                    ),
                    Err(reason) => (
                        bad.execute(params![p.id, reason, p.stamp.0, p.stamp.1])
                            .store(&path)?,
                        &mut failed,
                    ),
                };
                if changed > 0 {
                    *counter.entry(p.job_id).or_default() += 1;
                    if let Ok(i) = &p.result {
                        *formats.entry(i.format.name()).or_default() += 1;
                    }
                }
            }
            // The format facet's counters (see schema::filters_sql): a pending row has no
            // format yet, so each row that changed adds one.
            let mut count = tx
                .prepare_cached(
                    "INSERT INTO format_counts (dataset_id, format, n) VALUES (?1, ?2, ?3)
                     ON CONFLICT (dataset_id, format) DO UPDATE SET n = n + excluded.n",
                )
                .store(&path)?;
            for (format, n) in &formats {
                count.execute(params![dataset_id, format, n]).store(&path)?;
            }
        }
        bump_moves(&tx, dataset_id, PENDING, INDEXED, &indexed).store(&path)?;
        bump_moves(&tx, dataset_id, PENDING, FAILED, &failed).store(&path)?;
        let moved = indexed.values().chain(failed.values()).sum();
        if moved > 0 {
            throughput::begin(&tx, dataset_id, throughput::PROBE, started).store(&path)?;
            throughput::record(&tx, dataset_id, throughput::PROBE, moved).store(&path)?;
        }
        tx.commit().store(&path)
    }

    /// Phase 2: probe every pending row of the dataset until none is left or `stop` is set.
    ///
    /// Reading the queue and probing happen on this thread and the I/O pool while a second
    /// connection writes the previous batch, so the store writes overlap the file reads.
    /// With `lease = Some((owner, ttl))` the `probe` lease is taken first and every batch is
    /// committed only while no other owner holds it (`LeaseLost` otherwise). The first error
    /// of either side (a full disk, a lost lease) ends the call promptly: the writer's failure
    /// stops the probing within a file or so, and no side waits on the other's channel.
    /// Returns the number of rows probed.
    pub fn probe_pending(
        &mut self,
        dataset_id: i64,
        stop: &AtomicBool,
        done: &AtomicU64,
        lease: Option<(&str, f64)>,
    ) -> Result<u64> {
        if let Some((owner, ttl)) = lease {
            if !self.acquire_lease(dataset_id, "probe", owner, ttl)? {
                return Err(Error::LeaseLost {
                    path: self.path.clone(),
                    dataset_id,
                    phase: "probe".into(),
                    owner: owner.into(),
                });
            }
        }
        let owner = lease.map(|(o, _)| o);
        let started = crate::db::now();
        let mut writer = Store::open(&self.path)?;
        // Set by the writer when it fails: the reader stops probing at once.
        let halt = AtomicBool::new(false);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Probed>>(1);
        std::thread::scope(|scope| {
            let halt = &halt;
            let write = scope.spawn(move || -> Result<u64> {
                let mut total = 0u64;
                for results in rx {
                    if let Err(e) = writer.record_probes_since(dataset_id, &results, owner, started)
                    {
                        halt.store(true, Ordering::Relaxed);
                        return Err(e); // drops `rx`: a send on the other side fails at once
                    }
                    total += results.len() as u64;
                    done.fetch_add(results.len() as u64, Ordering::Relaxed);
                }
                Ok(total)
            });
            let mut after = 0i64;
            let read: Result<()> = loop {
                if stop.load(Ordering::Relaxed) {
                    break Err(Error::Cancelled);
                }
                if halt.load(Ordering::Relaxed) {
                    break Ok(()); // the writer's result says why
                }
                let batch = match self.pending_batch(dataset_id, after, PROBE_BATCH) {
                    Ok(b) => b,
                    Err(e) => break Err(e),
                };
                let Some(last) = batch.last() else {
                    break Ok(());
                };
                after = last.id;
                // Object-store rows (s3://...) are read by `remote`, files by the I/O pool.
                let (probed, failed) =
                    match crate::remote::probe::probe_batch(&batch, &[stop, halt]) {
                        Ok(Some(p)) => p,
                        Ok(None) => continue, // stopped inside the batch: the checks above say why
                        Err(e) => break Err(e),
                    };
                if tx.send(probed).is_err() {
                    break Ok(()); // the writer stopped; its result says why
                }
                if let Some(e) = failed {
                    break Err(e); // what was probed is written first
                }
            };
            // Close the channel before joining: the writer ends when it has drained it.
            drop(tx);
            let written = write
                .join()
                .unwrap_or_else(|_| Err(Error::InvalidArgument("probe writer panicked".into())));
            // A store error outranks the cancel that followed it.
            let total = written?;
            read.map(|()| total)
        })
    }
}

/// A row waiting for phase 2.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: i64,
    pub job_id: i64,
    pub path: PathBuf,
    pub stamp: Stamp,
}

/// A row's `(size_bytes, mtime_ns)` when its batch was read; a probe result is written only
/// while the row still has it.
pub type Stamp = (Option<i64>, Option<i64>);

/// A probed row: its header, or the one-line reason it is not a readable image.
#[derive(Debug, Clone)]
pub struct Probed {
    pub id: i64,
    pub job_id: i64,
    pub stamp: Stamp,
    pub result: std::result::Result<ImageInfo, String>,
}

/// Probe files on the I/O pool; a file that is not a readable image gets its reason.
/// Returns `None` as soon as one of `stops` is set (a cold batch can take seconds: each file
/// checks first).
pub fn probe_files(batch: &[Pending], stops: &[&AtomicBool]) -> Option<Vec<Probed>> {
    let stopped = || stops.iter().any(|s| s.load(Ordering::Relaxed));
    io_pool().install(|| {
        batch
            .par_iter()
            .with_min_len(16)
            .map(|p| {
                if stopped() {
                    return None;
                }
                Some(Probed {
                    id: p.id,
                    job_id: p.job_id,
                    stamp: p.stamp,
                    result: header::probe_path(&p.path).map_err(|r| r.to_string()),
                })
            })
            .collect()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// SQLite's count of virtual-machine steps of `sql` run once with `args`: the work a
    /// statement did, whatever the machine's speed.
    pub(crate) fn vm_steps(s: &Store, sql: &str, args: impl rusqlite::Params) -> i32 {
        let mut st = s.conn.prepare(sql).unwrap();
        let mut rows = st.query(args).unwrap();
        while rows.next().unwrap().is_some() {}
        drop(rows);
        st.get_status(rusqlite::StatementStatus::VmStep)
    }

    /// A dataset of `n` rows already through phase 2, inserted directly.
    pub(crate) fn big_dataset(s: &mut Store, n: i64) -> (i64, i64, i64) {
        let d = s.create_dataset("big").unwrap();
        let job = s.create_job(d, "images", "/big").unwrap();
        s.conn
            .execute(
                "INSERT INTO roots (dataset_id, path) VALUES (?1, '/big')",
                [d],
            )
            .unwrap();
        let root = s.conn.last_insert_rowid();
        s.conn
            .execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?3)
                 INSERT INTO samples (dataset_id, job_id, root_id, path, status)
                 SELECT ?1, ?2, ?4, printf('d%04d/%07d.png', i / 1000, i), 'indexed' FROM n",
                params![d, job, n, root],
            )
            .unwrap();
        (d, job, root)
    }

    #[test]
    fn a_probe_batch_reads_only_the_queue() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let (d, job, root) = big_dataset(&mut s, 50_000);
        // ten new rows at the end, and two old ones put back in the queue (a changed file)
        for i in 0..10 {
            s.conn
                .execute(
                    "INSERT INTO samples (dataset_id, job_id, root_id, path) VALUES (?1, ?2, ?3, ?4)",
                    params![d, job, root, format!("new/{i}.png")],
                )
                .unwrap();
        }
        s.conn
            .execute(
                "UPDATE samples SET status = 'pending' WHERE id IN (7, 30000)",
                [],
            )
            .unwrap();
        let batch = s.pending_batch(d, 0, PROBE_BATCH).unwrap();
        assert_eq!(batch.len(), 12);
        assert_eq!((batch[0].id, batch[1].id), (7, 30_000));
        // the work: a few steps per row taken, not per row of the dataset
        let steps = vm_steps(&s, PENDING_BATCH, params![d, 0, PROBE_BATCH as i64]);
        assert!(steps < 400, "{steps} steps for 12 rows of 50,010");
        let plan: String = s
            .conn
            .query_row(
                &format!("EXPLAIN QUERY PLAN {PENDING_BATCH}"),
                params![d, 0, 1],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("samples_pending"), "{plan}");
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        v.extend(w.to_be_bytes());
        v.extend(h.to_be_bytes());
        v.extend([8, 2, 0, 0, 0]);
        v
    }

    #[test]
    fn an_add_in_flight_is_in_progress() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let d = s.create_dataset("d").unwrap();
        assert!(s.progress(d, None).unwrap().is_complete());
        let job = s.create_job(d, "images", "/x").unwrap();
        assert!(
            !s.progress(d, None).unwrap().is_complete(),
            "the walk is running"
        );
        s.finish_job(job, 0, 0, &[]).unwrap();
        assert!(s.progress(d, None).unwrap().is_complete());
        // a job left running by a process that died does not hold progress forever
        let dead = format!("{}:{}", crate::leases::local_host(), i32::MAX - 1);
        s.create_job(d, "images", "/y").unwrap();
        s.conn
            .execute(
                "UPDATE jobs SET running_owner = ?1 WHERE running_owner IS NOT NULL",
                [dead],
            )
            .unwrap();
        assert!(s.progress(d, None).unwrap().is_complete());
        // a walk that fails leaves no job behind
        let stop = AtomicBool::new(false);
        let jobs = |s: &Store| {
            s.conn
                .query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get::<_, i64>(0))
                .unwrap()
        };
        let before = jobs(&s);
        let gone = t.path().join("gone");
        std::fs::create_dir(&gone).unwrap();
        std::fs::remove_dir(&gone).unwrap();
        assert!(s.scan(d, &gone, false, false, &stop).is_err());
        assert_eq!(jobs(&s), before);
    }

    #[test]
    fn scan_probe_and_readd() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("imgs");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.png"), png(3, 4)).unwrap();
        std::fs::write(root.join("sub/b.png"), png(5, 6)).unwrap();
        std::fs::write(root.join("bad.jpg"), b"nope").unwrap();
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let d = s.create_dataset("d").unwrap();
        let stop = AtomicBool::new(false);
        let sum = s.scan(d, &root, false, false, &stop).unwrap();
        assert_eq!((sum.added, sum.existing), (3, 0));
        assert_eq!(s.progress(d, None).unwrap().count(PENDING), 3);
        let done = AtomicU64::new(0);
        assert_eq!(s.probe_pending(d, &stop, &done, None).unwrap(), 3);
        let p = s.progress(d, None).unwrap();
        assert_eq!(
            (p.count(INDEXED), p.count(FAILED), p.count(PENDING)),
            (2, 1, 0)
        );
        assert!(p.is_complete());
        let again = s.scan(d, &root, false, false, &stop).unwrap();
        assert_eq!((again.added, again.existing), (0, 3));
        let sub = s.scan(d, &root.join("sub"), false, false, &stop).unwrap();
        assert_eq!((sub.added, sub.existing), (0, 1));
        assert_eq!(s.progress(d, None).unwrap().total(), 3);
    }
    #[test]
    fn byte_names_round_trip_and_problems_once() {
        use std::ffi::OsStr;
        let t = tempfile::tempdir().unwrap();
        let raw = |b: &[u8]| PathBuf::from(OsStr::from_bytes(b));
        let root = t.path().join(raw(b"r\xe9"));
        let long = [b"x".repeat(251), b".png".to_vec()].concat();
        let names: [&[u8]; 4] = [b"caf\xe9.png", b"new\nline.png", &long, b"\xff/in.png"];
        for n in names {
            let p = root.join(raw(n));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, png(7, 9)).unwrap();
        }
        std::os::unix::fs::symlink(root.join("gone"), root.join(raw(b"gone\xe9.jpg"))).unwrap();
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let d = s.create_dataset("d").unwrap();
        let stop = AtomicBool::new(false);
        let abs = absolute_dir(&root).unwrap();
        let sum = s.scan(d, &abs, false, false, &stop).unwrap();
        assert_eq!((sum.found, sum.added, sum.existing), (5, 5, 0));
        let done = AtomicU64::new(0);
        assert_eq!(s.probe_pending(d, &stop, &done, None).unwrap(), 4);
        let rows = s.samples(d, &Default::default(), i64::MAX, 0).unwrap();
        let mut got: Vec<(Vec<u8>, &str, Option<i64>)> = rows
            .iter()
            .map(|r| {
                assert_eq!(r.root, abs);
                (
                    r.path.as_os_str().as_bytes().to_vec(),
                    r.status.as_str(),
                    r.width,
                )
            })
            .collect();
        got.sort();
        let mut want: Vec<(Vec<u8>, &str, Option<i64>)> = names
            .iter()
            .map(|n| (n.to_vec(), INDEXED, Some(7)))
            .collect();
        want.push((b"gone\xe9.jpg".to_vec(), FAILED, None));
        want.sort();
        assert_eq!(got, want);
        let failed = rows.iter().find(|r| r.status == FAILED).unwrap();
        assert_eq!(failed.error.as_deref(), Some("broken symbolic link"));
        // again, and from a folder inside the root (a prefix that is not UTF-8 either)
        let again = s.scan(d, &abs, false, false, &stop).unwrap();
        assert_eq!((again.added, again.existing), (0, 5));
        let sub = s
            .scan(d, &abs.join(raw(b"\xff")), false, false, &stop)
            .unwrap();
        assert_eq!((sub.added, sub.existing), (0, 1));
        let p = s.progress(d, None).unwrap();
        assert_eq!((p.total(), p.count(FAILED)), (5, 1));
        // the link fixed, an add takes the file: the same row, queued again
        let link = root.join(raw(b"gone\xe9.jpg"));
        std::fs::remove_file(&link).unwrap();
        std::fs::write(&link, png(2, 3)).unwrap();
        let fixed = s.scan(d, &abs, false, false, &stop).unwrap();
        assert_eq!((fixed.added, fixed.existing), (0, 5));
        assert_eq!(s.progress(d, None).unwrap().count(PENDING), 1);
        assert_eq!(s.probe_pending(d, &stop, &done, None).unwrap(), 1);
        let p = s.progress(d, None).unwrap();
        assert_eq!((p.total(), p.count(INDEXED), p.count(FAILED)), (5, 5, 0));
    }
}
