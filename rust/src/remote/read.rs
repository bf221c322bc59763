//! Whole objects (or byte ranges of them) for phase 3 and the server.

use std::sync::atomic::AtomicBool;

use futures::stream::{self, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange};

use super::client::{self, block_on, Patience};
use super::failure::{classify, Failure, Kind};
use super::ObjectUri;
use crate::error::{Error, Result};

/// The object key of `uri` as object_store addresses it (any unicode; no empty, `.` or `..`
/// segment).
pub fn object_path(uri: &ObjectUri) -> Result<ObjectPath> {
    ObjectPath::parse(&uri.key).map_err(|e| Error::ObjectStore {
        uri: uri.to_string(),
        reason: format!("not a valid object key: {e}"),
    })
}

fn range(start: Option<u64>, end: Option<u64>) -> Option<GetRange> {
    match (start, end) {
        (None | Some(0), None) => None,
        (Some(s), None) => Some(GetRange::Offset(s)),
        (s, Some(e)) => Some(GetRange::Bounded(s.unwrap_or(0)..e)),
    }
}

async fn fetch(
    uri: &ObjectUri,
    start: Option<u64>,
    end: Option<u64>,
) -> std::result::Result<bytes::Bytes, (String, Option<Failure>)> {
    if let (Some(s), Some(e)) = (start, end) {
        if e <= s {
            return Ok(bytes::Bytes::new());
        }
    }
    let store = client::client(uri, Patience::Patient).map_err(|e| (e.to_string(), None))?;
    let path = object_path(uri).map_err(|e| (e.to_string(), None))?;
    let opts = GetOptions {
        range: range(start, end),
        ..Default::default()
    };
    let got = async {
        let r = store.get_opts(&path, opts).await?;
        r.bytes().await
    };
    got.await.map_err(|e| {
        let f = classify(&e);
        (f.row_reason(&uri.to_string()), Some(f))
    })
}

/// The bytes of `uri` from `start` (default 0) to `end` (exclusive; default the end).
/// `None` when stopped.
pub fn read_object(
    uri: &str,
    start: Option<u64>,
    end: Option<u64>,
    stop: &AtomicBool,
) -> Result<Option<bytes::Bytes>> {
    let uri = parse(uri)?;
    let Some(got) = block_on(fetch(&uri, start, end), &[stop]) else {
        return Ok(None);
    };
    match got {
        Ok(b) => Ok(Some(b)),
        Err((_, Some(f)))
            if f.kind == Kind::NotFound && f.code.as_deref() != Some("NoSuchBucket") =>
        {
            Err(Error::ObjectStore {
                uri: uri.to_string(),
                reason: f.headline(),
            })
        }
        Err((_, Some(f))) => Err(f.into_error(&uri.to_string())),
        Err((msg, None)) => Err(Error::ObjectStore {
            uri: uri.to_string(),
            reason: msg,
        }),
    }
}

fn parse(uri: &str) -> Result<ObjectUri> {
    ObjectUri::parse(uri).unwrap_or_else(|| {
        Err(Error::InvalidArgument(format!(
            "{uri}: not an object URI (s3://, gs:// or az://)"
        )))
    })
}

/// Every object of `uris`, in order: its bytes, or the one-line reason it could not be read.
/// `None` when stopped.
pub fn read_objects(
    uris: &[String],
    max_in_flight: usize,
    stop: &AtomicBool,
) -> Option<Vec<std::result::Result<bytes::Bytes, String>>> {
    let work = stream::iter(uris.iter())
        .map(|u| async move {
            let uri = parse(u).map_err(|e| e.to_string())?;
            fetch(&uri, None, None).await.map_err(|(msg, _)| msg)
        })
        .buffered(max_in_flight.max(1))
        .collect::<Vec<_>>();
    block_on(work, &[stop])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(range(None, None), None);
        assert_eq!(range(Some(0), None), None);
        assert_eq!(range(Some(5), None), Some(GetRange::Offset(5)));
        assert_eq!(range(None, Some(10)), Some(GetRange::Bounded(0..10)));
        assert_eq!(range(Some(3), Some(10)), Some(GetRange::Bounded(3..10)));
    }
}
