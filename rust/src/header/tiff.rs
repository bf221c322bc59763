//! TIFF: ImageWidth and ImageLength of the first IFD, and the IFD reader EXIF shares.

use super::{nonzero, Format, ImageInfo, Parsed, Reason, Source};

/// Byte order and flavour of a TIFF structure, from its first four bytes, as Pillow accepts
/// them: the two valid headers, the two with the version bytes swapped, and BigTIFF. Pillow
/// takes a header for BigTIFF only when its third byte is 43, so a big-endian BigTIFF is read as
/// classic TIFF (and usually fails), as Pillow does.
#[derive(Debug, Clone, Copy)]
pub(super) struct TiffOrder {
    le: bool,
    pub(super) big: bool,
}

impl TiffOrder {
    pub(super) fn detect(h: &[u8]) -> Option<TiffOrder> {
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
    pub(super) fn u32(self, b: &[u8], i: usize) -> u32 {
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
pub(super) enum TagValue {
    Int(i128),
    Float(f64),
    /// RATIONAL or SRATIONAL: numerator, denominator.
    Ratio(i64, i64),
    /// BYTE, ASCII or UNDEFINED: bytes or text, never a number to Pillow.
    Other,
}

impl TagValue {
    /// Pillow compares tag values with `==`: 6, 6.0 and 12/2 all equal 6.
    pub(super) fn equals(self, k: i64) -> bool {
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
pub(super) fn tiff_unit(typ: u16) -> Option<u64> {
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
pub(super) fn ifd_values<const N: usize>(
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
pub(super) fn probe(src: &mut impl Source) -> Parsed<ImageInfo> {
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
    use crate::header::fixtures::{size, tiff_with};

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
}
