//! Parallel directory walk that picks image files by extension.
//!
//! Rules: hidden names (leading `.`) are skipped unless asked; symlinked files are followed;
//! symlinked folders are entered only when asked, and then every folder is entered at most once
//! (by device and inode), so a loop cannot hang the walk. An unreadable folder is reported in
//! [`WalkReport::errors`] and the walk goes on.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
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
    /// Path relative to the root, `/`-separated.
    pub rel_path: String,
    pub size: u64,
    pub mtime_ns: i64,
}

#[derive(Debug, Default)]
pub struct WalkReport {
    /// Sorted by `rel_path`.
    pub files: Vec<FileEntry>,
    /// `path: reason` for each folder or file that could not be read.
    pub errors: Vec<String>,
}

pub fn is_image_name(name: &str) -> bool {
    let Some((_, ext)) = name.rsplit_once('.') else {
        return false;
    };
    ext.len() <= 4 && IMAGE_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext))
}

struct Walker<'a> {
    /// The root, links resolved.
    real_root: PathBuf,
    opts: &'a WalkOptions,
    stop: &'a AtomicBool,
    visited: Mutex<HashSet<(u64, u64)>>,
    files: Mutex<Vec<Vec<FileEntry>>>,
    errors: Mutex<Vec<String>>,
}

/// Walk `root` on the rayon pool. Fails only when `root` itself is not a readable folder.
pub fn walk(root: &Path, opts: &WalkOptions, stop: &AtomicBool) -> Result<WalkReport> {
    let meta = fs::metadata(root).map_err(|e| Error::io(root, e))?;
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{}: not a folder",
            root.display()
        )));
    }
    fs::read_dir(root).map_err(|e| Error::io(root, e))?;
    let walker = Walker {
        real_root: fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf()),
        opts,
        stop,
        visited: Mutex::new(HashSet::from([(meta.dev(), meta.ino())])),
        files: Mutex::new(Vec::new()),
        errors: Mutex::new(Vec::new()),
    };
    let pool = crate::pools::cpu_pool();
    pool.scope(|s| walker.visit(s, root.to_path_buf(), String::new()));
    if stop.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    let chunks = walker.files.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut files: Vec<FileEntry> = chunks.into_iter().flatten().collect();
    pool.install(|| {
        rayon::slice::ParallelSliceMut::par_sort_unstable_by(&mut files[..], |a, b| {
            a.rel_path.cmp(&b.rel_path)
        });
    });
    let mut errors = walker
        .errors
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    errors.sort();
    Ok(WalkReport { files, errors })
}

impl<'a> Walker<'a> {
    fn error(&self, path: &Path, e: impl std::fmt::Display) {
        let msg = e.to_string();
        let msg = msg
            .split(" (os error")
            .next()
            .unwrap_or(&msg)
            .to_lowercase();
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{}: {msg}", path.display()));
    }

    fn visit<'s>(&'s self, scope: &rayon::Scope<'s>, dir: PathBuf, rel: String) {
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => return self.error(&dir, e),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    self.error(&dir, e);
                    continue;
                }
            };
            let name_os = entry.file_name();
            let Some(name) = name_os.to_str() else {
                if !is_hidden(&name_os) {
                    self.error(&entry.path(), "file name is not valid utf-8, skipped");
                }
                continue;
            };
            if !self.opts.include_hidden && name.starts_with('.') {
                continue;
            }
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let child_rel = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            if kind.is_dir() {
                self.enter(scope, entry.path(), child_rel, false);
            } else if kind.is_symlink() {
                let path = entry.path();
                match fs::metadata(&path) {
                    Ok(m) if m.is_dir() => {
                        if self.opts.follow_dir_links {
                            self.enter(scope, path, child_rel, true);
                        }
                    }
                    Ok(m) if m.is_file() && is_image_name(name) => found.push(FileEntry {
                        rel_path: child_rel,
                        size: m.len(),
                        mtime_ns: mtime_ns(&m),
                    }),
                    Ok(_) => {}
                    Err(e) if is_image_name(name) => self.error(&path, format!("broken link: {e}")),
                    Err(_) => {}
                }
            } else if kind.is_file() && is_image_name(name) {
                match entry.metadata() {
                    Ok(m) => found.push(FileEntry {
                        rel_path: child_rel,
                        size: m.len(),
                        mtime_ns: mtime_ns(&m),
                    }),
                    Err(e) => self.error(&entry.path(), e),
                }
            }
        }
        if !found.is_empty() {
            self.files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(found);
        }
    }

    fn enter<'s>(&'s self, scope: &rayon::Scope<'s>, path: PathBuf, rel: String, via_link: bool) {
        if self.opts.skip_dirs.iter().any(|d| d == &path) {
            return;
        }
        if via_link {
            // A link to a folder inside the tree is not entered: the folder is walked under
            // its own path, whichever of the two the walk meets first.
            match fs::canonicalize(&path) {
                Ok(target) if target.starts_with(&self.real_root) => return,
                Ok(_) => {}
                Err(e) => return self.error(&path, e),
            }
        }
        if self.opts.follow_dir_links {
            // Every folder once: a link back to an ancestor, or two links to one folder, are
            // entered a single time.
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
                Err(e) => return self.error(&path, e),
            }
        }
        scope.spawn(move |s| self.visit(s, path, rel));
    }
}

fn is_hidden(name: &OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
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
        r.files.iter().map(|f| f.rel_path.as_str()).collect()
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
    fn links_loops_and_unreadable() {
        let t = tempfile::tempdir().unwrap();
        touch(&t.path().join("real/1.jpg"));
        touch(&t.path().join("outside/2.jpg"));
        symlink(t.path().join("real/1.jpg"), t.path().join("real/link.jpg")).unwrap();
        symlink(t.path(), t.path().join("real/loop")).unwrap();
        symlink(
            t.path().join("nowhere.jpg"),
            t.path().join("real/broken.jpg"),
        )
        .unwrap();
        let stop = AtomicBool::new(false);
        let r = walk(&t.path().join("real"), &WalkOptions::default(), &stop).unwrap();
        assert_eq!(names(&r), ["1.jpg", "link.jpg"]);
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        let follow = WalkOptions {
            follow_dir_links: true,
            ..Default::default()
        };
        let r = walk(&t.path().join("real"), &follow, &stop).unwrap();
        // the loop leads to the parent once: outside/2.jpg is found, real/ is not entered again
        assert_eq!(names(&r), ["1.jpg", "link.jpg", "loop/outside/2.jpg"]);
    }

    #[test]
    fn missing_root_is_an_error() {
        let stop = AtomicBool::new(false);
        assert!(walk(Path::new("/no/such/folder"), &WalkOptions::default(), &stop).is_err());
    }
}
