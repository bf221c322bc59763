//! Reads of samples and annotations.

use std::path::PathBuf;

use rusqlite::{params, Row};

use crate::db::{Store, STATUSES};
use crate::error::{Error, Result, StoreContext};
use crate::paths::StoredPath;

/// One sample as stored. `path` is relative to `root`; both are the file system's bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow {
    pub id: i64,
    pub dataset_id: i64,
    pub job_id: i64,
    pub root: PathBuf,
    pub path: PathBuf,
    pub size_bytes: Option<i64>,
    pub mtime_ns: Option<i64>,
    pub status: String,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub format: Option<String>,
    pub orientation: Option<i64>,
    pub error: Option<String>,
    pub coco_width: Option<i64>,
    pub coco_height: Option<i64>,
    pub size_mismatch: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AnnotationRow {
    pub id: i64,
    pub sample_id: i64,
    pub category: String,
    pub supercategory: Option<String>,
    pub bbox: [f64; 4],
    pub area: Option<f64>,
    pub iscrowd: bool,
    pub segmentation: Option<String>,
}

const SAMPLE_COLUMNS: &str = "s.id, s.dataset_id, s.job_id, r.path, s.path, s.size_bytes, s.mtime_ns, s.status,
    s.width, s.height, s.format, s.orientation, s.error, s.coco_width, s.coco_height, s.size_mismatch";

fn sample_row(r: &Row<'_>) -> rusqlite::Result<SampleRow> {
    Ok(SampleRow {
        id: r.get(0)?,
        dataset_id: r.get(1)?,
        job_id: r.get(2)?,
        root: r.get::<_, StoredPath>(3)?.0,
        path: r.get::<_, StoredPath>(4)?.0,
        size_bytes: r.get(5)?,
        mtime_ns: r.get(6)?,
        status: r.get(7)?,
        width: r.get(8)?,
        height: r.get(9)?,
        format: r.get(10)?,
        orientation: r.get(11)?,
        error: r.get(12)?,
        coco_width: r.get(13)?,
        coco_height: r.get(14)?,
        size_mismatch: r.get(15)?,
    })
}

pub fn check_status(status: &str) -> Result<()> {
    if STATUSES.contains(&status) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "unknown status {status:?}: expected one of {}",
            STATUSES.join(", ")
        )))
    }
}

impl Store {
    /// Samples of a dataset in id order, optionally of one status, paged by `offset` or (at
    /// any depth, in O(limit)) by `after_id`: the rows with ids above it.
    pub fn samples(
        &self,
        dataset_id: i64,
        status: Option<&str>,
        offset: i64,
        limit: i64,
        after_id: i64,
    ) -> Result<Vec<SampleRow>> {
        if offset < 0 || limit < 0 {
            return Err(Error::InvalidArgument(
                "offset and limit must not be negative".into(),
            ));
        }
        // The status goes into the SQL text (it is one of STATUSES, checked) so that SQLite
        // can use the partial index of `failed` rows; a bound parameter would hide it.
        let filter = match status {
            Some(s) => {
                check_status(s)?;
                format!("AND s.status = '{s}'")
            }
            None => String::new(),
        };
        let sql = format!(
            "SELECT {SAMPLE_COLUMNS} FROM samples s JOIN roots r ON r.id = s.root_id
             WHERE s.dataset_id = ?1 AND s.id > ?2 {filter} ORDER BY s.id LIMIT ?3 OFFSET ?4"
        );
        let mut st = self.conn.prepare_cached(&sql).store(&self.path)?;
        let rows = st
            .query_map(params![dataset_id, after_id, limit, offset], sample_row)
            .store(&self.path)?;
        rows.collect::<std::result::Result<_, _>>()
            .store(&self.path)
    }

    /// Samples by id, in the order given; ids that do not exist are left out.
    pub fn samples_by_id(&self, ids: &[i64]) -> Result<Vec<SampleRow>> {
        let sql = format!("SELECT {SAMPLE_COLUMNS} FROM samples s JOIN roots r ON r.id = s.root_id WHERE s.id = ?1");
        let mut st = self.conn.prepare_cached(&sql).store(&self.path)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let mut rows = st.query_map([id], sample_row).store(&self.path)?;
            if let Some(row) = rows.next() {
                out.push(row.store(&self.path)?);
            }
        }
        Ok(out)
    }

    /// Boxes with category names, of one sample or of the whole dataset, in id order.
    pub fn annotations(
        &self,
        dataset_id: i64,
        sample_id: Option<i64>,
    ) -> Result<Vec<AnnotationRow>> {
        let sql = if sample_id.is_some() {
            "SELECT a.id, a.sample_id, c.name, c.supercategory, a.x, a.y, a.w, a.h, a.area, a.iscrowd, a.segmentation
             FROM annotations a JOIN categories c ON c.id = a.category_id
             JOIN samples s ON s.id = a.sample_id
             WHERE a.sample_id = ?2 AND s.dataset_id = ?1 ORDER BY a.id"
        } else {
            "SELECT a.id, a.sample_id, c.name, c.supercategory, a.x, a.y, a.w, a.h, a.area, a.iscrowd, a.segmentation
             FROM annotations a JOIN categories c ON c.id = a.category_id
             WHERE c.dataset_id = ?1 AND ?2 IS NULL ORDER BY a.sample_id, a.id"
        };
        let mut st = self.conn.prepare_cached(sql).store(&self.path)?;
        let rows = st
            .query_map(params![dataset_id, sample_id], |r| {
                Ok(AnnotationRow {
                    id: r.get(0)?,
                    sample_id: r.get(1)?,
                    category: r.get(2)?,
                    supercategory: r.get(3)?,
                    bbox: [r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?],
                    area: r.get(8)?,
                    iscrowd: r.get(9)?,
                    segmentation: r.get(10)?,
                })
            })
            .store(&self.path)?;
        rows.collect::<std::result::Result<_, _>>()
            .store(&self.path)
    }

    /// COCO entries of a job whose file was not found: `(coco image id, file_name)`.
    pub fn coco_missing(&self, job_id: i64) -> Result<Vec<(i64, String)>> {
        self.pairs("SELECT coco_image_id, file_name FROM coco_missing WHERE job_id = ?1 ORDER BY file_name", job_id)
    }
}
