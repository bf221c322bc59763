//! COCO detection files, in three steps:
//!
//! 1. read (a regular file, at most `max_bytes()`), parse and check everything; a malformed
//!    file is refused with the reason and where, before anything is written;
//! 2. look at the listed files with no transaction open (in parallel on the I/O pool): each
//!    `file_name` is normalised, and refused when it (or a symlink on its way) leaves the
//!    images folder; the header is read in the same open (phase 2 for free);
//! 3. write in short transactions (a few ms each, a pause between them), so another
//!    dataset's writers on the same store wait for milliseconds, not for the ingest.
//!
//! A failed or cancelled ingest keeps what it committed: every transaction leaves the store
//! consistent (rows, their counters and boxes of each sample written together), and running
//! the same file again finishes it: rows already there are `existing`, and their boxes from
//! this file are replaced, never doubled. Rolling back instead could not cover a crash (a
//! kill -9 runs no cleanup), so a rerun has to be the recovery in any case; keeping the
//! committed rows makes an error and a crash leave the same kind of state.

mod ingest;
mod parse;
mod paths;
mod plan;
mod write;

pub use parse::{
    max_bytes, parse, read_limited, Annotation, Category, Coco, Image, MAX_COCO_BYTES,
    MAX_COCO_BYTES_ENV,
};
pub use paths::normalise;

#[derive(Debug, Clone, Default)]
pub struct CocoSummary {
    pub job_id: i64,
    pub images: u64,
    pub added: u64,
    pub existing: u64,
    pub annotations: u64,
    pub categories: u64,
    /// `file_name` of each COCO image whose file is not on disk.
    pub missing: Vec<String>,
    /// `(file_name, reason)` of each COCO image refused because it leads out of the images
    /// folder (absolute, `..`, a symlink out): never opened nor indexed.
    pub rejected: Vec<(String, String)>,
    /// Boxes of images missing or refused: not stored, counted here.
    pub annotations_skipped: u64,
}
