//! Contact sheets of a dataset: one row per class, bias-aligned samples framed green and
//! bias-conflicting samples framed red, to check by eye that a dataset is what it claims.

use super::Split;
use crate::util;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Frame colour of bias-aligned samples.
pub const ALIGNED_FRAME: [u8; 3] = [0, 200, 0];
/// Frame colour of bias-conflicting samples.
pub const CONFLICT_FRAME: [u8; 3] = [230, 0, 0];
/// Background (gaps and empty cells).
pub const BACKGROUND: [u8; 3] = [40, 40, 40];
/// Frame width and gap between cells, in pixels.
pub const FRAME: usize = 2;
pub const GAP: usize = 2;

/// Geometry of a sheet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SheetLayout {
    /// Integer upscaling of each image (small images such as MNIST are enlarged to >= 56 px).
    pub scale: usize,
    /// Side of one cell (frame included).
    pub cell_w: usize,
    pub cell_h: usize,
}

impl SheetLayout {
    pub fn for_split(split: &Split) -> Self {
        let scale = (56 / split.height.max(1)).max(1);
        Self {
            scale,
            cell_w: split.width * scale + 2 * FRAME,
            cell_h: split.height * scale + 2 * FRAME,
        }
    }

    /// Top-left pixel of cell (`row`, `col`).
    pub fn origin(&self, row: usize, col: usize) -> (usize, usize) {
        (
            GAP + col * (self.cell_w + GAP),
            GAP + row * (self.cell_h + GAP),
        )
    }
}

/// Builds the sheet of `split`: row `c` shows the first `per_class` aligned samples of class
/// `c`, then its first `per_class` conflicting samples (missing ones leave empty cells).
/// Returns the RGB image.
pub fn contact_sheet(
    split: &Split,
    num_classes: usize,
    per_class: usize,
) -> Result<image::RgbImage> {
    if per_class == 0 || num_classes == 0 {
        bail!("--per-class must be at least 1");
    }
    if split.channels != 1 && split.channels != 3 {
        bail!(
            "cannot preview {}-channel images (1 or 3 supported)",
            split.channels
        );
    }
    let lay = SheetLayout::for_split(split);
    let cols = 2 * per_class;
    let (w, h) = lay.origin(num_classes, cols);
    let (w, h) = (w as u32, h as u32);
    if u64::from(w) * u64::from(h) > 400_000_000 {
        bail!("the preview would be {w}x{h} pixels: lower --per-class");
    }
    let mut sheet = image::RgbImage::from_pixel(w, h, image::Rgb(BACKGROUND));
    for c in 0..num_classes {
        let aligned = (0..split.len())
            .filter(|&i| split.labels[i] as usize == c && !split.is_conflicting(i))
            .take(per_class);
        let conflicting = (0..split.len())
            .filter(|&i| split.labels[i] as usize == c && split.is_conflicting(i))
            .take(per_class);
        let cells = aligned
            .enumerate()
            .map(|(k, i)| (k, i, ALIGNED_FRAME))
            .chain(
                conflicting
                    .enumerate()
                    .map(|(k, i)| (per_class + k, i, CONFLICT_FRAME)),
            );
        for (col, i, frame) in cells {
            let (x0, y0) = lay.origin(c, col);
            let img = split.image(i)?;
            for y in 0..lay.cell_h {
                for x in 0..lay.cell_w {
                    let inner = x >= FRAME
                        && y >= FRAME
                        && x < lay.cell_w - FRAME
                        && y < lay.cell_h - FRAME;
                    let px = if inner {
                        let (sx, sy) = ((x - FRAME) / lay.scale, (y - FRAME) / lay.scale);
                        let p = (sy * split.width + sx) * split.channels;
                        if split.channels == 3 {
                            [img[p], img[p + 1], img[p + 2]]
                        } else {
                            [img[p]; 3]
                        }
                    } else {
                        frame
                    };
                    sheet.put_pixel((x0 + x) as u32, (y0 + y) as u32, image::Rgb(px));
                }
            }
        }
    }
    Ok(sheet)
}

/// Writes the contact sheet of `split` to `out` as PNG (atomically).
pub fn write_preview(
    split: &Split,
    num_classes: usize,
    per_class: usize,
    out: &Path,
) -> Result<()> {
    let sheet = contact_sheet(split, num_classes, per_class)?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    sheet
        .write_to(&mut bytes, image::ImageFormat::Png)
        .context("cannot encode the preview PNG")?;
    util::write_atomic(out, &bytes.into_inner()).with_context(|| format!("--out {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheet_places_frames_and_pixels() -> Result<()> {
        // Two 1x1... use 2x2 grey-distinct RGB images: class 0 aligned (value 10), class 0
        // conflicting (value 20), class 1 aligned (value 30).
        let img = |v: u8| vec![v; 2 * 2 * 3];
        let images = [img(10), img(20), img(30)].concat();
        let split = Split::new(images, vec![0, 0, 1], vec![0, 1, 1], 2, 2, 3)?;
        let sheet = contact_sheet(&split, 2, 1)?;
        let lay = SheetLayout::for_split(&split);
        assert_eq!(lay.scale, 28);
        assert_eq!(lay.cell_w, 2 * 28 + 4);
        assert_eq!(
            (sheet.width() as usize, sheet.height() as usize),
            (GAP + 2 * (lay.cell_w + GAP), GAP + 2 * (lay.cell_h + GAP))
        );
        let at = |row, col, dx: usize, dy: usize| {
            let (x, y) = lay.origin(row, col);
            sheet.get_pixel((x + dx) as u32, (y + dy) as u32).0
        };
        assert_eq!(at(0, 0, 0, 0), ALIGNED_FRAME);
        assert_eq!(at(0, 0, FRAME + 5, FRAME + 40), [10; 3]);
        assert_eq!(at(0, 1, 1, 1), CONFLICT_FRAME);
        assert_eq!(at(0, 1, FRAME, FRAME), [20; 3]);
        assert_eq!(at(1, 0, 0, 3), ALIGNED_FRAME);
        assert_eq!(at(1, 0, FRAME + 55, FRAME + 55), [30; 3]);
        // Class 1 has no conflicting sample: its cell stays background.
        assert_eq!(at(1, 1, 0, 0), BACKGROUND);
        Ok(())
    }
}
