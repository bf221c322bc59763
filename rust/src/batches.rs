//! Phase 3 spread over workers (the Ray engine): the coordinator, the store's only writer,
//! hands out *leases* of `indexed` rows, each with an id that is never reused, and commits a
//! lease's results only for the rows still out under that id. A duplicate or late result, or
//! one for a lease given back since, changes nothing.
//!
//! `attempts` counts the workers a row was with when they died. A row that was with one dying
//! worker is handed out in small leases with other such rows, a row that was with two goes
//! alone, and one that was with `max_attempts` becomes `failed` ("worker died").

use std::collections::HashMap;
use std::path::PathBuf;

use rusqlite::{params, OptionalExtension, Transaction};

use crate::db::{bump_moves, tally, Store, EMBEDDING, FAILED, INDEXED, READY};
use crate::error::{Error, Result, StoreContext};
use crate::leases::{hold_lease, not_held_by_another, EMBED_PHASE};
use crate::paths::StoredPath;
use crate::throughput;

/// What a row that killed its worker `max_attempts` times says.
pub const WORKER_DIED: &str = "worker died";

/// One row of a lease: `(id, absolute path, EXIF orientation, attempts before this lease)`.
pub type LeaseRow = (i64, PathBuf, i64, i64);

impl Store {
    /// Take a lease: up to `limit` `indexed` rows with id above `after` (the caller's
    /// cursor) go to `embedding` under a new lease id, counters moved in the same
    /// transaction, checked against `owner`'s embed lease of the dataset (`LeaseLost`
    /// otherwise, nothing changed). Rows that were with a dying worker come first: those with
    /// one death in a lease of at most `max(1, limit / 8)` of them, those with more alone
    /// (whatever `after`; the caller keeps its cursor for those leases: their rows have
    /// `attempts > 0`). Returns `(lease id, rows in id order)`, no rows when none is left.
    pub fn claim_batch(
        &mut self,
        dataset_id: i64,
        limit: usize,
        after: i64,
        owner: &str,
    ) -> Result<(i64, Vec<LeaseRow>)> {
        if limit == 0 {
            return Err(Error::InvalidArgument(
                "a lease needs at least one row".into(),
            ));
        }
        let roots = self.root_dirs(dataset_id)?;
        let path = self.path.clone();
        let tx = self.immediate()?;
        hold_lease(&tx, &path, dataset_id, EMBED_PHASE, owner)?;
        let suspect: Option<i64> = tx
            .query_row(
                "SELECT MAX(attempts) FROM samples
                 WHERE dataset_id = ?1 AND attempts > 0 AND status = 'indexed'",
                [dataset_id],
                |r| r.get(0),
            )
            .optional()
            .store(&path)?
            .flatten();
        let (sql, n) = match suspect {
            Some(a) if a >= 2 => (CLAIM_SUSPECTS, 1),
            Some(_) => (CLAIM_SUSPECTS, (limit / 8).max(1)),
            None => (CLAIM_FRESH, limit),
        };
        let lease = next_lease_id(&tx).store(&path)?;
        let mut out = Vec::new();
        let mut moves: HashMap<i64, i64> = HashMap::new();
        {
            let mut st = tx.prepare_cached(sql).store(&path)?;
            let mut rows = st
                .query(params![dataset_id, n as i64, after, lease])
                .store(&path)?;
            while let Some(r) = rows.next().store(&path)? {
                let id: i64 = r.get(0).store(&path)?;
                let job: i64 = r.get(1).store(&path)?;
                let root: i64 = r.get(2).store(&path)?;
                let rel: StoredPath = r.get(3).store(&path)?;
                let orientation: Option<i64> = r.get(4).store(&path)?;
                let attempts: i64 = r.get(5).store(&path)?;
                *moves.entry(job).or_default() += 1;
                let abs = roots
                    .get(&root)
                    .map_or_else(PathBuf::new, PathBuf::clone)
                    .join(rel.0);
                out.push((id, abs, orientation.unwrap_or(1), attempts));
            }
        }
        if out.is_empty() {
            // Nothing to hand out: the lease id is not spent either.
            drop(tx);
            return Ok((0, out));
        }
        throughput::begin_claim(&tx, dataset_id, throughput::EMBED).store(&path)?;
        bump_moves(&tx, dataset_id, INDEXED, EMBEDDING, &moves).store(&path)?;
        tx.commit().store(&path)?;
        out.sort_unstable_by_key(|r| r.0);
        Ok((lease, out))
    }

    /// Commit a lease's results in one transaction: `vectors` holds `ids.len() * dim`
    /// little-endian float16 values (rows -> `ready`), `failed` the rows that could not be
    /// read or decoded (-> `failed` with the reason). Only rows still `embedding` under
    /// `lease` change; the others (given back, or committed already) are skipped, vector
    /// included. Returns how many rows changed. Checked against `owner`'s embed lease.
    #[allow(clippy::too_many_arguments)]
    pub fn commit_batch(
        &mut self,
        dataset_id: i64,
        model_id: i64,
        lease: i64,
        ids: &[i64],
        vectors: &[u8],
        failed: &[(i64, String)],
        owner: &str,
    ) -> Result<u64> {
        let row_bytes = self.vector_bytes(model_id, ids.len(), vectors.len())?;
        let path = self.path.clone();
        let tx = self.immediate()?;
        hold_lease(&tx, &path, dataset_id, EMBED_PHASE, owner)?;
        let mut ready: HashMap<i64, i64> = HashMap::new();
        let mut bad: HashMap<i64, i64> = HashMap::new();
        {
            let mut done = tx
                .prepare_cached(
                    "UPDATE samples SET status = 'ready', lease_id = NULL
                     WHERE id = ?1 AND lease_id = ?2 AND status = 'embedding' RETURNING job_id",
                )
                .store(&path)?;
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO embeddings (model_id, sample_id, vector) VALUES (?1, ?2, ?3)
                     ON CONFLICT (model_id, sample_id) DO UPDATE SET vector = excluded.vector",
                )
                .store(&path)?;
            for (id, v) in ids.iter().zip(vectors.chunks_exact(row_bytes)) {
                let mut rows = done.query(params![id, lease]).store(&path)?;
                if let Some(r) = rows.next().store(&path)? {
                    *ready.entry(r.get(0).store(&path)?).or_default() += 1;
                    drop(rows);
                    put.execute(params![model_id, id, v]).store(&path)?;
                }
            }
            let mut fail = tx
                .prepare_cached(
                    "UPDATE samples SET status = 'failed', error = ?3, lease_id = NULL
                     WHERE id = ?1 AND lease_id = ?2 AND status = 'embedding' RETURNING job_id",
                )
                .store(&path)?;
            for (id, reason) in failed {
                tally(
                    &mut fail.query(params![id, lease, reason]).store(&path)?,
                    &mut bad,
                )
                .store(&path)?;
            }
        }
        bump_moves(&tx, dataset_id, EMBEDDING, READY, &ready).store(&path)?;
        bump_moves(&tx, dataset_id, EMBEDDING, FAILED, &bad).store(&path)?;
        let moved: i64 = ready.values().chain(bad.values()).sum();
        throughput::record(&tx, dataset_id, throughput::EMBED, moved).store(&path)?;
        tx.commit().store(&path)?;
        Ok(moved as u64)
    }

    /// Give a lease's rows (`ids`, those still `embedding` under `lease`) back. With
    /// `worker_died`, each row's `attempts` goes up by one and a row that reaches
    /// `max_attempts` becomes `failed` ("worker died"); the others go back to `indexed`.
    /// Returns `(rows back to indexed, rows failed)`. Refused (`LeaseLost`) while another
    /// owner holds the dataset's embed lease.
    pub fn release_batch(
        &mut self,
        dataset_id: i64,
        lease: i64,
        ids: &[i64],
        worker_died: bool,
        max_attempts: i64,
        owner: &str,
    ) -> Result<(u64, u64)> {
        let path = self.path.clone();
        let tx = self.immediate()?;
        not_held_by_another(&tx, &path, dataset_id, EMBED_PHASE, owner)?;
        let mut back: HashMap<i64, i64> = HashMap::new();
        let mut bad: HashMap<i64, i64> = HashMap::new();
        {
            let mut st = tx
                .prepare_cached(
                    "UPDATE samples SET
                        attempts = attempts + ?4,
                        status = CASE WHEN attempts + ?4 >= ?5 THEN 'failed' ELSE 'indexed' END,
                        error = CASE WHEN attempts + ?4 >= ?5 THEN ?6 ELSE error END,
                        lease_id = NULL
                     WHERE id = ?1 AND dataset_id = ?2 AND lease_id = ?3 AND status = 'embedding'
                     RETURNING job_id, status",
                )
                .store(&path)?;
            let died = i64::from(worker_died);
            // without a death, `attempts + 0 >= max` must never fail a row
            let max = if worker_died { max_attempts } else { i64::MAX };
            for id in ids {
                let mut rows = st
                    .query(params![id, dataset_id, lease, died, max, WORKER_DIED])
                    .store(&path)?;
                if let Some(r) = rows.next().store(&path)? {
                    let job: i64 = r.get(0).store(&path)?;
                    let status: String = r.get(1).store(&path)?;
                    let to = if status == FAILED {
                        &mut bad
                    } else {
                        &mut back
                    };
                    *to.entry(job).or_default() += 1;
                }
            }
        }
        bump_moves(&tx, dataset_id, EMBEDDING, INDEXED, &back).store(&path)?;
        bump_moves(&tx, dataset_id, EMBEDDING, FAILED, &bad).store(&path)?;
        tx.commit().store(&path)?;
        let n = |m: &HashMap<i64, i64>| m.values().sum::<i64>() as u64;
        Ok((n(&back), n(&bad)))
    }
}

/// Rows no worker died with, after the cursor, in id order.
const CLAIM_FRESH: &str = "UPDATE samples SET status = 'embedding', lease_id = ?4
     WHERE id IN (SELECT id FROM samples
                  WHERE dataset_id = ?1 AND id > ?3 AND status = 'indexed' AND attempts = 0
                  ORDER BY id LIMIT ?2)
     RETURNING id, job_id, root_id, path, orientation, attempts";

/// Rows a worker died with (the partial index `samples_suspect`), most deaths first; the
/// cursor does not apply (`?3` is left unused).
const CLAIM_SUSPECTS: &str = "UPDATE samples SET status = 'embedding', lease_id = ?4
     WHERE id IN (SELECT id FROM samples
                  WHERE dataset_id = ?1 AND attempts > 0 AND status = 'indexed'
                  ORDER BY attempts DESC, id LIMIT ?2)
     RETURNING id, job_id, root_id, path, orientation, attempts";

/// The next lease id of the store: one counter in `meta`, never reused (a result of a lease
/// of an earlier run can never match a lease of this one).
fn next_lease_id(tx: &Transaction<'_>) -> rusqlite::Result<i64> {
    let v: String = tx.query_row(
        "INSERT INTO meta (key, value) VALUES ('last_embed_lease', '1')
         ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)
         RETURNING value",
        [],
        |r| r.get(0),
    )?;
    Ok(v.parse().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{EMBEDDING, FAILED, INDEXED, READY};

    fn store(t: &tempfile::TempDir, n: usize) -> (Store, i64) {
        let root = t.path().join("r");
        std::fs::create_dir_all(&root).unwrap();
        for i in 0..n {
            std::fs::write(root.join(format!("{i:03}.png")), b"x").unwrap();
        }
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let d = s.create_dataset("d").unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        s.scan(d, &root, false, false, &stop).unwrap();
        s.conn
            .execute_batch(
                "UPDATE samples SET status = 'indexed'; UPDATE counts SET status = 'indexed';",
            )
            .unwrap();
        assert!(s.acquire_lease(d, "embed", "c", 10.0).unwrap());
        (s, d)
    }

    fn ids(rows: &[LeaseRow]) -> Vec<i64> {
        rows.iter().map(|r| r.0).collect()
    }

    #[test]
    fn a_lease_commits_once_and_only_under_its_id() {
        let t = tempfile::tempdir().unwrap();
        let (mut s, d) = store(&t, 5);
        let m = s.register_model("m", "p", 2).unwrap();
        let (l1, rows) = s.claim_batch(d, 3, 0, "c").unwrap();
        assert_eq!(rows.len(), 3);
        let (l2, rest) = s.claim_batch(d, 3, rows[2].0, "c").unwrap();
        assert_ne!(l1, l2);
        assert_eq!(rest.len(), 2);
        assert_eq!(s.progress(d, None).unwrap().count(EMBEDDING), 5);
        let one = ids(&rows);
        let v = vec![1u8; 3 * 4];
        // the wrong lease id changes nothing
        assert_eq!(s.commit_batch(d, m, l2, &one, &v, &[], "c").unwrap(), 0);
        assert_eq!(s.commit_batch(d, m, l1, &one, &v, &[], "c").unwrap(), 3);
        // a duplicate changes nothing
        assert_eq!(
            s.commit_batch(d, m, l1, &one, &[2u8; 12], &[], "c")
                .unwrap(),
            0
        );
        let (_, got, bytes) = s.load_embeddings(d, m, 0).unwrap();
        assert_eq!(got, one);
        assert!(bytes.iter().all(|b| *b == 1));
        // given back, then a late result: nothing
        assert_eq!(
            s.release_batch(d, l2, &ids(&rest), false, 3, "c").unwrap(),
            (2, 0)
        );
        let late = [(rest[0].0, "x".to_string())];
        assert_eq!(s.commit_batch(d, m, l2, &[], &[], &late, "c").unwrap(), 0);
        let p = s.progress(d, None).unwrap();
        assert_eq!(
            (p.count(READY), p.count(INDEXED), p.count(EMBEDDING)),
            (3, 2, 0)
        );
        // another owner's lease: refused
        assert!(s.acquire_lease(d, "embed", "other", -1.0).unwrap());
        assert!(matches!(
            s.claim_batch(d, 3, 0, "c"),
            Err(Error::LeaseLost { .. })
        ));
    }

    #[test]
    fn rows_of_dead_workers_are_isolated_then_failed() {
        let t = tempfile::tempdir().unwrap();
        let (mut s, d) = store(&t, 20);
        let (l, rows) = s.claim_batch(d, 16, 0, "c").unwrap();
        assert_eq!(
            s.release_batch(d, l, &ids(&rows), true, 3, "c").unwrap(),
            (16, 0)
        );
        // one death: small leases of suspects first, whatever the cursor
        let (l, rows) = s.claim_batch(d, 16, 100, "c").unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.3 == 1));
        assert_eq!(
            s.release_batch(d, l, &ids(&rows), true, 3, "c").unwrap(),
            (2, 0)
        );
        // two deaths: alone
        let (l, rows) = s.claim_batch(d, 16, 0, "c").unwrap();
        assert_eq!((rows.len(), rows[0].3), (1, 2));
        let poison = rows[0].0;
        assert_eq!(
            s.release_batch(d, l, &[poison], true, 3, "c").unwrap(),
            (0, 1)
        );
        let p = s.progress(d, None).unwrap();
        assert_eq!((p.count(FAILED), p.count(INDEXED)), (1, 19));
        let failed = s.samples_by_id(&[poison]).unwrap();
        assert_eq!(failed[0].error.as_deref(), Some(WORKER_DIED));
        // a release without a death (a cancel) never counts
        let (l, rows) = s.claim_batch(d, 16, 0, "c").unwrap();
        assert!(rows.iter().all(|r| r.3 == 2));
        s.release_batch(d, l, &ids(&rows), false, 3, "c").unwrap();
        let (_, again) = s.claim_batch(d, 16, 0, "c").unwrap();
        assert_eq!(again[0].3, 2);
    }
}
