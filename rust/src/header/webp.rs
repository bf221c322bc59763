//! WebP: the size from the first chunk (VP8, VP8L or VP8X).

use super::{le16, le24, le32, nonzero, Format, ImageInfo, Parsed, Reason, Source};

pub(super) fn probe(src: &mut impl Source) -> Parsed<ImageInfo> {
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
