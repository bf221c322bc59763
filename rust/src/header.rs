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

/// Pillow's rule: walk the markers up to the first SOS; the last SOF before it gives the size.
fn jpeg(src: &mut impl Source) -> Parsed<ImageInfo> {
    let mut pos: u64 = 2;
    let mut size: Option<(u32, u32)> = None;
    let mut orientation = None;
    // Each step reads 1 byte (junk or fill) or a whole marker; files end, so this ends.
    while let Ok(&[b]) = src.read_at(pos, 1, "JPEG") {
        if b != 0xFF {
            pos += 1; // junk between segments, skipped as Pillow does
            continue;
        }
        let Ok(m) = src.read_at(pos + 1, 1, "JPEG") else {
            break;
        };
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
                return Err(Reason::Unsupported(format!(
                    "JPEG with {} components",
                    s[5]
                )));
            }
            if (s.len() - 6) % 3 != 0 {
                // Pillow reads the component table three bytes at a time and fails on a remainder
                return Err(Reason::Corrupt(
                    "JPEG SOF has a partial component entry".into(),
                ));
            }
            size = Some((be16(s, 3), be16(s, 1)));
        } else if marker == 0xDA {
            break;
        } else {
            if marker == 0xE1 && orientation.is_none() && body >= 6 {
                // Pillow keeps the first Exif block and reads its IFD0 (with `Exif\0\0` repeated
                // at the start stripped, as Pillow does).
                let (mut base, mut len) = (body_at, body);
                while len >= 6 && src.read_at(base, 6, "JPEG APP1")? == b"Exif\0\0" {
                    (base, len) = (base + 6, len - 6);
                }
                if base != body_at {
                    orientation = Some(exif_orientation(&mut Within {
                        src: &mut *src,
                        base,
                        len,
                    }));
                }
            }
            if body > 0 {
                // Pillow reads the whole segment; a segment cut short by the end of file fails.
                src.read_at(body_at + body - 1, 1, "JPEG")?;
            }
        }
        pos = body_at + body;
    }
    let (w, h) = size.ok_or_else(|| Reason::Corrupt("JPEG has no frame header (SOF)".into()))?;
    let mut info = nonzero(w, h, Format::Jpeg)?;
    info.orientation = orientation.flatten();
    Ok(info)
}

/// EXIF orientation as Pillow's `getexif().get(0x0112)` reads it from a TIFF-structured block:
/// `Some` only for a value equal to a whole number from 1 to 8.
fn exif_orientation(src: &mut impl Source) -> Option<u16> {
    let t = TiffOrder::detect(src.read_at(0, 4, "EXIF").ok()?)?;
    if t.big {
        return None; // Pillow reads an 8-byte header for EXIF, too short for BigTIFF: no EXIF
    }
    let ifd = t.u32(src.read_at(4, 4, "EXIF").ok()?, 0);
    let [value] = ifd_values(src, t, u64::from(ifd), [0x0112]);
    let value = value?;
    (1..=8u16).find(|&k| value.equals(i64::from(k)))
}

/// Pillow's rule: chunks up to the first IDAT; the IHDR gives the size. Chunks before the IHDR
/// are stepped over (a name must be four letters, digits or `_`). The IHDR itself is checked as
/// Pillow checks it: 13 bytes or more, its CRC, a known bit depth and colour type, filter 0.
/// (Pillow would let a second IHDR before the IDAT override the first; this stops at the first.)
fn png(src: &mut impl Source) -> Parsed<ImageInfo> {
    let mut pos: u64 = 8;
    // Each step moves past a whole chunk (12 bytes at least), so this ends with the file.
    loop {
        let h = src.read_at(pos, 8, "PNG")?;
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let cid = [h[4], h[5], h[6], h[7]];
        if !cid.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_') {
            return Err(Reason::Corrupt(format!(
                "broken PNG chunk name {:?}",
                String::from_utf8_lossy(&cid)
            )));
        }
        match &cid {
            b"IHDR" => return png_ihdr(src, pos, len),
            b"IDAT" | b"fdAT" | b"IEND" => return Err(Reason::Corrupt("PNG has no IHDR".into())),
            _ => pos += 12 + u64::from(len),
        }
    }
}

fn png_ihdr(src: &mut impl Source, pos: u64, len: u32) -> Parsed<ImageInfo> {
    if len < 13 {
        return Err(Reason::Corrupt("truncated PNG IHDR chunk".into()));
    }
    let mut chunk = [0u8; 17]; // the name and the 13 bytes of data that the CRC covers
    chunk.copy_from_slice(src.read_at(pos + 4, 17, "PNG IHDR")?);
    if len == 13 {
        // A file that ends before the CRC is read as far as it goes; a CRC that is there must match.
        if let Ok(c) = src.read_at(pos + 21, 4, "PNG IHDR") {
            if crc32(&chunk) != u32::from_be_bytes([c[0], c[1], c[2], c[3]]) {
                return Err(Reason::Corrupt("PNG IHDR checksum does not match".into()));
            }
        }
    }
    let d = &chunk[4..];
    let w = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
    let ht = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
    let known = matches!(
        (d[8], d[9]),
        (1 | 2 | 4 | 8 | 16, 0) | (8 | 16, 2) | (1 | 2 | 4 | 8, 3) | (8 | 16, 4) | (8 | 16, 6)
    );
    if !known {
        return Err(Reason::Unsupported(format!(
            "PNG bit depth {} with colour type {}",
            d[8], d[9]
        )));
    }
    if d[11] != 0 {
        return Err(Reason::Corrupt(format!("PNG filter method {}", d[11])));
    }
    nonzero(w, ht, Format::Png)
}

/// CRC-32 (ISO 3309, as PNG uses it), bit by bit: only a few bytes are ever checked.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
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
    while let Ok(&[b]) = src.read_at(pos, 1, "GIF") {
        match b {
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
        let Ok(n) = src.read_at(pos, 1, "GIF") else {
            return Ok(pos);
        };
        let n = u64::from(n[0]);
        pos += 1 + n;
        if n == 0 {
            return Ok(pos);
        }
    }
}

/// Pillow's rule: width and height are unsigned 32-bit, except that a height whose top byte is
/// 0xFF is a top-down image of height `2^32 - h`. The header must be whole, the pixel depth one
/// Pillow decodes, the compression known and, for bitfields, the masks a layout Pillow knows.
fn bmp(src: &mut impl Source) -> Parsed<ImageInfo> {
    let s = src.read_at(14, 4, "BMP")?;
    let header_size = le32(s, 0);
    let (w, h, bits) = match header_size {
        12 => {
            let d = src.read_at(18, 8, "BMP")?;
            (le16(d, 0), le16(d, 2), le16(d, 6))
        }
        40 | 52 | 56 | 64 | 108 | 124 => {
            let d = &src.read_at(18, header_size as usize - 4, "BMP")?.to_vec();
            let w = le32(d, 0);
            let raw_h = le32(d, 4);
            let h = if d[7] == 0xFF {
                raw_h.wrapping_neg()
            } else {
                raw_h
            };
            let bits = le16(d, 10);
            let compression = le32(d, 12);
            let colors = le32(d, 28);
            bmp_checks(src, d, bits, compression, colors)?;
            (w, h, bits)
        }
        other => return Err(Reason::Unsupported(format!("BMP header type {other}"))),
    };
    if !matches!(bits, 1 | 4 | 8 | 16 | 24 | 32) {
        return Err(Reason::Unsupported(format!("BMP pixel depth {bits}")));
    }
    nonzero(w, h, Format::Bmp)
}

/// What Pillow refuses in a BITMAPINFOHEADER (or later) on open, besides the pixel depth.
fn bmp_checks(
    src: &mut impl Source,
    d: &[u8],
    bits: u32,
    compression: u32,
    colors: u32,
) -> Parsed<()> {
    match compression {
        0..=2 => {}
        3 => {
            // Bitfields: the masks follow a 40-byte header, or sit inside a longer one.
            let masks: [u32; 4] = if d.len() >= 48 {
                let a = if d.len() >= 52 { le32(d, 48) } else { 0 };
                [le32(d, 36), le32(d, 40), le32(d, 44), a]
            } else {
                let m = src.read_at(54, 12, "BMP bitfields")?;
                [le32(m, 0), le32(m, 4), le32(m, 8), 0]
            };
            let rgb = [masks[0], masks[1], masks[2]];
            let ok = match bits {
                32 => matches!(
                    masks,
                    [0xFF_0000, 0xFF00, 0xFF, 0]
                        | [0xFF00_0000, 0xFF_0000, 0xFF00, 0]
                        | [0xFF00_0000, 0xFF00, 0xFF, 0]
                        | [0xFF00_0000, 0xFF_0000, 0xFF00, 0xFF]
                        | [0xFF, 0xFF00, 0xFF_0000, 0xFF00_0000]
                        | [0xFF_0000, 0xFF00, 0xFF, 0xFF00_0000]
                        | [0xFF00_0000, 0xFF00, 0xFF, 0xFF_0000]
                        | [0, 0, 0, 0]
                ),
                24 => rgb == [0xFF_0000, 0xFF00, 0xFF],
                16 => rgb == [0xF800, 0x7E0, 0x1F] || rgb == [0x7C00, 0x3E0, 0x1F],
                _ => false,
            };
            if !ok {
                return Err(Reason::Unsupported("BMP bitfields layout".into()));
            }
        }
        other => return Err(Reason::Unsupported(format!("BMP compression {other}"))),
    }
    // Palette images: Pillow takes the colour count from the header, or 2^bits.
    if compression != 3 && bits <= 8 && bits > 0 {
        let n = if colors == 0 {
            1u64 << bits
        } else {
            u64::from(colors)
        };
        if n > 65536 {
            return Err(Reason::Unsupported(format!("BMP palette of {n} colours")));
        }
    }
    Ok(())
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
        _ => {
            return Err(Reason::Unsupported(
                "WebP without VP8, VP8L or VP8X chunk".into(),
            ))
        }
    };
    nonzero(w, h, Format::Webp)
}

/// Byte order and flavour of a TIFF structure, from its first four bytes, as Pillow accepts
/// them: the two valid headers, the two with the version bytes swapped, and BigTIFF. Pillow
/// takes a header for BigTIFF only when its third byte is 43, so a big-endian BigTIFF is read as
/// classic TIFF (and usually fails), as Pillow does.
#[derive(Debug, Clone, Copy)]
struct TiffOrder {
    le: bool,
    big: bool,
}

impl TiffOrder {
    fn detect(h: &[u8]) -> Option<TiffOrder> {
        let le = match h.get(..4)? {
            b"II\x2a\0" | b"II\0\x2a" | b"II\x2b\0" => true,
            b"MM\0\x2a" | b"MM\x2a\0" | b"MM\0\x2b" => false,
            _ => return None,
        };
        Some(TiffOrder {
            le,
            big: h[2] == 43,
        })
    }
    fn u16(self, b: &[u8], i: usize) -> u16 {
        let a = [b[i], b[i + 1]];
        if self.le {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        }
    }
    fn u32(self, b: &[u8], i: usize) -> u32 {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if self.le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    }
    fn u64(self, b: &[u8], i: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        if self.le {
            u64::from_le_bytes(a)
        } else {
            u64::from_be_bytes(a)
        }
    }
}

/// The first value of a TIFF tag, as Pillow decodes it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TagValue {
    Int(i128),
    Float(f64),
    /// RATIONAL or SRATIONAL: numerator, denominator.
    Ratio(i64, i64),
    /// BYTE, ASCII or UNDEFINED: bytes or text, never a number to Pillow.
    Other,
}

impl TagValue {
    /// Pillow compares tag values with `==`: 6, 6.0 and 12/2 all equal 6.
    fn equals(self, k: i64) -> bool {
        match self {
            TagValue::Int(v) => v == i128::from(k),
            #[allow(clippy::cast_precision_loss)]
            TagValue::Float(f) => f == k as f64,
            TagValue::Ratio(n, d) => d != 0 && i128::from(n) == i128::from(k) * i128::from(d),
            TagValue::Other => false,
        }
    }

    fn decode(t: TiffOrder, typ: u16, b: &[u8]) -> TagValue {
        match typ {
            3 => TagValue::Int(t.u16(b, 0).into()),
            4 | 13 => TagValue::Int(t.u32(b, 0).into()),
            6 => TagValue::Int(i8::from_ne_bytes([b[0]]).into()),
            #[allow(clippy::cast_possible_wrap)]
            8 => TagValue::Int((t.u16(b, 0) as i16).into()),
            #[allow(clippy::cast_possible_wrap)]
            9 => TagValue::Int((t.u32(b, 0) as i32).into()),
            16 => TagValue::Int(t.u64(b, 0).into()),
            5 => TagValue::Ratio(t.u32(b, 0).into(), t.u32(b, 4).into()),
            #[allow(clippy::cast_possible_wrap)]
            10 => TagValue::Ratio((t.u32(b, 0) as i32).into(), (t.u32(b, 4) as i32).into()),
            11 => TagValue::Float(f32::from_bits(t.u32(b, 0)).into()),
            12 => TagValue::Float(f64::from_bits(t.u64(b, 0))),
            _ => TagValue::Other,
        }
    }
}

/// Bytes per value of a TIFF field type as Pillow reads it; `None` for the types it skips.
fn tiff_unit(typ: u16) -> Option<u64> {
    match typ {
        1 | 2 | 6 | 7 => Some(1),
        3 | 8 => Some(2),
        4 | 9 | 11 | 13 => Some(4),
        5 | 10 | 12 | 16 => Some(8),
        _ => None,
    }
}

/// The first value of each tag of `wanted` in the IFD at `at`, read the way Pillow's
/// `ImageFileDirectory_v2.load` reads it: the first entry of a tag that is kept wins; entries of
/// unknown types, empty ones, and out-of-line ones once their total passes the length of the
/// stream are skipped; an IFD cut short keeps the entries read so far, and out-of-line data
/// that runs past the end stops the reading there.
fn ifd_values<const N: usize>(
    src: &mut impl Source,
    t: TiffOrder,
    at: u64,
    wanted: [u16; N],
) -> [Option<TagValue>; N] {
    let mut out = [None; N];
    let Ok(limit) = src.total_len() else {
        return out;
    };
    let (count_len, entry_len, inline) = if t.big {
        (8u64, 20u64, 8u64)
    } else {
        (2, 12, 4)
    };
    let Ok(c) = src.read_at(at, count_len as usize, "TIFF IFD") else {
        return out;
    };
    let count = if t.big {
        t.u64(c, 0)
    } else {
        u64::from(t.u16(c, 0))
    };
    // Tags kept so far (a bit per tag): a later entry of a kept tag is ignored entirely.
    let mut kept = vec![0u64; 1024];
    let mut total: u128 = 0;
    for i in 0..count {
        if out.iter().all(Option::is_some) {
            break; // later entries cannot change a kept value
        }
        let Some(pos) = i
            .checked_mul(entry_len)
            .and_then(|o| o.checked_add(at))
            .and_then(|o| o.checked_add(count_len))
        else {
            break;
        };
        // An IFD cut short: each entry is read in turn, so the loop ends with the file.
        let Ok(e) = src.read_at(pos, entry_len as usize, "TIFF IFD") else {
            break;
        };
        let mut e_copy = [0u8; 20];
        e_copy[..e.len()].copy_from_slice(e);
        let e = &e_copy[..entry_len as usize];
        let tag = t.u16(e, 0);
        let typ = t.u16(e, 2);
        let n = if t.big {
            t.u64(e, 4)
        } else {
            u64::from(t.u32(e, 4))
        };
        let field = if t.big { 12 } else { 8 };
        if kept[usize::from(tag / 64)] & (1 << (tag % 64)) != 0 {
            continue;
        }
        let Some(unit) = tiff_unit(typ) else { continue };
        let size = u128::from(n) * u128::from(unit);
        let slot = wanted.iter().position(|w| *w == tag);
        let value = if size > u128::from(inline) {
            let offset = if t.big {
                t.u64(e, field)
            } else {
                u64::from(t.u32(e, field))
            };
            if offset >= 1 << 63 {
                continue;
            }
            total += size;
            if total > u128::from(limit) {
                continue;
            }
            if u128::from(offset) + size > u128::from(limit) {
                break;
            }
            match slot {
                Some(_) => match src.read_at(offset, unit as usize, "TIFF tag") {
                    Ok(b) => Some(TagValue::decode(t, typ, b)),
                    Err(_) => break,
                },
                None => None,
            }
        } else if size == 0 {
            continue;
        } else {
            slot.map(|_| TagValue::decode(t, typ, &e[field..]))
        };
        kept[usize::from(tag / 64)] |= 1 << (tag % 64);
        if let (Some(k), Some(v)) = (slot, value) {
            out[k] = Some(v);
        }
    }
    out
}

/// ImageWidth and ImageLength of the first IFD, as Pillow reads them (see [`ifd_values`]); like
/// Pillow (11 and later), width and height are swapped when the Orientation tag says the image
/// is turned a quarter (5 to 8).
fn tiff(src: &mut impl Source) -> Parsed<ImageInfo> {
    let s = src.read_at(0, 4, "TIFF")?;
    let t = TiffOrder::detect(s).ok_or_else(|| Reason::Unsupported("not a TIFF file".into()))?;
    let first = if t.big {
        t.u64(src.read_at(8, 8, "BigTIFF")?, 0)
    } else {
        u64::from(t.u32(src.read_at(4, 4, "TIFF")?, 0))
    };
    if first == 0 || first >= 1 << 63 {
        return Err(Reason::Corrupt("TIFF has no image".into()));
    }
    let [w, h, orientation] = ifd_values(src, t, first, [256, 257, 274]);
    let dim = |v: Option<TagValue>| match v {
        Some(TagValue::Int(n)) => Ok(n),
        Some(_) => Err(Reason::Corrupt("TIFF size is not a whole number".into())),
        None => Err(Reason::Corrupt("TIFF has no ImageWidth/ImageLength".into())),
    };
    let (w, h) = (dim(w)?, dim(h)?);
    let (Ok(w), Ok(h)) = (u32::try_from(w.max(0)), u32::try_from(h.max(0))) else {
        return Err(Reason::Corrupt(format!("TIFF size {w}x{h} out of range")));
    };
    let turned = orientation.is_some_and(|o| (5..=8).any(|k| o.equals(k)));
    if turned {
        nonzero(h, w, Format::Tiff)
    } else {
        nonzero(w, h, Format::Tiff)
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
        assert_eq!(
            (info.width, info.height, info.format),
            (640, 480, Format::Jpeg)
        );
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
        assert_eq!(
            (info.width, info.height, info.orientation),
            (4000, 3000, Some(6))
        );
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

    /// A PNG signature, optional chunks, then an IHDR (RGB, 8 bits) with its CRC.
    fn png_with(before: &[(&[u8; 4], Vec<u8>)], w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |name: &[u8; 4], data: &[u8]| {
            v.extend((data.len() as u32).to_be_bytes());
            let mut c = name.to_vec();
            c.extend(data);
            v.extend(&c);
            v.extend(crc32(&c).to_be_bytes());
        };
        for (name, data) in before {
            chunk(name, data);
        }
        let mut ihdr = w.to_be_bytes().to_vec();
        ihdr.extend(h.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        chunk(b"IHDR", &ihdr);
        v
    }

    /// A BMP file header and a BITMAPINFOHEADER.
    fn bmp_with(w: u32, h: u32, bits: u16) -> Vec<u8> {
        let mut v = b"BM".to_vec();
        v.extend([0u8; 12]);
        v.extend(40u32.to_le_bytes());
        v.extend(w.to_le_bytes());
        v.extend(h.to_le_bytes());
        v.extend(1u16.to_le_bytes());
        v.extend(bits.to_le_bytes());
        v.extend([0u8; 24]);
        v
    }

    /// A classic TIFF whose first IFD (at 8) holds `entries` as `(tag, type, count, value)`
    /// (the value written in the 4-byte field as the type's first value, or as an offset),
    /// followed by `extra` bytes (out-of-line data starts at `8 + 2 + 12 * n + 4`).
    fn tiff_with(le: bool, entries: &[(u16, u16, u32, u32)], extra: &[u8]) -> Vec<u8> {
        let w16 = |v: u16| if le { v.to_le_bytes() } else { v.to_be_bytes() };
        let w32 = |v: u32| if le { v.to_le_bytes() } else { v.to_be_bytes() };
        let mut t = if le {
            b"II\x2a\0".to_vec()
        } else {
            b"MM\0\x2a".to_vec()
        };
        t.extend(w32(8));
        t.extend(w16(entries.len() as u16));
        for &(tag, typ, count, value) in entries {
            t.extend(w16(tag));
            t.extend(w16(typ));
            t.extend(w32(count));
            let inline = count * tiff_unit(typ).unwrap_or(1) as u32 <= 4;
            match typ {
                3 | 8 if inline => {
                    t.extend(w16(value as u16));
                    t.extend([0, 0]);
                }
                1 | 6 if inline => t.extend([value as u8, 0, 0, 0]),
                _ => t.extend(w32(value)),
            }
        }
        t.extend(w32(0));
        t.extend(extra);
        t
    }

    fn size(bytes: &[u8]) -> Option<(u32, u32)> {
        probe_bytes(bytes).ok().map(|i| (i.width, i.height))
    }

    #[test]
    fn tiff_orientation_turns_the_size_as_pillow_does() {
        for le in [true, false] {
            for (o, want) in [
                (1, (30, 20)),
                (4, (30, 20)),
                (5, (20, 30)),
                (6, (20, 30)),
                (8, (20, 30)),
                (9, (30, 20)),
            ] {
                let t = tiff_with(le, &[(256, 3, 1, 30), (257, 3, 1, 20), (274, 3, 1, o)], &[]);
                assert_eq!(size(&t), Some(want), "orientation {o}, little-endian {le}");
            }
        }
        // a RATIONAL 12/2 equals 6 to Pillow; BYTE and ASCII values never do
        let after = 8 + 2 + 12 * 3 + 4;
        let mut rational = 12u32.to_le_bytes().to_vec();
        rational.extend(2u32.to_le_bytes());
        let t = tiff_with(
            true,
            &[(256, 3, 1, 30), (257, 3, 1, 20), (274, 5, 1, after)],
            &rational,
        );
        assert_eq!(size(&t), Some((20, 30)));
        let t = tiff_with(
            true,
            &[(256, 3, 1, 30), (257, 3, 1, 20), (274, 1, 1, 6)],
            &[],
        );
        assert_eq!(size(&t), Some((30, 20)));
    }

    #[test]
    fn tiff_ifd_is_read_as_pillow_reads_it() {
        // the first kept entry of a tag wins
        let t = tiff_with(
            true,
            &[(256, 3, 1, 30), (256, 3, 1, 99), (257, 4, 1, 20)],
            &[],
        );
        assert_eq!(size(&t), Some((30, 20)));
        // an entry of an unknown type is skipped, so a later entry of the tag counts
        let t = tiff_with(
            true,
            &[(256, 19, 1, 99), (256, 3, 1, 30), (257, 3, 1, 20)],
            &[],
        );
        assert_eq!(size(&t), Some((30, 20)));
        // an empty entry is skipped too
        let t = tiff_with(
            false,
            &[(256, 3, 0, 99), (256, 3, 1, 30), (257, 3, 1, 20)],
            &[],
        );
        assert_eq!(size(&t), Some((30, 20)));
        // several values: the first one, read where the offset points
        let after = 8 + 2 + 12 * 2 + 4;
        let mut shorts = Vec::new();
        for v in [41u16, 7, 9] {
            shorts.extend(v.to_be_bytes());
        }
        let t = tiff_with(false, &[(256, 3, 3, after), (257, 3, 1, 20)], &shorts);
        assert_eq!(size(&t), Some((41, 20)));
        // out-of-line data past the end of the file stops the IFD: the height after it is lost
        let t = tiff_with(
            true,
            &[(256, 3, 1, 30), (258, 3, 3, 10_000), (257, 3, 1, 20)],
            &[],
        );
        assert_eq!(size(&t), None);
        // an IFD cut short keeps the entries read before the cut
        let t = tiff_with(
            true,
            &[(256, 3, 1, 30), (257, 3, 1, 20), (258, 3, 1, 8)],
            &[],
        );
        assert_eq!(size(&t[..8 + 2 + 24 + 5]), Some((30, 20)));
        // signed, fractional and byte sizes are not sizes to Pillow
        for typ in [8u16, 9] {
            let t = tiff_with(true, &[(256, typ, 1, -30i32 as u32), (257, 3, 1, 20)], &[]);
            assert_eq!(size(&t), None, "type {typ}");
        }
        let t = tiff_with(true, &[(256, 9, 1, 30), (257, 6, 1, 20)], &[]);
        assert_eq!(size(&t), Some((30, 20)));
        let t = tiff_with(true, &[(256, 1, 1, 30), (257, 3, 1, 20)], &[]);
        assert_eq!(size(&t), None);
        // Pillow also takes a header with its version bytes swapped
        let mut t = tiff_with(false, &[(256, 3, 1, 30), (257, 3, 1, 20)], &[]);
        t[2..4].copy_from_slice(b"\x2a\0");
        assert_eq!(size(&t), Some((30, 20)));
        // an IFD at 0 is no image; a huge entry count ends with the file
        let mut t = tiff_with(true, &[(256, 3, 1, 30), (257, 3, 1, 20)], &[]);
        t[4..8].copy_from_slice(&[0; 4]);
        assert_eq!(size(&t), None);
        let mut t = tiff_with(true, &[(256, 3, 1, 30), (257, 3, 1, 20)], &[]);
        t[8..10].copy_from_slice(&[0xFF, 0xFF]);
        assert_eq!(size(&t), Some((30, 20)));
    }

    #[test]
    fn bmp_sizes_are_unsigned_as_in_pillow() {
        assert_eq!(
            size(&bmp_with(0x8000_0025, 23, 24)),
            Some((0x8000_0025, 23))
        );
        assert_eq!(
            size(&bmp_with(37, 0x8000_0017, 24)),
            Some((37, 0x8000_0017))
        );
        assert_eq!(size(&bmp_with(37, 0xFFFF_FFE9, 24)), Some((37, 23))); // top-down
        assert_eq!(size(&bmp_with(37, 23, 2)), None); // a depth Pillow does not read
        let mut rle24 = bmp_with(37, 23, 24);
        rle24[30] = 4; // JPEG compression: Pillow refuses it on open
        assert_eq!(size(&rle24), None);
        assert_eq!(size(&bmp_with(37, 23, 24)[..40]), None); // header cut short
    }

    #[test]
    fn png_is_read_as_pillow_reads_it() {
        // chunks before the IHDR are stepped over
        let p = png_with(&[(b"tEXt", b"k\0v".to_vec())], 300, 200);
        assert_eq!(size(&p), Some((300, 200)));
        assert_eq!(size(&png_with(&[(b"IDAT", vec![0; 4])], 3, 2)), None);
        assert_eq!(size(&png_with(&[(b"t\xffXt", vec![0; 4])], 3, 2)), None);
        // the whole 32-bit range, as Pillow reads it
        assert_eq!(size(&png_with(&[], 0x8000_0000, 1)), Some((0x8000_0000, 1)));
        // a flipped bit in the IHDR fails its CRC, as in Pillow; a file cut before the CRC is read
        let mut p = png_with(&[], 300, 200);
        p[17] ^= 1;
        assert_eq!(size(&p), None);
        assert_eq!(size(&png_with(&[], 300, 200)[..29]), Some((300, 200)));
        let mut bad_depth = png_with(&[], 3, 2);
        bad_depth[24] = 3;
        assert_eq!(size(&bad_depth[..29]), None);
    }

    #[test]
    fn jpeg_orientation_is_read_as_pillow_reads_exif() {
        // big-endian EXIF with the orientation stored as a LONG
        let mut app1 = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        app1.extend([0x01, 0x12, 0, 4, 0, 0, 0, 1, 0, 0, 0, 8]);
        app1.extend([0, 0, 0, 0]);
        let info = probe_bytes(&jpeg_with(&[(0xE1, app1.clone())], 64, 48)).unwrap();
        assert_eq!(info.orientation, Some(8));
        // a value outside 1..=8 is no orientation
        let mut odd = app1.clone();
        odd[6 + 8 + 2 + 11] = 9;
        assert_eq!(
            probe_bytes(&jpeg_with(&[(0xE1, odd)], 64, 48))
                .unwrap()
                .orientation,
            None
        );
        // an APP1 cut short by the end of the file fails, as Pillow's read of the segment does
        let mut cut = jpeg_with(&[(0xE1, app1)], 64, 48);
        cut.truncate(20);
        assert!(probe_bytes(&cut).is_err());
        // a SOF whose component table does not come in threes
        let mut sof = jpeg_with(&[], 64, 48);
        let at = sof.iter().position(|&b| b == 0xC0).unwrap();
        sof[at + 2] += 1;
        sof.insert(at + 3 + 15, 0);
        assert!(probe_bytes(&sof).is_err());
    }
}
