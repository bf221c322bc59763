//! COCO detection files: parse and check everything first, then write in one transaction.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;
use rusqlite::{params, OptionalExtension};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::db::{bump, multi_row_insert, Store, FAILED, INDEXED};
use crate::error::{Error, Result, StoreContext};
use crate::header::{FileSource, ImageInfo};
use crate::scan::io_pool;

#[derive(Deserialize)]
struct RawCoco<'a> {
    images: Vec<Image>,
    #[serde(default)]
    categories: Vec<Category>,
    #[serde(default, borrow)]
    annotations: Vec<Annotation<'a>>,
}

#[derive(Deserialize)]
pub struct Image {
    pub id: i64,
    pub file_name: String,
    pub width: Option<i64>,
    pub height: Option<i64>,
}

#[derive(Deserialize)]
pub struct Category {
    pub id: i64,
    pub name: String,
    pub supercategory: Option<String>,
}

#[derive(Deserialize)]
pub struct Annotation<'a> {
    pub id: Option<i64>,
    pub image_id: i64,
    pub category_id: i64,
    pub bbox: Vec<f64>,
    pub area: Option<f64>,
    pub iscrowd: Option<i64>,
    #[serde(borrow)]
    pub segmentation: Option<&'a RawValue>,
}

/// A checked COCO file, borrowing the segmentation JSON from the file's bytes.
pub struct Coco<'a> {
    pub images: Vec<Image>,
    pub categories: Vec<Category>,
    pub annotations: Vec<Annotation<'a>>,
}

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

/// Listed files looked at per step while the previous step's rows are inserted.
const LOOK_CHUNK: usize = 8192;

#[derive(Debug, Clone, Default)]
pub struct CocoSummary {
    pub job_id: i64,
    pub images: u64,
    pub added: u64,
    pub existing: u64,
    pub annotations: u64,
    pub categories: u64,
    /// `file_name` of each COCO image whose file is not on disk.
    pub missing: Vec<String>,
    /// Boxes of images whose file is missing: not stored, counted here.
    pub annotations_skipped: u64,
}

/// What opening one listed file found.
enum Found {
    Missing,
    File {
        size: u64,
        mtime_ns: i64,
        probed: std::result::Result<ImageInfo, String>,
    },
}

fn look(path: &Path) -> Found {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Found::Missing,
        Err(e) => {
            return Found::File {
                size: 0,
                mtime_ns: 0,
                probed: Err(format!("cannot read file: {e}")),
            }
        }
    };
    let (size, mtime_ns) = match file.metadata() {
        Ok(m) if m.is_file() => (m.len(), crate::walk::mtime_ns(&m)),
        Ok(_) => return Found::Missing,
        Err(e) => {
            return Found::File {
                size: 0,
                mtime_ns: 0,
                probed: Err(format!("cannot read file: {e}")),
            }
        }
    };
    let probed = FileSource::from_file(file)
        .and_then(|mut src| crate::header::probe(&mut src))
        .map_err(|r| r.to_string());
    Found::File {
        size,
        mtime_ns,
        probed,
    }
}

/// Parse and check a COCO file: ids unique, every annotation's image and category known,
/// every bbox four finite numbers with non-negative size.
pub fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<Coco<'a>> {
    // serde would also take a JSON array as the struct's fields in order: a COCO file is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Error::coco(
            path,
            "not a COCO file: the top level must be a JSON object",
        ));
    }
    let raw: RawCoco<'a> = serde_json::from_slice(bytes)
        .map_err(|e| Error::coco(path, format!("not a COCO file: {e}")))?;
    let mut image_ids = HashSet::with_capacity(raw.images.len());
    for (i, im) in raw.images.iter().enumerate() {
        if !image_ids.insert(im.id) {
            return Err(Error::coco(
                path,
                format!("images[{i}]: duplicate image id {}", im.id),
            ));
        }
        if im.file_name.is_empty() {
            return Err(Error::coco(path, format!("images[{i}]: empty file_name")));
        }
        if im.width.is_some_and(|w| w <= 0) || im.height.is_some_and(|h| h <= 0) {
            return Err(Error::coco(
                path,
                format!("images[{i}]: width and height must be positive"),
            ));
        }
    }
    let mut cat_ids = HashSet::with_capacity(raw.categories.len());
    for (i, c) in raw.categories.iter().enumerate() {
        if !cat_ids.insert(c.id) {
            return Err(Error::coco(
                path,
                format!("categories[{i}]: duplicate category id {}", c.id),
            ));
        }
    }
    let mut ann_ids = HashSet::with_capacity(raw.annotations.len());
    for (i, a) in raw.annotations.iter().enumerate() {
        if let Some(id) = a.id {
            if !ann_ids.insert(id) {
                return Err(Error::coco(
                    path,
                    format!("annotations[{i}]: duplicate annotation id {id}"),
                ));
            }
        }
        if !image_ids.contains(&a.image_id) {
            return Err(Error::coco(
                path,
                format!("annotations[{i}]: image_id {} is not in images", a.image_id),
            ));
        }
        if !cat_ids.contains(&a.category_id) {
            return Err(Error::coco(
                path,
                format!(
                    "annotations[{i}]: category_id {} is not in categories",
                    a.category_id
                ),
            ));
        }
        let ok = a.bbox.len() == 4
            && a.bbox.iter().all(|v| v.is_finite())
            && a.bbox[2] >= 0.0
            && a.bbox[3] >= 0.0;
        if !ok {
            return Err(Error::coco(
                path,
                format!(
                    "annotations[{i}]: bbox must be [x, y, width, height], got {:?}",
                    a.bbox
                ),
            ));
        }
    }
    Ok(Coco {
        images: raw.images,
        categories: raw.categories,
        annotations: raw.annotations,
    })
}

impl Store {
    /// Read, check and ingest a COCO file for the images under `images_root` (absolute).
    /// Nothing is written when the file is malformed.
    pub fn ingest_coco(
        &mut self,
        dataset_id: i64,
        annotations_json: &Path,
        images_root: &Path,
        stop: &AtomicBool,
    ) -> Result<CocoSummary> {
        let bytes = std::fs::read(annotations_json).map_err(|e| Error::io(annotations_json, e))?;
        let coco = parse(annotations_json, &bytes)?;
        if images_root.to_str().is_none() {
            return Err(Error::InvalidArgument(format!(
                "{}: path is not utf-8",
                images_root.display()
            )));
        }

        // Every listed file has to be opened to know it exists; read its header in the same
        // open (phase 2 for free), in parallel, sorted by name so the index inserts append.
        let mut order: Vec<usize> = (0..coco.images.len()).collect();
        order.sort_unstable_by(|&a, &b| coco.images[a].file_name.cmp(&coco.images[b].file_name));
        // Chunks are looked at on the I/O pool while the previous chunk's rows are inserted.
        let (found_tx, found_rx) = std::sync::mpsc::sync_channel::<Vec<Found>>(2);
        std::thread::scope(|scope| {
            let (order, coco, images_root) = (&order, &coco, images_root);
            scope.spawn(move || {
                for chunk in order.chunks(LOOK_CHUNK) {
                    let found = io_pool().install(|| {
                        chunk
                            .par_iter()
                            .map(|&i| look(&images_root.join(&coco.images[i].file_name)))
                            .collect()
                    });
                    if stop.load(Ordering::Relaxed) || found_tx.send(found).is_err() {
                        break; // the inserting side stopped
                    }
                }
            });
            let job_id = self.create_job(
                dataset_id,
                "coco",
                annotations_json.to_str().unwrap_or_default(),
            )?;
            let done = self.insert_coco(
                dataset_id,
                job_id,
                annotations_json,
                images_root,
                coco,
                order,
                &found_rx,
                stop,
            );
            if done.is_err() {
                let _ = self.drop_job(job_id); // the transaction rolled back: leave nothing
            }
            done
        })
    }

    #[allow(clippy::too_many_arguments, clippy::too_many_lines)]
    fn insert_coco(
        &mut self,
        dataset_id: i64,
        job_id: i64,
        annotations_json: &Path,
        images_root: &Path,
        coco: &Coco<'_>,
        order: &[usize],
        found_rx: &std::sync::mpsc::Receiver<Vec<Found>>,
        stop: &AtomicBool,
    ) -> Result<CocoSummary> {
        let root_str = images_root.to_str().unwrap_or_default();
        let json_str = annotations_json.to_str().unwrap_or_default();
        let (root_id, prefix, _) = self.root_for(dataset_id, root_str)?;
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
        let mut category_rows: HashMap<i64, i64> = HashMap::new();
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO categories (dataset_id, name, supercategory, coco_id) VALUES (?1, ?2, ?3, ?4)
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
                category_rows.insert(c.id, id);
            }
        }
        let mut sample_of_image: HashMap<i64, i64> = HashMap::with_capacity(coco.images.len());
        let mut earlier: Vec<i64> = Vec::new();
        let mut missing = Vec::new();
        let (mut n_indexed, mut n_failed) = (0i64, 0i64);
        let mut new_rows: HashSet<i64> = HashSet::new();
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO samples (dataset_id, job_id, root_id, path, size_bytes, mtime_ns, coco_width, coco_height,
                                          status, width, height, format, orientation, error, size_mismatch)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14,
                             coalesce(?7 IS NOT NULL AND ?10 IS NOT NULL AND (?7 != ?10 OR ?8 != ?11), 0))
                     ON CONFLICT (root_id, path) DO UPDATE SET
                         coco_width = excluded.coco_width, coco_height = excluded.coco_height,
                         size_mismatch = (width IS NOT NULL AND excluded.coco_width IS NOT NULL
                             AND (width != excluded.coco_width OR height != excluded.coco_height))
                     RETURNING id, job_id",
                )
                .store(&path)?;
            let mut miss = tx
                .prepare_cached("INSERT INTO coco_missing (job_id, coco_image_id, file_name) VALUES (?1, ?2, ?3)")
                .store(&path)?;
            for chunk in order.chunks(LOOK_CHUNK) {
                let found = found_rx.recv().map_err(|_| {
                    if stop.load(Ordering::Relaxed) {
                        Error::Cancelled
                    } else {
                        Error::coco(annotations_json, "reading the listed files stopped early")
                    }
                })?;
                for (&i, look) in chunk.iter().zip(&found) {
                    let im = &coco.images[i];
                    let (size, mtime, probed) = match look {
                        Found::Missing => {
                            miss.execute(params![job_id, im.id, im.file_name])
                                .store(&path)?;
                            missing.push(im.file_name.clone());
                            continue;
                        }
                        Found::File {
                            size,
                            mtime_ns,
                            probed,
                        } => (*size, *mtime_ns, probed),
                    };
                    let rel = if prefix.is_empty() {
                        im.file_name.clone()
                    } else {
                        format!("{prefix}/{}", im.file_name)
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
                    let (id, owner): (i64, i64) = st
                        .query_row(
                            params![
                                dataset_id,
                                job_id,
                                root_id,
                                rel,
                                size as i64,
                                mtime,
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
                    if owner != job_id {
                        earlier.push(id);
                    } else if new_rows.insert(id) {
                        // (the same file listed twice is one row, counted once)
                        if status == INDEXED {
                            n_indexed += 1;
                        } else {
                            n_failed += 1;
                        }
                    }
                    sample_of_image.insert(im.id, id);
                }
            }
        }
        let added = new_rows.len() as i64;
        {
            // Ingesting the same file again replaces its boxes instead of adding them twice.
            let mut del = tx
                .prepare_cached("DELETE FROM annotations WHERE sample_id = ?1 AND file_id = ?2")
                .store(&path)?;
            for id in &earlier {
                del.execute(params![id, file_id]).store(&path)?;
            }
        }
        let mut anns: Vec<(i64, &Annotation<'_>)> = coco
            .annotations
            .iter()
            .filter_map(|a| sample_of_image.get(&a.image_id).map(|s| (*s, a)))
            .collect();
        anns.sort_by_key(|(s, _)| *s);
        let annotations_skipped = (coco.annotations.len() - anns.len()) as u64;
        {
            let mut next: i64 = tx
                .query_row(
                    "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'next_annotation_id'",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .store(&path)?
                .unwrap_or(1);
            // Many rows per INSERT: the per-statement cost, not SQLite's per-row work,
            // dominates a 700k-box ingest.
            for chunk in anns.chunks(ROWS_PER_INSERT) {
                let mut st = tx
                    .prepare_cached(&multi_row_insert(
                        "annotations",
                        &ANNOTATION_COLUMNS,
                        chunk.len(),
                        "",
                    ))
                    .store(&path)?;
                let mut values: Vec<rusqlite::types::Value> = Vec::with_capacity(chunk.len() * 12);
                for (sample, a) in chunk {
                    use rusqlite::types::Value::{Integer, Null, Real, Text};
                    let b = &a.bbox;
                    values.extend([
                        Integer(*sample),
                        Integer(next),
                        Integer(file_id),
                        Integer(category_rows[&a.category_id]),
                        a.id.map_or(Null, Integer),
                        Real(b[0]),
                        Real(b[1]),
                        Real(b[2]),
                        Real(b[3]),
                        a.area.map_or(Null, Real),
                        Integer(a.iscrowd.unwrap_or(0)),
                        a.segmentation.map_or(Null, |r| Text(r.get().to_string())),
                    ]);
                    next += 1;
                }
                st.execute(rusqlite::params_from_iter(values))
                    .store(&path)?;
            }
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('next_annotation_id', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [next.to_string()],
            )
            .store(&path)?;
        }
        bump(&tx, dataset_id, job_id, INDEXED, n_indexed).store(&path)?;
        bump(&tx, dataset_id, job_id, FAILED, n_failed).store(&path)?;
        // Rows that were there before this job (a file listed twice is still one row).
        let existing = earlier.iter().collect::<HashSet<_>>().len() as i64;
        let warnings: Vec<String> = missing
            .iter()
            .map(|m| format!("{m}: listed in the COCO file but not found on disk"))
            .collect();
        tx.execute(
            "UPDATE jobs SET added = ?2, existing = ?3, warnings = ?4, running_owner = NULL WHERE id = ?1",
            params![
                job_id,
                added,
                existing.max(0),
                serde_json::to_string(&warnings).unwrap_or_default()
            ],
        )
        .store(&path)?;
        tx.commit().store(&path)?;
        Ok(CocoSummary {
            job_id,
            images: coco.images.len() as u64,
            added: added as u64,
            existing: existing.max(0) as u64,
            annotations: anns.len() as u64,
            categories: coco.categories.len() as u64,
            missing,
            annotations_skipped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_listed_twice_is_one_row_and_counted_once() {
        let t = tempfile::tempdir().unwrap();
        let images = t.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::write(images.join("a.png"), b"\x89PNG\r\n\x1a\n").unwrap();
        let json = t.path().join("c.json");
        let coco = r#"{"images":[{"id":1,"file_name":"a.png"},{"id":2,"file_name":"a.png"}]}"#;
        std::fs::write(&json, coco).unwrap();
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let d = s.create_dataset("d").unwrap();
        let stop = AtomicBool::new(false);
        let first = s.ingest_coco(d, &json, &images, &stop).unwrap();
        assert_eq!((first.added, first.existing), (1, 0));
        let again = s.ingest_coco(d, &json, &images, &stop).unwrap();
        assert_eq!((again.added, again.existing), (0, 1));
    }

    #[test]
    fn malformed_files_are_refused_with_a_reason() {
        let p = Path::new("x.json");
        let err = |s: &str| match parse(p, s.as_bytes()) {
            Err(Error::Coco { reason, .. }) => reason,
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("accepted {s}"),
        };
        assert!(err("{").contains("not a COCO file"));
        assert!(err(r#"{"images": 3}"#).contains("not a COCO file"));
        let base =
            r#""images":[{"id":1,"file_name":"a.jpg"}],"categories":[{"id":7,"name":"dog"}]"#;
        assert!(err(&format!(
            r#"{{{base},"annotations":[{{"image_id":2,"category_id":7,"bbox":[0,0,1,1]}}]}}"#
        ))
        .contains("image_id 2"));
        assert!(err(&format!(
            r#"{{{base},"annotations":[{{"image_id":1,"category_id":8,"bbox":[0,0,1,1]}}]}}"#
        ))
        .contains("category_id 8"));
        assert!(err(&format!(
            r#"{{{base},"annotations":[{{"image_id":1,"category_id":7,"bbox":[0,0,1]}}]}}"#
        ))
        .contains("bbox"));
        assert!(err("[]").contains("must be a JSON object"));
        assert!(err(" [[], [], []]").contains("must be a JSON object"));
        let ann = r#"{"id":5,"image_id":1,"category_id":7,"bbox":[1,2,3,4]}"#;
        assert!(err(&format!(r#"{{{base},"annotations":[{ann},{ann}]}}"#))
            .contains("annotations[1]: duplicate annotation id 5"));
        let no_ids = r#"{"image_id":1,"category_id":7,"bbox":[1,2,3,4]}"#;
        assert!(parse(
            p,
            format!(r#"{{{base},"annotations":[{no_ids},{no_ids}]}}"#).as_bytes()
        )
        .is_ok());
        let ok = format!(
            r#"{{{base},"annotations":[{{"id":5,"image_id":1,"category_id":7,"bbox":[1,2,3,4],"segmentation":[[1,2,3,4,5,6]]}}]}}"#
        );
        let c = parse(p, ok.as_bytes()).unwrap();
        assert_eq!(
            c.annotations[0].segmentation.unwrap().get(),
            "[[1,2,3,4,5,6]]"
        );
    }
}
