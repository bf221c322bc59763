//! Leases: which process runs a phase of a dataset, renewed by heartbeat and taken over
//! when its holder is gone.

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension, Transaction};

use crate::db::{bump_moves, now, tally, Store, EMBEDDING, INDEXED};
use crate::error::{Error, Result, StoreContext};

impl Store {
    /// Take (or keep) the right to run `phase` for a dataset. A lease whose holder has not
    /// renewed it within `ttl` seconds, or whose holder is a process of this host that is
    /// gone, is taken over. Returns whether `owner` holds it now.
    ///
    /// Taking over the `embed` lease puts the previous holder's `embedding` rows back to
    /// `indexed` in the same transaction, so a late commit of the old holder (refused by
    /// `finish_embeddings(owner=...)`) can never land after another has claimed them.
    pub fn acquire_lease(
        &mut self,
        dataset_id: i64,
        phase: &str,
        owner: &str,
        ttl: f64,
    ) -> Result<bool> {
        let path = self.path.clone();
        let tx = self.immediate()?;
        let held: Option<(String, f64)> = tx
            .query_row(
                "SELECT owner, heartbeat FROM leases WHERE dataset_id = ?1 AND phase = ?2",
                params![dataset_id, phase],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .store(&path)?;
        let t = now();
        let (free, taken_from_another) = match &held {
            None => (true, true),
            Some((o, _)) if o == owner => (true, false),
            Some((o, hb)) => {
                let stale = t - hb > ttl || holder_is_gone(o);
                (stale, stale)
            }
        };
        if free {
            tx.execute(
                "INSERT INTO leases (dataset_id, phase, owner, heartbeat) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (dataset_id, phase) DO UPDATE SET owner = excluded.owner, heartbeat = excluded.heartbeat",
                params![dataset_id, phase, owner, t],
            )
            .store(&path)?;
            if taken_from_another && phase == EMBED_PHASE {
                release_all_claims(&tx, dataset_id).store(&path)?;
            }
        }
        tx.commit().store(&path)?;
        Ok(free)
    }

    /// Renew `owner`'s lease on `phase`: only if `owner` still holds it (it never takes one
    /// over or takes a free one). Returns whether it did. `ttl` is the time-to-live the caller
    /// works under; a holder that renews within it keeps the lease.
    pub fn renew_lease(
        &mut self,
        dataset_id: i64,
        phase: &str,
        owner: &str,
        ttl: f64,
    ) -> Result<bool> {
        if !ttl.is_finite() || ttl <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "lease ttl must be a positive number of seconds, got {ttl}"
            )));
        }
        let n = self
            .conn
            .execute(RENEW_LEASE, params![dataset_id, phase, owner, now()])
            .store(&self.path)?;
        Ok(n > 0)
    }

    pub fn release_lease(&mut self, dataset_id: i64, phase: &str, owner: &str) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM leases WHERE dataset_id = ?1 AND phase = ?2 AND owner = ?3",
                params![dataset_id, phase, owner],
            )
            .store(&self.path)?;
        Ok(())
    }
}

/// Renew a lease only if its owner still holds it: `(dataset_id, phase, owner, now)`.
pub(crate) const RENEW_LEASE: &str =
    "UPDATE leases SET heartbeat = ?4 WHERE dataset_id = ?1 AND phase = ?2 AND owner = ?3";

/// The lease phase whose holder has rows claimed (`embedding`).
pub(crate) const EMBED_PHASE: &str = "embed";

/// Inside a write transaction: fail with `LeaseLost` when another owner holds `phase`'s lease
/// of the dataset; else renew it for `owner` (the commit is proof of life), taking it if it
/// is free. Call it before writing anything, so a lost lease leaves the transaction empty.
///
/// A free lease is taken rather than refused: whoever held it before gave its claims back
/// before letting go (or had them given back by a take-over), and every phase commit only
/// moves rows still in the state the committer left them in, so nothing is done twice.
pub(crate) fn hold_lease(
    tx: &Transaction<'_>,
    path: &str,
    dataset_id: i64,
    phase: &str,
    owner: &str,
) -> Result<()> {
    let n = tx
        .execute(
            "INSERT INTO leases (dataset_id, phase, owner, heartbeat) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (dataset_id, phase) DO UPDATE SET heartbeat = excluded.heartbeat
                 WHERE owner = excluded.owner",
            params![dataset_id, phase, owner, now()],
        )
        .store(path)?;
    if n == 0 {
        return Err(Error::LeaseLost {
            path: path.to_string(),
            dataset_id,
            phase: phase.to_string(),
            owner: owner.to_string(),
        });
    }
    Ok(())
}

/// Inside a write transaction: fail with `LeaseLost` when an owner other than `owner` holds
/// `phase`'s lease of the dataset (the lease itself is left as it is).
pub(crate) fn not_held_by_another(
    tx: &Transaction<'_>,
    path: &str,
    dataset_id: i64,
    phase: &str,
    owner: &str,
) -> Result<()> {
    let holder: Option<String> = tx
        .query_row(
            "SELECT owner FROM leases WHERE dataset_id = ?1 AND phase = ?2",
            params![dataset_id, phase],
            |r| r.get(0),
        )
        .optional()
        .store(path)?;
    match holder {
        Some(h) if h != owner => Err(Error::LeaseLost {
            path: path.to_string(),
            dataset_id,
            phase: phase.to_string(),
            owner: owner.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Every `embedding` row of the dataset back to `indexed`, counters included.
pub(crate) fn release_all_claims(tx: &Transaction<'_>, dataset_id: i64) -> rusqlite::Result<u64> {
    let mut moves: HashMap<i64, i64> = HashMap::new();
    {
        let mut st = tx.prepare_cached(
            "UPDATE samples SET status = 'indexed' WHERE dataset_id = ?1 AND status = 'embedding' RETURNING job_id",
        )?;
        tally(&mut st.query([dataset_id])?, &mut moves)?;
    }
    bump_moves(tx, dataset_id, EMBEDDING, INDEXED, &moves)?;
    Ok(moves.values().sum::<i64>() as u64)
}

/// True when a lease owner named `host:pid:...` ran on this machine and that process is gone
/// (a crash): its lease is taken over at once instead of after its time-to-live.
pub(crate) fn holder_is_gone(owner: &str) -> bool {
    let mut parts = owner.split(':');
    let (Some(host), Some(pid)) = (parts.next(), parts.next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<i32>() else {
        return false;
    };
    if pid <= 0 || host != local_host() {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    !alive
}

/// This machine's host name, for lease owners.
pub fn local_host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{EMBEDDING, INDEXED};

    #[test]
    fn leases() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        assert!(s.acquire_lease(1, "probe", "a", 10.0).unwrap());
        assert!(!s.acquire_lease(1, "probe", "b", 10.0).unwrap());
        assert!(s.acquire_lease(1, "probe", "b", -1.0).unwrap());
        s.release_lease(1, "probe", "b").unwrap();
        assert!(s.acquire_lease(1, "probe", "a", 10.0).unwrap());
        // a holder on this host whose process is gone loses its lease at once
        let host = local_host();
        let dead = format!("{host}:{}:x", i32::MAX - 1);
        assert!(s.acquire_lease(2, "embed", &dead, 600.0).unwrap());
        assert!(s.acquire_lease(2, "embed", "c", 600.0).unwrap());
        // a live one keeps it
        let live = format!("{host}:{}:x", std::process::id());
        assert!(s.acquire_lease(3, "embed", &live, 600.0).unwrap());
        assert!(!s.acquire_lease(3, "embed", "c", 600.0).unwrap());
    }

    fn store_with_rows(t: &tempfile::TempDir, n: usize) -> (Store, i64) {
        let root = t.path().join("r");
        std::fs::create_dir_all(&root).unwrap();
        for i in 0..n {
            std::fs::write(root.join(format!("{i}.png")), b"x").unwrap();
        }
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let d = s.create_dataset("d").unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        s.scan(d, &root, false, false, &stop).unwrap();
        (s, d)
    }

    fn statuses(s: &Store, d: i64) -> Vec<(String, i64)> {
        let mut st = s
            .conn
            .prepare("SELECT status, COUNT(*) FROM samples WHERE dataset_id = ?1 GROUP BY status ORDER BY status")
            .unwrap();
        st.query_map([d], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[test]
    fn renew_never_takes_over() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        assert!(!s.renew_lease(1, "probe", "a", 10.0).unwrap());
        assert!(s.acquire_lease(1, "probe", "a", 10.0).unwrap());
        assert!(s.renew_lease(1, "probe", "a", 10.0).unwrap());
        assert!(s.acquire_lease(1, "probe", "b", -1.0).unwrap());
        assert!(!s.renew_lease(1, "probe", "a", 10.0).unwrap());
        assert!(s.renew_lease(1, "probe", "a", f64::NAN).is_err());
    }

    #[test]
    fn a_probe_commit_without_the_lease_writes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let (mut s, d) = store_with_rows(&t, 3);
        let batch = s.pending_batch(d, 0, 10).unwrap();
        let probed = crate::scan::probe_files(&batch, &[]).unwrap();
        assert!(s.acquire_lease(d, "probe", "a", 10.0).unwrap());
        assert!(s.acquire_lease(d, "probe", "b", -1.0).unwrap());
        let before = statuses(&s, d);
        assert!(matches!(
            s.record_probes(d, &probed, Some("a")),
            Err(Error::LeaseLost { .. })
        ));
        assert_eq!(statuses(&s, d), before);
        assert_eq!(s.progress(d, None).unwrap().count(crate::db::PENDING), 3);
        // a lease let go is free: the commit takes it (nobody else can hold claims then)
        s.release_lease(d, "probe", "b").unwrap();
        s.record_probes(d, &probed, Some("a")).unwrap();
        assert_eq!(s.progress(d, None).unwrap().count(crate::db::FAILED), 3);
        assert!(!s.acquire_lease(d, "probe", "b", 10.0).unwrap());
    }

    #[test]
    fn taking_over_embed_gives_the_claims_back_at_once() {
        let t = tempfile::tempdir().unwrap();
        let (mut s, d) = store_with_rows(&t, 4);
        // make them `indexed` by hand: the files are not images
        s.conn
            .execute_batch(
                "UPDATE samples SET status = 'indexed'; UPDATE counts SET status = 'indexed';",
            )
            .unwrap();
        let model = s.register_model("m", "p", 2).unwrap();
        assert!(s.acquire_lease(d, "embed", "old", 10.0).unwrap());
        let claimed = s.claim_for_embedding(d, 2, 0, Some("old")).unwrap();
        let ids: Vec<i64> = claimed.iter().map(|(i, _)| *i).collect();
        assert_eq!(s.progress(d, None).unwrap().count(EMBEDDING), 2);
        // the same owner renewing keeps its claims
        assert!(s.acquire_lease(d, "embed", "old", 10.0).unwrap());
        assert_eq!(s.progress(d, None).unwrap().count(EMBEDDING), 2);
        assert!(s.acquire_lease(d, "embed", "new", -1.0).unwrap());
        let p = s.progress(d, None).unwrap();
        assert_eq!((p.count(EMBEDDING), p.count(INDEXED)), (0, 4));
        let late = s.finish_embeddings(d, model, &ids, &[0u8; 8], &[], Some("old"));
        assert!(matches!(late, Err(Error::LeaseLost { .. })));
        assert!(matches!(
            s.claim_for_embedding(d, 2, 0, Some("old")),
            Err(Error::LeaseLost { .. })
        ));
        assert_eq!(s.load_embeddings(d, model, 0).unwrap().1.len(), 0);
        let again = s.claim_for_embedding(d, 10, 0, Some("new")).unwrap();
        assert_eq!(again.len(), 4);
        // the old holder's cancel path cannot give back the new holder's claims
        assert!(matches!(
            s.release_claims(d, None, Some("old")),
            Err(Error::LeaseLost { .. })
        ));
        assert_eq!(s.progress(d, None).unwrap().count(EMBEDDING), 4);
        assert_eq!(s.release_claims(d, None, Some("new")).unwrap(), 4);
    }

    #[test]
    fn adding_is_judged_by_heartbeat_age() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let d = s.create_dataset("d").unwrap();
        let job = s.create_job(d, "images", "/x").unwrap();
        assert!(!s.progress(d, None).unwrap().is_complete());
        // a live pid (1 is always there) on this host, silent for longer than the TTL
        let host = local_host();
        s.conn
            .execute(
                "UPDATE jobs SET running_owner = ?1, heartbeat = ?2 WHERE id = ?3",
                params![
                    format!("{host}:1:x"),
                    now() - 2.0 * crate::schema::JOB_TTL,
                    job
                ],
            )
            .unwrap();
        assert!(s.progress(d, None).unwrap().is_complete());
        // renewed: running again
        assert_eq!(s.renew_jobs(&format!("{host}:1:x")).unwrap(), 1);
        assert!(!s.progress(d, None).unwrap().is_complete());
        // a heartbeat from another connection renews this connection's jobs
        let j2 = s.create_job(d, "images", "/y").unwrap();
        s.conn
            .execute("UPDATE jobs SET heartbeat = 0 WHERE id = ?1", [j2])
            .unwrap();
        crate::db::Heartbeat::jobs(&s.path, s.job_owner()).beat();
        let hb: f64 = s
            .conn
            .query_row("SELECT heartbeat FROM jobs WHERE id = ?1", [j2], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(hb > now() - 5.0);
    }

    #[test]
    fn dataset_ids_are_never_reused() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s.db");
        let mut s = Store::open(p.to_str().unwrap()).unwrap();
        let a = s.create_dataset("a").unwrap();
        let b = s.create_dataset("b").unwrap();
        s.delete_dataset(b).unwrap();
        let c = s.find_or_create_dataset("c").unwrap();
        assert_eq!(c, (b + 1, true));
        assert_eq!(s.find_or_create_dataset(" c ").unwrap(), (c.0, false));
        s.delete_dataset(c.0).unwrap();
        s.delete_dataset(a).unwrap();
        drop(s);
        let mut s = Store::open(p.to_str().unwrap()).unwrap();
        assert_eq!(s.create_dataset("a").unwrap(), c.0 + 1);
    }
}
