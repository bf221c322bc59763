//! The ingest: the listed files are looked at on the I/O pool (no transaction open) while
//! this thread writes what was found in short transactions.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use rusqlite::params;

use super::parse::{max_bytes, parse, read_limited, Coco, MAX_COCO_BYTES_ENV};
use super::paths::{list_prefix, look, Found, Root};
use super::plan::Plan;
use super::write::{Cursor, Tally, Target, TX_PAUSE, TX_TIME};
use super::CocoSummary;
use crate::db::Store;
use crate::error::{Error, Result, StoreContext};
use crate::remote::ObjectUri;
use crate::scan::io_pool;

/// Listed files looked at per step while the previous step's rows are written.
const LOOK_CHUNK: usize = 2048;

impl Store {
    /// Read, check and ingest a COCO file for the images under `images_root`.
    ///
    /// Nothing is written when the file is malformed. Otherwise rows are written in short
    /// transactions while the job is marked as adding. A store error or a set `stop` ends
    /// the call within milliseconds, keeping what was committed (consistent: rows with their
    /// counters and boxes); ingesting the same file again finishes the work.
    pub fn ingest_coco(
        &mut self,
        dataset_id: i64,
        annotations_json: &Path,
        images_root: &Path,
        stop: &AtomicBool,
    ) -> Result<CocoSummary> {
        let json_str = annotations_json.to_str().ok_or_else(|| {
            Error::InvalidArgument(format!("{}: path is not utf-8", annotations_json.display()))
        })?;
        let bytes = match ObjectUri::parse(json_str) {
            Some(uri) => read_object_limited(&uri?, max_bytes(), stop)?,
            None => read_limited(annotations_json, max_bytes(), stop)?,
        };
        let coco = parse(annotations_json, &bytes, stop)?;
        let plan = Plan::new(&coco, stop)?;
        let root = images_root.to_str().and_then(ObjectUri::parse);
        let (root, root_str) = match root {
            // A bucket prefix, as the scan stores it, listed before anything is written (a
            // bucket that cannot be listed is refused with nothing written).
            Some(uri) => {
                let uri = uri?;
                check_listable(&uri, stop)?;
                let wanted = plan.names.iter().map(String::as_str).collect();
                let listing = list_prefix(&uri, &wanted, stop)?;
                (Root::objects(&uri.root(), listing), uri.root())
            }
            // The real folder: every listed file's real path must lie inside it.
            None => {
                let root =
                    std::fs::canonicalize(images_root).map_err(|e| Error::io(images_root, e))?;
                let root_str = root.to_str().map(str::to_string).ok_or_else(|| {
                    Error::InvalidArgument(format!("{}: path is not utf-8", root.display()))
                })?;
                (Root::new(&root), root_str)
            }
        };
        let root_str = root_str.as_str();
        if stop.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let (root_id, prefix, _) = self.root_for(dataset_id, root_str)?;
        let job_id = self.create_job(dataset_id, "coco", json_str)?;
        let mut tally = Tally {
            skipped: plan.refused_boxes,
            rejected: plan
                .refused
                .iter()
                .map(|&(i, why)| (coco.images[i as usize].file_name.clone(), why.to_string()))
                .collect(),
            ..Tally::default()
        };
        let done = self.write_coco(
            dataset_id, job_id, json_str, root_id, &prefix, &root, &coco, &plan, &mut tally, stop,
        );
        // The category facet, for what was committed (even by an ingest stopped part way).
        let counted = self.count_categories(dataset_id);
        tally.rejected.sort();
        let place = if ObjectUri::parse(root_str).is_some() {
            "in the bucket"
        } else {
            "on disk"
        };
        let mut warnings: Vec<String> = tally
            .missing
            .iter()
            .map(|m| format!("{m}: listed in the COCO file but not found {place}"))
            .chain(
                tally
                    .rejected
                    .iter()
                    .map(|(f, why)| format!("{f}: refused: {why}")),
            )
            .collect();
        if let Err(e) = done {
            // Best effort: the store may be what failed. What was committed stays.
            if tally.added == 0 {
                let _ = self
                    .conn
                    .execute("DELETE FROM coco_missing WHERE job_id = ?1", [job_id]);
                let _ = self.drop_job(job_id);
            } else {
                warnings.push(format!(
                    "the ingest stopped before the end ({e}); ingest the file again to finish"
                ));
                let _ = self.finish_job(job_id, tally.added, tally.existing, &warnings);
            }
            return Err(e);
        }
        counted?;
        self.finish_job(job_id, tally.added, tally.existing, &warnings)?;
        Ok(CocoSummary {
            job_id,
            images: coco.images.len() as u64,
            added: tally.added,
            existing: tally.existing,
            annotations: tally.annotations,
            categories: coco.categories.len() as u64,
            missing: tally.missing,
            rejected: tally.rejected,
            annotations_skipped: tally.skipped,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn write_coco(
        &mut self,
        dataset_id: i64,
        job_id: i64,
        json_str: &str,
        root_id: i64,
        prefix: &str,
        root: &Root,
        coco: &Coco<'_>,
        plan: &Plan,
        tally: &mut Tally,
        stop: &AtomicBool,
    ) -> Result<()> {
        let (file_id, categories) = self.write_categories(dataset_id, json_str, coco, stop)?;
        self.pause();
        let target = Target {
            dataset_id,
            job_id,
            root_id,
            prefix,
            file_id,
            categories: &categories,
            started: crate::db::now(),
        };
        // Checkpoints are run in the pauses between transactions, not inside the commits.
        let autocheckpoint: i64 = self
            .conn
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .store(&self.path)?;
        self.conn
            .execute_batch("PRAGMA wal_autocheckpoint = 0")
            .store(&self.path)?;
        let written = self.look_and_write(&target, root, coco, plan, tally, stop);
        let restored = self
            .conn
            .execute_batch(&format!("PRAGMA wal_autocheckpoint = {autocheckpoint}"))
            .store(&self.path);
        written.and(restored)
    }

    /// Look at the listed files on the I/O pool while this thread writes what was found.
    fn look_and_write(
        &mut self,
        target: &Target<'_>,
        root: &Root,
        coco: &Coco<'_>,
        plan: &Plan,
        tally: &mut Tally,
        stop: &AtomicBool,
    ) -> Result<()> {
        let quit = AtomicBool::new(false);
        let (found_tx, found_rx) = sync_channel::<Vec<Found>>(2);
        std::thread::scope(|scope| {
            let halt = || stop.load(Ordering::Relaxed) || quit.load(Ordering::Relaxed);
            let looker = scope.spawn(move || {
                for chunk in plan.names.chunks(LOOK_CHUNK) {
                    if halt() {
                        break;
                    }
                    // Each file looks at the flags: a stop ends the chunk in microseconds.
                    let found = io_pool().install(|| {
                        chunk
                            .par_iter()
                            .map(|n| {
                                if halt() {
                                    Found::Skipped
                                } else {
                                    look(root, n)
                                }
                            })
                            .collect()
                    });
                    if found_tx.send(found).is_err() {
                        break; // the writer stopped
                    }
                }
            });
            let written = self.write_found(target, coco, plan, tally, &found_rx, stop);
            // Stop the looker and unblock it before waiting for it: it may be waiting on a
            // full channel that nobody reads any more.
            quit.store(true, Ordering::Relaxed);
            drop(found_rx);
            let joined = looker.join();
            written?;
            joined.map_err(|_| Error::InvalidArgument("the COCO file looker panicked".into()))
        })
    }

    /// The COCO file's row and its categories (in short transactions too: a file may list
    /// millions). Returns the file's id and `(COCO category id, category row)`, sorted.
    fn write_categories(
        &mut self,
        dataset_id: i64,
        json_str: &str,
        coco: &Coco<'_>,
        stop: &AtomicBool,
    ) -> Result<(i64, Vec<(i64, i64)>)> {
        let path = self.path.clone();
        let mut file_id = None;
        let mut rows = Vec::with_capacity(coco.categories.len());
        while file_id.is_none() || rows.len() < coco.categories.len() {
            if stop.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            if file_id.is_some() {
                self.pause();
            }
            let tx = self.immediate()?;
            let began = Instant::now();
            if file_id.is_none() {
                file_id = Some(
                    tx.query_row(
                        "INSERT INTO coco_files (dataset_id, path) VALUES (?1, ?2)
                         ON CONFLICT (dataset_id, path) DO UPDATE SET path = excluded.path
                         RETURNING id",
                        params![dataset_id, json_str],
                        |r| r.get(0),
                    )
                    .store(&path)?,
                );
            }
            {
                let mut st = tx
                    .prepare_cached(
                        "INSERT INTO categories (dataset_id, name, supercategory, coco_id)
                         VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (dataset_id, name) DO UPDATE
                         SET supercategory = coalesce(excluded.supercategory, supercategory)
                         RETURNING id",
                    )
                    .store(&path)?;
                for c in &coco.categories[rows.len()..] {
                    let id: i64 = st
                        .query_row(params![dataset_id, c.name, c.supercategory, c.id], |r| {
                            r.get(0)
                        })
                        .store(&path)?;
                    rows.push((c.id, id));
                    if began.elapsed() >= TX_TIME {
                        break;
                    }
                }
            }
            tx.commit().store(&path)?;
        }
        rows.sort_unstable();
        Ok((file_id.unwrap_or_default(), rows))
    }

    /// Between two write transactions: let other writers in. The pause also does the
    /// checkpoint work the commits were spared; it runs beside other writers (PASSIVE takes
    /// no write lock), and a checkpoint that fails only leaves the log longer.
    fn pause(&mut self) {
        let began = Instant::now();
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        std::thread::sleep(TX_PAUSE.saturating_sub(began.elapsed()));
    }

    /// Write what the looker found, chunk by chunk, in short transactions with a pause
    /// between them so that other writers get the store.
    fn write_found(
        &mut self,
        t: &Target<'_>,
        coco: &Coco<'_>,
        plan: &Plan,
        tally: &mut Tally,
        found_rx: &Receiver<Vec<Found>>,
        stop: &AtomicBool,
    ) -> Result<()> {
        let mut cur = Cursor::default();
        let mut base = 0;
        // How long the store has been held since the last pause (transactions back to back
        // look like one to a writer waiting), and when it was last let go.
        let (mut held, mut let_go) = (Duration::ZERO, Instant::now());
        while base < plan.names.len() {
            // No transaction is open while waiting for the looker.
            let Ok(found) = found_rx.recv() else {
                return Err(if stop.load(Ordering::Relaxed) {
                    Error::Cancelled
                } else {
                    Error::InvalidArgument("looking at the listed files stopped early".into())
                });
            };
            let end = base + found.len();
            while cur.busy(end) {
                if stop.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                if let_go.elapsed() >= TX_PAUSE {
                    held = Duration::ZERO; // waiting for the looker was a pause
                }
                let budget = TX_TIME.saturating_sub(held);
                held += self.write_some(t, coco, plan, &found, base, &mut cur, tally, budget)?;
                let_go = Instant::now();
                if held >= TX_TIME && cur.busy(plan.names.len()) {
                    self.pause();
                    held = Duration::ZERO;
                }
            }
            base = end;
        }
        Ok(())
    }
}

/// A COCO file in a bucket, read with one ranged GET of at most `limit + 1` bytes: a larger
/// object is refused without being read whole.
fn read_object_limited(uri: &ObjectUri, limit: u64, stop: &AtomicBool) -> Result<Vec<u8>> {
    let name = uri.to_string();
    let bytes = crate::remote::read::read_object(&name, Some(0), Some(limit + 1), stop)?
        .ok_or(Error::Cancelled)?;
    if bytes.len() as u64 > limit {
        return Err(Error::coco(
            Path::new(&name),
            format!(
                "the object is more than {limit} bytes, the limit \
                 (set {MAX_COCO_BYTES_ENV} to allow more)"
            ),
        ));
    }
    Ok(bytes.to_vec())
}

/// A bucket that cannot be listed (missing, credentials refused, unreachable) fails at once,
/// with one line naming it, before the (patient) listing would retry.
fn check_listable(uri: &ObjectUri, stop: &AtomicBool) -> Result<()> {
    let base = uri.prefix();
    let prefix = (!base.is_empty())
        .then(|| {
            crate::remote::read::object_path(&ObjectUri {
                key: base,
                ..uri.clone()
            })
        })
        .transpose()?;
    crate::remote::list::check_listable(uri, prefix.as_ref(), stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png() -> &'static [u8] {
        b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\x03\0\0\0\x04\x08\x02\0\0\0"
    }

    fn setup(coco: &str) -> (tempfile::TempDir, Store, i64, std::path::PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let images = t.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::write(images.join("a.png"), png()).unwrap();
        std::fs::write(t.path().join("c.json"), coco).unwrap();
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let d = s.create_dataset("d").unwrap();
        (t, s, d, images)
    }

    fn count(s: &Store, table: &str) -> i64 {
        s.conn
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_file_listed_twice_is_one_row_and_counted_once() {
        let coco = r#"{"images":[{"id":1,"file_name":"a.png"},{"id":2,"file_name":"./a.png"}],
            "categories":[{"id":1,"name":"x"}],
            "annotations":[{"image_id":1,"category_id":1,"bbox":[0,0,1,1]},
                           {"image_id":2,"category_id":1,"bbox":[0,0,2,2]}]}"#;
        let (t, mut s, d, images) = setup(coco);
        let json = t.path().join("c.json");
        let stop = AtomicBool::new(false);
        let first = s.ingest_coco(d, &json, &images, &stop).unwrap();
        assert_eq!((first.added, first.existing, first.annotations), (1, 0, 2));
        let again = s.ingest_coco(d, &json, &images, &stop).unwrap();
        assert_eq!((again.added, again.existing, again.annotations), (0, 1, 2));
        assert_eq!(count(&s, "annotations"), 2);
        assert_eq!(count(&s, "samples"), 1);
    }

    #[test]
    fn escaping_names_are_refused_with_their_boxes() {
        let coco = r#"{"images":[{"id":1,"file_name":"../x.png"},{"id":2,"file_name":"/etc/passwd"},
                                 {"id":3,"file_name":"a.png"}],
            "categories":[{"id":1,"name":"x"}],
            "annotations":[{"image_id":1,"category_id":1,"bbox":[0,0,1,1]},
                           {"image_id":2,"category_id":1,"bbox":[0,0,2,2]}]}"#;
        let (t, mut s, d, images) = setup(coco);
        std::fs::write(t.path().join("x.png"), png()).unwrap();
        let stop = AtomicBool::new(false);
        let sum = s
            .ingest_coco(d, &t.path().join("c.json"), &images, &stop)
            .unwrap();
        assert_eq!(
            (sum.added, sum.annotations, sum.annotations_skipped),
            (1, 0, 2)
        );
        let refused: Vec<&str> = sum.rejected.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(refused, ["../x.png", "/etc/passwd"]);
    }

    #[test]
    fn a_set_stop_flag_writes_nothing() {
        let (t, mut s, d, images) = setup(r#"{"images":[{"id":1,"file_name":"a.png"}]}"#);
        let stop = AtomicBool::new(true);
        let r = s.ingest_coco(d, &t.path().join("c.json"), &images, &stop);
        assert!(matches!(r, Err(Error::Cancelled)));
        assert_eq!(count(&s, "jobs"), 0);
    }

    #[test]
    fn many_boxes_on_one_image_span_transactions_and_are_replaced_on_rerun() {
        let n = 100_000;
        let anns: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"id":{i},"image_id":1,"category_id":1,"bbox":[0,0,1,1]}}"#))
            .collect();
        let coco = format!(
            r#"{{"images":[{{"id":1,"file_name":"a.png"}}],"categories":[{{"id":1,"name":"x"}}],
                "annotations":[{}]}}"#,
            anns.join(",")
        );
        let (t, mut s, d, images) = setup(&coco);
        let stop = AtomicBool::new(false);
        let json = t.path().join("c.json");
        assert_eq!(
            s.ingest_coco(d, &json, &images, &stop).unwrap().annotations,
            n
        );
        assert_eq!(
            s.ingest_coco(d, &json, &images, &stop).unwrap().annotations,
            n
        );
        assert_eq!(count(&s, "annotations"), n as i64);
    }
}
