//! Reads of samples and annotations.

use std::path::PathBuf;

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, OptionalExtension, Row};

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

/// Up to this many matches, a path glob's page is read through the path index and sorted.
const PREFIX_ROUTE_MAX: i64 = 2000;

/// `[lo, hi)`: the paths that start with the glob's literal prefix (None without one).
fn glob_prefix_range(glob: &str) -> Option<(String, String)> {
    let end = glob.find(['*', '?', '[']).unwrap_or(glob.len());
    let lo = &glob[..end];
    let last = lo.chars().last()?;
    let next = char::from_u32(last as u32 + 1)?;
    let hi = format!("{}{next}", &lo[..lo.len() - last.len_utf8()]);
    Some((lo.to_owned(), hi))
}

fn annotation_row(r: &Row<'_>) -> rusqlite::Result<AnnotationRow> {
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

/// What a page of samples must match; `None` (or `false` for nothing) leaves a field out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleFilter {
    pub status: Option<String>,
    pub format: Option<String>,
    pub min_width: Option<i64>,
    pub max_width: Option<i64>,
    pub min_height: Option<i64>,
    pub max_height: Option<i64>,
    /// SQLite GLOB over the path relative to its root (`*`, `?`, `[...]`; case-sensitive).
    pub path_glob: Option<String>,
    /// A category name: samples with at least one box of it.
    pub category: Option<String>,
    pub has_annotations: Option<bool>,
}

impl SampleFilter {
    pub fn by_status(status: Option<&str>) -> Self {
        SampleFilter {
            status: status.map(str::to_owned),
            ..Default::default()
        }
    }
}

/// Counts for the filter controls, each read from a counter: O(distinct values).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facets {
    pub formats: Vec<(String, i64)>,
    /// `(name, samples with a box of it)`, by name.
    pub categories: Vec<(String, i64)>,
}

/// `(category id, name, supercategory, COCO id)`.
pub type CategoryRow = (i64, String, Option<String>, Option<i64>);

impl Store {
    /// Samples of a dataset in id order that match `filter`, paged by key: up to `limit` rows
    /// with ids above `after_id` (the last id of the previous page). There is no offset: a
    /// page at any depth costs what its rows cost when an index serves the filter (the
    /// dataset's id order, a status queue, a format, a category), never the rows before it.
    pub fn samples(
        &self,
        dataset_id: i64,
        filter: &SampleFilter,
        limit: i64,
        after_id: i64,
    ) -> Result<Vec<SampleRow>> {
        if limit < 0 || after_id < 0 {
            return Err(Error::InvalidArgument(
                "limit and after_id must not be negative".into(),
            ));
        }
        let mut args: Vec<Value> = vec![dataset_id.into(), after_id.into(), limit.into()];
        let mut cond = String::new();
        // The status goes into the SQL text (it is one of STATUSES, checked) so that SQLite
        // can use the partial index of its rows (`pending`, `indexed`, `embedding`, `failed`);
        // a bound parameter would hide it.
        if let Some(s) = &filter.status {
            check_status(s)?;
            cond.push_str(&format!(" AND s.status = '{s}'"));
        }
        let mut bind = |cond: &mut String, sql: &str, v: Value| {
            args.push(v);
            cond.push_str(&sql.replace('?', &format!("?{}", args.len())));
        };
        if let Some(f) = &filter.format {
            bind(&mut cond, " AND s.format = ?", f.clone().into());
        }
        for (value, sql) in [
            (filter.min_width, " AND s.width >= ?"),
            (filter.max_width, " AND s.width <= ?"),
            (filter.min_height, " AND s.height >= ?"),
            (filter.max_height, " AND s.height <= ?"),
        ] {
            if let Some(v) = value {
                bind(&mut cond, sql, v.into());
            }
        }
        // A glob with a literal start ("train/cats/*") that few paths share is served by the
        // (root, path) index: its matches are read by path and sorted by id. Otherwise the
        // glob is checked on the id-ordered walk (dense matches fill a page quickly).
        let mut by_path = false;
        if let Some(g) = &filter.path_glob {
            // CAST: a name stored as bytes (not UTF-8) is a BLOB, which GLOB never matches.
            bind(
                &mut cond,
                " AND CAST(s.path AS TEXT) GLOB ?",
                g.clone().into(),
            );
            if let Some((lo, hi)) = glob_prefix_range(g) {
                if filter.category.is_none() && self.few_under_prefix(dataset_id, &lo, &hi)? {
                    bind(&mut cond, " AND s.path >= ?", lo.into());
                    bind(&mut cond, " AND s.path < ?", hi.into());
                    cond.push_str(" AND s.root_id IN (SELECT id FROM roots WHERE dataset_id = ?1)");
                    by_path = true;
                }
            }
        }
        match filter.has_annotations {
            Some(true) => {
                cond.push_str(" AND EXISTS (SELECT 1 FROM annotations x WHERE x.sample_id = s.id)")
            }
            Some(false) => cond
                .push_str(" AND NOT EXISTS (SELECT 1 FROM annotations x WHERE x.sample_id = s.id)"),
            None => {}
        }
        let sql = match &filter.category {
            // One category: walk its index in sample order, so a rare category costs what its
            // page holds, not a scan of the dataset.
            Some(name) => {
                let Some(category_id) = self.category_id(dataset_id, name)? else {
                    return Ok(Vec::new());
                };
                bind(&mut cond, " AND a.category_id = ?", category_id.into());
                format!(
                    "SELECT {SAMPLE_COLUMNS} FROM annotations a INDEXED BY annotations_by_category
                     JOIN samples s ON s.id = a.sample_id JOIN roots r ON r.id = s.root_id
                     WHERE s.dataset_id = ?1 AND a.sample_id > ?2 {cond}
                     GROUP BY a.sample_id ORDER BY a.sample_id LIMIT ?3"
                )
            }
            None => {
                let index = if by_path {
                    "INDEXED BY sqlite_autoindex_samples_1"
                } else {
                    ""
                };
                format!(
                    "SELECT {SAMPLE_COLUMNS} FROM samples s {index} JOIN roots r ON r.id = s.root_id
                     WHERE s.dataset_id = ?1 AND s.id > ?2 {cond} ORDER BY s.id LIMIT ?3"
                )
            }
        };
        let mut st = self.conn.prepare_cached(&sql).store(&self.path)?;
        let rows = st
            .query_map(params_from_iter(args), sample_row)
            .store(&self.path)?;
        rows.collect::<std::result::Result<_, _>>()
            .store(&self.path)
    }

    /// Whether fewer than `PREFIX_ROUTE_MAX` paths of the dataset lie in `[lo, hi)`, none of
    /// them stored as bytes (a name that is not UTF-8 sorts apart, as a BLOB: such a dataset
    /// keeps the walk, which sees every name).
    fn few_under_prefix(&self, dataset_id: i64, lo: &str, hi: &str) -> Result<bool> {
        let sql = format!(
            "SELECT (SELECT COUNT(*) FROM (SELECT 1 FROM samples INDEXED BY sqlite_autoindex_samples_1
                 WHERE root_id IN (SELECT id FROM roots WHERE dataset_id = ?1)
                 AND path >= ?2 AND path < ?3 LIMIT {PREFIX_ROUTE_MAX})),
             EXISTS (SELECT 1 FROM samples INDEXED BY sqlite_autoindex_samples_1
                 WHERE root_id IN (SELECT id FROM roots WHERE dataset_id = ?1)
                 AND path >= CAST(?2 AS BLOB) AND path < CAST(?3 AS BLOB))"
        );
        let (n, bytes): (i64, bool) = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut st| {
                st.query_row(params![dataset_id, lo, hi], |r| Ok((r.get(0)?, r.get(1)?)))
            })
            .store(&self.path)?;
        Ok(n < PREFIX_ROUTE_MAX && !bytes)
    }

    /// Recount the samples per category of a dataset (the category facet) from the category
    /// index: O(boxes), once per COCO ingest, instead of a check on every box written.
    pub(crate) fn count_categories(&mut self, dataset_id: i64) -> Result<()> {
        let path = self.path.clone();
        let tx = self.immediate()?;
        tx.execute(
            "DELETE FROM category_counts
             WHERE category_id IN (SELECT id FROM categories WHERE dataset_id = ?1)",
            [dataset_id],
        )
        .store(&path)?;
        tx.execute(
            "INSERT INTO category_counts (category_id, n)
             SELECT category_id, COUNT(DISTINCT sample_id) FROM annotations
             WHERE category_id IN (SELECT id FROM categories WHERE dataset_id = ?1)
             GROUP BY category_id",
            [dataset_id],
        )
        .store(&path)?;
        tx.commit().store(&path)
    }

    fn category_id(&self, dataset_id: i64, name: &str) -> Result<Option<i64>> {
        self.conn
            .prepare_cached("SELECT id FROM categories WHERE dataset_id = ?1 AND name = ?2")
            .and_then(|mut st| {
                st.query_row(params![dataset_id, name], |r| r.get(0))
                    .optional()
            })
            .store(&self.path)
    }

    /// Samples per format and per category, from the counters the schema's triggers keep.
    pub fn facets(&self, dataset_id: i64) -> Result<Facets> {
        Ok(Facets {
            formats: self.pairs(
                "SELECT format, n FROM format_counts WHERE dataset_id = ?1 AND n > 0 ORDER BY format",
                dataset_id,
            )?,
            categories: self.pairs(
                "SELECT c.name, COALESCE(k.n, 0) FROM categories c
                 LEFT JOIN category_counts k ON k.category_id = c.id
                 WHERE c.dataset_id = ?1 ORDER BY c.name",
                dataset_id,
            )?,
        })
    }

    /// The dataset's categories in id order.
    pub fn categories(&self, dataset_id: i64) -> Result<Vec<CategoryRow>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT id, name, supercategory, coco_id FROM categories WHERE dataset_id = ?1 ORDER BY id",
            )
            .store(&self.path)?;
        let rows = st
            .query_map([dataset_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .store(&self.path)?;
        rows.collect::<std::result::Result<_, _>>()
            .store(&self.path)
    }

    /// Boxes of the samples with ids in `(after_id, upto_id]`, in (sample, id) order: one
    /// page of an export, read along the table's clustering.
    pub fn annotations_between(
        &self,
        dataset_id: i64,
        after_id: i64,
        upto_id: i64,
    ) -> Result<Vec<AnnotationRow>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT a.id, a.sample_id, c.name, c.supercategory, a.x, a.y, a.w, a.h, a.area, a.iscrowd, a.segmentation
                 FROM annotations a JOIN categories c ON c.id = a.category_id
                 WHERE a.sample_id > ?2 AND a.sample_id <= ?3 AND c.dataset_id = ?1
                 ORDER BY a.sample_id, a.id",
            )
            .store(&self.path)?;
        let rows = st
            .query_map(params![dataset_id, after_id, upto_id], annotation_row)
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
            .query_map(params![dataset_id, sample_id], annotation_row)
            .store(&self.path)?;
        rows.collect::<std::result::Result<_, _>>()
            .store(&self.path)
    }

    /// COCO entries of a job whose file was not found: `(coco image id, file_name)`.
    pub fn coco_missing(&self, job_id: i64) -> Result<Vec<(i64, String)>> {
        self.pairs("SELECT coco_image_id, file_name FROM coco_missing WHERE job_id = ?1 ORDER BY file_name", job_id)
    }
}

#[cfg(test)]
mod tests {
    use super::glob_prefix_range;

    #[test]
    fn glob_prefixes() {
        assert_eq!(
            glob_prefix_range("train/*"),
            Some(("train/".into(), "train0".into()))
        );
        assert_eq!(glob_prefix_range("a?b"), Some(("a".into(), "b".into())));
        assert_eq!(glob_prefix_range("é[xy]"), Some(("é".into(), "ê".into())));
        assert_eq!(glob_prefix_range("*.png"), None);
        assert_eq!(
            glob_prefix_range("plain"),
            Some(("plain".into(), "plaio".into()))
        );
    }
}
