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
}

/// An image already in memory (tests, fuzzing, bytes from elsewhere).
pub struct SliceSource<'a>(pub &'a [u8]);

impl Source for SliceSource<'_> {
    fn read_at(&mut self, offset: u64, len: usize, what: &'static str) -> Parsed<&[u8]> {
        let start = usize::try_from(offset).map_err(|_| Reason::Truncated(what))?;
        let end = start.checked_add(len).ok_or(Reason::Truncated(what))?;
        self.0.get(start..end).ok_or(Reason::Truncated(what))
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
        // Only a few KiB are needed: without this hint a cold read pulls in the kernel's
        // readahead window too (a 64 KiB read costs ~3x a 4 KiB one on a cold disk).
        // SAFETY: a plain syscall on a descriptor we own; failure only loses the hint.
        unsafe {
            libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, libc::POSIX_FADV_RANDOM);
        }
        let mut head = vec![0u8; HEAD_BYTES];
        let n = read_full_at(&file, &mut head, 0).map_err(|e| Reason::Io(io_reason(&e)))?;
        head.truncate(n);
        Ok(FileSource { file, head, window: Vec::new(), window_at: 0 })
    }

    pub fn head(&self) -> &[u8] {
        &self.head
    }
}

impl Source for FileSource {
    fn read_at(&mut self, offset: u64, len: usize, what: &'static str) -> Parsed<&[u8]> {
        let end = offset.checked_add(len as u64).ok_or(Reason::Truncated(what))?;
        if end <= self.head.len() as u64 {
            // `end` fits in the head, so both casts are lossless.
            return Ok(&self.head[offset as usize..end as usize]);
        }
        let in_window = offset >= self.window_at && end <= self.window_at + self.window.len() as u64;
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
        jpeg(src)
    } else if magic.starts_with(b"\x89PNG\r\n\x1a\n") {
        png(src)
    } else if magic.starts_with(b"GIF87a") || magic.starts_with(b"GIF89a") {
        gif(src)
    } else if magic.starts_with(b"BM") {
        bmp(src)
    } else if magic.starts_with(b"RIFF") && &magic[8..12] == b"WEBP" {
        webp(src)
    } else if magic.starts_with(b"II") || magic.starts_with(b"MM") {
        tiff(src)
    } else {
        Err(Reason::Unsupported("not a JPEG, PNG, GIF, BMP, WebP or TIFF file".into()))
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
        return Err(Reason::Corrupt(format!("{} header gives a size of {width}x{height}", format.name())));
    }
    Ok(ImageInfo { width, height, format, orientation: None })
}

/// Pillow's rule: walk the markers up to the first SOS; the last SOF before it gives the size.
fn jpeg(src: &mut impl Source) -> Parsed<ImageInfo> {
    let mut pos: u64 = 2;
    let mut size: Option<(u32, u32)> = None;
    let mut orientation = None;
    // Each step reads 1 byte (junk or fill) or a whole marker; files end, so this ends.
    loop {
        let Ok(b) = src.read_at(pos, 1, "JPEG") else { break };
        if b[0] != 0xFF {
            pos += 1; // junk between segments, skipped as Pillow does
            continue;
        }
        let Ok(m) = src.read_at(pos + 1, 1, "JPEG") else { break };
        let marker = m[0];
        match marker {
            0xFF => {
                pos += 1; // fill byte
                continue;
            }
            0x00 => {
                pos += 2; // escaped 0xFF in stray data
                continue;
            }
            // markers without a length (SOI, EOI, RSTn, JPG, JPGn): Pillow steps over them
            0xC8 | 0xD0..=0xD9 | 0xF0..=0xFD => {
                pos += 2;
                continue;
            }
            0xC0..=0xFE => {}
            _ => return Err(Reason::Corrupt("no JPEG marker found".into())),
        }
        let len_bytes = src.read_at(pos + 2, 2, "JPEG")?;
        let seg_len = be16(len_bytes, 0);
        let body = u64::from(seg_len.saturating_sub(2));
        let body_at = pos + 4;
        let is_sof = matches!(marker, 0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF | 0xDE);
        if is_sof {
            let s = src.read_at(body_at, body as usize, "JPEG SOF")?;
            if s.len() < 6 {
                return Err(Reason::Truncated("JPEG SOF"));
            }
            if s[0] != 8 {
                return Err(Reason::Unsupported(format!("{}-bit JPEG", s[0])));
            }
            if !matches!(s[5], 1 | 3 | 4) {
                return Err(Reason::Unsupported(format!("JPEG with {} components", s[5])));
            }
            size = Some((be16(s, 3), be16(s, 1)));
        } else if marker == 0xDA {
            break;
        } else if marker == 0xE1 && orientation.is_none() && body >= 14 {
            // IFD0 sits near the start of the block: look there first, read it all if needed.
            let first = src.read_at(body_at, body.min(1024) as usize, "JPEG APP1")?;
            if first.starts_with(b"Exif\0\0") {
                let found = match exif_orientation(&first[6..]) {
                    Some(found) => found,
                    None => {
                        let all = src.read_at(body_at, body as usize, "JPEG APP1")?;
                        exif_orientation(&all[6..]).flatten()
                    }
                };
                orientation = Some(found);
            }
        } else if body > 0 {
            // Pillow reads the whole segment; a segment cut short by the end of file fails.
            src.read_at(body_at + body - 1, 1, "JPEG")?;
        }
        pos = body_at + body;
    }
    let (w, h) = size.ok_or_else(|| Reason::Corrupt("JPEG has no frame header (SOF)".into()))?;
    let mut info = nonzero(w, h, Format::Jpeg)?;
    info.orientation = orientation.flatten();
    Ok(info)
}

/// Tag 0x0112 of IFD0 in a TIFF-structured EXIF block: `Some(value)` when the block answers
/// (`value` is `None` when there is no valid orientation), `None` when IFD0 runs past `tiff`.
fn exif_orientation(tiff: &[u8]) -> Option<Option<u16>> {
    let le = match tiff.get(..4) {
        Some([b'I', b'I', 42, 0]) => true,
        Some([b'M', b'M', 0, 42]) => false,
        _ => return Some(None),
    };
    let u16_at = |i: usize| -> Option<u16> {
        let b = tiff.get(i..i + 2)?;
        Some(if le { u16::from_le_bytes([b[0], b[1]]) } else { u16::from_be_bytes([b[0], b[1]]) })
    };
    let u32_at = |i: usize| -> Option<u32> {
        let b = tiff.get(i..i + 4)?;
        let a = [b[0], b[1], b[2], b[3]];
        Some(if le { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) })
    };
    let Some(ifd) = u32_at(4).and_then(|o| usize::try_from(o).ok()) else { return Some(None) };
    let count = usize::from(u16_at(ifd)?);
    for i in 0..count {
        let entry = ifd.checked_add(2 + 12 * i)?;
        if u16_at(entry)? == 0x0112 {
            let v = u16_at(entry + 8)?;
            return Some((1..=8).contains(&v).then_some(v));
        }
    }
    Some(None)
}

fn png(src: &mut impl Source) -> Parsed<ImageInfo> {
    let h = src.read_at(8, 16, "PNG")?;
    if &h[4..8] != b"IHDR" {
        return Err(Reason::Corrupt("PNG does not start with IHDR".into()));
    }
    let w = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    let ht = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    if w > i32::MAX as u32 || ht > i32::MAX as u32 {
        return Err(Reason::Corrupt(format!("PNG size {w}x{ht} out of range")));
    }
    nonzero(w, ht, Format::Png)
}

/// The logical screen, grown to hold the first frame when that frame reaches beyond it
/// (Pillow does the same on open).
fn gif(src: &mut impl Source) -> Parsed<ImageInfo> {
    let s = src.read_at(0, 13, "GIF")?;
    let (mut w, mut h) = (le16(s, 6), le16(s, 8));
    let flags = s[10];
    let mut pos: u64 = 13;
    if flags & 0x80 != 0 {
        pos += 3u64 << ((flags & 7) + 1);
    }
    loop {
        let Ok(b) = src.read_at(pos, 1, "GIF") else { break };
        match b[0] {
            b'!' => {
                pos += 2; // introducer and label
                pos = skip_sub_blocks(src, pos)?;
            }
            b',' => {
                let d = src.read_at(pos + 1, 9, "GIF image descriptor")?;
                let (x1, y1) = (le16(d, 0) + le16(d, 4), le16(d, 2) + le16(d, 6));
                if x1 > w || y1 > h {
                    w = w.max(x1);
                    h = h.max(y1);
                }
                return nonzero(w, h, Format::Gif);
            }
            b';' => break,
            _ => pos += 1,
        }
    }
    Err(Reason::Corrupt("GIF has no image".into()))
}

fn skip_sub_blocks(src: &mut impl Source, mut pos: u64) -> Parsed<u64> {
    loop {
        let Ok(n) = src.read_at(pos, 1, "GIF") else { return Ok(pos) };
        let n = u64::from(n[0]);
        pos += 1 + n;
        if n == 0 {
            return Ok(pos);
        }
    }
}

fn bmp(src: &mut impl Source) -> Parsed<ImageInfo> {
    let s = src.read_at(14, 4, "BMP")?;
    let header_size = le32(s, 0);
    match header_size {
        12 => {
            let d = src.read_at(18, 4, "BMP")?;
            nonzero(le16(d, 0), le16(d, 2), Format::Bmp)
        }
        40 | 52 | 56 | 64 | 108 | 124 => {
            let d = src.read_at(18, 12, "BMP")?;
            let w = le32(d, 0);
            let raw_h = le32(d, 4);
            // Pillow treats a height whose top byte is 0xFF as top-down (negative).
            let h = if d[7] == 0xFF { raw_h.wrapping_neg() } else { raw_h };
            let bits = le16(d, 10);
            if !matches!(bits, 1 | 2 | 4 | 8 | 16 | 24 | 32) {
                return Err(Reason::Unsupported(format!("BMP pixel depth {bits}")));
            }
            if w > i32::MAX as u32 || h > i32::MAX as u32 {
                return Err(Reason::Corrupt(format!("BMP size {w}x{h} out of range")));
            }
            nonzero(w, h, Format::Bmp)
        }
        other => Err(Reason::Unsupported(format!("BMP header type {other}"))),
    }
}

fn webp(src: &mut impl Source) -> Parsed<ImageInfo> {
    let s = src.read_at(12, 18, "WebP")?;
    let (w, h) = match &s[0..4] {
        b"VP8 " => {
            if s[11..14] != [0x9d, 0x01, 0x2a] {
                return Err(Reason::Corrupt("bad VP8 frame tag".into()));
            }
            (le16(s, 14) & 0x3FFF, le16(s, 16) & 0x3FFF)
        }
        b"VP8L" => {
            if s[8] != 0x2F {
                return Err(Reason::Corrupt("bad VP8L signature".into()));
            }
            let bits = le32(s, 9);
            ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        }
        b"VP8X" => (le24(s, 12) + 1, le24(s, 15) + 1),
        _ => return Err(Reason::Unsupported("WebP without VP8, VP8L or VP8X chunk".into())),
    };
    nonzero(w, h, Format::Webp)
}

/// ImageWidth and ImageLength of the first IFD (classic TIFF and BigTIFF, either byte order).
fn tiff(src: &mut impl Source) -> Parsed<ImageInfo> {
    let s = src.read_at(0, 4, "TIFF")?;
    let le = &s[0..2] == b"II";
    let rd16 = |b: &[u8], i: usize| if le { le16(b, i) } else { be16(b, i) };
    let rd32 = |b: &[u8], i: usize| {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) }
    };
    let rd64 = |b: &[u8], i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        if le { u64::from_le_bytes(a) } else { u64::from_be_bytes(a) }
    };
    let version = rd16(s, 2);
    let big = match version {
        42 => false,
        43 => true,
        _ => return Err(Reason::Unsupported("not a TIFF file".into())),
    };
    let (ifd, count_len, entry_len) = if big {
        let h = src.read_at(4, 12, "BigTIFF")?;
        (rd64(h, 4), 8u64, 20u64)
    } else {
        let h = src.read_at(4, 4, "TIFF")?;
        (u64::from(rd32(h, 0)), 2, 12)
    };
    let c = src.read_at(ifd, count_len as usize, "TIFF IFD")?;
    let count = if big { rd64(c, 0) } else { u64::from(rd16(c, 0)) };
    if count > 4096 {
        return Err(Reason::Corrupt(format!("TIFF IFD claims {count} entries")));
    }
    let entries = src.read_at(ifd + count_len, (count * entry_len) as usize, "TIFF IFD")?;
    let (mut w, mut h) = (None, None);
    for e in entries.chunks_exact(entry_len as usize) {
        let tag = rd16(e, 0);
        if tag != 256 && tag != 257 {
            continue;
        }
        let value_at = if big { 12 } else { 8 };
        let v = match rd16(e, 2) {
            3 => rd16(e, value_at),             // SHORT
            4 => rd32(e, value_at),             // LONG
            16 if big => rd32(e, value_at),     // LONG8, low half (sizes fit in 32 bits)
            t => return Err(Reason::Corrupt(format!("TIFF size tag has type {t}"))),
        };
        if tag == 256 { w = Some(v) } else { h = Some(v) }
    }
    match (w, h) {
        (Some(w), Some(h)) => nonzero(w, h, Format::Tiff),
        _ => Err(Reason::Corrupt("TIFF has no ImageWidth/ImageLength".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg_with(segments: &[(u8, Vec<u8>)], w: u16, h: u16) -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8];
        for (m, body) in segments {
            v.extend([0xFF, *m]);
            v.extend(((body.len() + 2) as u16).to_be_bytes());
            v.extend(body);
        }
        v.extend([0xFF, 0xC0, 0, 17, 8]);
        v.extend(h.to_be_bytes());
        v.extend(w.to_be_bytes());
        v.extend([3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        v.extend([0xFF, 0xDA, 0, 2]);
        v
    }

    #[test]
    fn jpeg_after_large_app_segments() {
        let icc: Vec<(u8, Vec<u8>)> = (0..4).map(|_| (0xE2, vec![7u8; 60_000])).collect();
        let bytes = jpeg_with(&icc, 640, 480);
        let info = probe_bytes(&bytes).unwrap();
        assert_eq!((info.width, info.height, info.format), (640, 480, Format::Jpeg));
    }

    #[test]
    fn jpeg_thumbnail_sof_inside_exif_is_ignored() {
        // an APP1 holding a whole JPEG thumbnail with its own SOF of 160x120
        let thumb = jpeg_with(&[], 160, 120);
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(b"MM\0\x2a\0\0\0\x08\0\x01");
        app1.extend([0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0]);
        app1.extend([0, 0, 0, 0]);
        app1.extend(thumb);
        let bytes = jpeg_with(&[(0xE1, app1)], 4000, 3000);
        let info = probe_bytes(&bytes).unwrap();
        assert_eq!((info.width, info.height, info.orientation), (4000, 3000, Some(6)));
    }

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
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend(300u32.to_be_bytes());
        png.extend(200u32.to_be_bytes());
        assert_eq!(probe_bytes(&png).unwrap().width, 300);

        let mut gif = b"GIF89a".to_vec();
        gif.extend([10, 0, 10, 0, 0, 0, 0]);
        gif.extend([b',', 0, 0, 0, 0, 20, 0, 5, 0, 0]);
        let g = probe_bytes(&gif).unwrap();
        assert_eq!((g.width, g.height), (20, 10));

        let mut bmp = b"BM".to_vec();
        bmp.extend([0u8; 12]);
        bmp.extend(40u32.to_le_bytes());
        bmp.extend(33i32.to_le_bytes());
        bmp.extend((-44i32).to_le_bytes());
        bmp.extend(1u16.to_le_bytes());
        bmp.extend(24u16.to_le_bytes());
        let b = probe_bytes(&bmp).unwrap();
        assert_eq!((b.width, b.height), (33, 44));

        let mut webp = b"RIFF\0\0\0\0WEBPVP8X".to_vec();
        webp.extend([0u8; 8]);
        webp.extend([0x1F, 0x03, 0x00, 0xDF, 0x01, 0x00]);
        let w = probe_bytes(&webp).unwrap();
        assert_eq!((w.width, w.height), (800, 480));

        let mut tif = b"II\x2a\0\x08\0\0\0".to_vec();
        tif.extend(2u16.to_le_bytes());
        tif.extend([0, 1, 3, 0, 1, 0, 0, 0, 0x2C, 0x01, 0, 0]);
        tif.extend([1, 1, 4, 0, 1, 0, 0, 0, 0x90, 0x01, 0, 0]);
        let t = probe_bytes(&tif).unwrap();
        assert_eq!((t.width, t.height), (300, 400));
    }
}
