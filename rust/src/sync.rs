//! Sync: make a root's rows follow its folder. A file is compared with its row by size and
//! mtime (ns): a new file gets a `pending` row; a changed one (or one that was `missing` and
//! is back, or a walk failure that is now a file) goes back to `pending` with what phases 2
//! and 3 wrote about it dropped; a deleted one becomes `missing` (its annotations stay); an
//! unchanged one is not written at all.
//!
//! Two entry points: the full walk of a root (`Store::scan`, in scan.rs, which streams its
//! chunks through [`Store::sync_chunk`] and ends with [`Store::mark_unseen_missing`]), and
//! [`Store::sync_paths`] for a few paths a watcher saw change, in one short transaction.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::db::{bump, multi_row_insert, Store, FAILED, MISSING, PENDING};
use crate::error::{Error, Result, StoreContext};
use crate::paths::{join_rel, path_bytes, SqlPath};
use crate::walk::{self, FileEntry, WalkOptions};

/// Rows marked `missing` (or read while looking for them) per transaction.
const MISSING_BATCH: usize = 16_384;
/// Sample rows bound into one INSERT statement (7 values each).
const ROWS_PER_INSERT: usize = 128;

/// What a sync did, by row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncCounts {
    /// New rows (`pending`).
    pub added: u64,
    /// Rows back to `pending`: the file changed, came back, or is a file again.
    pub changed: u64,
    /// Rows that became `missing`.
    pub removed: u64,
    /// Rows left as they were (not written).
    pub unchanged: u64,
}

impl std::ops::AddAssign for SyncCounts {
    fn add_assign(&mut self, o: Self) {
        self.added += o.added;
        self.changed += o.changed;
        self.removed += o.removed;
        self.unchanged += o.unchanged;
    }
}

/// What the sync compares a row with: `(path in the root, size, mtime ns, ETag)`. An object
/// in a bucket has an ETag; a file has none.
pub(crate) type Entry = (Vec<u8>, u64, i64, Option<String>);

/// A sample row as the sync compares it with its file.
#[derive(Debug, Clone)]
struct Known {
    id: i64,
    job_id: i64,
    status: String,
    size: Option<i64>,
    mtime: Option<i64>,
    format: Option<String>,
    etag: Option<String>,
}

fn lookup(conn: &Connection, root_id: i64, rel: &[u8]) -> rusqlite::Result<Option<Known>> {
    conn.prepare_cached(
        "SELECT id, job_id, status, size_bytes, mtime_ns, format, etag FROM samples
         WHERE root_id = ?1 AND path = ?2",
    )?
    .query_row(params![root_id, SqlPath(rel)], known_row)
    .optional()
}

/// True when the row says nothing has to be done for this file: the same size, and the same
/// ETag where both have one (an object's last-modified says when it was uploaded, not
/// whether its bytes changed), else the same mtime.
fn unchanged(k: &Known, size: u64, mtime_ns: i64, etag: Option<&str>) -> bool {
    let same = match (etag, k.etag.as_deref()) {
        (Some(a), Some(b)) => a == b,
        _ => k.mtime == Some(mtime_ns),
    };
    k.status != MISSING && k.size == Some(size as i64) && same
}

/// Ids of the rows a sync saw on disk, for the pass that marks the others `missing`: one bit
/// per id up to the highest id when the sync began (rows added later are never unseen).
/// 10M rows take 1.25 MB.
pub struct Seen {
    max_id: i64,
    bits: Vec<u64>,
}

impl Seen {
    pub fn upto(max_id: i64) -> Seen {
        let max_id = max_id.max(0);
        Seen {
            max_id,
            bits: vec![0; (max_id as usize >> 6) + 1],
        }
    }
    pub(crate) fn set(&mut self, id: i64) {
        if (0..=self.max_id).contains(&id) {
            self.bits[id as usize >> 6] |= 1 << (id & 63);
        }
    }
    fn has(&self, id: i64) -> bool {
        !(0..=self.max_id).contains(&id) || self.bits[id as usize >> 6] & (1 << (id & 63)) != 0
    }
}

/// The id of the row of `rel` in a root, if there is one.
pub(crate) fn row_id(conn: &Connection, root_id: i64, rel: &[u8]) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT id FROM samples WHERE root_id = ?1 AND path = ?2")?
        .query_row(params![root_id, SqlPath(rel)], |r| r.get(0))
        .optional()
}

/// The counter moves of one transaction, applied at its end.
#[derive(Default)]
struct Tally {
    counts: SyncCounts,
    /// `(job, status) -> delta`.
    moves: HashMap<(i64, String), i64>,
    /// Rows that lost their format: the facet's counters go down.
    formats: HashMap<String, i64>,
}

impl Tally {
    fn moved(&mut self, (job, from): (i64, &str), (to_job, to): (i64, &str)) {
        if (job, from) != (to_job, to) {
            *self.moves.entry((job, from.to_string())).or_default() -= 1;
            *self.moves.entry((to_job, to.to_string())).or_default() += 1;
        }
    }

    fn apply(self, tx: &Transaction<'_>, dataset_id: i64) -> rusqlite::Result<SyncCounts> {
        for ((job, status), n) in &self.moves {
            bump(tx, dataset_id, *job, status, *n)?;
        }
        let mut st = tx.prepare_cached(
            "UPDATE format_counts SET n = n - ?3 WHERE dataset_id = ?1 AND format = ?2",
        )?;
        for (format, n) in &self.formats {
            st.execute(params![dataset_id, format, n])?;
        }
        Ok(self.counts)
    }
}

/// Back to `pending` with what phases 2 and 3 wrote dropped (a changed file is a new image),
/// in job `job` (the sync's, so that waiting for it waits for the row; `None`: its own).
/// Only if the row is still as `k` says (another writer may have moved it since it was read).
fn reset(
    tx: &Transaction<'_>,
    k: &Known,
    file: Option<(u64, i64, Option<&str>)>,
    job: Option<i64>,
    t: &mut Tally,
) -> rusqlite::Result<bool> {
    let job = job.unwrap_or(k.job_id);
    let n = tx
        .prepare_cached(
            "UPDATE samples SET status = 'pending', job_id = ?6, size_bytes = COALESCE(?3, size_bytes),
                 mtime_ns = COALESCE(?4, mtime_ns),
                 etag = CASE WHEN ?3 IS NULL THEN etag ELSE ?7 END, width = NULL, height = NULL, format = NULL,
                 orientation = NULL, error = NULL, size_mismatch = 0
             WHERE id = ?1 AND status = ?2 AND format IS ?5",
        )?
        .execute(params![
            k.id,
            k.status,
            file.map(|f| f.0 as i64),
            file.map(|f| f.1),
            k.format,
            job,
            file.and_then(|f| f.2)
        ])?;
    if n == 0 {
        return Ok(false);
    }
    // By (model, sample): one seek per model, not a scan of every vector.
    tx.prepare_cached(
        "DELETE FROM embeddings WHERE model_id IN (SELECT id FROM models) AND sample_id = ?1",
    )?
    .execute([k.id])?;
    if let Some(f) = &k.format {
        *t.formats.entry(f.clone()).or_default() += 1;
    }
    t.moved((k.job_id, &k.status), (job, PENDING));
    Ok(true)
}

fn mark_missing(tx: &Transaction<'_>, k: &Known, t: &mut Tally) -> rusqlite::Result<()> {
    if k.status == MISSING {
        return Ok(());
    }
    let n = tx
        .prepare_cached("UPDATE samples SET status = 'missing' WHERE id = ?1 AND status = ?2")?
        .execute(params![k.id, k.status])?;
    if n > 0 {
        t.moved((k.job_id, &k.status), (k.job_id, MISSING));
        t.counts.removed += 1;
    }
    Ok(())
}

/// Insert `pending` rows (`(path, size, mtime, ETag)`, paths relative to the root); a path already
/// there is left alone. Returns how many were added.
pub(crate) fn insert_pending<'a>(
    tx: &Transaction<'_>,
    dataset_id: i64,
    job_id: i64,
    root_id: i64,
    files: impl ExactSizeIterator<Item = (&'a [u8], u64, i64, Option<&'a str>)>,
) -> rusqlite::Result<u64> {
    let columns = [
        "dataset_id",
        "job_id",
        "root_id",
        "path",
        "size_bytes",
        "mtime_ns",
        "etag",
    ];
    let mut added = 0;
    let mut files = files.peekable();
    while files.peek().is_some() {
        let rows: Vec<(&[u8], u64, i64, Option<&str>)> =
            files.by_ref().take(ROWS_PER_INSERT).collect();
        let sql = multi_row_insert(
            "samples",
            &columns,
            rows.len(),
            "ON CONFLICT (root_id, path) DO NOTHING",
        );
        let mut st = tx.prepare_cached(&sql)?;
        // Bound by reference: no copy of the paths.
        let mut values: Vec<ToSqlOutput<'_>> = Vec::with_capacity(rows.len() * 7);
        for (rel, size, mtime, etag) in &rows {
            values.extend([
                ToSqlOutput::from(dataset_id),
                ToSqlOutput::from(job_id),
                ToSqlOutput::from(root_id),
                ToSqlOutput::Borrowed(SqlPath(rel).value()),
                ToSqlOutput::from(*size as i64),
                ToSqlOutput::from(*mtime),
                match etag {
                    Some(t) => ToSqlOutput::from(*t),
                    None => ToSqlOutput::Owned(rusqlite::types::Value::Null),
                },
            ]);
        }
        // ON CONFLICT DO NOTHING: `changes` counts only the rows really added.
        added += st.execute(rusqlite::params_from_iter(values))? as u64;
    }
    bump(tx, dataset_id, job_id, PENDING, added as i64)?;
    Ok(added)
}

/// Apply the sync rules to files seen on disk or objects listed (paths relative to the root)
/// inside `tx`, reading each row afresh. Marks every row it saw in `seen`.
fn apply_files(
    tx: &Transaction<'_>,
    dataset_id: i64,
    job_id: i64,
    root_id: i64,
    files: &[Entry],
    seen: &mut dyn FnMut(i64),
    t: &mut Tally,
) -> rusqlite::Result<()> {
    let mut new: Vec<usize> = Vec::new();
    for (i, (rel, size, mtime, etag)) in files.iter().enumerate() {
        match lookup(tx, root_id, rel)? {
            None => new.push(i),
            Some(k) => {
                seen(k.id);
                let file = (*size, *mtime, etag.as_deref());
                if unchanged(&k, file.0, file.1, file.2) {
                    t.counts.unchanged += 1;
                } else if reset(tx, &k, Some(file), Some(job_id), t)? {
                    t.counts.changed += 1;
                }
            }
        }
    }
    let rows = new.iter().map(|&i| {
        (
            files[i].0.as_slice(),
            files[i].1,
            files[i].2,
            files[i].3.as_deref(),
        )
    });
    t.counts.added += insert_pending(tx, dataset_id, job_id, root_id, rows)?;
    Ok(())
}

/// The rows of a root whose paths lie under `dir/` (`dir` empty: all of them; the row `dir`
/// itself is not one), in index order, at most `limit` after `after` (`None`: from the
/// start). TEXT paths sort before BLOB ones, so this is two ranges, one per storage class,
/// each contiguous from `dir/` on.
fn rows_under(
    conn: &Connection,
    root_id: i64,
    dir: &[u8],
    after: Option<(bool, &[u8])>,
    limit: usize,
) -> rusqlite::Result<Vec<(i64, bool, Vec<u8>)>> {
    let below = join_rel(dir, b"");
    let mut out = Vec::new();
    for blob in [false, true] {
        let (start, sql) = match after {
            Some((true, _)) if !blob => continue,
            Some((b, last)) if b == blob => (
                last,
                "SELECT id, path FROM samples WHERE root_id = ?1 AND path > ?2 ORDER BY path LIMIT ?3",
            ),
            _ => (
                below.as_slice(),
                "SELECT id, path FROM samples WHERE root_id = ?1 AND path >= ?2 ORDER BY path LIMIT ?3",
            ),
        };
        let start = if blob {
            ValueRef::Blob(start)
        } else {
            ValueRef::Text(start)
        };
        let mut st = conn.prepare_cached(sql)?;
        let mut rows = st.query(params![
            root_id,
            ToSqlOutput::Borrowed(start),
            (limit - out.len()) as i64
        ])?;
        while let Some(r) = rows.next()? {
            let v = r.get_ref(1)?;
            let p = path_bytes(v).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(1, v.data_type(), e.into())
            })?;
            if matches!(v, ValueRef::Blob(_)) != blob || !p.starts_with(&below) {
                break;
            }
            out.push((r.get(0)?, blob, p.to_vec()));
        }
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

impl Store {
    /// The sync of one sorted chunk of a walk (paths relative to the walked folder, which is
    /// `prefix` inside the root): see [`Store::sync_entries`].
    pub(crate) fn sync_chunk(
        &mut self,
        dataset_id: i64,
        job_id: i64,
        root_id: i64,
        prefix: &[u8],
        files: &[FileEntry],
        seen: &mut Seen,
    ) -> Result<SyncCounts> {
        let entries: Vec<Entry> = files
            .iter()
            .map(|f| (join_rel(prefix, &f.rel_path), f.size, f.mtime_ns, None))
            .collect();
        self.sync_entries(dataset_id, job_id, root_id, entries, seen)
    }

    /// The sync of entries sorted by path (in the root): files of a walk, or objects of a
    /// listing. Reads first with no transaction open; only rows to add or change are
    /// written, in one short transaction, each read again there. Every row it saw is marked
    /// in `seen`.
    pub(crate) fn sync_entries(
        &mut self,
        dataset_id: i64,
        job_id: i64,
        root_id: i64,
        entries: Vec<Entry>,
        seen: &mut Seen,
    ) -> Result<SyncCounts> {
        let path = self.path.clone();
        let mut counts = SyncCounts::default();
        let rels: Vec<&[u8]> = entries.iter().map(|e| e.0.as_slice()).collect();
        let known = known_in_order(&self.conn, root_id, &rels).store(&path)?;
        let mut todo: Vec<Entry> = Vec::new();
        for (e, k) in entries.into_iter().zip(known) {
            match k {
                Some(k) if unchanged(&k, e.1, e.2, e.3.as_deref()) => {
                    seen.set(k.id);
                    counts.unchanged += 1;
                }
                _ => todo.push(e),
            }
        }
        if todo.is_empty() {
            return Ok(counts);
        }
        let tx = self.immediate()?;
        let mut t = Tally::default();
        apply_files(
            &tx,
            dataset_id,
            job_id,
            root_id,
            &todo,
            &mut |id| seen.set(id),
            &mut t,
        )
        .store(&path)?;
        counts += t.apply(&tx, dataset_id).store(&path)?;
        tx.commit().store(&path)?;
        Ok(counts)
    }

    /// Whether a root has any row under `dir` (`dir` empty: any row at all).
    pub(crate) fn has_rows_under(&self, root_id: i64, dir: &[u8]) -> Result<bool> {
        Ok(!rows_under(&self.conn, root_id, dir, None, 1)
            .store(&self.path)?
            .is_empty())
    }

    /// The highest sample id so far (rows added after it are never "unseen").
    pub(crate) fn max_sample_id(&self) -> Result<i64> {
        self.conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM samples", [], |r| r.get(0))
            .store(&self.path)
    }

    /// After a complete walk of `dir` (relative to the root): every row under it the walk did
    /// not see becomes `missing`, except under `keep` (folders the walk could not read: their
    /// files may well be there). Reads a page of the root's index at a time with no
    /// transaction open, then marks that page's unseen rows in a short transaction.
    pub(crate) fn mark_unseen_missing(
        &mut self,
        dataset_id: i64,
        root_id: i64,
        dir: &[u8],
        seen: &Seen,
        keep: &[Vec<u8>],
        stop: &AtomicBool,
    ) -> Result<u64> {
        let path = self.path.clone();
        let kept = |p: &[u8]| {
            keep.iter()
                .any(|k| p == k.as_slice() || p.starts_with(&join_rel(k, b"")))
        };
        let mut removed = 0;
        let mut after: Option<(bool, Vec<u8>)> = None;
        loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let page = rows_under(
                &self.conn,
                root_id,
                dir,
                after.as_ref().map(|(b, p)| (*b, p.as_slice())),
                MISSING_BATCH,
            )
            .store(&path)?;
            let Some(last) = page.last() else { break };
            after = Some((last.1, last.2.clone()));
            let unseen: Vec<i64> = page
                .iter()
                .filter(|(id, _, p)| !seen.has(*id) && !kept(p))
                .map(|(id, _, _)| *id)
                .collect();
            if !unseen.is_empty() {
                removed += self.mark_ids_missing(dataset_id, &unseen)?;
            }
            if page.len() < MISSING_BATCH {
                break;
            }
        }
        Ok(removed)
    }

    fn mark_ids_missing(&mut self, dataset_id: i64, ids: &[i64]) -> Result<u64> {
        let path = self.path.clone();
        let tx = self.immediate()?;
        let mut t = Tally::default();
        for &id in ids {
            if let Some(k) = known_by_id(&tx, id).store(&path)? {
                mark_missing(&tx, &k, &mut t).store(&path)?;
            }
        }
        let counts = t.apply(&tx, dataset_id).store(&path)?;
        tx.commit().store(&path)?;
        Ok(counts.removed)
    }

    /// Sync the given paths (relative to `root`, a root of the dataset or a folder inside one)
    /// with what is on disk now, in one transaction: an image file is added, reset or left
    /// alone; a path that is gone takes its row, and every row under it, to `missing`; a
    /// folder is walked and its subtree synced. New rows go to `job_id`. Names the walk would
    /// skip (hidden ones unless `include_hidden`, files that are not images) are ignored.
    /// Fails only when `root` itself is not a readable folder.
    pub fn sync_paths(
        &mut self,
        dataset_id: i64,
        job_id: i64,
        root: &Path,
        rel_paths: &[Vec<u8>],
        opts: &WalkOptions,
        stop: &AtomicBool,
    ) -> Result<SyncCounts> {
        walk::check_root(root)?;
        let (root_id, prefix, nested) = self.root_for_path(dataset_id, root)?;
        let nested: Vec<Vec<u8>> = nested
            .iter()
            .filter_map(|n| n.strip_prefix(root).ok())
            .map(|r| r.as_os_str().as_bytes().to_vec())
            .collect();
        let under_nested = |rel: &[u8]| {
            nested
                .iter()
                .any(|n| rel == n.as_slice() || rel.starts_with(&join_rel(n, b"")))
        };
        // Look at the disk first, with no transaction open.
        let mut files: Vec<(Vec<u8>, u64, i64)> = Vec::new();
        let mut gone: Vec<Vec<u8>> = Vec::new();
        // Folders walked: `(path in the root, what the walk found under it)`.
        let mut walked: Vec<(Vec<u8>, Vec<Vec<u8>>)> = Vec::new();
        let mut problems: Vec<(Vec<u8>, String)> = Vec::new();
        let mut seen_paths: HashSet<Vec<u8>> = HashSet::new();
        for rel in rel_paths {
            let rel = normalized(rel)?;
            if rel.is_empty() || under_nested(&rel) || !seen_paths.insert(rel.clone()) {
                if rel.is_empty() {
                    walked.push((Vec::new(), Vec::new()));
                }
                continue;
            }
            let hidden = rel.split(|&b| b == b'/').any(|c| c.first() == Some(&b'.'));
            if hidden && !opts.include_hidden {
                continue;
            }
            let abs = root.join(walk::rel_as_path(&rel));
            match fs::symlink_metadata(&abs) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => gone.push(rel),
                Err(_) => {} // unreadable now: what is known of it stays as it is
                Ok(m) if m.is_dir() => walked.push((rel, Vec::new())),
                Ok(m) => {
                    let name = rel.rsplit(|&b| b == b'/').next().unwrap_or(&rel);
                    if !walk::is_image_name(name) {
                        continue;
                    }
                    let m = if m.file_type().is_symlink() {
                        match fs::metadata(&abs) {
                            Ok(t) if t.is_file() => t,
                            Ok(_) => continue,
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                                problems.push((rel, "broken symbolic link".into()));
                                continue;
                            }
                            Err(e) => {
                                problems.push((rel, walk::io_reason(&e)));
                                continue;
                            }
                        }
                    } else if m.is_file() {
                        m
                    } else {
                        continue;
                    };
                    files.push((rel, m.len(), walk::mtime_ns(&m)));
                }
            }
        }
        // A folder given (or the root itself, as ""): walk it whole.
        let mut keep: Vec<Vec<u8>> = Vec::new();
        for (dir, found) in &mut walked {
            let abs = root.join(walk::rel_as_path(dir));
            let report = match walk::walk(&abs, opts, stop) {
                Ok(r) => r,
                Err(Error::Cancelled) => return Err(Error::Cancelled),
                // Gone (or no folder any more) since it was looked at: as if deleted.
                Err(_) if fs::symlink_metadata(&abs).is_err() => {
                    gone.push(dir.clone());
                    continue;
                }
                Err(e) if dir.is_empty() => return Err(e),
                Err(_) => continue,
            };
            for f in report.files {
                let rel = join_rel(dir, &f.rel_path);
                if !under_nested(&rel) {
                    found.push(rel.clone());
                    files.push((rel, f.size, f.mtime_ns));
                }
            }
            for p in report.problems {
                let rel = join_rel(dir, &p.rel_path);
                if !under_nested(&rel) {
                    found.push(rel.clone());
                    problems.push((rel, p.reason));
                }
            }
            keep.extend(
                report
                    .unreadable_dirs
                    .iter()
                    .map(|d| join_rel(&prefix, &join_rel(dir, d))),
            );
        }
        // The store: one short transaction.
        let path = self.path.clone();
        let in_root = |rel: &[u8]| join_rel(&prefix, rel);
        let files: Vec<Entry> = files
            .into_iter()
            .map(|(rel, s, m)| (in_root(&rel), s, m, None))
            .collect();
        let problems: Vec<(Vec<u8>, String)> = problems
            .into_iter()
            .map(|(rel, why)| (in_root(&rel), why))
            .collect();
        // What is on disk now, by path in the root: the rest under a walked folder is gone.
        let on_disk: HashSet<&[u8]> = files
            .iter()
            .map(|f| f.0.as_slice())
            .chain(problems.iter().map(|p| p.0.as_slice()))
            .collect();
        let tx = self.immediate()?;
        let mut t = Tally::default();
        apply_files(
            &tx,
            dataset_id,
            job_id,
            root_id,
            &files,
            &mut |_| {},
            &mut t,
        )
        .store(&path)?;
        let mut failed = 0;
        for (rel, reason) in &problems {
            match row_id(&tx, root_id, rel).store(&path)? {
                Some(_) => t.counts.unchanged += 1,
                None => {
                    failed += tx
                        .prepare_cached(
                            "INSERT INTO samples (dataset_id, job_id, root_id, path, status, error)
                             VALUES (?1, ?2, ?3, ?4, 'failed', ?5) ON CONFLICT (root_id, path) DO NOTHING",
                        )
                        .store(&path)?
                        .execute(params![dataset_id, job_id, root_id, SqlPath(rel), reason])
                        .store(&path)? as i64;
                }
            }
        }
        bump(&tx, dataset_id, job_id, FAILED, failed).store(&path)?;
        t.counts.added += failed as u64;
        // Gone, or walked: rows under them that are not on disk now are missing.
        let walked_dirs = walked.iter().map(|(d, _)| d);
        for dir in gone.iter().chain(walked_dirs) {
            let dir = in_root(dir);
            // The path itself (a file deleted, or a file that is a folder now).
            if !dir.is_empty() && !on_disk.contains(dir.as_slice()) {
                if let Some(k) = lookup(&tx, root_id, &dir).store(&path)? {
                    mark_missing(&tx, &k, &mut t).store(&path)?;
                }
            }
            let mut after: Option<(bool, Vec<u8>)> = None;
            loop {
                let page = rows_under(
                    &tx,
                    root_id,
                    &dir,
                    after.as_ref().map(|(b, p)| (*b, p.as_slice())),
                    MISSING_BATCH,
                )
                .store(&path)?;
                let Some(last) = page.last() else { break };
                after = Some((last.1, last.2.clone()));
                for (id, _, p) in &page {
                    let kept = keep
                        .iter()
                        .any(|k| p == k || p.starts_with(&join_rel(k, b"")));
                    if on_disk.contains(p.as_slice()) || kept {
                        continue;
                    }
                    if let Some(k) = known_by_id(&tx, *id).store(&path)? {
                        mark_missing(&tx, &k, &mut t).store(&path)?;
                    }
                }
                if page.len() < MISSING_BATCH {
                    break;
                }
            }
        }
        let counts = t.apply(&tx, dataset_id).store(&path)?;
        tx.commit().store(&path)?;
        Ok(counts)
    }

    /// The job the rows a watcher adds under `root` belong to: one per dataset and folder,
    /// made on first use, never marked as adding (a watch has no end to wait for).
    pub fn watch_job(&mut self, dataset_id: i64, root: &Path) -> Result<i64> {
        let source = root.to_string_lossy();
        let found: Option<i64> = self
            .conn
            .query_row(
                "SELECT id FROM jobs WHERE dataset_id = ?1 AND kind = 'watch' AND source = ?2
                 ORDER BY id LIMIT 1",
                params![dataset_id, source],
                |r| r.get(0),
            )
            .optional()
            .store(&self.path)?;
        if let Some(id) = found {
            return Ok(id);
        }
        self.conn
            .execute(
                "INSERT INTO jobs (dataset_id, kind, source, created_at) VALUES (?1, 'watch', ?2, ?3)",
                params![dataset_id, source, crate::db::now()],
            )
            .store(&self.path)?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Failed rows of a dataset back to `pending` (their files may be fixed now), with what
    /// phases 2 and 3 wrote dropped, in transactions of `MISSING_BATCH` rows. Returns how many.
    pub fn retry_failed(&mut self, dataset_id: i64) -> Result<u64> {
        let path = self.path.clone();
        let mut total = 0;
        let mut after = 0i64;
        loop {
            let tx = self.immediate()?;
            let rows: Vec<Known> = {
                let mut st = tx
                    .prepare_cached(
                        "SELECT id, job_id, status, size_bytes, mtime_ns, format, etag FROM samples
                         WHERE dataset_id = ?1 AND status = 'failed' AND id > ?2 ORDER BY id LIMIT ?3",
                    )
                    .store(&path)?;
                let rows = st
                    .query_map(params![dataset_id, after, MISSING_BATCH as i64], known_row)
                    .store(&path)?;
                rows.collect::<rusqlite::Result<_>>().store(&path)?
            };
            let Some(last) = rows.last() else { break };
            after = last.id;
            let mut t = Tally::default();
            for k in &rows {
                if reset(&tx, k, None, None, &mut t).store(&path)? {
                    t.counts.changed += 1;
                }
            }
            total += t.apply(&tx, dataset_id).store(&path)?.changed;
            tx.commit().store(&path)?;
            if rows.len() < MISSING_BATCH {
                break;
            }
        }
        Ok(total)
    }
}

/// The rows of `rels` (sorted by bytes), in their order: one pass of the path index over the
/// range they span per storage class (TEXT paths sort before BLOB ones), merged with them, in
/// place of a lookup each. A range that holds many more rows than asked for (files of the
/// chunk far apart in the tree) is looked up path by path instead.
fn known_in_order(
    conn: &Connection,
    root_id: i64,
    rels: &[&[u8]],
) -> rusqlite::Result<Vec<Option<Known>>> {
    let mut out: Vec<Option<Known>> = vec![None; rels.len()];
    for blob in [false, true] {
        let mine: Vec<usize> = (0..rels.len())
            .filter(|&i| std::str::from_utf8(rels[i]).is_err() == blob)
            .collect();
        let (Some(&first), Some(&last)) = (mine.first(), mine.last()) else {
            continue;
        };
        fn bound(blob: bool, b: &[u8]) -> ToSqlOutput<'_> {
            ToSqlOutput::Borrowed(if blob {
                ValueRef::Blob(b)
            } else {
                ValueRef::Text(b)
            })
        }
        let limit = 2 * mine.len() + 64;
        let mut rows: Vec<(Vec<u8>, Known)> = Vec::with_capacity(mine.len());
        {
            let mut st = conn.prepare_cached(
                "SELECT id, job_id, status, size_bytes, mtime_ns, format, etag, path FROM samples
                 WHERE root_id = ?1 AND path >= ?2 AND path <= ?3 ORDER BY path LIMIT ?4",
            )?;
            let mut q = st.query(params![
                root_id,
                bound(blob, rels[first]),
                bound(blob, rels[last]),
                limit as i64
            ])?;
            while let Some(r) = q.next()? {
                let v = r.get_ref(7)?;
                let p = path_bytes(v).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(7, v.data_type(), e.into())
                })?;
                rows.push((p.to_vec(), known_row(r)?));
            }
        }
        if rows.len() >= limit {
            for &i in &mine {
                out[i] = lookup(conn, root_id, rels[i])?;
            }
            continue;
        }
        let mut rows = rows.into_iter().peekable();
        for &i in &mine {
            while rows.next_if(|(p, _)| p.as_slice() < rels[i]).is_some() {}
            if let Some((_, k)) = rows.next_if(|(p, _)| p.as_slice() == rels[i]) {
                out[i] = Some(k);
            }
        }
    }
    Ok(out)
}

fn known_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Known> {
    Ok(Known {
        id: r.get(0)?,
        job_id: r.get(1)?,
        status: r.get(2)?,
        size: r.get(3)?,
        mtime: r.get(4)?,
        format: r.get(5)?,
        etag: r.get(6)?,
    })
}

fn known_by_id(conn: &Connection, id: i64) -> rusqlite::Result<Option<Known>> {
    conn.prepare_cached(
        "SELECT id, job_id, status, size_bytes, mtime_ns, format, etag FROM samples WHERE id = ?1",
    )?
    .query_row([id], known_row)
    .optional()
}

/// A relative path as given (`a//b/`, `./a`): `/`-joined components, no `.`; `..` or an
/// absolute path is refused.
fn normalized(rel: &[u8]) -> Result<Vec<u8>> {
    let mut out: Vec<u8> = Vec::with_capacity(rel.len());
    if rel.first() == Some(&b'/') {
        return Err(Error::InvalidArgument(format!(
            "{}: not a path relative to the folder",
            String::from_utf8_lossy(rel)
        )));
    }
    for c in rel.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(Error::InvalidArgument(format!(
                    "{}: leads out of the folder",
                    String::from_utf8_lossy(rel)
                )))
            }
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        v.extend(w.to_be_bytes());
        v.extend(h.to_be_bytes());
        v.extend([8, 2, 0, 0, 0]);
        v
    }

    fn put(root: &Path, rel: &[u8], data: &[u8]) {
        let p = root.join(walk::rel_as_path(rel));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }

    /// `(path, status)` of every row, sorted, and a check that the counters agree.
    fn state(s: &Store, d: i64) -> Vec<(Vec<u8>, String)> {
        let rows = s.samples(d, &Default::default(), i64::MAX, 0).unwrap();
        let p = s.progress(d, None).unwrap();
        for st in crate::db::STATUSES {
            let n = rows.iter().filter(|r| r.status == st).count() as i64;
            assert_eq!(p.count(st), n, "counter of {st}");
        }
        let mut out: Vec<_> = rows
            .into_iter()
            .map(|r| (r.path.as_os_str().as_bytes().to_vec(), r.status))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn rows_under_a_folder_in_both_storage_classes() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("r");
        // `a-z` and `a.png` sort between `a` and `a/...`; `a\xff/x` is a BLOB after every TEXT
        for rel in [
            &b"a/1.png"[..],
            b"a/2/3.png",
            b"a-z/4.png",
            b"a.png",
            b"a/\xe9.png",
            b"a\xff/x.png",
            b"b.png",
        ] {
            put(&root, rel, &png(1, 1));
        }
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let d = s.create_dataset("d").unwrap();
        let stop = AtomicBool::new(false);
        let root = crate::scan::absolute_dir(&root).unwrap();
        s.scan(d, &root, false, false, &stop).unwrap();
        let (root_id, _, _) = s.root_for_path(d, &root).unwrap();
        let under = |dir: &[u8], limit: usize| {
            let mut out = Vec::new();
            let mut after: Option<(bool, Vec<u8>)> = None;
            loop {
                let page = rows_under(
                    &s.conn,
                    root_id,
                    dir,
                    after.as_ref().map(|(b, p)| (*b, p.as_slice())),
                    limit,
                )
                .unwrap();
                let Some(last) = page.last() else { break };
                after = Some((last.1, last.2.clone()));
                out.extend(page.into_iter().map(|(_, _, p)| p));
            }
            out
        };
        for limit in [1, 2, 100] {
            assert_eq!(
                under(b"a", limit),
                [&b"a/1.png"[..], b"a/2/3.png", b"a/\xe9.png"],
                "{limit}"
            );
            assert_eq!(under(b"", limit).len(), 7);
            assert_eq!(under(b"a\xff", limit), [&b"a\xff/x.png"[..]]);
        }
    }

    #[test]
    fn sync_paths_and_retry_keep_the_counters() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("r");
        put(&root, b"a.png", &png(1, 1));
        put(&root, b"dir/b.png", &png(2, 2));
        put(&root, b"dir/c/d.png", &png(3, 3));
        put(&root, b"bad.png", b"nope");
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let d = s.create_dataset("d").unwrap();
        let stop = AtomicBool::new(false);
        let done = AtomicU64::new(0);
        let root = crate::scan::absolute_dir(&root).unwrap();
        s.scan(d, &root, false, false, &stop).unwrap();
        s.probe_pending(d, &stop, &done, None).unwrap();
        let job = s.watch_job(d, &root).unwrap();
        assert_eq!(s.watch_job(d, &root).unwrap(), job);
        let opts = WalkOptions::default();
        fs::remove_dir_all(root.join("dir")).unwrap();
        put(&root, b"a.png", &png(5, 5));
        put(&root, b"new/e.png", &png(4, 4));
        let paths: Vec<Vec<u8>> = vec![b"dir".to_vec(), b"./a.png".to_vec(), b"new".to_vec()];
        let c = s.sync_paths(d, job, &root, &paths, &opts, &stop).unwrap();
        assert_eq!(
            c,
            SyncCounts {
                added: 1,
                changed: 1,
                removed: 2,
                unchanged: 0
            }
        );
        let st = state(&s, d);
        let status = |p: &[u8]| st.iter().find(|(q, _)| q == p).unwrap().1.clone();
        assert_eq!(status(b"dir/c/d.png"), MISSING);
        assert_eq!(status(b"a.png"), PENDING);
        assert_eq!(status(b"bad.png"), FAILED);
        // again: nothing to do
        let c = s.sync_paths(d, job, &root, &paths, &opts, &stop).unwrap();
        assert_eq!((c.added, c.changed, c.removed, c.unchanged), (0, 0, 0, 2));
        assert_eq!(s.retry_failed(d).unwrap(), 1);
        assert_eq!(status_of(&state(&s, d), b"bad.png"), PENDING);
        assert!(matches!(
            s.sync_paths(d, job, &root, &[b"../x".to_vec()], &opts, &stop),
            Err(Error::InvalidArgument(_))
        ));
    }

    fn status_of(st: &[(Vec<u8>, String)], p: &[u8]) -> String {
        st.iter().find(|(q, _)| q == p).unwrap().1.clone()
    }

    #[test]
    fn an_object_is_compared_by_etag_and_size_a_file_by_mtime_and_size() {
        let k = Known {
            id: 1,
            job_id: 1,
            status: "indexed".into(),
            size: Some(10),
            mtime: Some(5),
            format: None,
            etag: Some("\"a\"".into()),
        };
        // a new last-modified with the same bytes is no change; new bytes of the same size are
        assert!(unchanged(&k, 10, 99, Some("\"a\"")));
        assert!(!unchanged(&k, 10, 5, Some("\"b\"")));
        assert!(!unchanged(&k, 11, 5, Some("\"a\"")));
        let file = Known {
            etag: None,
            ..k.clone()
        };
        assert!(unchanged(&file, 10, 5, None) && !unchanged(&file, 10, 6, None));
        let gone = Known {
            status: MISSING.into(),
            ..k
        };
        assert!(!unchanged(&gone, 10, 5, Some("\"a\"")));
    }

    #[test]
    fn seen_counts_rows_after_its_snapshot_as_seen() {
        let mut seen = Seen::upto(100);
        seen.set(3);
        assert!(seen.has(3) && !seen.has(4) && !seen.has(100));
        assert!(seen.has(101) && seen.has(1 << 40));
        assert_eq!(normalized(b"./a//b/").unwrap(), b"a/b");
        assert!(normalized(b"/a").is_err() && normalized(b"a/../b").is_err());
    }
}
