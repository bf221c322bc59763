//! Reading a COCO file with bounded memory, parsing it (stop-aware) and checking every value
//! before anything is written.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::marker::PhantomData;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{Error, Result};

/// The largest COCO file read by default (4 GiB). The whole file is held in memory while it
/// is ingested, and its parsed form takes about as much again.
pub const MAX_COCO_BYTES: u64 = 4 << 30;

/// Overrides `MAX_COCO_BYTES` (a number of bytes).
pub const MAX_COCO_BYTES_ENV: &str = "FASTINDEX_MAX_COCO_BYTES";

/// Elements parsed (or checked) between two looks at the stop flag: a few ms of work.
pub(super) const STOP_EVERY: usize = 4096;

/// Bytes read between two looks at the stop flag.
const READ_STEP: usize = 16 << 20;

#[derive(Deserialize)]
pub struct Image {
    pub id: i64,
    pub file_name: String,
    pub width: Option<i64>,
    pub height: Option<i64>,
}

#[derive(Deserialize)]
pub struct Category {
    pub id: i64,
    pub name: String,
    pub supercategory: Option<String>,
}

#[derive(Deserialize)]
pub struct Annotation<'a> {
    pub id: Option<i64>,
    pub image_id: i64,
    pub category_id: i64,
    pub bbox: Vec<f64>,
    pub area: Option<f64>,
    pub iscrowd: Option<i64>,
    #[serde(borrow)]
    pub segmentation: Option<&'a RawValue>,
}

/// A checked COCO file, borrowing the segmentation JSON from the file's bytes.
pub struct Coco<'a> {
    pub images: Vec<Image>,
    pub categories: Vec<Category>,
    pub annotations: Vec<Annotation<'a>>,
    /// Index in `images` of each annotation's image.
    pub image_of: Vec<u32>,
}

/// The size limit in force: `FASTINDEX_MAX_COCO_BYTES` if set to a number, else 4 GiB.
pub fn max_bytes() -> u64 {
    std::env::var(MAX_COCO_BYTES_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(MAX_COCO_BYTES)
}

/// Read the whole file, refusing anything but a regular file of at most `limit` bytes whose
/// size does not change while it is read (a FIFO, a device or a procfs file never ends or
/// has no size: they are refused at once instead of filling memory).
pub fn read_limited(path: &Path, limit: u64, stop: &AtomicBool) -> Result<Vec<u8>> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::coco(
            path,
            "not a regular file (a folder, FIFO, socket or device cannot be a COCO file)",
        ));
    }
    let size = meta.len();
    if size > limit {
        return Err(Error::coco(
            path,
            format!(
                "the file is {size} bytes, above the limit of {limit} bytes \
                 (set {MAX_COCO_BYTES_ENV} to allow more)"
            ),
        ));
    }
    let size = usize::try_from(size)
        .map_err(|_| Error::coco(path, "the file is too large for this machine"))?;
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(size)
        .map_err(|_| Error::coco(path, format!("cannot allocate {size} bytes to read it")))?;
    while bytes.len() < size {
        if stop.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let want = (size - bytes.len()).min(READ_STEP) as u64;
        let got = (&mut file)
            .take(want)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(path, e))?;
        if got == 0 {
            return Err(Error::coco(path, "the file shrank while it was read"));
        }
    }
    // A file that still has bytes past its size is growing, or is not a plain file at all
    // (procfs files say 0 bytes): what we hold would not be the file.
    let mut probe = [0u8; 4096];
    match file.read(&mut probe) {
        Ok(0) => Ok(bytes),
        Ok(_) => Err(Error::coco(
            path,
            "the file grew while it was read, or its size is unknown (not a regular file)",
        )),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Where the parser is, so that an error can say which element it is in, and whether it
/// stopped because the stop flag was set.
struct Ctx<'s> {
    stop: &'s AtomicBool,
    at: Cell<Option<(&'static str, usize)>>,
    cancelled: Cell<bool>,
}

struct RawCoco<'a> {
    images: Vec<Image>,
    categories: Vec<Category>,
    annotations: Vec<Annotation<'a>>,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Key {
    Images,
    Categories,
    Annotations,
    #[serde(other)]
    Other,
}

struct Top<'c, 's>(&'c Ctx<'s>);

impl<'de> DeserializeSeed<'de> for Top<'_, '_> {
    type Value = RawCoco<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Top<'_, '_> {
    type Value = RawCoco<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut images, mut categories, mut annotations) = (None, None, None);
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Images if images.is_some() => {
                    return Err(de::Error::duplicate_field("images"))
                }
                Key::Images => images = Some(map.next_value_seed(List::new(self.0, "images"))?),
                Key::Categories if categories.is_some() => {
                    return Err(de::Error::duplicate_field("categories"))
                }
                Key::Categories => {
                    categories = Some(map.next_value_seed(List::new(self.0, "categories"))?);
                }
                Key::Annotations if annotations.is_some() => {
                    return Err(de::Error::duplicate_field("annotations"))
                }
                Key::Annotations => {
                    annotations = Some(map.next_value_seed(List::new(self.0, "annotations"))?);
                }
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(RawCoco {
            images: images.ok_or_else(|| de::Error::missing_field("images"))?,
            categories: categories.unwrap_or_default(),
            annotations: annotations.unwrap_or_default(),
        })
    }
}

/// A JSON array parsed element by element, looking at the stop flag every `STOP_EVERY`.
struct List<'c, 's, T> {
    ctx: &'c Ctx<'s>,
    name: &'static str,
    _t: PhantomData<T>,
}

impl<'c, 's, T> List<'c, 's, T> {
    fn new(ctx: &'c Ctx<'s>, name: &'static str) -> Self {
        List {
            ctx,
            name,
            _t: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for List<'_, '_, T> {
    type Value = Vec<T>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for List<'_, '_, T> {
    type Value = Vec<T>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of {}", self.name)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        loop {
            if out.len() % STOP_EVERY == 0 && self.ctx.stop.load(Ordering::Relaxed) {
                self.ctx.cancelled.set(true);
                return Err(de::Error::custom("cancelled"));
            }
            self.ctx.at.set(Some((self.name, out.len())));
            match seq.next_element()? {
                Some(v) => out.push(v),
                None => break,
            }
        }
        self.ctx.at.set(None);
        Ok(out)
    }
}

/// Parse and check a COCO file: ids unique, every annotation's image and category known,
/// every bbox four finite numbers with non-negative size. An error names the element.
pub fn parse<'a>(path: &Path, bytes: &'a [u8], stop: &AtomicBool) -> Result<Coco<'a>> {
    // A JSON array would be taken as the object's fields in order: a COCO file is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Error::coco(
            path,
            "not a COCO file: the top level must be a JSON object",
        ));
    }
    let ctx = Ctx {
        stop,
        at: Cell::new(None),
        cancelled: Cell::new(false),
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let raw = Top(&ctx)
        .deserialize(&mut de)
        .and_then(|raw| de.end().map(|()| raw))
        .map_err(|e| {
            if ctx.cancelled.get() {
                return Error::Cancelled;
            }
            match ctx.at.get() {
                Some((list, i)) => Error::coco(path, format!("not a COCO file: {list}[{i}]: {e}")),
                None => Error::coco(path, format!("not a COCO file: {e}")),
            }
        })?;
    check(path, raw, stop)
}

fn check<'a>(path: &Path, raw: RawCoco<'a>, stop: &AtomicBool) -> Result<Coco<'a>> {
    let stopped = |i: usize| i % STOP_EVERY == 0 && stop.load(Ordering::Relaxed);
    let mut image_index: HashMap<i64, u32> = HashMap::with_capacity(raw.images.len());
    if u32::try_from(raw.images.len()).is_err() {
        return Err(Error::coco(path, "more than 2^32 images"));
    }
    for (i, im) in raw.images.iter().enumerate() {
        if stopped(i) {
            return Err(Error::Cancelled);
        }
        if image_index.insert(im.id, i as u32).is_some() {
            return Err(Error::coco(
                path,
                format!("images[{i}]: duplicate image id {}", im.id),
            ));
        }
        if im.file_name.is_empty() {
            return Err(Error::coco(path, format!("images[{i}]: empty file_name")));
        }
        if im.width.is_some() != im.height.is_some() {
            return Err(Error::coco(
                path,
                format!("images[{i}]: width and height go together (give both or neither)"),
            ));
        }
        if im.width.is_some_and(|w| w <= 0) || im.height.is_some_and(|h| h <= 0) {
            return Err(Error::coco(
                path,
                format!("images[{i}]: width and height must be positive"),
            ));
        }
    }
    let mut cat_ids = HashSet::with_capacity(raw.categories.len());
    for (i, c) in raw.categories.iter().enumerate() {
        if stopped(i) {
            return Err(Error::Cancelled);
        }
        if !cat_ids.insert(c.id) {
            return Err(Error::coco(
                path,
                format!("categories[{i}]: duplicate category id {}", c.id),
            ));
        }
    }
    let mut ann_ids = HashSet::with_capacity(raw.annotations.len());
    let mut image_of = Vec::with_capacity(raw.annotations.len());
    for (i, a) in raw.annotations.iter().enumerate() {
        if stopped(i) {
            return Err(Error::Cancelled);
        }
        if let Some(id) = a.id {
            if !ann_ids.insert(id) {
                return Err(Error::coco(
                    path,
                    format!("annotations[{i}]: duplicate annotation id {id}"),
                ));
            }
        }
        let Some(&image) = image_index.get(&a.image_id) else {
            return Err(Error::coco(
                path,
                format!("annotations[{i}]: image_id {} is not in images", a.image_id),
            ));
        };
        image_of.push(image);
        if !cat_ids.contains(&a.category_id) {
            return Err(Error::coco(
                path,
                format!(
                    "annotations[{i}]: category_id {} is not in categories",
                    a.category_id
                ),
            ));
        }
        let ok = a.bbox.len() == 4
            && a.bbox.iter().all(|v| v.is_finite())
            && a.bbox[2] >= 0.0
            && a.bbox[3] >= 0.0;
        if !ok {
            return Err(Error::coco(
                path,
                format!(
                    "annotations[{i}]: bbox must be [x, y, width, height] with width and \
                     height >= 0, got {:?}",
                    a.bbox
                ),
            ));
        }
        if a.area.is_some_and(|v| !v.is_finite() || v < 0.0) {
            return Err(Error::coco(
                path,
                format!("annotations[{i}]: area must be a number >= 0"),
            ));
        }
    }
    Ok(Coco {
        images: raw.images,
        categories: raw.categories,
        annotations: raw.annotations,
        image_of,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        let stop = AtomicBool::new(false);
        match parse(Path::new("x.json"), s.as_bytes(), &stop) {
            Err(Error::Coco { reason, .. }) => reason,
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("accepted {s}"),
        }
    }

    #[test]
    fn malformed_files_are_refused_with_a_reason() {
        let stop = AtomicBool::new(false);
        let p = Path::new("x.json");
        assert!(err("{").contains("not a COCO file"));
        assert!(err(r#"{"images": 3}"#).contains("not a COCO file"));
        let base =
            r#""images":[{"id":1,"file_name":"a.jpg"}],"categories":[{"id":7,"name":"dog"}]"#;
        assert!(err(&format!(
            r#"{{{base},"annotations":[{{"image_id":2,"category_id":7,"bbox":[0,0,1,1]}}]}}"#
        ))
        .contains("image_id 2"));
        assert!(err(&format!(
            r#"{{{base},"annotations":[{{"image_id":1,"category_id":8,"bbox":[0,0,1,1]}}]}}"#
        ))
        .contains("category_id 8"));
        assert!(err(&format!(
            r#"{{{base},"annotations":[{{"image_id":1,"category_id":7,"bbox":[0,0,1]}}]}}"#
        ))
        .contains("bbox"));
        assert!(err("[]").contains("must be a JSON object"));
        assert!(err(" [[], [], []]").contains("must be a JSON object"));
        let ann = r#"{"id":5,"image_id":1,"category_id":7,"bbox":[1,2,3,4]}"#;
        assert!(err(&format!(r#"{{{base},"annotations":[{ann},{ann}]}}"#))
            .contains("annotations[1]: duplicate annotation id 5"));
        let no_ids = r#"{"image_id":1,"category_id":7,"bbox":[1,2,3,4]}"#;
        let two = format!(r#"{{{base},"annotations":[{no_ids},{no_ids}]}}"#);
        assert!(parse(p, two.as_bytes(), &stop).is_ok());
        let ok = format!(
            r#"{{{base},"annotations":[{{"id":5,"image_id":1,"category_id":7,"bbox":[1,2,3,4],"segmentation":[[1,2,3,4,5,6]]}}]}}"#
        );
        let c = parse(p, ok.as_bytes(), &stop).unwrap();
        assert_eq!(
            c.annotations[0].segmentation.unwrap().get(),
            "[[1,2,3,4,5,6]]"
        );
        assert_eq!(c.image_of, [0]);
    }

    #[test]
    fn hostile_values_name_where_they_are() {
        let huge =
            r#"{"images":[{"id":1,"file_name":"a"},{"id":9223372036854775808,"file_name":"b"}]}"#;
        let e = err(huge);
        assert!(
            e.contains("images[1]") && e.contains("9223372036854775808"),
            "{e}"
        );
        let e = err(r#"{"images":[{"id":1,"file_name":7}]}"#);
        assert!(e.contains("images[0]") && e.contains("invalid type"), "{e}");
        let e = err(
            r#"{"images":[{"id":1,"file_name":"a"}],"categories":[{"id":1,"name":"c"}],
                "annotations":[{"image_id":1,"category_id":1,"bbox":[0,0,1,1]},
                               {"image_id":1,"category_id":1,"bbox":[0,0,-1,1]}]}"#,
        );
        assert!(e.contains("annotations[1]: bbox"), "{e}");
        assert!(err(r#"{"images":[{"id":1,"file_name":"a"}],"annotations":[{"image_id":1,"category_id":1,"bbox":[0,0,NaN,1]}]}"#).contains("annotations[0]"));
        assert!(err(r#"{"images":[],"images":[]}"#).contains("duplicate field `images`"));
        assert!(err(r#"{"images":[]} x"#).contains("trailing characters"));
        // an error outside the lists does not blame the last element read
        let e = err(r#"{"images":[{"id":1,"file_name":"a"}],"info":[}"#);
        assert!(!e.contains("images[0]"), "{e}");
    }

    #[test]
    fn a_set_stop_flag_cancels_the_parse() {
        let stop = AtomicBool::new(true);
        let r = parse(Path::new("x.json"), br#"{"images":[]}"#, &stop);
        assert!(matches!(r, Err(Error::Cancelled)));
    }

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let t = tempfile::tempdir().unwrap();
        let stop = AtomicBool::new(false);
        let f = t.path().join("c.json");
        std::fs::write(&f, b"{\"images\":[]}").unwrap();
        assert_eq!(read_limited(&f, 100, &stop).unwrap().len(), 13);
        assert!(
            matches!(read_limited(&f, 12, &stop), Err(Error::Coco { reason, .. }) if reason.contains("above the limit"))
        );
        assert!(matches!(
            read_limited(t.path(), 100, &stop),
            Err(Error::Coco { .. })
        ));
        let fifo = t.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a plain syscall on a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(
            matches!(read_limited(&fifo, 100, &stop), Err(Error::Coco { reason, .. }) if reason.contains("not a regular file"))
        );
        assert!(matches!(
            read_limited(Path::new("/dev/zero"), 100, &stop),
            Err(Error::Coco { .. })
        ));
        let pagemap = Path::new("/proc/self/pagemap");
        if pagemap.exists() {
            assert!(
                matches!(read_limited(pagemap, 1 << 20, &stop), Err(Error::Coco { reason, .. }) if reason.contains("size is unknown"))
            );
        }
    }
}
