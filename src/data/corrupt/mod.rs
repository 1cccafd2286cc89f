//! The 20 image corruptions of Corrupted CIFAR-10 (LfF, Nam et al. 2020), with the severity
//! parameters (1-5) of CIFAR-10-C (Hendrycks & Dietterich 2019, `make_cifar_c.py`),
//! implemented in Rust. Type0 and Type1 each assign corruption `i` to class `i`.
//!
//! Where CIFAR-10-C calls library code, we reimplement the operation: skimage's Gaussian
//! filter, scipy's `zoom`/`map_coordinates`, OpenCV's disk kernel, affine warp and the
//! spatter edge pipeline, ImageMagick's motion blur, PIL's box resize; JPEG goes through the
//! `image` crate's encoder at the same quality. Frost differs by design: CIFAR-10-C blends
//! photographs of frost that we do not ship, so `weather::frost_texture` synthesises an
//! ice-crystal texture procedurally and blends it with CIFAR-10-C's weights.
//!
//! Every corruption is deterministic given its random generator, and works on RGB images of
//! any size (CIFAR's 32x32 is what the parameters were tuned for); outputs are `u8` again
//! (values clipped to [0, 1], then rounded to the nearest of 0..=255).

pub mod blur;
pub mod digital;
pub(crate) mod filters;
pub mod noise;
pub mod weather;

use crate::util::Rng;
use anyhow::{bail, Result};

/// One corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Corruption {
    Snow,
    Frost,
    Fog,
    Brightness,
    Contrast,
    Spatter,
    Elastic,
    Jpeg,
    Pixelate,
    Saturate,
    GaussianNoise,
    ShotNoise,
    ImpulseNoise,
    SpeckleNoise,
    GaussianBlur,
    DefocusBlur,
    GlassBlur,
    MotionBlur,
    ZoomBlur,
    /// The unchanged image.
    Original,
}

/// LfF's Type0: class `i` takes corruption `i`.
pub const TYPE0: [Corruption; 10] = [
    Corruption::Snow,
    Corruption::Frost,
    Corruption::Fog,
    Corruption::Brightness,
    Corruption::Contrast,
    Corruption::Spatter,
    Corruption::Elastic,
    Corruption::Jpeg,
    Corruption::Pixelate,
    Corruption::Saturate,
];

/// LfF's Type1: class `i` takes corruption `i`.
pub const TYPE1: [Corruption; 10] = [
    Corruption::GaussianNoise,
    Corruption::ShotNoise,
    Corruption::ImpulseNoise,
    Corruption::SpeckleNoise,
    Corruption::GaussianBlur,
    Corruption::DefocusBlur,
    Corruption::GlassBlur,
    Corruption::MotionBlur,
    Corruption::ZoomBlur,
    Corruption::Original,
];

/// The corruptions of `--type 0|1`.
pub fn corruption_type(kind: u8) -> Result<[Corruption; 10]> {
    match kind {
        0 => Ok(TYPE0),
        1 => Ok(TYPE1),
        _ => bail!("--type must be 0 (snow, frost, ...) or 1 (noise, blur, ...), got {kind}"),
    }
}

/// Checks a severity level.
pub fn check_severity(severity: u8) -> Result<()> {
    if !(1..=5).contains(&severity) {
        bail!("--severity must be 1-5 (CIFAR-10-C levels; LfF/DFA use 4), got {severity}");
    }
    Ok(())
}

/// An RGB image of `f32` values in [0, 1] (HWC), the working format of the corruptions.
#[derive(Debug, Clone, PartialEq)]
pub struct Img {
    pub w: usize,
    pub h: usize,
    pub px: Vec<f32>,
}

impl Img {
    pub fn from_u8(rgb: &[u8], w: usize, h: usize) -> Self {
        Self {
            w,
            h,
            px: rgb.iter().map(|&v| f32::from(v) / 255.0).collect(),
        }
    }

    /// Clips to [0, 1] and rounds to bytes.
    pub fn to_u8(&self) -> Vec<u8> {
        self.px
            .iter()
            .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect()
    }

    /// Channel `c` as a plane.
    pub fn plane(&self, c: usize) -> Vec<f32> {
        self.px.iter().skip(c).step_by(3).copied().collect()
    }

    /// Replaces channel `c`.
    pub fn set_plane(&mut self, c: usize, plane: &[f32]) {
        for (p, &v) in plane.iter().enumerate() {
            self.px[p * 3 + c] = v;
        }
    }

    /// Applies `f` to each channel plane.
    pub fn map_planes(&self, mut f: impl FnMut(&[f32]) -> Vec<f32>) -> Img {
        let mut out = self.clone();
        for c in 0..3 {
            let p = f(&self.plane(c));
            out.set_plane(c, &p);
        }
        out
    }
}

impl Corruption {
    /// All 20, Type0 then Type1.
    pub const ALL: [Corruption; 20] = [
        TYPE0[0], TYPE0[1], TYPE0[2], TYPE0[3], TYPE0[4], TYPE0[5], TYPE0[6], TYPE0[7], TYPE0[8],
        TYPE0[9], TYPE1[0], TYPE1[1], TYPE1[2], TYPE1[3], TYPE1[4], TYPE1[5], TYPE1[6], TYPE1[7],
        TYPE1[8], TYPE1[9],
    ];

    /// Snake-case name, as in CIFAR-10-C's file names.
    pub fn name(self) -> &'static str {
        match self {
            Corruption::Snow => "snow",
            Corruption::Frost => "frost",
            Corruption::Fog => "fog",
            Corruption::Brightness => "brightness",
            Corruption::Contrast => "contrast",
            Corruption::Spatter => "spatter",
            Corruption::Elastic => "elastic_transform",
            Corruption::Jpeg => "jpeg_compression",
            Corruption::Pixelate => "pixelate",
            Corruption::Saturate => "saturate",
            Corruption::GaussianNoise => "gaussian_noise",
            Corruption::ShotNoise => "shot_noise",
            Corruption::ImpulseNoise => "impulse_noise",
            Corruption::SpeckleNoise => "speckle_noise",
            Corruption::GaussianBlur => "gaussian_blur",
            Corruption::DefocusBlur => "defocus_blur",
            Corruption::GlassBlur => "glass_blur",
            Corruption::MotionBlur => "motion_blur",
            Corruption::ZoomBlur => "zoom_blur",
            Corruption::Original => "original",
        }
    }

    /// Index in [`Corruption::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|&c| c == self).unwrap_or(0)
    }

    /// Corrupts an RGB image (`w * h * 3` bytes, HWC) at `severity` 1-5, drawing randomness
    /// from `rng`.
    pub fn apply(
        self,
        rgb: &[u8],
        w: usize,
        h: usize,
        severity: u8,
        rng: &mut Rng,
    ) -> Result<Vec<u8>> {
        check_severity(severity)?;
        if rgb.len() != w * h * 3 || w == 0 || h == 0 {
            bail!(
                "a {w}x{h} RGB image needs {} bytes, got {}",
                w * h * 3,
                rgb.len()
            );
        }
        let s = usize::from(severity - 1);
        let x = || Img::from_u8(rgb, w, h);
        Ok(match self {
            Corruption::Original => rgb.to_vec(),
            Corruption::Jpeg => digital::jpeg(rgb, w, h, s)?,
            Corruption::Pixelate => digital::pixelate(rgb, w, h, s),
            Corruption::Snow => weather::snow(&x(), s, rng).to_u8(),
            Corruption::Frost => weather::frost(&x(), s, rng).to_u8(),
            Corruption::Fog => weather::fog(&x(), s, rng).to_u8(),
            Corruption::Spatter => weather::spatter(&x(), s, rng).to_u8(),
            Corruption::Brightness => digital::brightness(&x(), s).to_u8(),
            Corruption::Contrast => digital::contrast(&x(), s).to_u8(),
            Corruption::Elastic => digital::elastic(&x(), s, rng).to_u8(),
            Corruption::Saturate => digital::saturate(&x(), s).to_u8(),
            Corruption::GaussianNoise => noise::gaussian(&x(), s, rng).to_u8(),
            Corruption::ShotNoise => noise::shot(&x(), s, rng).to_u8(),
            Corruption::ImpulseNoise => noise::impulse(&x(), s, rng).to_u8(),
            Corruption::SpeckleNoise => noise::speckle(&x(), s, rng).to_u8(),
            Corruption::GaussianBlur => blur::gaussian(&x(), s).to_u8(),
            Corruption::DefocusBlur => blur::defocus(&x(), s).to_u8(),
            Corruption::GlassBlur => blur::glass(&x(), s, rng).to_u8(),
            Corruption::MotionBlur => blur::motion(&x(), s, rng).to_u8(),
            Corruption::ZoomBlur => blur::zoom(&x(), s).to_u8(),
        })
    }
}
