//! Parallel directory walk that picks image files by extension.
//!
//! Rules: hidden names (leading `.`) are skipped unless asked; symlinked files are followed;
//! symlinked folders are entered only when asked, and then every folder is entered at most once
//! (by device and inode), so a loop cannot hang the walk. Names are bytes: whatever the file
//! system allows (not UTF-8, newlines, 255 bytes) is taken as it is.
//!
//! What the walk cannot take (a broken link with an image name, a link loop, an unreadable
//! folder or file) is a [`Problem`]: the scan stores it as a `failed` row with its reason, and
//! the walk goes on.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Extensions (lowercase) of the files the walk keeps. The format is decided later by content.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff"];

#[derive(Debug, Clone, Default)]
pub struct WalkOptions {
    pub include_hidden: bool,
    pub follow_dir_links: bool,
    /// Folders (absolute, as joined from the root) not to enter: other roots of the dataset.
    pub skip_dirs: Vec<PathBuf>,
}

/// One image file found by the walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Path relative to the root, `/`-separated, the file system's bytes.
    pub rel_path: Vec<u8>,
    pub size: u64,
    pub mtime_ns: i64,
}

/// Something under the root the walk met but could not take, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path relative to the root, as in [`FileEntry::rel_path`].
    pub rel_path: Vec<u8>,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct WalkReport {
    /// Sorted by `rel_path` (bytes).
    pub files: Vec<FileEntry>,
    /// Sorted by `rel_path`; one per path.
    pub problems: Vec<Problem>,
    /// `path: reason` for each problem, and for what is not a row (the root failing mid-walk).
    pub errors: Vec<String>,
    /// Folders (relative, `""` for the root) the walk could not read in full: what was known
    /// under them is not known to be gone.
    pub unreadable_dirs: Vec<Vec<u8>>,
}

/// What a streaming walk ([`walk_into`]) returns once its files are all handed over.
#[derive(Debug, Default)]
pub struct WalkTail {
    /// Sorted by `rel_path`; one per path.
    pub problems: Vec<Problem>,
    pub errors: Vec<String>,
    pub unreadable_dirs: Vec<Vec<u8>>,
}

/// Files handed to a streaming walk's sink at a time (at most; a folder's files at least
/// once): one folder of a million files is not held whole.
pub const SINK_BATCH: usize = 4096;

pub fn is_image_name(name: &[u8]) -> bool {
    let Some(dot) = name.iter().rposition(|&b| b == b'.') else {
        return false;
    };
    let ext = &name[dot + 1..];
    ext.len() <= 4
        && IMAGE_EXTENSIONS
            .iter()
            .any(|e| e.as_bytes().eq_ignore_ascii_case(ext))
}

/// The one-line reason of an I/O error: lowercase, without the `(os error N)` tail.
pub(crate) fn io_reason(e: &io::Error) -> String {
    if e.raw_os_error() == Some(libc::ELOOP) {
        return "symbolic link loop".into();
    }
    let msg = e.to_string();
    msg.split(" (os error")
        .next()
        .unwrap_or(&msg)
        .to_lowercase()
}

/// Where a streaming walk hands its files: `false` when nothing more is wanted (the walk
/// then stops soon).
pub type Sink<'a> = dyn Fn(Vec<FileEntry>) -> bool + Sync + 'a;

struct Walker<'a> {
    /// The root, links resolved.
    real_root: PathBuf,
    opts: &'a WalkOptions,
    stop: &'a AtomicBool,
    /// Set once the sink refused a batch.
    halted: AtomicBool,
    sink: &'a Sink<'a>,
    visited: Mutex<HashSet<(u64, u64)>>,
    problems: Mutex<Vec<Problem>>,
    errors: Mutex<Vec<String>>,
    unreadable_dirs: Mutex<Vec<Vec<u8>>>,
}

/// Check that `root` is a folder that can be listed; returns its metadata.
pub fn check_root(root: &Path) -> Result<fs::Metadata> {
    let meta = fs::metadata(root).map_err(|e| Error::io(root, e))?;
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{}: not a folder",
            root.display()
        )));
    }
    fs::read_dir(root).map_err(|e| Error::io(root, e))?;
    Ok(meta)
}

/// Walk `root` on the rayon pool and collect everything, sorted. Fails only when `root`
/// itself is not a readable folder.
pub fn walk(root: &Path, opts: &WalkOptions, stop: &AtomicBool) -> Result<WalkReport> {
    let chunks: Mutex<Vec<Vec<FileEntry>>> = Mutex::new(Vec::new());
    let tail = walk_into(root, opts, stop, &|batch| {
        chunks.lock().unwrap_or_else(|p| p.into_inner()).push(batch);
        true
    })?;
    let chunks = chunks.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut files: Vec<FileEntry> = chunks.into_iter().flatten().collect();
    crate::pools::cpu_pool().install(|| {
        rayon::slice::ParallelSliceMut::par_sort_unstable_by(&mut files[..], |a, b| {
            a.rel_path.cmp(&b.rel_path)
        });
    });
    Ok(WalkReport {
        files,
        problems: tail.problems,
        errors: tail.errors,
        unreadable_dirs: tail.unreadable_dirs,
    })
}

/// Walk `root` on the rayon pool, handing the files to `sink` in batches of at most
/// `SINK_BATCH` as they are found (in no particular order; a bounded channel behind `sink`
/// bounds the memory). Fails only when `root` itself is not a readable folder, or with
/// `Cancelled` once `stop` is set.
pub fn walk_into(
    root: &Path,
    opts: &WalkOptions,
    stop: &AtomicBool,
    sink: &Sink<'_>,
) -> Result<WalkTail> {
    let meta = check_root(root)?;
    let walker = Walker {
        real_root: fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf()),
        opts,
        stop,
        halted: AtomicBool::new(false),
        sink,
        visited: Mutex::new(HashSet::from([(meta.dev(), meta.ino())])),
        problems: Mutex::new(Vec::new()),
        errors: Mutex::new(Vec::new()),
        unreadable_dirs: Mutex::new(Vec::new()),
    };
    let pool = crate::pools::cpu_pool();
    pool.scope(|s| walker.visit(s, root.to_path_buf(), Vec::new()));
    if stop.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    let mut problems = walker
        .problems
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    problems.sort_by(|a, b| a.rel_path.cmp(&b.rel_path));
    problems.dedup_by(|a, b| a.rel_path == b.rel_path);
    let mut errors = walker
        .errors
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    errors.sort();
    let mut unreadable_dirs = walker
        .unreadable_dirs
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    unreadable_dirs.sort();
    unreadable_dirs.dedup();
    Ok(WalkTail {
        problems,
        errors,
        unreadable_dirs,
    })
}

fn child(rel: &[u8], name: &[u8]) -> Vec<u8> {
    crate::paths::join_rel(rel, name)
}

impl<'a> Walker<'a> {
    fn error(&self, path: &Path, msg: &str) {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{}: {msg}", path.display()));
    }

    /// `rel` (at `path`) becomes a `failed` row; the root itself only an error.
    fn problem(&self, rel: Vec<u8>, path: &Path, reason: String) {
        self.error(path, &reason);
        if rel.is_empty() {
            return;
        }
        self.problems
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Problem {
                rel_path: rel,
                reason,
            });
    }

    fn unreadable_folder(&self, rel: Vec<u8>, dir: &Path, e: &io::Error) {
        if e.kind() == io::ErrorKind::NotFound {
            // Removed while the walk ran: nothing there to index, nothing to keep as a row.
            return self.error(dir, &io_reason(e));
        }
        let reason = match io_reason(e) {
            r if e.raw_os_error() == Some(libc::ELOOP) => r,
            r => format!("unreadable folder: {r}"),
        };
        self.unreadable_dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(rel.clone());
        self.problem(rel, dir, reason);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.halted.load(Ordering::Relaxed)
    }

    /// Hand `found` to the sink; a refusal stops the walk.
    fn flush(&self, found: &mut Vec<FileEntry>) {
        if found.is_empty() || self.stopped() {
            return;
        }
        if !(self.sink)(std::mem::take(found)) {
            self.halted.store(true, Ordering::Relaxed);
        }
    }

    fn visit<'s>(&'s self, scope: &rayon::Scope<'s>, dir: PathBuf, rel: Vec<u8>) {
        if self.stopped() {
            return;
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => return self.unreadable_folder(rel, &dir, &e),
        };
        let mut found = Vec::new();
        // `(name, path, via a link)` of the folders to enter, once the listing is done.
        let mut folders: Vec<(Vec<u8>, PathBuf, bool)> = Vec::new();
        for (i, entry) in entries.enumerate() {
            // One folder can hold a million files: a stop is seen within it too.
            if i % 1024 == 1023 && self.stopped() {
                return;
            }
            if found.len() >= SINK_BATCH {
                self.flush(&mut found);
            }
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    // A folder that fails mid-listing fails for good: one row, then stop.
                    self.unreadable_folder(rel.clone(), &dir, &e);
                    break;
                }
            };
            let name_os = entry.file_name();
            let name = name_os.as_bytes();
            if !self.opts.include_hidden && name.first() == Some(&b'.') {
                continue;
            }
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                folders.push((name.to_vec(), entry.path(), false));
            } else if kind.is_symlink() {
                let path = entry.path();
                match fs::metadata(&path) {
                    Ok(m) if m.is_dir() => {
                        if self.opts.follow_dir_links {
                            folders.push((name.to_vec(), path, true));
                        }
                    }
                    Ok(m) if m.is_file() && is_image_name(name) => found.push(FileEntry {
                        rel_path: child(&rel, name),
                        size: m.len(),
                        mtime_ns: mtime_ns(&m),
                    }),
                    Ok(_) => {}
                    // A loop may be a folder link, so it counts whenever folder links do.
                    Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                        if is_image_name(name) || self.opts.follow_dir_links {
                            self.problem(child(&rel, name), &path, io_reason(&e));
                        }
                    }
                    Err(e) if is_image_name(name) => {
                        let reason = if e.kind() == io::ErrorKind::NotFound {
                            "broken symbolic link".to_string()
                        } else {
                            format!("unreadable symbolic link: {}", io_reason(&e))
                        };
                        self.problem(child(&rel, name), &path, reason);
                    }
                    Err(_) => {}
                }
            } else if kind.is_file() && is_image_name(name) {
                match entry.metadata() {
                    Ok(m) => found.push(FileEntry {
                        rel_path: child(&rel, name),
                        size: m.len(),
                        mtime_ns: mtime_ns(&m),
                    }),
                    // Removed while the walk ran: not a file of the folder any more.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => self.problem(
                        child(&rel, name),
                        &entry.path(),
                        format!("unreadable file: {}", io_reason(&e)),
                    ),
                }
            }
        }
        self.flush(&mut found);
        // Entered in name order (the pool runs a worker's own tasks last in, first out):
        // files then come out of the walk roughly in path order, which is the order the
        // store's path index takes new keys at least cost.
        folders.sort_unstable_by(|a, b| b.0.cmp(&a.0));
        for (name, path, via_link) in folders {
            self.enter(scope, &dir, path, child(&rel, &name), via_link);
        }
    }

    fn enter<'s>(
        &'s self,
        scope: &rayon::Scope<'s>,
        parent: &Path,
        path: PathBuf,
        rel: Vec<u8>,
        via_link: bool,
    ) {
        if self.opts.skip_dirs.iter().any(|d| d == &path) {
            return;
        }
        if via_link {
            let target = match fs::canonicalize(&path) {
                Ok(target) => target,
                Err(e) => return self.unreadable_folder(rel, &path, &e),
            };
            // A link to the folder it sits in, or to one above it, would walk that folder
            // again under a longer name, forever: a loop, reported and not entered.
            if fs::canonicalize(parent).is_ok_and(|p| p.starts_with(&target)) {
                return self.problem(rel, &path, "symbolic link loop".into());
            }
            // A link to another folder inside the tree is not entered: that folder is walked
            // under its own path.
            if target.starts_with(&self.real_root) {
                return;
            }
        }
        if self.opts.follow_dir_links {
            // Every folder once: two links to one folder outside the tree are entered once.
            let meta = if via_link {
                fs::metadata(&path)
            } else {
                fs::symlink_metadata(&path)
            };
            match meta {
                Ok(m) => {
                    let key = (m.dev(), m.ino());
                    if !self
                        .visited
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key)
                    {
                        return;
                    }
                }
                Err(e) => return self.unreadable_folder(rel, &path, &e),
            }
        }
        scope.spawn(move |s| self.visit(s, path, rel));
    }
}

/// A relative path of the walk as a `Path` (for joining onto its root).
pub fn rel_as_path(rel: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(rel))
}

/// Modification time in nanoseconds since the epoch, as stored on a sample.
pub(crate) fn mtime_ns(m: &fs::Metadata) -> i64 {
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn touch(p: &Path) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, b"x").unwrap();
    }

    fn names(r: &WalkReport) -> Vec<&str> {
        r.files
            .iter()
            .map(|f| std::str::from_utf8(&f.rel_path).unwrap())
            .collect()
    }

    fn problems(r: &WalkReport) -> Vec<(&str, &str)> {
        r.problems
            .iter()
            .map(|p| (std::str::from_utf8(&p.rel_path).unwrap(), p.reason.as_str()))
            .collect()
    }

    fn raw(b: &[u8]) -> &Path {
        Path::new(OsStr::from_bytes(b))
    }

    #[test]
    fn picks_images_skips_hidden_and_sorts() {
        let t = tempfile::tempdir().unwrap();
        for p in [
            "b/2.JPG",
            "a/1.png",
            "a/.hidden.jpg",
            ".cache/x.jpg",
            "c.txt",
            "d.TiFf",
            "._e.jpg",
        ] {
            touch(&t.path().join(p));
        }
        let stop = AtomicBool::new(false);
        let r = walk(t.path(), &WalkOptions::default(), &stop).unwrap();
        assert_eq!(names(&r), ["a/1.png", "b/2.JPG", "d.TiFf"]);
        let all = WalkOptions {
            include_hidden: true,
            ..Default::default()
        };
        let r = walk(t.path(), &all, &stop).unwrap();
        assert_eq!(r.files.len(), 6);
    }

    #[test]
    fn names_are_bytes() {
        let t = tempfile::tempdir().unwrap();
        let long = [b"x".repeat(251), b".png".to_vec()].concat();
        assert_eq!(long.len(), 255);
        let names: [&[u8]; 6] = [
            b"caf\xe9.png",
            b"line\nbreak.jpg",
            &long,
            b"\xff\xfe/in.gif",
            b"\xc3\xa9t\xc3\xa9.JPG",
            b".\xe9hidden.png",
        ];
        for n in names {
            touch(&t.path().join(raw(n)));
        }
        touch(&t.path().join(raw(b"not-an-image.\xe9png")));
        let stop = AtomicBool::new(false);
        let r = walk(t.path(), &WalkOptions::default(), &stop).unwrap();
        let got: Vec<&[u8]> = r.files.iter().map(|f| f.rel_path.as_slice()).collect();
        // byte order, hidden skipped, nothing reported
        let mut want: Vec<&[u8]> = names[..5].to_vec();
        want.sort();
        assert_eq!(got, want);
        assert!(
            r.problems.is_empty() && r.errors.is_empty(),
            "{:?}",
            r.errors
        );
        // a root whose own name is not UTF-8
        let r = walk(
            &t.path().join(raw(b"\xff\xfe")),
            &WalkOptions::default(),
            &stop,
        )
        .unwrap();
        assert_eq!(r.files[0].rel_path, b"in.gif");
    }

    #[test]
    fn links_loops_and_unreadable() {
        let t = tempfile::tempdir().unwrap();
        touch(&t.path().join("real/1.jpg"));
        touch(&t.path().join("outside/2.jpg"));
        symlink(t.path().join("real/1.jpg"), t.path().join("real/link.jpg")).unwrap();
        symlink(t.path(), t.path().join("real/loop")).unwrap();
        symlink(t.path().join("outside"), t.path().join("real/out")).unwrap();
        symlink(t.path().join("outside"), t.path().join("real/out2")).unwrap();
        symlink(
            t.path().join("nowhere.jpg"),
            t.path().join("real/broken.jpg"),
        )
        .unwrap();
        symlink("self.png", t.path().join("real/self.png")).unwrap();
        let stop = AtomicBool::new(false);
        let r = walk(&t.path().join("real"), &WalkOptions::default(), &stop).unwrap();
        assert_eq!(names(&r), ["1.jpg", "link.jpg"]);
        assert_eq!(
            problems(&r),
            [
                ("broken.jpg", "broken symbolic link"),
                ("self.png", "symbolic link loop")
            ]
        );
        assert_eq!(r.errors.len(), 2, "{:?}", r.errors);
        let follow = WalkOptions {
            follow_dir_links: true,
            ..Default::default()
        };
        let r = walk(&t.path().join("real"), &follow, &stop).unwrap();
        // the folder outside is entered once (through one of its two links); the link to an
        // ancestor is a loop, not entered
        let found = names(&r);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[2] == "out/2.jpg" || found[2] == "out2/2.jpg");
        assert_eq!(
            problems(&r),
            [
                ("broken.jpg", "broken symbolic link"),
                ("loop", "symbolic link loop"),
                ("self.png", "symbolic link loop")
            ]
        );
    }

    #[test]
    fn unreadable_folder_is_a_problem() {
        let t = tempfile::tempdir().unwrap();
        touch(&t.path().join("a.png"));
        // deeper than PATH_MAX, made step by step from open folders: no one, root included,
        // can open it by its path
        let name = std::ffi::CString::new("d".repeat(250)).unwrap();
        fs::create_dir(t.path().join("deep")).unwrap();
        let top = std::ffi::CString::new(t.path().join("deep").as_os_str().as_bytes()).unwrap();
        // SAFETY: plain syscalls on NUL-terminated names and descriptors this test owns.
        unsafe {
            let mut fd = libc::open(top.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
            for _ in 0..18 {
                assert_eq!(libc::mkdirat(fd, name.as_ptr(), 0o755), 0);
                let next = libc::openat(fd, name.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
                libc::close(fd);
                fd = next;
            }
            libc::close(fd);
        }
        let stop = AtomicBool::new(false);
        let r = walk(t.path(), &WalkOptions::default(), &stop).unwrap();
        assert_eq!(names(&r), ["a.png"]);
        let p = &r.problems;
        assert_eq!(p.len(), 1, "{:?}", r.errors);
        assert!(p[0].rel_path.starts_with(b"deep/ddd"));
        assert_eq!(p[0].reason, "unreadable folder: file name too long");
    }

    #[test]
    fn missing_root_is_an_error() {
        let stop = AtomicBool::new(false);
        assert!(walk(Path::new("/no/such/folder"), &WalkOptions::default(), &stop).is_err());
    }
}
