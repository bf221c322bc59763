//! Opening a store: recognise the file before anything is written to it, then create or
//! migrate the schema in one transaction that concurrent first opens take in turn.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::db::Store;
use crate::error::{Error, Result, StoreContext};
use crate::schema::{APPLICATION_ID, MIGRATIONS, SCHEMA, SCHEMA_VERSION, THROUGHPUT};

/// How long a connection waits for another writer before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// The store's busy handler: try again every millisecond, for up to `BUSY_TIMEOUT`. SQLite's
/// own (`busy_timeout`) sleeps ever longer, up to 100 ms between tries: against a writer that
/// holds the store in short transactions with short pauses between them (the COCO ingest),
/// its tries can fall inside the transactions again and again. Polling finds the next pause.
fn wait_a_millisecond(tries: i32) -> bool {
    if u128::try_from(tries).unwrap_or(0) >= BUSY_TIMEOUT.as_millis() {
        return false;
    }
    std::thread::sleep(Duration::from_millis(1));
    true
}

fn is_busy(e: &Error) -> bool {
    use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked};
    matches!(e, Error::Store { source, .. }
        if matches!(source.sqlite_error_code(), Some(DatabaseBusy | DatabaseLocked)))
}

/// What the file's tables say it is.
enum Kind {
    /// No tables yet: a new store (or an empty file), ours to create.
    Empty,
    /// A fastindex store of this schema version.
    Store(i64),
    /// Another application's database.
    Foreign,
}

/// The page cache of each connection, in KiB: 64 MiB, or `FASTINDEX_CACHE_KIB` (a machine
/// short of memory; the memory tests, which bound what the phases themselves hold).
fn cache_kib() -> i64 {
    std::env::var("FASTINDEX_CACHE_KIB")
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|k| *k > 0)
        .unwrap_or(65_536)
}

impl Store {
    /// Open (or create) the store at `path`.
    ///
    /// The file is recognised before anything is written to it: a folder, a file that is not
    /// SQLite, a damaged (truncated) store, a store this process cannot write and another
    /// application's SQLite file each fail with a one-line error naming the file, and the file
    /// is left exactly as it was (its journal mode included). A store of an older schema
    /// version is migrated in place; a newer one is refused. Concurrent first opens of a new
    /// store all succeed and create one schema.
    pub fn open(path: &str) -> Result<Store> {
        if path.is_empty() {
            return Err(Error::InvalidArgument("db: empty path".into()));
        }
        let exists = look_at_file(path)?;
        // Switching a new file to WAL can answer "locked" at once, without waiting on the
        // busy handler, while another process creates the same store: try again then.
        let deadline = Instant::now() + BUSY_TIMEOUT;
        loop {
            match Store::open_checked(path, exists) {
                Err(e) if is_busy(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                done => return done,
            }
        }
    }

    fn open_checked(path: &str, exists: bool) -> Result<Store> {
        let flags = if exists {
            // Never create: a file removed since we looked is an error, not a new store.
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let conn = Connection::open_with_flags(path, flags).map_err(|e| opening(path, e))?;
        conn.busy_handler(Some(wait_a_millisecond)).store(path)?;
        // A read of the tables writes nothing; only a file known to be ours is switched to WAL.
        let found = kind(&conn).map_err(|e| opening(path, e))?;
        if let Kind::Foreign = found {
            return Err(Error::NotAStore(path.to_string()));
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| opening(path, e))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .store(path)?;
        conn.pragma_update(None, "temp_store", "MEMORY")
            .store(path)?;
        conn.pragma_update(None, "cache_size", -cache_kib())
            .store(path)?;
        let mut store = Store::from_connection(path, conn);
        // The common case, a store of this version, opens without taking the write lock.
        if !matches!(found, Kind::Store(SCHEMA_VERSION)) {
            store.create_or_migrate()?;
        }
        Ok(store)
    }

    /// Create the schema, or migrate an older one, inside one IMMEDIATE transaction: the
    /// first of several concurrent openers does the work, the others find it done.
    fn create_or_migrate(&mut self) -> Result<()> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| opening(&path, e))?;
        match kind(&tx).map_err(|e| opening(&path, e))? {
            Kind::Foreign => return Err(Error::NotAStore(path)),
            Kind::Store(v) if v == SCHEMA_VERSION => return Ok(()),
            Kind::Store(found) if !(1..=SCHEMA_VERSION).contains(&found) => {
                return Err(Error::SchemaVersion {
                    path,
                    found,
                    expected: SCHEMA_VERSION,
                })
            }
            Kind::Store(found) => {
                for (from, sql) in MIGRATIONS {
                    if *from >= found {
                        tx.execute_batch(sql).store(&path)?;
                    }
                }
            }
            Kind::Empty => {
                tx.execute_batch(SCHEMA).store(&path)?;
                tx.execute_batch(THROUGHPUT).store(&path)?;
            }
        }
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .store(&path)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [SCHEMA_VERSION.to_string()],
        )
        .store(&path)?;
        tx.commit().store(&path)
    }
}

/// What the tables of the database on `conn` say it is.
fn kind(conn: &Connection) -> rusqlite::Result<Kind> {
    let tables: i64 = conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'",
        [],
        |r| r.get(0),
    )?;
    if tables == 0 {
        // No tables yet, but marked by its application: not ours to fill.
        let app: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
        let user: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if (app != 0 && app != APPLICATION_ID) || user != 0 {
            return Ok(Kind::Foreign);
        }
        return Ok(Kind::Empty);
    }
    let has_meta: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')",
        [],
        |r| r.get(0),
    )?;
    if !has_meta {
        return Ok(Kind::Foreign);
    }
    let version: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    Ok(match version {
        Some(v) => Kind::Store(v.parse::<i64>().unwrap_or(-1)),
        None => Kind::Foreign,
    })
}

/// Look at `path` with plain file calls (no SQLite yet, so nothing is created or changed).
/// Returns whether the file exists; fails on anything that cannot be a writable store.
fn look_at_file(path: &str) -> Result<bool> {
    let p = Path::new(path);
    let bad = |reason: &str| Error::BadStore {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    let meta = match std::fs::metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            return match std::fs::metadata(dir) {
                Ok(d) if d.is_dir() => {
                    writable(dir).map_err(|e| {
                        bad(&format!(
                            "cannot create the store: its folder is not writable ({e})"
                        ))
                    })?;
                    Ok(false)
                }
                Ok(_) => Err(bad("cannot create the store: its folder is not a folder")),
                Err(e) => Err(bad(&format!(
                    "cannot create the store: its folder is missing ({})",
                    short(&e)
                ))),
            };
        }
        Err(e) => return Err(bad(&short(&e))),
    };
    if meta.is_dir() {
        return Err(bad("is a folder, not a store file; name a file inside it"));
    }
    if !meta.is_file() {
        return Err(bad("not a regular file"));
    }
    // Nothing here opens the file itself: closing any descriptor of it would drop the locks
    // SQLite holds on it for this process's other connections (sqlite.org/howtocorrupt,
    // 2.2), so its content is judged by SQLite (not SQLite, damaged, truncated: see
    // `opening`).
    //
    // Refuse a file we may not write before SQLite opens it: a read-only open would leave a
    // `-shm` file with the store's read-only mode behind, which then kept its owner out.
    writable(p).map_err(|e| bad(&read_only(&e)))?;
    if meta.len() > 0 && std::fs::metadata(format!("{path}-shm")).is_err() {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
        if let Err(e) = writable(dir.unwrap_or(Path::new("."))) {
            return Err(bad(&format!(
                "its folder is not writable ({e}); fastindex keeps its write-ahead log beside the store"
            )));
        }
    }
    Ok(true)
}

fn read_only(e: &str) -> String {
    format!("the store is read-only ({e}); fastindex needs to write it")
}

/// `Ok` when this process may write `p` (`access(2)`: the real permissions, a read-only
/// mount included; root passes permission bits but not a read-only mount).
fn writable(p: &Path) -> std::result::Result<(), String> {
    let c =
        CString::new(p.as_os_str().as_bytes()).map_err(|_| "path holds a NUL byte".to_string())?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(short(&std::io::Error::last_os_error()))
    }
}

/// An I/O error as a short lowercase phrase (no "(os error N)").
fn short(e: &std::io::Error) -> String {
    let msg = e.to_string();
    msg.split(" (os error")
        .next()
        .unwrap_or(&msg)
        .to_lowercase()
}

/// A SQLite error met while opening: damage and permission problems get a plain reason.
fn opening(path: &str, e: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode::{CannotOpen, DatabaseCorrupt, NotADatabase, ReadOnly};
    let reason = match e.sqlite_error_code() {
        // SQLite checks the size its header records against the file's: a truncated store
        // lands here too.
        Some(DatabaseCorrupt) => {
            "the store is damaged (truncated or overwritten: database disk image is malformed)"
        }
        Some(NotADatabase) => "not a fastindex store (not an SQLite database); choose another file",
        Some(ReadOnly) => "the store is read-only; fastindex needs to write it",
        Some(CannotOpen) => "cannot open the store file (check the file and its folder)",
        _ => {
            return Error::Store {
                path: path.to_string(),
                source: e,
            }
        }
    };
    Error::BadStore {
        path: path.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> (tempfile::TempDir, String) {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s.db").to_str().unwrap().to_string();
        (t, p)
    }

    #[test]
    fn a_foreign_database_is_left_as_it_was() {
        let (_t, p) = fresh();
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch("CREATE TABLE notes (x); INSERT INTO notes VALUES (1);")
                .unwrap();
        }
        let before = std::fs::read(&p).unwrap();
        assert!(matches!(Store::open(&p), Err(Error::NotAStore(_))));
        assert_eq!(std::fs::read(&p).unwrap(), before);
        let c = Connection::open(&p).unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
        assert!(!Path::new(&format!("{p}-wal")).exists());
    }

    #[test]
    fn an_empty_database_marked_by_another_application_is_left_alone() {
        let (_t, p) = fresh();
        Connection::open(&p)
            .unwrap()
            .execute_batch("PRAGMA user_version = 3;")
            .unwrap();
        let before = std::fs::read(&p).unwrap();
        assert!(matches!(Store::open(&p), Err(Error::NotAStore(_))));
        assert_eq!(std::fs::read(&p).unwrap(), before);
    }

    #[test]
    fn folders_junk_and_truncated_stores_are_refused() {
        let (t, p) = fresh();
        let err = Store::open(t.path().to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("is a folder"), "{err}");
        std::fs::write(&p, vec![b'x'; 4096]).unwrap();
        let err = Store::open(&p).unwrap_err();
        assert!(err.to_string().contains("not an SQLite database"), "{err}");
        std::fs::remove_file(&p).unwrap();
        {
            let mut s = Store::open(&p).unwrap();
            s.create_dataset("d").unwrap();
        }
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len > 8192);
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len / 2).unwrap();
        let err = Store::open(&p).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
        assert!(err.to_string().contains(&p), "{err}");
    }

    #[test]
    fn a_version_1_store_is_migrated_in_place() {
        let (_t, p) = fresh();
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(SCHEMA).unwrap();
            // version 1 had no job heartbeat, no dataset high-water mark and no ETag
            c.execute_batch(
                "ALTER TABLE jobs DROP COLUMN heartbeat;
                 DROP INDEX samples_suspect;
                 ALTER TABLE samples DROP COLUMN lease_id;
                 ALTER TABLE samples DROP COLUMN attempts;
                 ALTER TABLE samples DROP COLUMN etag;
                 INSERT INTO meta VALUES ('schema_version', '1');
                 INSERT INTO datasets (id, name, created_at) VALUES (7, 'old', 0);
                 INSERT INTO jobs (dataset_id, kind, source, created_at, running_owner)
                     VALUES (7, 'images', '/x', 0, 'elsewhere:1');",
            )
            .unwrap();
        }
        let mut s = Store::open(&p).unwrap();
        assert_eq!(s.find_dataset("old").unwrap().unwrap().id, 7);
        // the old job's marker is judged by time now: long stale
        assert!(s.progress(7, None).unwrap().is_complete());
        s.delete_dataset(7).unwrap();
        assert_eq!(s.create_dataset("new").unwrap(), 8);
        let v: String = s
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION.to_string());
        drop(s);
        Store::open(&p).unwrap();
    }

    #[test]
    fn concurrent_first_opens_all_succeed() {
        for _ in 0..10 {
            let (_t, p) = fresh();
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let p = p.clone();
                    std::thread::spawn(move || {
                        let mut s = Store::open(&p)?;
                        s.find_or_create_dataset("images")
                    })
                })
                .collect();
            let ids: Vec<(i64, bool)> = handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect();
            assert!(ids.iter().all(|(id, _)| *id == ids[0].0));
            assert_eq!(ids.iter().filter(|(_, created)| *created).count(), 1);
        }
    }
}
