//! BMP: the size from the DIB header, with the checks Pillow makes on open.

use super::{le16, le32, nonzero, Format, ImageInfo, Parsed, Reason, Source};

/// Pillow's rule: width and height are unsigned 32-bit, except that a height whose top byte is
/// 0xFF is a top-down image of height `2^32 - h`. The header must be whole, the pixel depth one
/// Pillow decodes, the compression known and, for bitfields, the masks a layout Pillow knows.
pub(super) fn probe(src: &mut impl Source) -> Parsed<ImageInfo> {
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

#[cfg(test)]
mod tests {
    use crate::header::fixtures::{bmp_with, size};

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
}
