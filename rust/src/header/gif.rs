//! GIF: the logical screen size, grown to hold the first frame.

use super::{le16, nonzero, Format, ImageInfo, Parsed, Reason, Source};

/// The logical screen, grown to hold the first frame when that frame reaches beyond it
/// (Pillow does the same on open).
pub(super) fn probe(src: &mut impl Source) -> Parsed<ImageInfo> {
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
