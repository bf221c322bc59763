//! One short write transaction of a COCO ingest: a few thousand rows, then commit.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{params, OptionalExtension};

use super::parse::Coco;
use super::paths::{Found, Listed, ESCAPES};
use super::plan::Plan;
use crate::db::{bump, multi_row_insert, Store, FAILED, INDEXED, PENDING};
use crate::error::{Error, Result, StoreContext};
use crate::throughput;

/// The store is held for this long at most (or `TX_ROWS` rows) in one transaction, or in
/// transactions back to back (one per chunk of files looked at)...
pub const TX_TIME: Duration = Duration::from_millis(60);
const TX_ROWS: usize = 65_536;

/// ...and the next one starts after this pause. A writer waiting for the store tries again
/// every millisecond (the busy handler set in `open.rs`), so one of its tries falls in the
/// pause: it waits one transaction (~60-75 ms) at most.
pub const TX_PAUSE: Duration = Duration::from_millis(3);

/// Sample rows per upsert statement, and box rows per insert statement: the per-statement
/// cost, not SQLite's per-row work, dominates at 100k files and 700k boxes.
const ROWS_PER_STATEMENT: usize = 64;

const SAMPLE_COLUMNS: [&str; 16] = [
    "dataset_id",
    "job_id",
    "root_id",
    "path",
    "size_bytes",
    "mtime_ns",
    "coco_width",
    "coco_height",
    "status",
    "width",
    "height",
    "format",
    "orientation",
    "error",
    "size_mismatch",
    "etag",
];

/// A row already there keeps its status and header; the COCO file's declared size is taken.
const SAMPLE_UPSERT: &str = "ON CONFLICT (root_id, path) DO UPDATE SET
    coco_width = excluded.coco_width, coco_height = excluded.coco_height,
    size_mismatch = coalesce(width IS NOT NULL AND excluded.coco_width IS NOT NULL
        AND (width != excluded.coco_width OR height != excluded.coco_height), 0)
    RETURNING id, job_id, path";

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

/// Fixed facts of one ingest.
pub struct Target<'a> {
    pub dataset_id: i64,
    pub job_id: i64,
    pub root_id: i64,
    pub prefix: &'a str,
    pub file_id: i64,
    /// `(COCO category id, category row)`, sorted.
    pub categories: &'a [(i64, i64)],
    /// When the ingest began (`db::now()`): its rate is measured from then.
    pub started: f64,
}

/// What the ingest committed so far.
#[derive(Default)]
pub struct Tally {
    pub added: u64,
    pub existing: u64,
    pub annotations: u64,
    pub skipped: u64,
    pub missing: Vec<String>,
    pub rejected: Vec<(String, String)>,
}

impl Tally {
    fn absorb(&mut self, step: Tally) {
        self.added += step.added;
        self.existing += step.existing;
        self.annotations += step.annotations;
        self.skipped += step.skipped;
        self.missing.extend(step.missing);
        self.rejected.extend(step.rejected);
    }
}

/// Where the writer is: the next name to write, and the rows written whose boxes are not
/// all in yet (an image with many boxes spans transactions).
#[derive(Default)]
pub struct Cursor {
    pub name: usize,
    open: VecDeque<(usize, i64)>,
    next_box: usize,
}

impl Cursor {
    /// Work is left before name `end`.
    pub fn busy(&self, end: usize) -> bool {
        self.name < end || !self.open.is_empty()
    }
}

/// One transaction's statements and budget.
struct Step<'t> {
    began: Instant,
    budget: Duration,
    rows: usize,
    boxes: Vec<ToSqlOutput<'t>>,
    next_id: i64,
}

impl Step<'_> {
    /// The budget counts from when the lock was taken, and every transaction writes at
    /// least one row: waiting for the store never leaves the ingest without progress.
    fn spent(&self) -> bool {
        self.rows > 0 && (self.rows >= TX_ROWS || self.began.elapsed() >= self.budget)
    }
}

impl Store {
    /// One transaction: from `cur` on, until `budget` is spent or the names before
    /// `base + found.len()` are written. Rows, their counters and boxes commit together.
    /// Returns how long it held the store.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_some<'c>(
        &mut self,
        t: &Target<'_>,
        coco: &'c Coco<'c>,
        plan: &Plan,
        found: &[Found],
        base: usize,
        cur: &mut Cursor,
        tally: &mut Tally,
        budget: Duration,
    ) -> Result<Duration> {
        let path = self.path.clone();
        let tx = self.immediate()?;
        let began = Instant::now();
        let next_id: i64 = tx
            .query_row(
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'next_annotation_id'",
                [],
                |r| r.get(0),
            )
            .optional()
            .store(&path)?
            .unwrap_or(1);
        let mut step = Step {
            began,
            budget,
            rows: 0,
            boxes: Vec::with_capacity(ROWS_PER_STATEMENT * ANNOTATION_COLUMNS.len()),
            next_id,
        };
        let mut done = Tally::default();
        let (mut n_pending, mut n_indexed, mut n_failed) = (0i64, 0i64, 0i64);
        let end = base + found.len();
        loop {
            write_open_boxes(&tx, &path, t, coco, plan, cur, &mut step, &mut done)?;
            if !cur.open.is_empty() || cur.name >= end || step.spent() {
                break;
            }
            let group = cur.name..end.min(cur.name + ROWS_PER_STATEMENT);
            let mut rels: Vec<(String, usize, &str)> = Vec::new();
            let mut values: Vec<Value> = Vec::new();
            for k in group.clone() {
                match &found[k - base] {
                    Found::Skipped => return Err(Error::Cancelled),
                    Found::Missing => {
                        let mut miss = tx
                            .prepare_cached(
                                "INSERT INTO coco_missing (job_id, coco_image_id, file_name)
                                 VALUES (?1, ?2, ?3)",
                            )
                            .store(&path)?;
                        for &im in plan.images.get(k) {
                            let im = &coco.images[im as usize];
                            miss.execute(params![t.job_id, im.id, im.file_name])
                                .store(&path)?;
                            done.missing.push(im.file_name.clone());
                            step.rows += 1;
                        }
                        done.skipped += plan.boxes.get(k).len() as u64;
                    }
                    Found::Escapes => {
                        for &im in plan.images.get(k) {
                            let name = &coco.images[im as usize].file_name;
                            done.rejected.push((name.clone(), ESCAPES.to_string()));
                        }
                        done.skipped += plan.boxes.get(k).len() as u64;
                    }
                    found @ (Found::File { .. } | Found::Object(_)) => {
                        let rel = if t.prefix.is_empty() {
                            plan.names[k].clone()
                        } else {
                            format!("{}/{}", t.prefix, plan.names[k])
                        };
                        // The first listing's declared size is the one kept.
                        let im = &coco.images[plan.images.get(k)[0] as usize];
                        let status = sample_values(&mut values, t, &rel, found, im);
                        rels.push((rel, k, status));
                    }
                }
            }
            cur.name = group.end;
            if rels.is_empty() {
                continue;
            }
            let sql = multi_row_insert("samples", &SAMPLE_COLUMNS, rels.len(), SAMPLE_UPSERT);
            let mut st = tx.prepare_cached(&sql).store(&path)?;
            let mut rows = st.query(rusqlite::params_from_iter(values)).store(&path)?;
            let mut ids = vec![(0i64, 0i64); rels.len()];
            while let Some(r) = rows.next().store(&path)? {
                let rel = r.get_ref(2).store(&path)?;
                let rel = rel.as_str().map_err(rusqlite::Error::from).store(&path)?;
                // (RETURNING gives rows in no promised order: match them by path.)
                if let Ok(i) = rels.binary_search_by(|(p, _, _)| p.as_str().cmp(rel)) {
                    ids[i] = (r.get(0).store(&path)?, r.get(1).store(&path)?);
                }
            }
            drop(rows);
            step.rows += rels.len();
            let mut del = tx
                .prepare_cached("DELETE FROM annotations WHERE sample_id = ?1 AND file_id = ?2")
                .store(&path)?;
            for ((_, k, status), (id, owner)) in rels.iter().zip(ids) {
                if owner == t.job_id {
                    done.added += 1;
                    match *status {
                        INDEXED => n_indexed += 1,
                        PENDING => n_pending += 1,
                        _ => n_failed += 1,
                    }
                } else {
                    // Ingesting a file again replaces its boxes instead of adding them twice
                    // (a rerun after a failed or cancelled ingest lands here too).
                    done.existing += 1;
                    step.rows += del.execute(params![id, t.file_id]).store(&path)?;
                }
                cur.open.push_back((*k, id));
            }
        }
        flush_boxes(&tx, &path, &mut step.boxes)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('next_annotation_id', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [step.next_id.to_string()],
        )
        .store(&path)?;
        bump(&tx, t.dataset_id, t.job_id, PENDING, n_pending).store(&path)?;
        bump(&tx, t.dataset_id, t.job_id, INDEXED, n_indexed).store(&path)?;
        bump(&tx, t.dataset_id, t.job_id, FAILED, n_failed).store(&path)?;
        if n_indexed + n_failed > 0 {
            throughput::begin(&tx, t.dataset_id, throughput::INGEST, t.started).store(&path)?;
            throughput::record(&tx, t.dataset_id, throughput::INGEST, n_indexed + n_failed)
                .store(&path)?;
        }
        tx.commit().store(&path)?;
        tally.absorb(done);
        Ok(began.elapsed())
    }
}

/// The row of a file looked at (`indexed` or `failed`), or of an object not looked at
/// (`pending`, for phase 2); returns its status.
fn sample_values(
    values: &mut Vec<Value>,
    t: &Target<'_>,
    rel: &str,
    found: &Found,
    im: &super::parse::Image,
) -> &'static str {
    use Value::{Integer, Null, Text};
    let opt = |v: Option<i64>| v.map_or(Null, Integer);
    let (size, mtime_ns, (status, w, h, fmt, orient, err)) = match found {
        Found::File {
            size,
            mtime_ns,
            probed: Ok(info),
        } => (
            Some(i64::try_from(*size).unwrap_or(i64::MAX)),
            Some(*mtime_ns),
            (
                INDEXED,
                Some(i64::from(info.width)),
                Some(i64::from(info.height)),
                Some(info.format.name()),
                info.orientation.map(i64::from),
                None,
            ),
        ),
        Found::File {
            size,
            mtime_ns,
            probed: Err(reason),
        } => (
            Some(i64::try_from(*size).unwrap_or(i64::MAX)),
            Some(*mtime_ns),
            (FAILED, None, None, None, None, Some(reason.clone())),
        ),
        Found::Object(o) => (
            Some(i64::try_from(o.size).unwrap_or(i64::MAX)),
            Some(o.mtime_ns),
            (PENDING, None, None, None, None, None),
        ),
        Found::Missing | Found::Escapes | Found::Skipped => {
            unreachable!("only found files and objects get a row")
        }
    };
    let mismatch = im.width.is_some() && w.is_some() && (im.width, im.height) != (w, h);
    values.extend([
        Integer(t.dataset_id),
        Integer(t.job_id),
        Integer(t.root_id),
        Text(rel.to_string()),
        opt(size),
        opt(mtime_ns),
        opt(im.width),
        opt(im.height),
        Text(status.to_string()),
        opt(w),
        opt(h),
        fmt.map_or(Null, |f| Text(f.to_string())),
        opt(orient),
        err.map_or(Null, Text),
        Integer(i64::from(mismatch)),
        match found {
            Found::Object(Listed { etag: Some(e), .. }) => Text(e.clone()),
            _ => Null,
        },
    ]);
    status
}

/// Boxes of the rows in `cur.open`, until they are all in or the budget is spent.
#[allow(clippy::too_many_arguments)]
fn write_open_boxes<'c>(
    tx: &rusqlite::Transaction<'_>,
    path: &str,
    t: &Target<'_>,
    coco: &'c Coco<'c>,
    plan: &Plan,
    cur: &mut Cursor,
    step: &mut Step<'c>,
    done: &mut Tally,
) -> Result<()> {
    while let Some(&(k, sample)) = cur.open.front() {
        let boxes = plan.boxes.get(k);
        while cur.next_box < boxes.len() {
            if step.boxes.is_empty() && step.spent() {
                return Ok(());
            }
            let a = &coco.annotations[boxes[cur.next_box] as usize];
            let category = t
                .categories
                .binary_search_by_key(&a.category_id, |c| c.0)
                .map_or(0, |i| t.categories[i].1);
            let (b, int, real) = (&a.bbox, Value::Integer, Value::Real);
            step.boxes.extend(
                [
                    int(sample),
                    int(step.next_id),
                    int(t.file_id),
                    int(category),
                    a.id.map_or(Value::Null, int),
                    real(b[0]),
                    real(b[1]),
                    real(b[2]),
                    real(b[3]),
                    a.area.map_or(Value::Null, real),
                    int(a.iscrowd.unwrap_or(0)),
                ]
                .map(ToSqlOutput::Owned),
            );
            step.boxes
                .push(a.segmentation.map_or(ToSqlOutput::Owned(Value::Null), |r| {
                    ToSqlOutput::Borrowed(ValueRef::Text(r.get().as_bytes()))
                }));
            step.next_id += 1;
            step.rows += 1;
            cur.next_box += 1;
            done.annotations += 1;
            if step.boxes.len() == ROWS_PER_STATEMENT * ANNOTATION_COLUMNS.len() {
                flush_boxes(tx, path, &mut step.boxes)?;
            }
        }
        cur.open.pop_front();
        cur.next_box = 0;
    }
    Ok(())
}

fn flush_boxes(
    tx: &rusqlite::Transaction<'_>,
    path: &str,
    boxes: &mut Vec<ToSqlOutput<'_>>,
) -> Result<()> {
    if boxes.is_empty() {
        return Ok(());
    }
    let n = boxes.len() / ANNOTATION_COLUMNS.len();
    let sql = multi_row_insert("annotations", &ANNOTATION_COLUMNS, n, "");
    tx.prepare_cached(&sql)
        .store(path)?
        .execute(rusqlite::params_from_iter(boxes.drain(..)))
        .store(path)?;
    Ok(())
}
