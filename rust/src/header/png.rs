//! PNG: the size from the IHDR chunk, checked as Pillow checks it.

use super::{nonzero, Format, ImageInfo, Parsed, Reason, Source};

/// Pillow's rule: chunks up to the first IDAT; the IHDR gives the size. Chunks before the IHDR
/// are stepped over (a name must be four letters, digits or `_`). The IHDR itself is checked as
/// Pillow checks it: 13 bytes or more, its CRC, a known bit depth and colour type, filter 0.
/// (Pillow would let a second IHDR before the IDAT override the first; this stops at the first.)
pub(super) fn probe(src: &mut impl Source) -> Parsed<ImageInfo> {
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
pub(super) fn crc32(bytes: &[u8]) -> u32 {
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

#[cfg(test)]
mod tests {
    use crate::header::fixtures::{png_with, size};

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
}
