//! Phase 2 for objects: a ranged GET of the first bytes of each object, many in flight, the
//! header parsed from them; a second range only where the header points further (a JPEG's
//! SOF behind a large EXIF or ICC block).

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use object_store::{GetOptions, GetRange, ObjectStore};

use super::client::{self, block_on, Patience};
use super::failure::{classify, Failure};
use super::read::object_path;
use super::{is_object_path, ObjectUri, Scheme};
use crate::error::{Error, Result};
use crate::header::{self, ImageInfo, Reason, Source};
use crate::scan::{probe_files, Pending, Probed};

/// Bytes of the first request: every supported header in the common case (as for files).
pub const HEAD_RANGE: u64 = header::HEAD_BYTES as u64;
/// Least size of a follow-up request, where the header points past what was read.
const MORE_RANGE: u64 = 16 * 1024;
/// Follow-up requests per object at most (a JPEG whose ICC profile spans many segments
/// needs one per segment header).
const MAX_ROUNDS: usize = 12;
/// Requests in flight (`FASTINDEX_OBJECT_REQUESTS` overrides; see the report of issue 9
/// for the measurement behind it).
pub const IN_FLIGHT: usize = 128;

/// The ranges read so far of one object.
struct Ranges {
    parts: Vec<(u64, Bytes)>,
    total: u64,
    /// The first read that fell outside them: what to fetch next.
    miss: Option<(u64, usize)>,
}

impl Source for Ranges {
    fn read_at(&mut self, offset: u64, len: usize, what: &'static str) -> Result<&[u8], Reason> {
        let end = offset
            .checked_add(len as u64)
            .ok_or(Reason::Truncated(what))?;
        if end > self.total {
            return Err(Reason::Truncated(what));
        }
        let hit = self
            .parts
            .iter()
            .position(|(at, b)| offset >= *at && end <= at + b.len() as u64);
        match hit {
            Some(i) => {
                let (at, b) = &self.parts[i];
                Ok(&b[(offset - at) as usize..(end - at) as usize])
            }
            None => {
                self.miss.get_or_insert((offset, len));
                Err(Reason::Truncated(what))
            }
        }
    }
    fn total_len(&mut self) -> Result<u64, Reason> {
        Ok(self.total)
    }
}

/// What became of one object.
enum Outcome {
    Done(std::result::Result<ImageInfo, String>),
    /// The store as a whole cannot be used (unreachable, credentials refused): stop the
    /// phase, leave the rows `pending`.
    Stop(Failure, String),
}

async fn get(
    store: &Arc<dyn ObjectStore>,
    path: &object_store::path::Path,
    range: std::ops::Range<u64>,
) -> object_store::Result<(u64, Bytes)> {
    let opts = GetOptions {
        range: Some(GetRange::Bounded(range)),
        ..Default::default()
    };
    let r = store.get_opts(path, opts).await?;
    let total = r.meta.size;
    Ok((total, r.bytes().await?))
}

fn failed(e: &object_store::Error, uri: &ObjectUri) -> Outcome {
    let f = classify(e);
    if f.is_store_wide() {
        return Outcome::Stop(f, uri.bucket_uri());
    }
    if f.status == Some(416) {
        // An empty object: S3 refuses any range of it.
        return Outcome::Done(Err(
            Reason::Unsupported("empty or tiny file".into()).to_string()
        ));
    }
    Outcome::Done(Err(f.row_reason(&uri.to_string())))
}

async fn probe_object(store: &Arc<dyn ObjectStore>, uri: &ObjectUri) -> Outcome {
    let path = match object_path(uri) {
        Ok(p) => p,
        Err(e) => return Outcome::Done(Err(e.to_string())),
    };
    let (total, head) = match get(store, &path, 0..HEAD_RANGE).await {
        Ok(v) => v,
        Err(e) => return failed(&e, uri),
    };
    let mut src = Ranges {
        parts: vec![(0, head)],
        total,
        miss: None,
    };
    for round in 0.. {
        src.miss = None;
        let res = header::probe(&mut src);
        let Some((offset, len)) = src.miss else {
            return Outcome::Done(res.map_err(|r| r.to_string()));
        };
        if round >= MAX_ROUNDS {
            return Outcome::Done(res.map_err(|r| r.to_string()));
        }
        let end = total.min(offset + (len as u64).max(MORE_RANGE));
        match get(store, &path, offset..end).await {
            Ok((_, more)) => src.parts.push((offset, more)),
            Err(e) => return failed(&e, uri),
        }
    }
    unreachable!("the loop returns")
}

/// Rows probed, and the error that ended the batch early, if one did.
pub type BatchResult = (Vec<Probed>, Option<Error>);

/// Probe a batch whose rows may be files or objects. Files go to the I/O pool as before;
/// objects are read with up to `IN_FLIGHT` requests at once. `Ok(None)` as soon as one of
/// `stops` is set. When the object store cannot be used at all (unreachable, credentials
/// refused) the batch ends early with the rows probed so far and the error (naming the
/// bucket): the caller writes those, then ends the phase; the other rows stay `pending`.
pub fn probe_batch(batch: &[Pending], stops: &[&AtomicBool]) -> Result<Option<BatchResult>> {
    if !batch.iter().any(|p| is_object_path(&p.path)) {
        return Ok(probe_files(batch, stops).map(|v| (v, None)));
    }
    let (objects, files): (Vec<&Pending>, Vec<&Pending>) =
        batch.iter().partition(|p| is_object_path(&p.path));
    let mut out = if files.is_empty() {
        Vec::new()
    } else {
        let files: Vec<Pending> = files.into_iter().cloned().collect();
        match probe_files(&files, stops) {
            Some(v) => v,
            None => return Ok(None),
        }
    };
    let mut clients: HashMap<(Scheme, String), Arc<dyn ObjectStore>> = HashMap::new();
    let mut work = Vec::with_capacity(objects.len());
    for p in objects {
        let uri = match ObjectUri::from_path(&p.path) {
            Some(Ok(u)) => u,
            Some(Err(e)) => {
                out.push(Probed {
                    id: p.id,
                    job_id: p.job_id,
                    stamp: p.stamp,
                    result: Err(e.to_string()),
                });
                continue;
            }
            None => continue, // not reached: partitioned by `is_object_path`
        };
        let key = (uri.scheme, uri.bucket.clone());
        let store = match clients.get(&key) {
            Some(c) => c.clone(),
            None => {
                let c = client::client(&uri, Patience::Patient)?;
                clients.insert(key, c.clone());
                c
            }
        };
        work.push((p.id, p.job_id, p.stamp, uri, store));
    }
    let n = client::in_flight(IN_FLIGHT);
    let probed = async {
        let mut done = Vec::with_capacity(work.len());
        let mut results = stream::iter(work)
            .map(|(id, job_id, stamp, uri, store)| async move {
                match probe_object(&store, &uri).await {
                    Outcome::Done(result) => Ok(Probed {
                        id,
                        job_id,
                        stamp,
                        result,
                    }),
                    Outcome::Stop(f, bucket) => Err(f.into_error(&bucket)),
                }
            })
            .buffer_unordered(n);
        while let Some(r) = results.next().await {
            match r {
                Ok(p) => done.push(p),
                // The requests still in flight are dropped; what was read is kept.
                Err(e) => return (done, Some(e)),
            }
        }
        (done, None)
    };
    match block_on(probed, stops) {
        None => Ok(None),
        Some((done, error)) => {
            out.extend(done);
            Ok(Some((out, error)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_record_the_first_miss() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut r = Ranges {
            parts: vec![
                (0, Bytes::from(data[..10].to_vec())),
                (50, Bytes::from(data[50..60].to_vec())),
            ],
            total: 100,
            miss: None,
        };
        assert_eq!(r.read_at(2, 3, "x").unwrap(), &[2, 3, 4]);
        assert_eq!(r.read_at(52, 2, "x").unwrap(), &[52, 53]);
        assert!(r.read_at(8, 4, "x").is_err());
        assert!(r.read_at(70, 1, "x").is_err());
        assert_eq!(r.miss, Some((8, 4)));
        // past the end is truncation, not a miss to fetch
        let mut r2 = Ranges {
            parts: vec![],
            total: 5,
            miss: None,
        };
        assert!(r2.read_at(3, 4, "x").is_err());
        assert_eq!(r2.miss, None);
    }

    #[test]
    fn a_header_split_across_ranges_parses() {
        // a PNG whose IHDR lies in a second range
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend(300u32.to_be_bytes());
        png.extend(200u32.to_be_bytes());
        png.extend([8, 2, 0, 0, 0]);
        let mut r = Ranges {
            parts: vec![(0, Bytes::from(png[..12].to_vec()))],
            total: png.len() as u64,
            miss: None,
        };
        assert!(header::probe(&mut r).is_err());
        let (off, _) = r.miss.unwrap();
        r.parts
            .push((off, Bytes::from(png[off as usize..].to_vec())));
        r.miss = None;
        let info = header::probe(&mut r).unwrap();
        assert_eq!((info.width, info.height), (300, 200));
    }
}
