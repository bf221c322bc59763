//! Writing a checked COCO file: the listed files are looked at on the I/O pool (no
//! transaction open) while this thread writes what was found in short transactions.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use rusqlite::types::Value;
use rusqlite::{params, OptionalExtension};

use super::parse::{max_bytes, parse, read_limited, Coco};
use super::paths::{look, normalise, Found, ESCAPES};
use super::CocoSummary;
use crate::db::{bump, multi_row_insert, Store, FAILED, INDEXED};
use crate::error::{Error, Result, StoreContext};
use crate::scan::io_pool;

/// Listed files looked at per step while the previous step's rows are written.
const LOOK_CHUNK: usize = 2048;

/// A write transaction ends after this long or this many rows, whichever comes first...
const TX_TIME: Duration = Duration::from_millis(20);
const TX_ROWS: usize = 8192;

/// ...and the next one starts after this pause. SQLite's busy handler retries a waiting
/// writer after 1, 3, 8, 18, 33, 53 ms...: a pause as long as those steps lets it in.
const TX_PAUSE: Duration = Duration::from_millis(15);

/// Annotation rows bound into one INSERT statement (12 values each).
const ROWS_PER_INSERT: usize = 64;

const ANNOTATION_COLUMNS: [&str; 12] = [
    "sample_id",
    "id",
    "file_id",
    "category_id",
    "coco_id",
    "x",
    "y",
    "w",
    "h",
    "area",
    "iscrowd",
    "segmentation",
];

const UPSERT_SAMPLE: &str = "
    INSERT INTO samples (dataset_id, job_id, root_id, path, size_bytes, mtime_ns, coco_width,
                         coco_height, status, width, height, format, orientation, error,
                         size_mismatch)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14,
            coalesce(?7 IS NOT NULL AND ?10 IS NOT NULL AND (?7 != ?10 OR ?8 != ?11), 0))
    ON CONFLICT (root_id, path) DO UPDATE SET
        coco_width = excluded.coco_width, coco_height = excluded.coco_height,
        size_mismatch = (width IS NOT NULL AND excluded.coco_width IS NOT NULL
            AND (width != excluded.coco_width OR height != excluded.coco_height))
    RETURNING id, job_id";

/// Items of group `k` are `items[start[k]..start[k + 1]]`.
struct Groups {
    start: Vec<usize>,
    items: Vec<u32>,
}

impl Groups {
    fn get(&self, k: usize) -> &[u32] {
        &self.items[self.start[k]..self.start[k + 1]]
    }
}

/// The distinct files a COCO file lists, in name order, with the images and boxes of each.
struct Plan {
    /// Normalised names, sorted, each once: two entries naming one file are one row.
    names: Vec<String>,
    images: Groups,
    boxes: Groups,
    /// `(image, reason)` of each image whose name leaves the images folder.
    refused: Vec<(u32, &'static str)>,
    refused_boxes: u64,
}

impl Plan {
    fn new(coco: &Coco<'_>, stop: &AtomicBool) -> Result<Plan> {
        let mut listed: Vec<(String, u32)> = Vec::with_capacity(coco.images.len());
        let mut refused = Vec::new();
        for (i, im) in coco.images.iter().enumerate() {
            match normalise(&im.file_name) {
                Ok(name) => listed.push((name, i as u32)),
                Err(reason) => refused.push((i as u32, reason)),
            }
        }
        if stop.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        listed.par_sort_unstable();
        let mut names: Vec<String> = Vec::new();
        let mut name_of = vec![u32::MAX; coco.images.len()];
        let mut start = Vec::new();
        let mut items = Vec::with_capacity(listed.len());
        for (name, image) in listed {
            if names.last() != Some(&name) {
                start.push(items.len());
                names.push(name);
            }
            name_of[image as usize] = (names.len() - 1) as u32;
            items.push(image);
        }
        start.push(items.len());
        let images = Groups { start, items };
        // Boxes grouped by file, in file order within a group (a counting sort).
        let mut count = vec![0usize; names.len() + 1];
        let mut refused_boxes = 0u64;
        for &im in &coco.image_of {
            match name_of[im as usize] {
                u32::MAX => refused_boxes += 1,
                k => count[k as usize + 1] += 1,
            }
        }
        for k in 1..count.len() {
            count[k] += count[k - 1];
        }
        let start = count.clone();
        let mut items = vec![0u32; coco.image_of.len() - refused_boxes as usize];
        for (a, &im) in coco.image_of.iter().enumerate() {
            let k = name_of[im as usize];
            if k != u32::MAX {
                items[count[k as usize]] = a as u32;
                count[k as usize] += 1;
            }
        }
        Ok(Plan {
            names,
            images,
            boxes: Groups { start, items },
            refused,
            refused_boxes,
        })
    }
}

/// Where the writer is: the file being written, and how many of its boxes are in.
#[derive(Default)]
struct Cursor {
    name: usize,
    sample: Option<i64>,
    next_box: usize,
}

/// What the ingest did so far.
#[derive(Default)]
struct Tally {
    added: u64,
    existing: u64,
    annotations: u64,
    skipped: u64,
    missing: Vec<String>,
    rejected: Vec<(String, String)>,
}

/// Fixed facts of one ingest.
struct Target<'a> {
    dataset_id: i64,
    job_id: i64,
    root_id: i64,
    prefix: &'a str,
    file_id: i64,
    categories: &'a HashMap<i64, i64>,
}

impl Store {
    /// Read, check and ingest a COCO file for the images under `images_root`.
    /// Nothing is written when the file is malformed. A store error or a set `stop` ends
    /// the call at the next transaction boundary (milliseconds), keeping what was committed;
    /// ingesting the same file again finishes the work.
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
        let bytes = read_limited(annotations_json, max_bytes(), stop)?;
        let coco = parse(annotations_json, &bytes, stop)?;
        // The real folder: every listed file's real path must lie inside it.
        let root = std::fs::canonicalize(images_root).map_err(|e| Error::io(images_root, e))?;
        let root_str = root.to_str().ok_or_else(|| {
            Error::InvalidArgument(format!("{}: path is not utf-8", root.display()))
        })?;
        let plan = Plan::new(&coco, stop)?;
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
            dataset_id, job_id, json_str, root_id, &prefix, &root, &coco, &plan, &mut tally,
            stop,
        );
        let mut warnings: Vec<String> = tally
            .missing
            .iter()
            .map(|m| format!("{m}: listed in the COCO file but not found on disk"))
            .chain(
                tally
                    .rejected
                    .iter()
                    .map(|(f, why)| format!("{f}: refused: {why}")),
            )
            .collect();
        if let Err(e) = done {
            // Best effort: the store may be what failed. The rows committed so far stay.
            if tally.added == 0 {
                let _ = self.conn.execute(
                    "DELETE FROM coco_missing WHERE job_id = ?1",
                    [job_id],
                );
                let _ = self.drop_job(job_id);
            } else {
                warnings.push(format!(
                    "the ingest stopped before the end ({e}); ingest the file again to finish"
                ));
                let _ = self.finish_job(job_id, tally.added, tally.existing, &warnings);
            }
            return Err(e);
        }
        self.finish_job(job_id, tally.added, tally.existing, &warnings)?;
        tally.rejected.sort();
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
        root: &Path,
        coco: &Coco<'_>,
        plan: &Plan,
        tally: &mut Tally,
        stop: &AtomicBool,
    ) -> Result<()> {
        let (file_id, categories) = self.write_categories(dataset_id, json_str, coco)?;
        let target = Target {
            dataset_id,
            job_id,
            root_id,
            prefix,
            file_id,
            categories: &categories,
        };
        let quit = AtomicBool::new(false);
        let (found_tx, found_rx) = sync_channel::<Vec<Found>>(2);
        std::thread::scope(|scope| {
            let halt = || stop.load(Ordering::Relaxed) || quit.load(Ordering::Relaxed);
            let looker = scope.spawn(move || {
                for chunk in plan.names.chunks(LOOK_CHUNK) {
                    if halt() {
                        break;
                    }
                    let found = io_pool().install(|| {
                        chunk
                            .par_iter()
                            .map(|n| if halt() { Found::Skipped } else { look(root, n) })
                            .collect()
                    });
                    if found_tx.send(found).is_err() {
                        break; // the writer stopped
                    }
                }
            });
            let written = self.write_found(&target, coco, plan, tally, &found_rx, stop);
            // Unblock and stop the looker before waiting for it: it may be on a full channel.
            quit.store(true, Ordering::Relaxed);
            drop(found_rx);
            let joined = looker.join();
            written?;
            joined.map_err(|_| Error::InvalidArgument("the COCO file looker panicked".into()))
        })
    }

    /// The COCO file's row and its categories, in one transaction. Returns the file's id and
    /// the category row of each COCO category id.
    fn write_categories(
        &mut self,
        dataset_id: i64,
        json_str: &str,
        coco: &Coco<'_>,
    ) -> Result<(i64, HashMap<i64, i64>)> {
        let path = self.path.clone();
        let tx = self.immediate()?;
        let file_id: i64 = tx
            .query_row(
                "INSERT INTO coco_files (dataset_id, path) VALUES (?1, ?2)
                 ON CONFLICT (dataset_id, path) DO UPDATE SET path = excluded.path RETURNING id",
                params![dataset_id, json_str],
                |r| r.get(0),
            )
            .store(&path)?;
        let mut rows = HashMap::with_capacity(coco.categories.len());
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO categories (dataset_id, name, supercategory, coco_id)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (dataset_id, name)
                     DO UPDATE SET supercategory = coalesce(excluded.supercategory, supercategory)
                     RETURNING id",
                )
                .store(&path)?;
            for c in &coco.categories {
                let id: i64 = st
                    .query_row(params![dataset_id, c.name, c.supercategory, c.id], |r| {
                        r.get(0)
                    })
                    .store(&path)?;
                rows.insert(c.id, id);
            }
        }
        tx.commit().store(&path)?;
        Ok((file_id, rows))
    }

    /// Write what the looker found, chunk by chunk, in short transactions.
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
        while base < plan.names.len() {
            let found = found_rx.recv().map_err(|_| {
                if stop.load(Ordering::Relaxed) {
                    Error::Cancelled
                } else {
                    Error::coco(Path::new(&self.path), "looking at the listed files stopped")
                }
            })?;
            let end = base + found.len();
            while cur.name < end {
                if stop.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                self.write_some(t, coco, plan, &found, base, &mut cur, tally)?;
                if cur.name < plan.names.len() {
                    std::thread::sleep(TX_PAUSE);
                }
            }
            base = end;
        }
        Ok(())
    }

    /// One transaction: from `cur` on, until the time or row budget is spent or the chunk
    /// `found` (files `base..`) is written. Rows, their counters and boxes commit together.
    #[allow(clippy::too_many_arguments, clippy::too_many_lines)]
    fn write_some(
        &mut self,
        t: &Target<'_>,
        coco: &Coco<'_>,
        plan: &Plan,
        found: &[Found],
        base: usize,
        cur: &mut Cursor,
        tally: &mut Tally,
    ) -> Result<()> {
        let path = self.path.clone();
        let began = Instant::now();
        let tx = self.immediate()?;
        let mut next_id: i64 = tx
            .query_row(
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'next_annotation_id'",
                [],
                |r| r.get(0),
            )
            .optional()
            .store(&path)?
            .unwrap_or(1);
        let (mut n_indexed, mut n_failed) = (0i64, 0i64);
        // Counted here and added to `tally` only once the transaction commits.
        let mut step = Tally::default();
        let mut rows = 0usize;
        let mut values: Vec<Value> = Vec::with_capacity(ROWS_PER_INSERT * 12);
        {
            let mut upsert = tx.prepare_cached(UPSERT_SAMPLE).store(&path)?;
            let mut del = tx
                .prepare_cached("DELETE FROM annotations WHERE sample_id = ?1 AND file_id = ?2")
                .store(&path)?;
            let mut miss = tx
                .prepare_cached(
                    "INSERT INTO coco_missing (job_id, coco_image_id, file_name) VALUES (?1, ?2, ?3)",
                )
                .store(&path)?;
            let full = multi_row_insert("annotations", &ANNOTATION_COLUMNS, ROWS_PER_INSERT, "");
            let mut insert_full = tx.prepare_cached(&full).store(&path)?;
            let end = base + found.len();
            while cur.name < end && rows < TX_ROWS && began.elapsed() < TX_TIME {
                let k = cur.name;
                let sample = match (cur.sample, &found[k - base]) {
                    (Some(s), _) => s,
                    (None, Found::Skipped) => return Err(Error::Cancelled),
                    (None, Found::Missing) => {
                        for &im in plan.images.get(k) {
                            let im = &coco.images[im as usize];
                            miss.execute(params![t.job_id, im.id, im.file_name])
                                .store(&path)?;
                            step.missing.push(im.file_name.clone());
                        }
                        step.skipped += plan.boxes.get(k).len() as u64;
                        rows += plan.images.get(k).len();
                        cur.name += 1;
                        continue;
                    }
                    (None, Found::Escapes) => {
                        for &im in plan.images.get(k) {
                            let name = &coco.images[im as usize].file_name;
                            step.rejected.push((name.clone(), ESCAPES.to_string()));
                        }
                        step.skipped += plan.boxes.get(k).len() as u64;
                        cur.name += 1;
                        continue;
                    }
                    (
                        None,
                        Found::File {
                            size,
                            mtime_ns,
                            probed,
                        },
                    ) => {
                        // The first listing's declared size is the one kept.
                        let im = &coco.images[plan.images.get(k)[0] as usize];
                        let rel = if t.prefix.is_empty() {
                            plan.names[k].clone()
                        } else {
                            format!("{}/{}", t.prefix, plan.names[k])
                        };
                        let (status, w, h, fmt, orient, err) = match probed {
                            Ok(info) => (
                                INDEXED,
                                Some(info.width),
                                Some(info.height),
                                Some(info.format.name()),
                                info.orientation,
                                None,
                            ),
                            Err(reason) => (FAILED, None, None, None, None, Some(reason.as_str())),
                        };
                        let (id, owner): (i64, i64) = upsert
                            .query_row(
                                params![
                                    t.dataset_id,
                                    t.job_id,
                                    t.root_id,
                                    rel,
                                    i64::try_from(*size).unwrap_or(i64::MAX),
                                    mtime_ns,
                                    im.width,
                                    im.height,
                                    status,
                                    w,
                                    h,
                                    fmt,
                                    orient,
                                    err
                                ],
                                |r| Ok((r.get(0)?, r.get(1)?)),
                            )
                            .store(&path)?;
                        rows += 1;
                        if owner == t.job_id {
                            step.added += 1;
                            if status == INDEXED {
                                n_indexed += 1;
                            } else {
                                n_failed += 1;
                            }
                        } else {
                            // Ingesting a file again replaces its boxes instead of adding
                            // them twice (a rerun after a failure lands here too).
                            step.existing += 1;
                            rows += del.execute(params![id, t.file_id]).store(&path)?;
                        }
                        cur.sample = Some(id);
                        cur.next_box = 0;
                        id
                    }
                };
                let boxes = plan.boxes.get(k);
                while cur.next_box < boxes.len() && rows < TX_ROWS {
                    let a = &coco.annotations[boxes[cur.next_box] as usize];
                    let b = &a.bbox;
                    values.extend([
                        Value::Integer(sample),
                        Value::Integer(next_id),
                        Value::Integer(t.file_id),
                        Value::Integer(t.categories[&a.category_id]),
                        a.id.map_or(Value::Null, Value::Integer),
                        Value::Real(b[0]),
                        Value::Real(b[1]),
                        Value::Real(b[2]),
                        Value::Real(b[3]),
                        a.area.map_or(Value::Null, Value::Real),
                        Value::Integer(a.iscrowd.unwrap_or(0)),
                        a.segmentation
                            .map_or(Value::Null, |r| Value::Text(r.get().to_string())),
                    ]);
                    next_id += 1;
                    cur.next_box += 1;
                    rows += 1;
                    step.annotations += 1;
                    if values.len() == ROWS_PER_INSERT * 12 {
                        // Many rows per INSERT: the per-statement cost, not SQLite's per-row
                        // work, dominates a 700k-box ingest.
                        insert_full
                            .execute(rusqlite::params_from_iter(values.drain(..)))
                            .store(&path)?;
                        if began.elapsed() >= TX_TIME {
                            break;
                        }
                    }
                }
                if cur.next_box == boxes.len() {
                    *cur = Cursor {
                        name: k + 1,
                        ..Cursor::default()
                    };
                }
            }
            if !values.is_empty() {
                let n = values.len() / 12;
                let sql = multi_row_insert("annotations", &ANNOTATION_COLUMNS, n, "");
                tx.prepare_cached(&sql)
                    .store(&path)?
                    .execute(rusqlite::params_from_iter(values.drain(..)))
                    .store(&path)?;
            }
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('next_annotation_id', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [next_id.to_string()],
        )
        .store(&path)?;
        bump(&tx, t.dataset_id, t.job_id, INDEXED, n_indexed).store(&path)?;
        bump(&tx, t.dataset_id, t.job_id, FAILED, n_failed).store(&path)?;
        tx.commit().store(&path)?;
        tally.added += step.added;
        tally.existing += step.existing;
        tally.annotations += step.annotations;
        tally.skipped += step.skipped;
        tally.missing.append(&mut step.missing);
        tally.rejected.append(&mut step.rejected);
        Ok(())
    }
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
        let n: i64 = s
            .conn
            .query_row("SELECT COUNT(*) FROM annotations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
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
        assert_eq!((sum.added, sum.annotations, sum.annotations_skipped), (1, 0, 2));
        let refused: Vec<&str> = sum.rejected.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(refused, ["../x.png", "/etc/passwd"]);
    }

    #[test]
    fn a_set_stop_flag_writes_nothing() {
        let (t, mut s, d, images) = setup(r#"{"images":[{"id":1,"file_name":"a.png"}]}"#);
        let stop = AtomicBool::new(true);
        let r = s.ingest_coco(d, &t.path().join("c.json"), &images, &stop);
        assert!(matches!(r, Err(Error::Cancelled)));
        let jobs: i64 = s
            .conn
            .query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(jobs, 0);
    }
}
