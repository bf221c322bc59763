//! The distinct files a COCO file lists, with the images and boxes of each.

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::slice::ParallelSliceMut;

use super::parse::{Coco, STOP_EVERY};
use super::paths::normalise;
use crate::error::{Error, Result};

/// Items of group `k` are `items[start[k]..start[k + 1]]`.
pub struct Groups {
    start: Vec<usize>,
    items: Vec<u32>,
}

impl Groups {
    pub fn get(&self, k: usize) -> &[u32] {
        &self.items[self.start[k]..self.start[k + 1]]
    }
}

pub struct Plan {
    /// Normalised names, sorted, each once: two entries naming one file are one row.
    pub names: Vec<String>,
    /// Per name, the images listing it (in file order).
    pub images: Groups,
    /// Per name, the boxes of those images (in file order).
    pub boxes: Groups,
    /// `(image, reason)` of each image whose name leaves the images folder.
    pub refused: Vec<(u32, &'static str)>,
    pub refused_boxes: u64,
}

impl Plan {
    pub fn new(coco: &Coco<'_>, stop: &AtomicBool) -> Result<Plan> {
        let mut listed: Vec<(String, u32)> = Vec::with_capacity(coco.images.len());
        let mut refused = Vec::new();
        for (i, im) in coco.images.iter().enumerate() {
            if i % STOP_EVERY == 0 && stop.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            match normalise(&im.file_name) {
                Ok(name) => listed.push((name, i as u32)),
                Err(reason) => refused.push((i as u32, reason)),
            }
        }
        // In name order, so that new rows (and their boxes) append to the indexes.
        crate::pools::cpu_pool().install(|| listed.par_sort_unstable());
        let mut names: Vec<String> = Vec::new();
        let mut name_of = vec![u32::MAX; coco.images.len()];
        let mut start = Vec::new();
        let mut items = Vec::with_capacity(listed.len());
        for (name, image) in listed {
            if names.last() != Some(&name) {
                start.push(items.len());
                names.push(name);
            }
            name_of[image as usize] = (names.len() - 1) as u32;
            items.push(image);
        }
        start.push(items.len());
        let images = Groups { start, items };
        // Boxes grouped by name, in file order within a name (a counting sort).
        let mut count = vec![0usize; names.len() + 1];
        let mut refused_boxes = 0u64;
        for &im in &coco.image_of {
            match name_of[im as usize] {
                u32::MAX => refused_boxes += 1,
                k => count[k as usize + 1] += 1,
            }
        }
        for k in 1..count.len() {
            count[k] += count[k - 1];
        }
        let start = count.clone();
        let mut items = vec![0u32; start[names.len()]];
        for (a, &im) in coco.image_of.iter().enumerate() {
            let k = name_of[im as usize];
            if k != u32::MAX {
                items[count[k as usize]] = a as u32;
                count[k as usize] += 1;
            }
        }
        Ok(Plan {
            names,
            images,
            boxes: Groups { start, items },
            refused,
            refused_boxes,
        })
    }
}
