//! Phase 1 for a bucket: list the keys under the prefix (pages of 1000, the common prefixes
//! of the first level listed in parallel), keep image names as the walk does, and insert
//! `pending` rows with size, last-modified and ETag in large transactions while the listing
//! goes on. A prefix listed before is synced instead, by the rules of `sync.rs` with objects
//! compared by ETag and size: new keys are added, changed ones go back to `pending`, and after
//! a complete listing the keys no longer there become `missing`.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, BoxStream, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore};
use rusqlite::types::ToSqlOutput;

use super::client::{self, block_on, Patience};
use super::failure::{classify, Kind};
use super::ObjectUri;
use crate::db::{bump, multi_row_insert, Store, PENDING};
use crate::error::{Error, Result, StoreContext};
use crate::paths::{join_rel, SqlPath};
use crate::scan::ScanSummary;
use crate::sync::{Entry, Seen, SyncCounts};
use crate::walk::is_image_name;

/// Rows per transaction (as for folders).
const INSERT_CHUNK: usize = 16_384;
/// Rows bound into one INSERT statement (7 values each).
const ROWS_PER_INSERT: usize = 128;
/// Rows waiting no longer than this before they are committed, so progress moves on a slow
/// listing.
const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Entries handed over at a time (one S3 page).
const PAGE: usize = 1000;
/// Common prefixes listed at once.
const PREFIX_LISTS: usize = 16;
/// Times one listing resumes from its last key after an error that outlasted the client's
/// own retries (a server restarting, a connection dropped mid-page).
const RESUMES: u32 = 5;

/// One object kept by the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    /// Key relative to the listed prefix.
    pub rel: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub etag: Option<String>,
}

/// The walk's rules on a key relative to the root: an image extension, and no component
/// starting with `.` unless hidden names are asked for.
pub fn keep(rel: &str, include_hidden: bool) -> bool {
    if rel.is_empty() || rel.ends_with('/') {
        return false;
    }
    if !include_hidden && rel.split('/').any(|c| c.starts_with('.')) {
        return false;
    }
    is_image_name(rel.rsplit('/').next().unwrap_or(rel).as_bytes())
}

fn entry(meta: ObjectMeta, base: &str) -> Option<ObjectEntry> {
    let rel = meta.location.as_ref().strip_prefix(base)?.to_string();
    Some(ObjectEntry {
        rel,
        size: meta.size,
        mtime_ns: meta.last_modified.timestamp_nanos_opt().unwrap_or(0),
        etag: meta.e_tag,
    })
}

fn transient(e: &object_store::Error) -> bool {
    matches!(classify(e).kind, Kind::Unreachable | Kind::Server)
}

fn pause(attempt: u32) -> Duration {
    Duration::from_millis(200u64 << attempt.min(5))
}

struct Lister {
    store: Arc<dyn ObjectStore>,
    prefix: Option<ObjectPath>,
    inner: Option<BoxStream<'static, object_store::Result<ObjectMeta>>>,
    last: Option<ObjectPath>,
    resumes: u32,
    failed: Option<object_store::Error>,
    done: bool,
}

/// Every object under `prefix`, in pages; after a transient error the listing starts again
/// after the last key it returned (S3's `start-after`), so nothing is lost or repeated.
fn pages(
    store: Arc<dyn ObjectStore>,
    prefix: Option<ObjectPath>,
) -> BoxStream<'static, object_store::Result<Vec<ObjectMeta>>> {
    let st = Lister {
        store,
        prefix,
        inner: None,
        last: None,
        resumes: 0,
        failed: None,
        done: false,
    };
    stream::unfold(st, |mut st| async move {
        if let Some(e) = st.failed.take() {
            st.done = true;
            return Some((Err(e), st));
        }
        if st.done {
            return None;
        }
        let mut page = Vec::new();
        loop {
            let inner = st.inner.get_or_insert_with(|| match &st.last {
                None => st.store.list(st.prefix.as_ref()),
                Some(after) => st.store.list_with_offset(st.prefix.as_ref(), after),
            });
            match inner.next().await {
                Some(Ok(m)) => {
                    st.resumes = 0;
                    st.last = Some(m.location.clone());
                    page.push(m);
                    if page.len() >= PAGE {
                        return Some((Ok(page), st));
                    }
                }
                None => {
                    st.done = true;
                    return (!page.is_empty()).then_some((Ok(page), st));
                }
                Some(Err(e)) if transient(&e) && st.resumes < RESUMES => {
                    st.resumes += 1;
                    st.inner = None;
                    tokio::time::sleep(pause(st.resumes)).await;
                }
                Some(Err(e)) => {
                    if page.is_empty() {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                    st.failed = Some(e);
                    return Some((Ok(page), st));
                }
            }
        }
    })
    .boxed()
}

/// The first level under `prefix`: its objects and its common prefixes (all pages), tried
/// again from the start after a transient error.
async fn first_level(
    store: &Arc<dyn ObjectStore>,
    prefix: Option<&ObjectPath>,
) -> object_store::Result<object_store::ListResult> {
    let mut attempt = 0;
    loop {
        match store.list_with_delimiter(prefix).await {
            Err(e) if transient(&e) && attempt < RESUMES => {
                attempt += 1;
                tokio::time::sleep(pause(attempt)).await;
            }
            other => return other,
        }
    }
}

fn listing_error(uri: &ObjectUri, e: &object_store::Error) -> Error {
    classify(e).into_error(&uri.bucket_uri())
}

/// Fail now, before anything is written, when the bucket cannot be listed: one request with
/// a client that barely retries.
pub fn check_listable(
    uri: &ObjectUri,
    prefix: Option<&ObjectPath>,
    stop: &AtomicBool,
) -> Result<()> {
    let quick = client::client(uri, Patience::Quick)?;
    let mut first = quick.list(prefix);
    match block_on(first.next(), &[stop]) {
        None => Err(Error::Cancelled),
        Some(Some(Err(e))) => Err(listing_error(uri, &e)),
        Some(_) => Ok(()),
    }
}

impl Store {
    /// Phase 1 for an object-store root: list it and add a `pending` row for each new image
    /// key; a prefix with rows already is synced (see the module's comment). Returns once
    /// every row is committed. Nothing is written when the bucket cannot be
    /// listed (no bucket, credentials refused, unreachable): the error names the bucket.
    pub fn scan_objects(
        &mut self,
        dataset_id: i64,
        uri: &ObjectUri,
        include_hidden: bool,
        stop: &AtomicBool,
    ) -> Result<ScanSummary> {
        let base = uri.prefix();
        let prefix = if base.is_empty() {
            None
        } else {
            Some(super::read::object_path(&ObjectUri {
                key: base.clone(),
                ..uri.clone()
            })?)
        };
        check_listable(uri, prefix.as_ref(), stop)?;
        let root = uri.root();
        let job_id = self.create_job(dataset_id, "images", &root)?;
        match self.list_into(dataset_id, job_id, uri, prefix, include_hidden, stop) {
            Ok(s) => Ok(s),
            Err(e) => {
                let _ = self.drop_job(job_id);
                Err(e)
            }
        }
    }

    fn list_into(
        &mut self,
        dataset_id: i64,
        job_id: i64,
        uri: &ObjectUri,
        prefix: Option<ObjectPath>,
        include_hidden: bool,
        stop: &AtomicBool,
    ) -> Result<ScanSummary> {
        let root = uri.root();
        let base = uri.prefix();
        let (root_id, row_prefix, nested) = self.root_for_path(dataset_id, Path::new(&root))?;
        // Keys under other roots of this dataset are there already, under those roots.
        let nested: Vec<String> = nested
            .iter()
            .filter_map(|n| {
                n.to_str()?
                    .strip_prefix(&root)
                    .map(|r| format!("{}/", r.trim_end_matches('/')))
            })
            .collect();
        let wanted = |rel: &str| {
            keep(rel, include_hidden) && !nested.iter().any(|n| rel.starts_with(n.as_str()))
        };
        let store = client::client(uri, Patience::Patient)?;
        // A prefix with no rows yet is only inserted into; one listed before is synced.
        let fresh = !self.has_rows_under(root_id, &row_prefix)?;
        let mut seen = Seen::upto(if fresh { 0 } else { self.max_sample_id()? });
        let mut found = 0u64;
        let mut counts = SyncCounts::default();
        let work = async {
            let top = first_level(&store, prefix.as_ref())
                .await
                .map_err(|e| listing_error(uri, &e))?;
            let mut buf: Vec<ObjectEntry> = top
                .objects
                .into_iter()
                .filter_map(|m| entry(m, &base))
                .filter(|e| wanted(&e.rel))
                .collect();
            let subs: Vec<ObjectPath> = top
                .common_prefixes
                .into_iter()
                .filter(|p| {
                    let rel = p.as_ref().strip_prefix(base.as_str()).unwrap_or(p.as_ref());
                    let rel = format!("{rel}/");
                    (include_hidden || !rel.split('/').any(|c| c.starts_with('.')))
                        && !nested.iter().any(|n| rel.starts_with(n.as_str()))
                })
                .collect();
            let mut all = stream::iter(subs)
                .map(|p| pages(store.clone(), Some(p)))
                .flatten_unordered(PREFIX_LISTS);
            let mut flushed = Instant::now();
            loop {
                let next = all.next().await;
                let ended = next.is_none();
                if let Some(page) = next {
                    let page = page.map_err(|e| listing_error(uri, &e))?;
                    let kept = page.into_iter().filter_map(|m| entry(m, &base));
                    buf.extend(kept.filter(|e| wanted(&e.rel)));
                }
                let due = buf.len() >= INSERT_CHUNK || flushed.elapsed() >= FLUSH_EVERY;
                if !buf.is_empty() && (ended || due) {
                    found += buf.len() as u64;
                    if fresh {
                        let added =
                            self.insert_objects(dataset_id, job_id, root_id, &row_prefix, &buf)?;
                        counts.added += added;
                        counts.unchanged += buf.len() as u64 - added;
                    } else {
                        counts += self.sync_objects(
                            dataset_id,
                            job_id,
                            root_id,
                            &row_prefix,
                            &mut buf,
                            &mut seen,
                        )?;
                    }
                    buf.clear();
                    flushed = Instant::now();
                }
                if ended {
                    return Ok::<(), Error>(());
                }
            }
        };
        match block_on(work, &[stop]) {
            None => return Err(Error::Cancelled),
            Some(r) => r?,
        }
        if !fresh {
            // Only after a complete listing: one that failed or was stopped returned above.
            counts.removed +=
                self.mark_unseen_missing(dataset_id, root_id, &row_prefix, &seen, &[], stop)?;
        }
        let existing = counts.changed + counts.unchanged;
        self.finish_job(job_id, counts.added, existing, &[])?;
        Ok(ScanSummary {
            job_id,
            found,
            added: counts.added,
            existing,
            changed: counts.changed,
            removed: counts.removed,
            unchanged: counts.unchanged,
            errors: Vec::new(),
        })
    }

    /// The sync of listed objects (keys relative to the listed prefix, which is `prefix` in
    /// the root) in sorted chunks of `INSERT_CHUNK`, each in one short transaction.
    fn sync_objects(
        &mut self,
        dataset_id: i64,
        job_id: i64,
        root_id: i64,
        prefix: &[u8],
        rows: &mut [ObjectEntry],
        seen: &mut Seen,
    ) -> Result<SyncCounts> {
        rows.sort_unstable_by(|a, b| a.rel.cmp(&b.rel));
        let mut counts = SyncCounts::default();
        for chunk in rows.chunks(INSERT_CHUNK) {
            let entries: Vec<Entry> = chunk
                .iter()
                .map(|e| {
                    let size = i64::try_from(e.size).unwrap_or(i64::MAX) as u64;
                    let rel = join_rel(prefix, e.rel.as_bytes());
                    (rel, size, e.mtime_ns, e.etag.clone())
                })
                .collect();
            counts += self.sync_entries(dataset_id, job_id, root_id, entries, seen)?;
        }
        Ok(counts)
    }

    /// Insert listed objects in one transaction per `INSERT_CHUNK` rows; a key already in the
    /// root is left as it is (adding a bucket again adds only new keys). Returns the rows
    /// added.
    pub fn insert_objects(
        &mut self,
        dataset_id: i64,
        job_id: i64,
        root_id: i64,
        prefix: &[u8],
        rows: &[ObjectEntry],
    ) -> Result<u64> {
        let path = self.path.clone();
        let columns = [
            "dataset_id",
            "job_id",
            "root_id",
            "path",
            "size_bytes",
            "mtime_ns",
            "etag",
        ];
        let mut added = 0u64;
        for chunk in rows.chunks(INSERT_CHUNK) {
            let tx = self.immediate()?;
            let mut n = 0i64;
            for part in chunk.chunks(ROWS_PER_INSERT) {
                let sql = multi_row_insert(
                    "samples",
                    &columns,
                    part.len(),
                    "ON CONFLICT (root_id, path) DO NOTHING",
                );
                let mut st = tx.prepare_cached(&sql).store(&path)?;
                let joined: Vec<Vec<u8>> = part
                    .iter()
                    .map(|e| join_rel(prefix, e.rel.as_bytes()))
                    .collect();
                let mut values: Vec<ToSqlOutput<'_>> = Vec::with_capacity(part.len() * 7);
                for (e, rel) in part.iter().zip(&joined) {
                    values.extend([
                        ToSqlOutput::from(dataset_id),
                        ToSqlOutput::from(job_id),
                        ToSqlOutput::from(root_id),
                        ToSqlOutput::Borrowed(SqlPath(rel).value()),
                        ToSqlOutput::from(i64::try_from(e.size).unwrap_or(i64::MAX)),
                        ToSqlOutput::from(e.mtime_ns),
                        match e.etag.as_deref() {
                            Some(t) => ToSqlOutput::from(t),
                            None => ToSqlOutput::Owned(rusqlite::types::Value::Null),
                        },
                    ]);
                }
                n += st
                    .execute(rusqlite::params_from_iter(values))
                    .store(&path)? as i64;
            }
            bump(&tx, dataset_id, job_id, PENDING, n).store(&path)?;
            tx.commit().store(&path)?;
            added += n as u64;
        }
        Ok(added)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_the_walk_keeps() {
        assert!(keep("a.jpg", false));
        assert!(keep("d/e/F.JPEG", false));
        assert!(!keep("d/notes.txt", false));
        assert!(!keep("d/", false));
        assert!(!keep(".hidden.png", false));
        assert!(!keep("d/.cache/x.png", false));
        assert!(keep("d/.cache/x.png", true));
        assert!(!keep("noext", false));
    }
}
