//! The store: one SQLite file that holds datasets, samples, annotations and embeddings, and is
//! the work queue. This module owns the schema (its text is in `schema`, opening and migrating
//! in `open`, the leases in `leases`); every write goes through `Store`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::error::{Error, Result, StoreContext};
use crate::schema::JOB_TTL;

pub use crate::leases::local_host;
pub use crate::schema::SCHEMA_VERSION;

/// The status column's values, in pipeline order. Python reads these from `_core.STATUSES`.
/// `missing`: the file is gone from its folder (found by a sync); the row keeps its
/// annotations, and goes back to `pending` if the file comes back.
pub const STATUSES: [&str; 6] = [PENDING, INDEXED, EMBEDDING, READY, FAILED, MISSING];
pub const PENDING: &str = "pending";
pub const INDEXED: &str = "indexed";
pub const EMBEDDING: &str = "embedding";
pub const READY: &str = "ready";
pub const FAILED: &str = "failed";
pub const MISSING: &str = "missing";

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Counts of one dataset or one job, by status, plus whether work is still owed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub dataset_id: i64,
    pub counts: [i64; 6],
    /// The dataset wants embeddings (an embedding model was asked for).
    pub embed_wanted: bool,
    /// `(phase, message)` for each phase that stopped on an error.
    pub errors: Vec<(String, String)>,
    /// An add (a walk, a COCO ingest) is still inserting rows somewhere.
    pub adding: bool,
    /// `(phase, rows/s, seconds since its last commit)` of each phase with a rate over its
    /// recent commits (`throughput`).
    pub rates: Vec<(String, f64, f64)>,
}

impl Progress {
    pub fn total(&self) -> i64 {
        self.counts.iter().sum()
    }
    pub fn count(&self, status: &str) -> i64 {
        STATUSES
            .iter()
            .position(|s| *s == status)
            .map_or(0, |i| self.counts[i])
    }
    /// `complete` once no row waits for a phase that can still run.
    pub fn is_complete(&self) -> bool {
        let embed_blocked = self.errors.iter().any(|(p, _)| p == "embed");
        let waiting_embed = self.embed_wanted && !embed_blocked && self.count(INDEXED) > 0;
        !self.adding && self.count(PENDING) == 0 && self.count(EMBEDDING) == 0 && !waiting_embed
    }
}

/// `(dataset_id, kind, source, added, existing, warnings as JSON)`.
pub type JobRow = (i64, String, String, i64, i64, String);

#[derive(Debug, Clone)]
pub struct DatasetRow {
    pub id: i64,
    pub name: String,
    pub created_at: f64,
    pub embed_spec: Option<String>,
}

#[derive(Debug)]
pub struct Store {
    pub path: String,
    pub(crate) conn: Connection,
    job_owner: String,
}

impl Store {
    /// A store on an opened connection; `open` (in `open.rs`) recognises the file first.
    pub(crate) fn from_connection(path: &str, conn: Connection) -> Store {
        static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
        let n = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        Store {
            path: path.to_string(),
            conn,
            job_owner: format!("{}:{}:{n}", crate::leases::local_host(), std::process::id()),
        }
    }

    /// The name this connection writes into the jobs it is adding rows for (`host:pid:n`):
    /// renew them with `renew_jobs`.
    pub fn job_owner(&self) -> &str {
        &self.job_owner
    }

    pub(crate) fn immediate(&mut self) -> Result<Transaction<'_>> {
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .store(&self.path)
    }

    pub fn create_dataset(&mut self, name: &str) -> Result<i64> {
        let name = checked_name(name)?;
        let path = self.path.clone();
        let tx = self.immediate()?;
        if dataset_id_of(&tx, name).store(&path)?.is_some() {
            return Err(Error::DatasetExists(name.to_string(), path));
        }
        let id = insert_dataset(&tx, name).store(&path)?;
        tx.commit().store(&path)?;
        Ok(id)
    }

    /// The id of the dataset named `name`, created if there is none, in one transaction: of
    /// several processes asking at once, one creates it and the others find it. Returns
    /// `(id, created)`.
    pub fn find_or_create_dataset(&mut self, name: &str) -> Result<(i64, bool)> {
        let name = checked_name(name)?;
        let path = self.path.clone();
        let tx = self.immediate()?;
        if let Some(id) = dataset_id_of(&tx, name).store(&path)? {
            return Ok((id, false));
        }
        let id = insert_dataset(&tx, name).store(&path)?;
        tx.commit().store(&path)?;
        Ok((id, true))
    }

    pub fn find_dataset(&self, name: &str) -> Result<Option<DatasetRow>> {
        self.conn
            .query_row(
                "SELECT id, name, created_at, embed_spec FROM datasets WHERE name = ?1",
                [name],
                dataset_row,
            )
            .optional()
            .store(&self.path)
    }

    pub fn dataset(&self, id: i64) -> Result<Option<DatasetRow>> {
        self.conn
            .query_row(
                "SELECT id, name, created_at, embed_spec FROM datasets WHERE id = ?1",
                [id],
                dataset_row,
            )
            .optional()
            .store(&self.path)
    }

    pub fn list_datasets(&self) -> Result<Vec<DatasetRow>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id, name, created_at, embed_spec FROM datasets ORDER BY id")
            .store(&self.path)?;
        let rows = st.query_map([], dataset_row).store(&self.path)?;
        rows.collect::<std::result::Result<_, _>>()
            .store(&self.path)
    }

    /// Remove a dataset and everything that belongs to it (samples, boxes, embeddings,
    /// counters) in one transaction. Files on disk are never touched.
    pub fn delete_dataset(&mut self, dataset_id: i64) -> Result<()> {
        let path = self.path.clone();
        let tx = self.immediate()?;
        tx.execute_batch(&format!(
            "DELETE FROM annotations WHERE sample_id IN (SELECT id FROM samples WHERE dataset_id = {dataset_id});
             DELETE FROM embeddings WHERE sample_id IN (SELECT id FROM samples WHERE dataset_id = {dataset_id});
             DELETE FROM coco_missing WHERE job_id IN (SELECT id FROM jobs WHERE dataset_id = {dataset_id});
             DELETE FROM samples WHERE dataset_id = {dataset_id};
             DELETE FROM counts WHERE dataset_id = {dataset_id};
             DELETE FROM jobs WHERE dataset_id = {dataset_id};
             DELETE FROM roots WHERE dataset_id = {dataset_id};
             DELETE FROM coco_files WHERE dataset_id = {dataset_id};
             DELETE FROM category_counts WHERE category_id IN (SELECT id FROM categories WHERE dataset_id = {dataset_id});
             DELETE FROM format_counts WHERE dataset_id = {dataset_id};
             DELETE FROM categories WHERE dataset_id = {dataset_id};
             DELETE FROM phase_errors WHERE dataset_id = {dataset_id};
             DELETE FROM leases WHERE dataset_id = {dataset_id};
             DELETE FROM throughput WHERE dataset_id = {dataset_id};
             DELETE FROM datasets WHERE id = {dataset_id};"
        ))
        .store(&path)?;
        tx.commit().store(&path)
    }

    /// A new job, marked as running on this connection until `finish_job` (or `drop_job`),
    /// so progress read elsewhere says `in_progress` while its rows are still being added.
    /// The mark lives `JOB_TTL` seconds unless renewed (`renew_jobs`).
    pub fn create_job(&mut self, dataset_id: i64, kind: &str, source: &str) -> Result<i64> {
        let t = now();
        self.conn
            .execute(
                "INSERT INTO jobs (dataset_id, kind, source, created_at, running_owner, heartbeat)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?4)",
                params![dataset_id, kind, source, t, self.job_owner],
            )
            .store(&self.path)?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Say that the jobs `owner` (a `job_owner()`) is adding rows for are still running.
    /// Returns how many it renewed.
    pub fn renew_jobs(&self, owner: &str) -> Result<usize> {
        self.conn
            .execute(RENEW_JOBS, params![owner, now()])
            .store(&self.path)
    }

    /// Remove a job that wrote no rows (its add failed): nothing is left behind.
    pub(crate) fn drop_job(&mut self, job_id: i64) -> Result<()> {
        self.conn
            .execute("DELETE FROM jobs WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM samples WHERE job_id = ?1)", [job_id])
            .store(&self.path)?;
        self.conn
            .execute(
                "UPDATE jobs SET running_owner = NULL WHERE id = ?1",
                [job_id],
            )
            .store(&self.path)?;
        Ok(())
    }

    /// True while a job of the dataset is still adding rows: its owner renewed the mark
    /// within `JOB_TTL` seconds and is not a process of this host known to be gone. Time,
    /// not the pid, decides: a pid can be reused (pid 1 in every container) and a crash on
    /// another host leaves no process to ask about.
    fn adding(&self, dataset_id: i64) -> Result<bool> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT running_owner FROM jobs WHERE dataset_id = ?1 AND running_owner IS NOT NULL
                   AND COALESCE(heartbeat, created_at) >= ?2",
            )
            .store(&self.path)?;
        let owners: Vec<String> = st
            .query_map(params![dataset_id, now() - JOB_TTL], |r| r.get(0))
            .store(&self.path)?
            .collect::<std::result::Result<_, _>>()
            .store(&self.path)?;
        Ok(owners.iter().any(|o| !crate::leases::holder_is_gone(o)))
    }

    /// The job's summary: `(dataset_id, kind, source, added, existing, warnings as JSON)`.
    pub fn job(&self, job_id: i64) -> Result<Option<JobRow>> {
        self.conn
            .query_row(
                "SELECT dataset_id, kind, source, added, existing, warnings FROM jobs WHERE id = ?1",
                [job_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .optional()
            .store(&self.path)
    }

    /// [`Store::root_for_path`] for a UTF-8 folder (COCO): the prefix and nested roots as text.
    pub fn root_for(&mut self, dataset_id: i64, abs: &str) -> Result<(i64, String, Vec<String>)> {
        let (id, prefix, nested) = self.root_for_path(dataset_id, std::path::Path::new(abs))?;
        let nested = nested
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        Ok((id, String::from_utf8_lossy(&prefix).into_owned(), nested))
    }

    /// The two columns of every row a one-key query returns, collected.
    pub(crate) fn pairs<A, B, C>(&self, sql: &str, key: i64) -> Result<C>
    where
        A: rusqlite::types::FromSql,
        B: rusqlite::types::FromSql,
        C: FromIterator<(A, B)>,
    {
        let mut st = self.conn.prepare_cached(sql).store(&self.path)?;
        let rows = st
            .query_map([key], |r| Ok((r.get(0)?, r.get(1)?)))
            .store(&self.path)?;
        rows.collect::<std::result::Result<_, _>>()
            .store(&self.path)
    }

    /// O(number of jobs): read from the counters kept in step with every status change.
    pub fn progress(&self, dataset_id: i64, job_id: Option<i64>) -> Result<Progress> {
        let mut p = Progress {
            dataset_id,
            ..Default::default()
        };
        let sql = if job_id.is_some() {
            "SELECT status, SUM(n) FROM counts WHERE dataset_id = ?1 AND job_id = ?2 GROUP BY status"
        } else {
            "SELECT status, SUM(n) FROM counts WHERE dataset_id = ?1 AND ?2 IS NULL GROUP BY status"
        };
        let mut st = self.conn.prepare_cached(sql).store(&self.path)?;
        let mut rows = st.query(params![dataset_id, job_id]).store(&self.path)?;
        while let Some(r) = rows.next().store(&self.path)? {
            let status: String = r.get(0).store(&self.path)?;
            let n: i64 = r.get(1).store(&self.path)?;
            if let Some(i) = STATUSES.iter().position(|s| *s == status) {
                p.counts[i] = n;
            }
        }
        drop(rows);
        p.embed_wanted = self
            .conn
            .query_row(
                "SELECT embed_spec IS NOT NULL FROM datasets WHERE id = ?1",
                [dataset_id],
                |r| r.get(0),
            )
            .optional()
            .store(&self.path)?
            .unwrap_or(false);
        p.errors = self.phase_errors(dataset_id)?;
        p.adding = job_id.is_none() && self.adding(dataset_id)?;
        p.rates = self.rates(dataset_id)?;
        Ok(p)
    }

    /// Each phase's rate over its recent commits: a few dozen rows at most per phase.
    fn rates(&self, dataset_id: i64) -> Result<Vec<(String, f64, f64)>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT phase, t0, t, n FROM throughput WHERE dataset_id = ?1 ORDER BY phase, t0",
            )
            .store(&self.path)?;
        let rows: Vec<(String, (f64, f64, i64))> = st
            .query_map([dataset_id], |r| {
                Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?)))
            })
            .store(&self.path)?
            .collect::<std::result::Result<_, _>>()
            .store(&self.path)?;
        let at = now();
        let mut out = Vec::new();
        for chunk in rows.chunk_by(|a, b| a.0 == b.0) {
            let entries: Vec<_> = chunk.iter().map(|(_, e)| *e).collect();
            if let Some(r) = crate::throughput::rate(&entries, at) {
                let last = entries.iter().map(|e| e.1).fold(f64::MIN, f64::max);
                out.push((chunk[0].0.clone(), r, at - last));
            }
        }
        Ok(out)
    }

    pub fn phase_errors(&self, dataset_id: i64) -> Result<Vec<(String, String)>> {
        self.pairs(
            "SELECT phase, message FROM phase_errors WHERE dataset_id = ?1 ORDER BY phase",
            dataset_id,
        )
    }

    /// Record (or with `None`, clear) the error that stopped `phase` for a dataset.
    pub fn set_phase_error(
        &mut self,
        dataset_id: i64,
        phase: &str,
        message: Option<&str>,
    ) -> Result<()> {
        match message {
            Some(m) => self.conn.execute(
                "INSERT INTO phase_errors (dataset_id, phase, message) VALUES (?1, ?2, ?3)
                 ON CONFLICT (dataset_id, phase) DO UPDATE SET message = excluded.message",
                params![dataset_id, phase, m],
            ),
            None => self.conn.execute(
                "DELETE FROM phase_errors WHERE dataset_id = ?1 AND phase = ?2",
                params![dataset_id, phase],
            ),
        }
        .store(&self.path)?;
        Ok(())
    }
}

const RENEW_JOBS: &str = "UPDATE jobs SET heartbeat = ?2 WHERE running_owner = ?1";

/// Renews, from a connection of its own, what a long call holds while that call's connection
/// is busy on another thread: the "adding" mark of its jobs, or a lease it holds. A beat that
/// fails (the store is busy) is simply missed: the time-to-lives span several beats.
pub struct Heartbeat {
    path: String,
    conn: Option<Connection>,
    what: Beat,
}

enum Beat {
    Jobs(String),
    Lease(i64, String, String),
}

impl Heartbeat {
    /// Renew the jobs `owner` (a `Store::job_owner()`) is adding rows for.
    pub fn jobs(path: &str, owner: &str) -> Heartbeat {
        Heartbeat {
            path: path.to_string(),
            conn: None,
            what: Beat::Jobs(owner.to_string()),
        }
    }

    /// Renew `owner`'s lease on `phase` (never taking it over).
    pub fn lease(path: &str, dataset_id: i64, phase: &str, owner: &str) -> Heartbeat {
        Heartbeat {
            path: path.to_string(),
            conn: None,
            what: Beat::Lease(dataset_id, phase.to_string(), owner.to_string()),
        }
    }

    pub fn beat(&mut self) {
        if self.conn.is_none() {
            // The store was recognised and opened by the call this beats for: no checks.
            let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let Ok(conn) = Connection::open_with_flags(&self.path, flags) else {
                return;
            };
            // Never hold up the waiting caller's signal checks for long.
            if conn
                .busy_timeout(std::time::Duration::from_millis(100))
                .is_err()
            {
                return;
            }
            self.conn = Some(conn);
        }
        let Some(conn) = &self.conn else { return };
        let _ = match &self.what {
            Beat::Jobs(owner) => conn.execute(RENEW_JOBS, params![owner, now()]),
            Beat::Lease(dataset_id, phase, owner) => conn.execute(
                crate::leases::RENEW_LEASE,
                params![dataset_id, phase, owner, now()],
            ),
        };
    }
}

/// `INSERT INTO {table} ({columns}) VALUES (?,..), (?,..) ... {tail}` for `rows` rows: many
/// rows per statement, since at a million rows the per-statement cost dominates.
pub(crate) fn multi_row_insert(table: &str, columns: &[&str], rows: usize, tail: &str) -> String {
    let one = format!("({})", vec!["?"; columns.len()].join(","));
    let values = vec![one; rows].join(",");
    format!(
        "INSERT INTO {table} ({}) VALUES {values} {tail}",
        columns.join(", ")
    )
}

/// Add `delta` to the counter of `(dataset, job, status)`. Called inside the transaction that
/// changes the rows, so the counters never drift from the table.
pub(crate) fn bump(
    tx: &Transaction<'_>,
    dataset_id: i64,
    job_id: i64,
    status: &str,
    delta: i64,
) -> rusqlite::Result<()> {
    if delta == 0 {
        return Ok(());
    }
    tx.prepare_cached(
        "INSERT INTO counts (dataset_id, job_id, status, n) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (dataset_id, job_id, status) DO UPDATE SET n = n + excluded.n",
    )?
    .execute(params![dataset_id, job_id, status, delta])?;
    Ok(())
}

/// Count, per job, the `job_id`s a status-changing `... RETURNING job_id` statement returned.
pub(crate) fn tally(
    rows: &mut rusqlite::Rows<'_>,
    moves: &mut std::collections::HashMap<i64, i64>,
) -> rusqlite::Result<()> {
    while let Some(r) = rows.next()? {
        *moves.entry(r.get(0)?).or_default() += 1;
    }
    Ok(())
}

/// Move rows between statuses in the counters: `moves` holds `(job_id, delta)` per job.
pub(crate) fn bump_moves(
    tx: &Transaction<'_>,
    dataset_id: i64,
    from: &str,
    to: &str,
    moves: &std::collections::HashMap<i64, i64>,
) -> rusqlite::Result<()> {
    for (&job, &n) in moves {
        bump(tx, dataset_id, job, from, -n)?;
        bump(tx, dataset_id, job, to, n)?;
    }
    Ok(())
}

fn dataset_id_of(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<Option<i64>> {
    tx.query_row("SELECT id FROM datasets WHERE name = ?1", [name], |r| {
        r.get(0)
    })
    .optional()
}

/// Insert a dataset under an id never given before in this store (above the high-water mark
/// in `meta`, which a delete leaves in place): anything keyed by a dataset id stays right
/// after a delete.
fn insert_dataset(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<i64> {
    let last: i64 = tx.query_row(
        "SELECT MAX(COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'last_dataset_id'), 0),
                    COALESCE((SELECT MAX(id) FROM datasets), 0))",
        [],
        |r| r.get(0),
    )?;
    let id = last + 1;
    tx.execute(
        "INSERT INTO datasets (id, name, created_at) VALUES (?1, ?2, ?3)",
        params![id, name, now()],
    )?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('last_dataset_id', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [id.to_string()],
    )?;
    Ok(id)
}

fn dataset_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DatasetRow> {
    Ok(DatasetRow {
        id: r.get(0)?,
        name: r.get(1)?,
        created_at: r.get(2)?,
        embed_spec: r.get(3)?,
    })
}

fn checked_name(name: &str) -> Result<&str> {
    let trimmed = name.trim();
    if trimmed.is_empty() || trimmed.len() > 200 || trimmed.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "invalid dataset name {name:?}: use 1-200 printable characters"
        )));
    }
    Ok(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_version_is_checked() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s.db");
        let p = p.to_str().unwrap();
        let mut s = Store::open(p).unwrap();
        let id = s.create_dataset("a").unwrap();
        assert!(matches!(
            s.create_dataset("a"),
            Err(Error::DatasetExists(..))
        ));
        assert_eq!(s.find_dataset("a").unwrap().unwrap().id, id);
        s.conn
            .execute(
                "UPDATE meta SET value = '999' WHERE key = 'schema_version'",
                [],
            )
            .unwrap();
        drop(s);
        assert!(matches!(
            Store::open(p),
            Err(Error::SchemaVersion { found: 999, .. })
        ));
    }

    #[test]
    fn not_a_database() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("junk.db");
        std::fs::write(&p, vec![b'x'; 4096]).unwrap();
        assert!(matches!(
            Store::open(p.to_str().unwrap()),
            Err(Error::BadStore { .. })
        ));
    }

    #[test]
    fn roots_nest() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let d = s.create_dataset("d").unwrap();
        let (child, prefix, skip) = s.root_for(d, "/data/photos/2024").unwrap();
        assert_eq!((prefix.as_str(), skip.len()), ("", 0));
        let (parent, _, skip) = s.root_for(d, "/data/photos").unwrap();
        assert_ne!(parent, child);
        assert_eq!(skip, ["/data/photos/2024"]);
        let (again, prefix, _) = s.root_for(d, "/data/photos/2023/x").unwrap();
        assert_eq!((again, prefix.as_str()), (parent, "2023/x"));
        let (same, _, _) = s.root_for(d, "/data/photos/2024").unwrap();
        assert_eq!(same, child);
        // below both roots: the deepest one, which holds the files there
        for _ in 0..5 {
            let (deep, prefix, _) = s.root_for(d, "/data/photos/2024/june").unwrap();
            assert_eq!((deep, prefix.as_str()), (child, "june"));
        }
    }
}
