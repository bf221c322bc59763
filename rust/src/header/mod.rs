//! Image dimensions from the file header, without decoding pixels.
//!
//! The answer for every file Pillow opens equals `PIL.Image.open(path).size`; the format names
//! are Pillow's (`JPEG`, `PNG`, ...). Only the bytes a format needs are read: the first
//! [`HEAD_BYTES`] of the file, then small reads at the offsets the header points to (a JPEG's
//! SOF behind a large ICC profile costs one read per skipped segment, not the whole profile).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

mod bmp;
mod exif;
mod gif;
mod jpeg;
mod png;
mod tiff;
mod webp;

#[cfg(test)]
mod fixtures;

/// Bytes read on open; enough for every supported header in the common case.
pub const HEAD_BYTES: usize = 4096;
/// Size of a follow-up read when a header points past what is already in memory.
const MORE_BYTES: usize = 4096;

/// A format recognised by its content (never by the file name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    Gif,
    Bmp,
    Webp,
    Tiff,
}

impl Format {
    /// Pillow's name for the format (`Image.format`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Jpeg => "JPEG",
            Format::Png => "PNG",
            Format::Gif => "GIF",
            Format::Bmp => "BMP",
            Format::Webp => "WEBP",
            Format::Tiff => "TIFF",
        }
    }
}

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub width: u32,
    pub height: u32,
    pub format: Format,
    /// EXIF orientation (1..=8) of a JPEG, when it has one. Width and height stay as stored.
    pub orientation: Option<u16>,
}

/// Why a file is not a readable image: the one-line reason stored on a `failed` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Io(String),
    Truncated(&'static str),
    Corrupt(String),
    Unsupported(String),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Io(e) => write!(f, "cannot read file: {e}"),
            Reason::Truncated(what) => write!(f, "truncated {what} header"),
            Reason::Corrupt(why) => write!(f, "corrupt image: {why}"),
            Reason::Unsupported(why) => write!(f, "unsupported image: {why}"),
        }
    }
}

type Parsed<T> = Result<T, Reason>;

/// Random access to a file's bytes. `read_at` returns exactly `len` bytes or `Truncated`.
pub trait Source {
    fn read_at(&mut self, offset: u64, len: usize, what: &'static str) -> Parsed<&[u8]>;
    /// Length of the whole image in bytes.
    fn total_len(&mut self) -> Parsed<u64>;
}

/// An image already in memory (tests, fuzzing, bytes from elsewhere).
pub struct SliceSource<'a>(pub &'a [u8]);

impl Source for SliceSource<'_> {
    fn read_at(&mut self, offset: u64, len: usize, what: &'static str) -> Parsed<&[u8]> {
        let start = usize::try_from(offset).map_err(|_| Reason::Truncated(what))?;
        let end = start.checked_add(len).ok_or(Reason::Truncated(what))?;
        self.0.get(start..end).ok_or(Reason::Truncated(what))
    }
    fn total_len(&mut self) -> Parsed<u64> {
        Ok(self.0.len() as u64)
    }
}

/// A byte range of another source, addressed from its start (the EXIF block inside a JPEG).
struct Within<'s, S> {
    src: &'s mut S,
    base: u64,
    len: u64,
}

impl<S: Source> Source for Within<'_, S> {
    fn read_at(&mut self, offset: u64, len: usize, what: &'static str) -> Parsed<&[u8]> {
        let end = offset
            .checked_add(len as u64)
            .ok_or(Reason::Truncated(what))?;
        if end > self.len {
            return Err(Reason::Truncated(what));
        }
        self.src.read_at(self.base + offset, len, what)
    }
    fn total_len(&mut self) -> Parsed<u64> {
        Ok(self.len)
    }
}

/// A file read with positioned reads: the head once, then a window wherever the header points.
pub struct FileSource {
    file: File,
    head: Vec<u8>,
    window: Vec<u8>,
    window_at: u64,
}

impl FileSource {
    /// Open `path` and read its first [`HEAD_BYTES`].
    pub fn open(path: &Path) -> Result<Self, Reason> {
        let file = File::open(path).map_err(|e| Reason::Io(io_reason(&e)))?;
        Self::from_file(file)
    }

    /// Wrap a file the caller opened, and read its first [`HEAD_BYTES`].
    pub fn from_file(file: File) -> Result<Self, Reason> {
        // Only a few KiB are needed: without this hint a cold read pulls in the kernel's
        // readahead window too (a 64 KiB read costs ~3x a 4 KiB one on a cold disk).
        // SAFETY: a plain syscall on a descriptor we own; failure only loses the hint.
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
                0,
                libc::POSIX_FADV_RANDOM,
            );
        }
        let mut head = vec![0u8; HEAD_BYTES];
        let n = read_full_at(&file, &mut head, 0).map_err(|e| Reason::Io(io_reason(&e)))?;
        head.truncate(n);
        Ok(FileSource {
            file,
            head,
            window: Vec::new(),
            window_at: 0,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn head(&self) -> &[u8] {
        &self.head
    }
}

impl Source for FileSource {
    fn read_at(&mut self, offset: u64, len: usize, what: &'static str) -> Parsed<&[u8]> {
        let end = offset
            .checked_add(len as u64)
            .ok_or(Reason::Truncated(what))?;
        if end <= self.head.len() as u64 {
            // `end` fits in the head, so both casts are lossless.
            return Ok(&self.head[offset as usize..end as usize]);
        }
        let in_window =
            offset >= self.window_at && end <= self.window_at + self.window.len() as u64;
        if !in_window {
            // Read a little more than asked: the next segment header is usually right behind.
            self.window.resize(len.max(MORE_BYTES), 0);
            let n = read_full_at(&self.file, &mut self.window, offset)
                .map_err(|e| Reason::Io(io_reason(&e)))?;
            self.window.truncate(n);
            self.window_at = offset;
            if (n as u64) < len as u64 {
                return Err(Reason::Truncated(what));
            }
        }
        let start = (offset - self.window_at) as usize;
        Ok(&self.window[start..start + len])
    }
    fn total_len(&mut self) -> Parsed<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Reason::Io(io_reason(&e)))
    }
}

fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn io_reason(e: &io::Error) -> String {
    let s = e.to_string();
    // "Permission denied (os error 13)" -> "permission denied"
    let s = s.split(" (os error").next().unwrap_or(&s);
    s.to_lowercase()
}

/// Read the header of the image at `path`.
pub fn probe_path(path: &Path) -> Result<ImageInfo, Reason> {
    let mut src = FileSource::open(path)?;
    probe(&mut src)
}

/// Read the header of an image in memory.
pub fn probe_bytes(bytes: &[u8]) -> Result<ImageInfo, Reason> {
    probe(&mut SliceSource(bytes))
}

/// Detect the format from the first bytes and read its header.
pub fn probe(src: &mut impl Source) -> Result<ImageInfo, Reason> {
    let magic: [u8; 12] = {
        let mut m = [0u8; 12];
        for (i, slot) in m.iter_mut().enumerate() {
            match src.read_at(i as u64, 1, "file") {
                Ok(b) => *slot = b[0],
                Err(_) if i >= 2 => break,
                Err(_) => return Err(Reason::Unsupported("empty or tiny file".into())),
            }
        }
        m
    };
    if magic.starts_with(&[0xFF, 0xD8, 0xFF]) {
        jpeg::probe(src)
    } else if magic.starts_with(b"\x89PNG\r\n\x1a\n") {
        png::probe(src)
    } else if magic.starts_with(b"GIF87a") || magic.starts_with(b"GIF89a") {
        gif::probe(src)
    } else if magic.starts_with(b"BM") {
        bmp::probe(src)
    } else if magic.starts_with(b"RIFF") && &magic[8..12] == b"WEBP" {
        webp::probe(src)
    } else if magic.starts_with(b"II") || magic.starts_with(b"MM") {
        tiff::probe(src)
    } else {
        Err(Reason::Unsupported(
            "not a JPEG, PNG, GIF, BMP, WebP or TIFF file".into(),
        ))
    }
}

fn be16(b: &[u8], i: usize) -> u32 {
    u32::from(u16::from_be_bytes([b[i], b[i + 1]]))
}
fn le16(b: &[u8], i: usize) -> u32 {
    u32::from(u16::from_le_bytes([b[i], b[i + 1]]))
}
fn le32(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn le24(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], 0])
}

fn nonzero(width: u32, height: u32, format: Format) -> Parsed<ImageInfo> {
    if width == 0 || height == 0 {
        return Err(Reason::Corrupt(format!(
            "{} header gives a size of {width}x{height}",
            format.name()
        )));
    }
    Ok(ImageInfo {
        width,
        height,
        format,
        orientation: None,
    })
}

#[cfg(test)]
mod tests {
    use super::fixtures::{bmp_with, jpeg_with, png_with, tiff_with};
    use super::*;

    #[test]
    fn truncated_and_garbage_fail_cleanly() {
        let bytes = jpeg_with(&[], 10, 10);
        for cut in 0..bytes.len() - 6 {
            let _ = probe_bytes(&bytes[..cut]);
        }
        assert!(probe_bytes(b"hello world, not an image").is_err());
        assert!(probe_bytes(&[]).is_err());
        assert!(probe_bytes(&[0xFF, 0xD8, 0xFF]).is_err());
    }

    #[test]
    fn png_gif_bmp_webp_tiff() {
        let png = png_with(&[], 300, 200);
        assert_eq!(probe_bytes(&png).unwrap().width, 300);

        let mut gif = b"GIF89a".to_vec();
        gif.extend([10, 0, 10, 0, 0, 0, 0]);
        gif.extend([b',', 0, 0, 0, 0, 20, 0, 5, 0, 0]);
        let g = probe_bytes(&gif).unwrap();
        assert_eq!((g.width, g.height), (20, 10));

        let b = probe_bytes(&bmp_with(33, -44i32 as u32, 24)).unwrap();
        assert_eq!((b.width, b.height), (33, 44));

        let mut webp = b"RIFF\0\0\0\0WEBPVP8X".to_vec();
        webp.extend([0u8; 8]);
        webp.extend([0x1F, 0x03, 0x00, 0xDF, 0x01, 0x00]);
        let w = probe_bytes(&webp).unwrap();
        assert_eq!((w.width, w.height), (800, 480));

        let tif = tiff_with(true, &[(256, 3, 1, 300), (257, 4, 1, 400)], &[]);
        let t = probe_bytes(&tif).unwrap();
        assert_eq!((t.width, t.height), (300, 400));
    }
}
