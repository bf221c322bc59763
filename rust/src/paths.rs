//! File and folder names as the store keeps them: the exact bytes the file system gave.
//!
//! A path is stored as TEXT when it is valid UTF-8 and as a BLOB of its raw bytes otherwise, in
//! the same column. SQLite never finds a TEXT equal to a BLOB (every TEXT sorts before every
//! BLOB), so `UNIQUE (root_id, path)` holds only because one byte string always gets the same
//! storage class: write paths through [`SqlPath`] and nothing else.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rusqlite::params;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

use crate::db::Store;
use crate::error::{Result, StoreContext};

/// A path to bind as a parameter: TEXT if its bytes are UTF-8, else a BLOB of them.
#[derive(Debug, Clone, Copy)]
pub struct SqlPath<'a>(pub &'a [u8]);

impl<'a> SqlPath<'a> {
    pub fn of(path: &'a Path) -> Self {
        SqlPath(path.as_os_str().as_bytes())
    }
    pub fn value(self) -> ValueRef<'a> {
        if std::str::from_utf8(self.0).is_ok() {
            ValueRef::Text(self.0)
        } else {
            ValueRef::Blob(self.0)
        }
    }
}

impl ToSql for SqlPath<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(self.value()))
    }
}

/// A path read back from a TEXT or BLOB column, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPath(pub PathBuf);

impl FromSql for StoredPath {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        path_bytes(v).map(|b| StoredPath(PathBuf::from(OsStr::from_bytes(b))))
    }
}

/// The bytes of a path column (TEXT or BLOB), borrowed.
pub fn path_bytes(v: ValueRef<'_>) -> FromSqlResult<&[u8]> {
    match v {
        ValueRef::Text(b) | ValueRef::Blob(b) => Ok(b),
        _ => Err(FromSqlError::InvalidType),
    }
}

/// `a/b` from `a` and `b` as bytes (`b` alone when `a` is empty).
pub fn join_rel(prefix: &[u8], rel: &[u8]) -> Vec<u8> {
    if prefix.is_empty() {
        return rel.to_vec();
    }
    let mut out = Vec::with_capacity(prefix.len() + 1 + rel.len());
    out.extend_from_slice(prefix);
    out.push(b'/');
    out.extend_from_slice(rel);
    out
}

impl Store {
    /// The folders of a dataset's roots, by root id.
    pub fn root_dirs(&self, dataset_id: i64) -> Result<HashMap<i64, PathBuf>> {
        let rows: Vec<(i64, StoredPath)> = self.pairs(
            "SELECT id, path FROM roots WHERE dataset_id = ?1",
            dataset_id,
        )?;
        Ok(rows.into_iter().map(|(id, p)| (id, p.0)).collect())
    }

    /// The root row for folder `abs` in a dataset, and the prefix (relative path bytes) to put
    /// before paths found under it. A folder inside a known root reuses that root (so nothing is
    /// added twice); known roots inside the new folder are returned so the walk can skip them.
    pub fn root_for_path(
        &mut self,
        dataset_id: i64,
        abs: &Path,
    ) -> Result<(i64, Vec<u8>, Vec<PathBuf>)> {
        let roots = self.root_dirs(dataset_id)?;
        // Component-wise, so `/a/bc` is not inside `/a/b`.
        let nested: Vec<PathBuf> = roots
            .values()
            .filter(|p| p.as_path() != abs && p.starts_with(abs))
            .cloned()
            .collect();
        if let Some((id, _)) = roots.iter().find(|(_, p)| p.as_path() == abs) {
            return Ok((*id, Vec::new(), nested));
        }
        // Inside several known roots (a child root added before its parent): the deepest one
        // holds the files there, since the parent's walk skipped it.
        let deepest = roots
            .iter()
            .filter_map(|(id, p)| {
                let rest = abs.strip_prefix(p).ok()?;
                Some((
                    p.as_os_str().len(),
                    *id,
                    rest.as_os_str().as_bytes().to_vec(),
                ))
            })
            .max_by_key(|(len, _, _)| *len);
        if let Some((_, id, prefix)) = deepest {
            return Ok((id, prefix, nested));
        }
        // Another process may add the same folder between the read above and this insert:
        // then its row is the root (one statement, so no transaction is needed).
        let id: i64 = self
            .conn
            .query_row(
                "INSERT INTO roots (dataset_id, path) VALUES (?1, ?2)
                 ON CONFLICT (dataset_id, path) DO UPDATE SET path = excluded.path RETURNING id",
                params![dataset_id, SqlPath::of(abs)],
                |r| r.get(0),
            )
            .store(&self.path)?;
        Ok((id, Vec::new(), nested))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_blob_by_utf8() {
        assert!(matches!(
            SqlPath(b"caf\xc3\xa9.png").value(),
            ValueRef::Text(_)
        ));
        assert!(matches!(SqlPath(b"caf\xe9.png").value(), ValueRef::Blob(_)));
        assert_eq!(join_rel(b"", b"a"), b"a");
        assert_eq!(join_rel(b"x\xff", b"a"), b"x\xff/a");
    }

    #[test]
    fn one_row_per_byte_string() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let d = s.create_dataset("d").unwrap();
        let raw = Path::new(OsStr::from_bytes(b"/data/caf\xe9"));
        let (id, prefix, _) = s.root_for_path(d, raw).unwrap();
        assert!(prefix.is_empty());
        let (again, _, _) = s.root_for_path(d, raw).unwrap();
        assert_eq!(again, id);
        let inner = Path::new(OsStr::from_bytes(b"/data/caf\xe9/\xff\xfe/x"));
        let (same, prefix, _) = s.root_for_path(d, inner).unwrap();
        assert_eq!((same, prefix.as_slice()), (id, &b"\xff\xfe/x"[..]));
        let (parent, _, nested) = s.root_for_path(d, Path::new("/data")).unwrap();
        assert_ne!(parent, id);
        assert_eq!(nested, [raw.to_path_buf()]);
        assert_eq!(s.root_dirs(d).unwrap()[&id], raw);
        // the same bytes bound twice meet the UNIQUE constraint: one row, never a TEXT twin
        let n: i64 = s
            .conn
            .query_row("SELECT COUNT(*) FROM roots", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
        let kinds: Vec<String> = s
            .conn
            .prepare("SELECT typeof(path) FROM roots ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(kinds, ["blob", "text"]);
    }
}
