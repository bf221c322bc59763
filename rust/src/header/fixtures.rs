//! Tiny image files built byte by byte, for the header tests.

use super::png::crc32;
use super::probe_bytes;
use super::tiff::tiff_unit;

/// A JPEG: SOI, `segments` as `(marker, body)`, a baseline SOF of `w`x`h`, then an SOS.
pub(super) fn jpeg_with(segments: &[(u8, Vec<u8>)], w: u16, h: u16) -> Vec<u8> {
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

/// A PNG signature, optional chunks, then an IHDR (RGB, 8 bits) with its CRC.
pub(super) fn png_with(before: &[(&[u8; 4], Vec<u8>)], w: u32, h: u32) -> Vec<u8> {
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
pub(super) fn bmp_with(w: u32, h: u32, bits: u16) -> Vec<u8> {
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
pub(super) fn tiff_with(le: bool, entries: &[(u16, u16, u32, u32)], extra: &[u8]) -> Vec<u8> {
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

/// `(width, height)` when the bytes probe as an image.
pub(super) fn size(bytes: &[u8]) -> Option<(u32, u32)> {
    probe_bytes(bytes).ok().map(|i| (i.width, i.height))
}
