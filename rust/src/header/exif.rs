//! EXIF: the orientation tag of a JPEG's APP1 block, read as a TIFF structure.

use super::tiff::{ifd_values, TiffOrder};
use super::Source;

/// EXIF orientation as Pillow's `getexif().get(0x0112)` reads it from a TIFF-structured block:
/// `Some` only for a value equal to a whole number from 1 to 8.
pub(super) fn orientation(src: &mut impl Source) -> Option<u16> {
    let t = TiffOrder::detect(src.read_at(0, 4, "EXIF").ok()?)?;
    if t.big {
        return None; // Pillow reads an 8-byte header for EXIF, too short for BigTIFF: no EXIF
    }
    let ifd = t.u32(src.read_at(4, 4, "EXIF").ok()?, 0);
    let [value] = ifd_values(src, t, u64::from(ifd), [0x0112]);
    let value = value?;
    (1..=8u16).find(|&k| value.equals(i64::from(k)))
}
