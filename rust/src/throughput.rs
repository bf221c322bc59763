//! How fast each phase moves rows: every status-changing commit of a phase appends `(t, n)`
//! to `throughput` inside that commit's transaction (so a commit that fails or loses its
//! lease records nothing), and `progress` turns the last few into a rate.
//!
//! Commits arrive in batches (an embedding batch can take 40 s on a CPU), so the rate is
//! taken over the last `WINDOW_S` seconds or the last `MIN_COMMITS` commits, whichever
//! reaches further back, and it is measured between commits, never up to "now": a phase
//! between two slow commits keeps its last rate instead of dropping to 0/s.

use rusqlite::{params, OptionalExtension, Transaction};

use crate::db::{now, Progress, EMBEDDING, INDEXED, PENDING, READY};

/// Seconds of commits a rate spans at least.
pub const WINDOW_S: f64 = 30.0;
/// Commits a rate spans at least (when the window holds fewer).
pub const MIN_COMMITS: usize = 5;
/// Commits within this many seconds of the entry they would follow are merged into it, so a
/// phase committing hundreds of batches a second keeps ~`2 * WINDOW_S / BUCKET_S` entries.
const BUCKET_S: f64 = 1.0;
/// A phase whose last entry is this old starts afresh when it starts again: its rate is not
/// averaged over the idle time before.
const IDLE_S: f64 = WINDOW_S;
/// ...and so does an embed phase whose rows in flight were left by a process long gone.
const STALE_S: f64 = 300.0;

pub const PROBE: &str = "probe";
pub const INGEST: &str = "ingest";
pub const EMBED: &str = "embed";

/// The newest entry of `(dataset, phase)`: `(t0, t, n)`.
fn newest(
    tx: &Transaction<'_>,
    dataset_id: i64,
    phase: &str,
) -> rusqlite::Result<Option<(f64, f64, i64)>> {
    tx.prepare_cached(
        "SELECT t0, t, n FROM throughput WHERE dataset_id = ?1 AND phase = ?2
         ORDER BY t0 DESC LIMIT 1",
    )?
    .query_row(params![dataset_id, phase], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
    .optional()
}

/// Forget the phase's entries and start from an empty entry at `at` (the time its work
/// began): the first commit then has a base to be measured from.
fn restart(tx: &Transaction<'_>, dataset_id: i64, phase: &str, at: f64) -> rusqlite::Result<()> {
    tx.prepare_cached("DELETE FROM throughput WHERE dataset_id = ?1 AND phase = ?2")?
        .execute(params![dataset_id, phase])?;
    tx.prepare_cached(
        "INSERT INTO throughput (dataset_id, phase, t0, t, n) VALUES (?1, ?2, ?3, ?3, 0)",
    )?
    .execute(params![dataset_id, phase, at])?;
    Ok(())
}

/// Called by a phase's work that began at `started` (a probe call, an ingest), inside each
/// commit that moves rows: a phase idle for longer than `IDLE_S` starts afresh from
/// `started`, so its first commit already has a base to be measured from.
pub(crate) fn begin(
    tx: &Transaction<'_>,
    dataset_id: i64,
    phase: &str,
    started: f64,
) -> rusqlite::Result<()> {
    match newest(tx, dataset_id, phase)? {
        Some((_, t, _)) if t >= started - IDLE_S => Ok(()),
        _ => restart(tx, dataset_id, phase, started),
    }
}

/// Called by an embedding claim (inside its transaction) before it moves rows: with no rows
/// in flight and nothing committed lately, the phase is starting (again) now. Rows still in
/// flight mean a batch is being worked on, however long it takes, unless they are very old.
pub(crate) fn begin_claim(
    tx: &Transaction<'_>,
    dataset_id: i64,
    phase: &str,
) -> rusqlite::Result<()> {
    let in_flight: i64 = tx
        .prepare_cached(
            "SELECT COALESCE(SUM(n), 0) FROM counts WHERE dataset_id = ?1 AND status = 'embedding'",
        )?
        .query_row([dataset_id], |r| r.get(0))?;
    let t = now();
    match newest(tx, dataset_id, phase)? {
        Some((_, last, _)) if last >= t - IDLE_S => Ok(()),
        Some((_, last, _)) if in_flight > 0 && last >= t - STALE_S => Ok(()),
        _ => restart(tx, dataset_id, phase, t),
    }
}

/// Append `n` rows committed now to the phase's entries (merged into the newest one when it
/// is younger than `BUCKET_S`), and drop the entries no rate needs any more: O(1) a commit.
pub(crate) fn record(
    tx: &Transaction<'_>,
    dataset_id: i64,
    phase: &str,
    n: i64,
) -> rusqlite::Result<()> {
    if n <= 0 {
        return Ok(());
    }
    let t = now();
    match newest(tx, dataset_id, phase)? {
        // Merging is exact: an entry says "n rows done between the entry before and t".
        Some((t0, _, m)) if m > 0 && t - t0 < BUCKET_S => {
            tx.prepare_cached(
                "UPDATE throughput SET t = MAX(t, ?4), n = n + ?5
                 WHERE dataset_id = ?1 AND phase = ?2 AND t0 = ?3",
            )?
            .execute(params![dataset_id, phase, t0, t, n])?;
        }
        _ => {
            tx.prepare_cached(
                "INSERT INTO throughput (dataset_id, phase, t0, t, n) VALUES (?1, ?2, ?3, ?3, ?4)
                 ON CONFLICT (dataset_id, phase, t0) DO UPDATE SET n = n + excluded.n",
            )?
            .execute(params![dataset_id, phase, t, n])?;
        }
    }
    // Keep the window (with room for the base before it) and the last MIN_COMMITS + 1
    // entries (the oldest is the base the others are measured from). With fewer entries
    // the subquery is NULL: nothing goes.
    tx.prepare_cached(
        "DELETE FROM throughput WHERE dataset_id = ?1 AND phase = ?2 AND t0 < MIN(?3,
             (SELECT t0 FROM throughput WHERE dataset_id = ?1 AND phase = ?2
              ORDER BY t0 DESC LIMIT 1 OFFSET ?4))",
    )?
    .execute(params![
        dataset_id,
        phase,
        t - 2.0 * WINDOW_S,
        MIN_COMMITS as i64
    ])?;
    Ok(())
}

/// Rows a second over `entries` (`(t0, t, n)`, oldest first), read at time `at`: from the
/// base entry (the oldest of those in the window, or of the last `MIN_COMMITS + 1`) to the
/// newest entry that moved rows. None until two entries span some time.
pub fn rate(entries: &[(f64, f64, i64)], at: f64) -> Option<f64> {
    let keep = MIN_COMMITS + 1;
    let by_count = entries.len().saturating_sub(keep);
    // The base of the window is the entry just before it.
    let by_time = entries
        .iter()
        .position(|e| e.0 >= at - WINDOW_S)
        .map_or(entries.len(), |i| i.saturating_sub(1));
    let span = &entries[by_count.min(by_time)..];
    let (base, rest) = span.split_first()?;
    let last = rest.iter().rposition(|e| e.2 > 0)?;
    let rows: i64 = rest[..=last].iter().map(|e| e.2).sum();
    let dt = rest[last].1 - base.1;
    (dt > 0.0 && rows > 0).then(|| rows as f64 / dt)
}

/// One phase as progress shows it: rows done of its total, and while it runs, its rate
/// (rows/s) and the seconds left at that rate. `total` is None for an ingest (the store does
/// not know how many names its COCO file lists).
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    pub done: i64,
    pub total: Option<i64>,
    pub running: bool,
    pub rate: Option<f64>,
    pub eta_s: Option<f64>,
}

/// The phases of `p`, in pipeline order, with the rates read at `progress` time.
pub fn phases(p: &Progress) -> Vec<Phase> {
    let rate_of = |name: &str| {
        p.rates
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, r, _)| *r)
    };
    let stopped = |name: &str| p.errors.iter().any(|(n, _)| n == name);
    let mut out = Vec::new();
    let mut phase = |name: &'static str, done: i64, left: Option<i64>, running: bool| {
        let rate = rate_of(name).filter(|_| running);
        let eta_s = match (rate, left) {
            (Some(r), Some(l)) => Some(l as f64 / r),
            _ => None,
        };
        out.push(Phase {
            name,
            done,
            total: left.map(|l| done + l),
            running,
            rate,
            eta_s,
        });
    };
    let total = p.total();
    // An ingest shows while it writes: `adding` alone may be a walk's.
    let ingesting = p
        .rates
        .iter()
        .any(|(n, _, age)| n == INGEST && *age < IDLE_S);
    if p.adding && ingesting {
        phase(INGEST, total, None, !stopped(INGEST));
    }
    let pending = p.count(PENDING);
    let probing = (pending > 0 || p.adding) && !stopped(PROBE);
    phase(PROBE, total - pending, Some(pending), probing);
    if p.embed_wanted {
        let left = pending + p.count(INDEXED) + p.count(EMBEDDING);
        let embedding = (left > 0 || p.adding) && !stopped(EMBED);
        phase(EMBED, p.count(READY), Some(left), embedding);
    }
    out
}

/// The running phase that completion waits on longest: the one with the most seconds left,
/// a phase with rows left and no rate yet counting as the longest (the later such phase
/// first). When no phase has rows to wait on (an ingest brings its rows in as `indexed`),
/// the running phase that moves them.
pub fn limiting(phases: &[Phase]) -> Option<&Phase> {
    let waits = |p: &Phase| match (p.eta_s, p.total) {
        (Some(eta), _) => Some(eta),
        (None, Some(total)) if total > p.done => Some(f64::INFINITY),
        // Running only because rows may still be added: nothing to wait on yet.
        _ => None,
    };
    phases
        .iter()
        .filter(|p| p.running && p.total.is_some())
        .filter_map(|p| waits(p).map(|w| (p, w)))
        .fold(None, |best: Option<(&Phase, f64)>, (p, w)| match best {
            Some((b, bw)) if bw > w => Some((b, bw)),
            _ => Some((p, w)),
        })
        .map(|(p, _)| p)
        .or_else(|| phases.iter().find(|p| p.running && p.rate.is_some()))
        .or_else(|| phases.iter().find(|p| p.running))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_spans_the_window_or_the_last_commits() {
        // a commit of 64 rows every 10 s: 6.4 rows/s, read long after the last one too
        let e: Vec<_> = (0..20)
            .map(|i| {
                (
                    f64::from(i) * 10.0,
                    f64::from(i) * 10.0,
                    if i == 0 { 0 } else { 64 },
                )
            })
            .collect();
        for at in [190.0, 195.0, 400.0, 10_000.0] {
            let r = rate(&e, at).unwrap();
            assert!((r - 6.4).abs() < 1e-9, "{r}");
        }
        // one entry, or only a base: no rate yet
        assert_eq!(rate(&e[..1], 1.0), None);
        assert_eq!(rate(&[], 1.0), None);
        // the base's own rows were done before it: not counted
        let r = rate(&[(0.0, 0.0, 500), (1.0, 2.0, 10)], 3.0).unwrap();
        assert!((r - 5.0).abs() < 1e-9);
        // fast commits: only the last WINDOW_S seconds count
        let mut e: Vec<_> = (0..100)
            .map(|i| (f64::from(i), f64::from(i), 1000))
            .collect();
        e.extend((100..200).map(|i| (f64::from(i), f64::from(i), 10)));
        let r = rate(&e, 199.5).unwrap();
        assert!((r - 10.0).abs() < 1e-9, "{r}");
    }

    #[test]
    fn phases_and_the_one_completion_waits_on() {
        let mut p = Progress {
            counts: [10, 20, 4, 6, 0, 0], // pending, indexed, embedding, ready, failed, missing
            embed_wanted: true,
            rates: vec![(PROBE.into(), 100.0, 1.0), (EMBED.into(), 2.0, 1.0)],
            ..Progress::default()
        };
        let ph = phases(&p);
        assert_eq!(ph.len(), 2);
        assert_eq!((ph[0].name, ph[0].done, ph[0].total), (PROBE, 30, Some(40)));
        assert_eq!((ph[0].rate, ph[0].eta_s), (Some(100.0), Some(0.1)));
        assert_eq!((ph[1].name, ph[1].done, ph[1].total), (EMBED, 6, Some(40)));
        assert_eq!((ph[1].rate, ph[1].eta_s), (Some(2.0), Some(17.0)));
        assert_eq!(limiting(&ph).unwrap().name, EMBED);
        // no embed rate yet: it has rows left, so completion waits on it, time unknown
        p.rates.pop();
        let ph = phases(&p);
        let top = limiting(&ph).unwrap();
        assert_eq!((top.name, top.rate, top.eta_s), (EMBED, None, None));
        // an ingest runs (rows arrive as `indexed`): phase 2 has nothing to wait on
        p.counts = [0, 20, 0, 0, 0, 0];
        p.adding = true;
        p.embed_wanted = false;
        p.rates = vec![(INGEST.into(), 500.0, 1.0)];
        let ph = phases(&p);
        assert_eq!(ph[0].name, INGEST);
        assert_eq!(
            (ph[0].rate, ph[0].total, ph[0].eta_s),
            (Some(500.0), None, None)
        );
        assert_eq!(limiting(&ph).unwrap().name, INGEST);
        // ...but not an ingest long over while a walk adds rows
        p.rates[0].2 = 600.0;
        assert_eq!(phases(&p)[0].name, PROBE);
        p.rates[0].2 = 1.0;
        // a phase stopped on an error is not running: no rate
        p.adding = false;
        p.counts = [5, 0, 0, 0, 0, 0];
        p.rates = vec![(PROBE.into(), 100.0, 1.0)];
        p.errors = vec![(PROBE.into(), "disk is full".into())];
        let ph = phases(&p);
        assert_eq!((ph[0].running, ph[0].rate), (false, None));
        assert!(limiting(&ph).is_none());
    }

    #[test]
    fn a_claim_restarts_the_embed_phase_only_when_it_was_idle() {
        let t = tempfile::tempdir().unwrap();
        let mut s = crate::db::Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let tx = s.immediate().unwrap();
        let entries = |tx: &Transaction<'_>| -> i64 {
            tx.query_row("SELECT COUNT(*) FROM throughput", [], |r| r.get(0))
                .unwrap()
        };
        begin_claim(&tx, 1, EMBED).unwrap(); // the first claim: the base
        record(&tx, 1, EMBED, 8).unwrap();
        assert_eq!(entries(&tx), 2);
        // a batch in flight for 2 minutes (a slow model): the history stays
        tx.execute("UPDATE throughput SET t0 = t0 - 120, t = t - 120", [])
            .unwrap();
        tx.execute(
            "INSERT INTO counts (dataset_id, job_id, status, n) VALUES (1, 1, 'embedding', 8)",
            [],
        )
        .unwrap();
        begin_claim(&tx, 1, EMBED).unwrap();
        assert_eq!(entries(&tx), 2);
        // nothing in flight and nothing lately: the phase starts again from this claim
        tx.execute("DELETE FROM counts", []).unwrap();
        begin_claim(&tx, 1, EMBED).unwrap();
        assert_eq!(entries(&tx), 1);
        // rows in flight left by a process gone long ago do not keep an old history either
        tx.execute("UPDATE throughput SET t0 = t0 - 3600, t = t - 3600", [])
            .unwrap();
        tx.execute(
            "INSERT INTO counts (dataset_id, job_id, status, n) VALUES (1, 1, 'embedding', 8)",
            [],
        )
        .unwrap();
        begin_claim(&tx, 1, EMBED).unwrap();
        let t0: f64 = tx
            .query_row("SELECT t0 FROM throughput", [], |r| r.get(0))
            .unwrap();
        assert!(t0 > now() - 60.0);
    }

    #[test]
    fn entries_stay_bounded_and_restart_after_idle() {
        let t = tempfile::tempdir().unwrap();
        let mut s = crate::db::Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let tx = s.immediate().unwrap();
        begin(&tx, 1, PROBE, now()).unwrap();
        for _ in 0..5000 {
            record(&tx, 1, PROBE, 3).unwrap();
        }
        let (kept, rows): (i64, i64) = tx
            .query_row(
                "SELECT COUNT(*), SUM(n) FROM throughput WHERE dataset_id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert!(kept <= (2.0 * WINDOW_S / BUCKET_S) as i64 + 2, "{kept}");
        assert_eq!(rows, 15_000);
        // idle for long: the next run starts from its own start
        tx.execute("UPDATE throughput SET t0 = t0 - 3600, t = t - 3600", [])
            .unwrap();
        let start = now();
        begin(&tx, 1, PROBE, start).unwrap();
        let left: Vec<(f64, i64)> = tx
            .prepare("SELECT t, n FROM throughput WHERE dataset_id = 1")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(left, [(start, 0)]);
    }
}
