//! JPEG: the size from the last frame header (SOF) before the scan, and the EXIF orientation.

use super::{be16, exif, nonzero, Format, ImageInfo, Parsed, Reason, Source, Within};

/// Pillow's rule: walk the markers up to the first SOS; the last SOF before it gives the size.
pub(super) fn probe(src: &mut impl Source) -> Parsed<ImageInfo> {
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
                    orientation = Some(exif::orientation(&mut Within {
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

#[cfg(test)]
mod tests {
    use crate::header::fixtures::jpeg_with;
    use crate::header::{probe_bytes, Format};

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
