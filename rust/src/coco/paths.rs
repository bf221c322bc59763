//! A COCO `file_name` is untrusted: it is normalised lexically, refused when it leaves the
//! images folder, and the file it names is looked at only once its real path (links
//! resolved) is known to lie inside the folder.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use crate::error::{Error, Result};
use crate::header::{FileSource, ImageInfo};
use crate::remote::client::{self, block_on, Patience};
use crate::remote::failure::classify;
use crate::remote::read::object_path;
use crate::remote::ObjectUri;

/// `file_name` relative to the images folder with `.` and `..` resolved lexically and
/// repeated `/` collapsed, or why it is refused: it is absolute, or `..` leaves the folder.
pub fn normalise(file_name: &str) -> Result<String, &'static str> {
    if file_name.contains('\0') {
        return Err("the name contains a NUL byte");
    }
    if file_name.starts_with('/') {
        return Err("an absolute path: names must be relative to the images folder");
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in file_name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err("`..` leads out of the images folder");
                }
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err("names the images folder itself, not a file");
    }
    Ok(parts.join("/"))
}

/// What looking at one listed file found.
pub enum Found {
    Missing,
    /// Its real path is outside the images folder (a symlink leads out): never opened.
    Escapes,
    File {
        size: u64,
        mtime_ns: i64,
        probed: Result<ImageInfo, String>,
    },
    /// Not looked at: the ingest is stopping.
    Skipped,
    /// Under a bucket prefix: the object as the listing saw it. Its header is left to phase
    /// 2's ranged GET (the row is written `pending`).
    Object(Listed),
}

/// An object of the listing of a bucket prefix.
#[derive(Debug, Clone)]
pub struct Listed {
    pub size: u64,
    pub mtime_ns: i64,
    pub etag: Option<String>,
}

/// The objects under a bucket prefix whose keys (relative to it) a COCO file names.
///
/// Objects are looked at by listing the prefix once, with no transaction open: pages of a
/// thousand keys give each object's existence, size, last-modified and ETag, so a listed
/// image missing from the bucket is reported as missing (as on disk), at a thousandth of the
/// requests of a HEAD per object. The header is not read here: phase 2's ranged GET, which
/// every object gets anyway, reads it. Keys have no links to escape by, and `normalise`
/// has kept every name under the prefix.
pub fn list_prefix(
    uri: &ObjectUri,
    wanted: &HashSet<&str>,
    stop: &AtomicBool,
) -> Result<HashMap<String, Listed>> {
    use futures::StreamExt;
    let base = uri.prefix();
    let prefix = (!base.is_empty())
        .then(|| {
            object_path(&ObjectUri {
                key: base.clone(),
                ..uri.clone()
            })
        })
        .transpose()?;
    let store = client::client(uri, Patience::Patient)?;
    let work = async {
        let mut found = HashMap::new();
        let mut objects = store.list(prefix.as_ref());
        while let Some(meta) = objects.next().await {
            let meta = meta.map_err(|e| classify(&e).into_error(&uri.bucket_uri()))?;
            let Some(rel) = meta.location.as_ref().strip_prefix(base.as_str()) else {
                continue;
            };
            if wanted.contains(rel) {
                let listed = Listed {
                    size: meta.size,
                    mtime_ns: meta.last_modified.timestamp_nanos_opt().unwrap_or(0),
                    etag: meta.e_tag,
                };
                found.insert(rel.to_string(), listed);
            }
        }
        Ok::<_, Error>(found)
    };
    block_on(work, &[stop]).ok_or(Error::Cancelled)?
}

pub const ESCAPES: &str = "a symlink leads out of the images folder";

fn cannot_read(e: &std::io::Error) -> Found {
    Found::File {
        size: 0,
        mtime_ns: 0,
        probed: Err(format!("cannot read file: {e}")),
    }
}

fn is_missing(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
        || matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ENAMETOOLONG))
}

/// The images folder (canonical), opened once so that names resolve beneath it; or a
/// bucket prefix, with its listing.
pub struct Root {
    path: PathBuf,
    objects: Option<HashMap<String, Listed>>,
    #[cfg(target_os = "linux")]
    dir: Option<File>,
}

impl Root {
    /// A bucket prefix (`s3://bucket/prefix/`) and what `list_prefix` found under it.
    pub fn objects(uri: &str, listing: HashMap<String, Listed>) -> Root {
        Root {
            path: PathBuf::from(uri),
            objects: Some(listing),
            #[cfg(target_os = "linux")]
            dir: None,
        }
    }

    pub fn new(path: &Path) -> Root {
        Root {
            path: path.to_path_buf(),
            objects: None,
            #[cfg(target_os = "linux")]
            dir: {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                    .open(path)
                    .ok()
            },
        }
    }
}

/// Look at `root/rel` (`rel` normalised): its real path must lie inside `root`; then its
/// size, mtime and image header, from the same open.
pub fn look(root: &Root, rel: &str) -> Found {
    if let Some(listing) = &root.objects {
        return listing
            .get(rel)
            .cloned()
            .map_or(Found::Missing, Found::Object);
    }
    #[cfg(target_os = "linux")]
    if let Some(file) = open_beneath(root, rel) {
        return match file {
            Ok(file) => read_header(file),
            Err(e) if is_missing(&e) => Found::Missing,
            Err(e) => cannot_read(&e),
        };
    }
    let path = root.path.join(rel);
    #[cfg(target_os = "linux")]
    {
        look_linux(&root.path, &path)
    }
    #[cfg(not(target_os = "linux"))]
    {
        look_portable(&root.path, &path)
    }
}

/// One `openat2` that the kernel refuses if resolving the name leaves the folder (the
/// common case in one system call, as cheap as a plain open). `None` where it cannot
/// decide: no `openat2` here, or a link that leaves the folder or is absolute (which may
/// still lead back inside: the slower look decides).
#[cfg(target_os = "linux")]
fn open_beneath(root: &Root, rel: &str) -> Option<std::io::Result<File>> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
    let dir = root.dir.as_ref()?;
    if UNSUPPORTED.load(Ordering::Relaxed) {
        return None;
    }
    let name = std::ffi::CString::new(rel).ok()?;
    // SAFETY: `open_how` is plain data; zero is "no flags".
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a plain syscall with a valid descriptor, a NUL-terminated name and a struct of
    // the size passed; a returned descriptor is owned by the `File` made from it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            std::ptr::addr_of!(how),
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: the kernel just gave us this descriptor.
        return Some(Ok(unsafe { File::from_raw_fd(fd as i32) }));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOSYS | libc::EPERM | libc::EINVAL | libc::E2BIG) => {
            UNSUPPORTED.store(e.raw_os_error() == Some(libc::ENOSYS), Ordering::Relaxed);
            None
        }
        Some(libc::EXDEV | libc::EAGAIN) => None,
        _ => Some(Err(e)),
    }
}

/// An `O_PATH` descriptor resolves the name without opening the file (no side effect of
/// opening a device or a FIFO out there); its `/proc/self/fd` link is the real path of
/// exactly what will be read, so a link swapped in between cannot redirect the read.
#[cfg(target_os = "linux")]
fn look_linux(root: &Path, path: &Path) -> Found {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let handle = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
    {
        Ok(h) => h,
        Err(e) if is_missing(&e) => return Found::Missing,
        Err(e) => return cannot_read(&e),
    };
    let proc_link = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    let Ok(real) = std::fs::read_link(&proc_link) else {
        return look_portable(root, path); // no /proc here
    };
    if !real.starts_with(root) {
        return Found::Escapes;
    }
    match handle.metadata() {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Found::Missing,
        Err(e) => return cannot_read(&e),
    }
    match File::open(&proc_link) {
        Ok(file) => read_header(file),
        Err(e) => cannot_read(&e),
    }
}

fn look_portable(root: &Path, path: &Path) -> Found {
    let real = match std::fs::canonicalize(path) {
        Ok(r) => r,
        Err(e) if is_missing(&e) => return Found::Missing,
        Err(e) => return cannot_read(&e),
    };
    if !real.starts_with(root) {
        return Found::Escapes;
    }
    match std::fs::metadata(&real) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Found::Missing,
        Err(e) if is_missing(&e) => return Found::Missing,
        Err(e) => return cannot_read(&e),
    }
    match File::open(&real) {
        Ok(file) => read_header(file),
        Err(e) if is_missing(&e) => Found::Missing,
        Err(e) => cannot_read(&e),
    }
}

fn read_header(file: File) -> Found {
    let m = match file.metadata() {
        Ok(m) if m.is_file() => m,
        Ok(_) => return Found::Missing,
        Err(e) => return cannot_read(&e),
    };
    let probed = FileSource::from_file(file)
        .and_then(|mut src| crate::header::probe(&mut src))
        .map_err(|r| r.to_string());
    Found::File {
        size: m.len(),
        mtime_ns: crate::walk::mtime_ns(&m),
        probed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn names_are_normalised_or_refused() {
        assert_eq!(normalise("a.png").unwrap(), "a.png");
        assert_eq!(normalise("./a.png").unwrap(), "a.png");
        assert_eq!(normalise("sub//./b.png").unwrap(), "sub/b.png");
        assert_eq!(normalise("a/../b.png").unwrap(), "b.png");
        assert_eq!(normalise("a/b/../../c/d.png").unwrap(), "c/d.png");
        assert_eq!(normalise("dir/").unwrap(), "dir");
        assert!(normalise("../secret/x.png").is_err());
        assert!(normalise("a/../../x.png").is_err());
        assert!(normalise("/abs/x.png").is_err());
        assert!(normalise(".").is_err());
        assert!(normalise("a/..").is_err());
        assert!(normalise("a\0b").is_err());
    }

    #[test]
    fn a_link_out_of_the_folder_escapes() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("images");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(t.path().join("secret")).unwrap();
        std::fs::write(t.path().join("secret/x.png"), b"\x89PNG\r\n\x1a\n").unwrap();
        std::fs::write(root.join("sub/in.png"), b"\x89PNG\r\n\x1a\n").unwrap();
        symlink(t.path().join("secret/x.png"), root.join("out.png")).unwrap();
        symlink(t.path().join("secret"), root.join("outdir")).unwrap();
        symlink(root.join("sub/in.png"), root.join("in-link.png")).unwrap();
        symlink("sub", root.join("sublink")).unwrap();
        symlink(root.join("sub/in.png"), root.join("abs-in.png")).unwrap();
        let real = std::fs::canonicalize(&root).unwrap();
        let root = Root::new(&real);
        assert!(matches!(look(&root, "abs-in.png"), Found::File { .. }));
        assert!(matches!(look(&root, "out.png"), Found::Escapes));
        assert!(matches!(look(&root, "outdir/x.png"), Found::Escapes));
        assert!(matches!(look(&root, "in-link.png"), Found::File { .. }));
        assert!(matches!(look(&root, "sublink/in.png"), Found::File { .. }));
        assert!(matches!(look(&root, "sub/in.png"), Found::File { .. }));
        assert!(matches!(look(&root, "gone.png"), Found::Missing));
        assert!(matches!(look(&root, "sub/in.png/x"), Found::Missing));
        assert!(matches!(look(&root, "sub"), Found::Missing));
        assert!(matches!(
            look_portable(&real, &real.join("out.png")),
            Found::Escapes
        ));
        assert!(matches!(
            look_portable(&real, &real.join("sublink/in.png")),
            Found::File { .. }
        ));
        assert!(matches!(
            look_linux(&real, &real.join("outdir/x.png")),
            Found::Escapes
        ));
    }
}
