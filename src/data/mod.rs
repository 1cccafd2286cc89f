//! Datasets with group annotations: every sample carries a class label and a bias attribute;
//! in DFA data it is *aligned* when the two agree and *bias-conflicting* otherwise; in a
//! dataset described by a table (`table`) the conflicting samples are those of its minority
//! (label, attribute) groups (`groups`).
//!
//! Images are stored as `u8` in NHWC order (what image files and `.npy` exports use), in RAM,
//! memory-mapped from a cache file or decoded on the fly (`images::Images`), and are
//! converted to `f32` NCHW batches only when a batch is gathered for the model.

pub mod builtin;
pub mod cache;
pub mod cifar;
pub mod colored_mnist;
pub mod corrupt;
pub mod dfa;
pub mod export;
pub mod groups;
pub mod idx;
pub mod images;
pub mod loader;
pub mod make;
pub mod make_cifar;
pub mod options;
pub mod preview;
pub mod sampler;
pub mod table;
pub mod transform;

use anyhow::{bail, Result};
use std::borrow::Cow;
use std::sync::Arc;

pub use images::Images;
pub use options::{DataOptions, DataPlan, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE};

/// Where a run's images come from (`DataPlan::source`).
#[derive(Debug, Clone)]
pub enum DataSource {
    /// Colored MNIST generated from the built-in digits.
    Builtin(colored_mnist::ColoredMnistSpec),
    /// A dataset folder, its images resized to `image_size` on load when given.
    Folder {
        opts: dfa::DfaOptions,
        image_size: Option<usize>,
    },
    /// A folder described by a table, its images loaded with `geometry`; minority groups
    /// chosen by `rule`.
    Table {
        opts: Box<table::TableOptions>,
        geometry: dfa::LoadGeometry,
        rule: groups::MinorityRule,
    },
}

/// Builds the dataset of `source`.
pub fn load(source: &DataSource) -> Result<GroupDataset> {
    match source {
        DataSource::Folder { opts, image_size } => Ok(dfa::load_sized(opts, *image_size)?.dataset),
        DataSource::Table {
            opts,
            geometry,
            rule,
        } => {
            let (mut ds, listing) = table::load(opts, geometry)?;
            let mut info = groups::GroupInfo::choose(&ds.train.labels, &ds.train.bias, rule)?;
            info.class_names = listing.class_names;
            info.attribute_names = listing.attribute_names;
            if info.minority.is_empty() {
                tracing::warn!(
                    "no minority group by the rule: {}; up-weighting changes nothing",
                    info.rule
                );
            }
            let info = Arc::new(info);
            for s in [&mut ds.train, &mut ds.valid, &mut ds.test] {
                s.groups = Some(info.clone());
            }
            Ok(ds)
        }
        DataSource::Builtin(spec) => {
            let (digits, labels) = builtin::builtin_digits()?;
            colored_mnist::generate(&digits, &labels, spec)
        }
    }
}

/// Layout of a dataset folder (`--data`), in the layout of the DFA release (Lee et al., 2021).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// From the folder name (`cmnist`, `cifar10c`, `bffhq` in it), else `dfa`.
    Auto,
    /// Colored MNIST: `<pct>/valid/*` (flat), `test/<class>/*`.
    Cmnist,
    /// Corrupted CIFAR-10: `<pct>/valid/*/*`, `test/<class>/*`.
    Cifar10c,
    /// BFFHQ: `valid/*`, `test/*`.
    Bffhq,
    /// Any of the above: validation in `<pct>/valid` or `valid`, flat or one folder deep.
    Dfa,
    /// SubpopBench: `metadata_<name>.csv` (`id,filename,split,y,a`; split 0/1/2).
    Subpop,
    /// Waterbirds as group_DRO ships it: `metadata.csv` (`img_id,img_filename,y,split,place`).
    Waterbirds,
    /// CelebA as group_DRO reads it: `list_attr_celeba.csv` + `list_eval_partition.csv`.
    Celeba,
    /// Any CSV: --table-file and its --image-column, --label-column, --attribute-column,
    /// --split-column.
    Table,
}

/// The default `image_size` of BFFHQ (REST's 128-pixel ResNet-18 pipeline; DFA uses 224).
pub const BFFHQ_IMAGE_SIZE: usize = 128;
/// group_DRO's input size for Waterbirds and CelebA.
pub const GROUP_DRO_IMAGE_SIZE: usize = 224;
/// CelebA's centre crop before resizing (group_DRO).
pub const CELEBA_CROP: usize = 178;

/// What a data layout implies where a run does not say: the size images are resized to on
/// load, training augmentation (random crop with padding 4, horizontal flip; or, with
/// `resized_crop`, torchvision's random resized crop and flip) and the normalisation, as the
/// reference code trains on that dataset.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LayoutDefaults {
    pub image_size: Option<usize>,
    pub augment: bool,
    pub normalize: Option<transform::Normalize>,
    /// Augmentation is a random resized crop (scale 0.7-1, ratio 3/4-4/3) + flip (Waterbirds).
    pub resized_crop: bool,
}

impl DatasetKind {
    /// The layout's defaults (see [`LayoutDefaults`]).
    pub fn defaults(self) -> LayoutDefaults {
        match self {
            DatasetKind::Cifar10c => LayoutDefaults {
                image_size: None,
                augment: true,
                normalize: Some(transform::Normalize::CIFAR),
                resized_crop: false,
            },
            DatasetKind::Bffhq => LayoutDefaults {
                image_size: Some(BFFHQ_IMAGE_SIZE),
                augment: true,
                normalize: Some(transform::Normalize::IMAGENET),
                ..LayoutDefaults::default()
            },
            DatasetKind::Waterbirds => LayoutDefaults {
                image_size: Some(GROUP_DRO_IMAGE_SIZE),
                augment: true,
                normalize: Some(transform::Normalize::IMAGENET),
                resized_crop: true,
            },
            DatasetKind::Celeba => LayoutDefaults {
                image_size: Some(GROUP_DRO_IMAGE_SIZE),
                augment: false,
                normalize: Some(transform::Normalize::IMAGENET),
                resized_crop: false,
            },
            DatasetKind::Auto
            | DatasetKind::Cmnist
            | DatasetKind::Dfa
            | DatasetKind::Subpop
            | DatasetKind::Table => LayoutDefaults::default(),
        }
    }

    /// True for the layouts described by a table (`data::table`).
    pub fn is_table(self) -> bool {
        matches!(
            self,
            DatasetKind::Subpop
                | DatasetKind::Waterbirds
                | DatasetKind::Celeba
                | DatasetKind::Table
        )
    }

    /// How images are cropped and resized on load for a final size `size` (group_DRO's
    /// pipelines: Waterbirds resized to size * 256/224 and centre-cropped to size; CelebA
    /// centre-cropped to 178 and resized to size; other layouts only resized).
    pub fn geometry(self, size: Option<usize>) -> dfa::LoadGeometry {
        match (self, size) {
            (DatasetKind::Waterbirds, Some(s)) => dfa::LoadGeometry {
                crop_before: None,
                resize: Some((s * 256).div_ceil(224)),
                crop_after: Some(s),
            },
            (DatasetKind::Celeba, s) => dfa::LoadGeometry {
                crop_before: Some(CELEBA_CROP),
                resize: s,
                crop_after: None,
            },
            (_, s) => dfa::LoadGeometry::resize(s),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DatasetKind::Auto => "auto",
            DatasetKind::Cmnist => "cmnist",
            DatasetKind::Cifar10c => "cifar10c",
            DatasetKind::Bffhq => "bffhq",
            DatasetKind::Dfa => "dfa",
            DatasetKind::Subpop => "subpop",
            DatasetKind::Waterbirds => "waterbirds",
            DatasetKind::Celeba => "celeba",
            DatasetKind::Table => "table",
        }
    }
}

/// One split (train, validation or test) of a group-annotated image dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// `len() * height * width * channels` bytes, NHWC: in RAM, memory-mapped or decoded on
    /// the fly ([`Images`]).
    pub images: Images,
    /// Class label of each sample.
    pub labels: Vec<u32>,
    /// Bias attribute of each sample (for Colored MNIST: the index of its colour).
    pub bias: Vec<u32>,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    /// A table dataset's groups and their minority groups (shared by its splits); `None`:
    /// the DFA rule, conflicting = label differs from bias.
    pub groups: Option<Arc<groups::GroupInfo>>,
}

impl Split {
    /// Builds a split of images held in RAM, checking that every buffer has the size the
    /// shape implies.
    pub fn new(
        images: Vec<u8>,
        labels: Vec<u32>,
        bias: Vec<u32>,
        height: usize,
        width: usize,
        channels: usize,
    ) -> Result<Self> {
        Self::from_images(
            Images::in_memory(images),
            labels,
            bias,
            height,
            width,
            channels,
        )
    }

    /// [`Self::new`] over any image store (mapped, decoded on the fly).
    pub fn from_images(
        images: Images,
        labels: Vec<u32>,
        bias: Vec<u32>,
        height: usize,
        width: usize,
        channels: usize,
    ) -> Result<Self> {
        let n = labels.len();
        if bias.len() != n {
            bail!("split has {} labels but {} bias attributes", n, bias.len());
        }
        if images.byte_len() != n * height * width * channels {
            bail!(
                "split has {} image bytes, expected {} = {} x {}x{}x{}",
                images.byte_len(),
                n * height * width * channels,
                n,
                height,
                width,
                channels
            );
        }
        Ok(Self {
            images,
            labels,
            bias,
            height,
            width,
            channels,
            groups: None,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per image (`height * width * channels`).
    pub fn image_size(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// True when sample `i` is bias-conflicting: in a minority group of a table dataset, or
    /// (DFA rule) its label differs from its bias attribute.
    pub fn is_conflicting(&self, i: usize) -> bool {
        match &self.groups {
            Some(g) => g.is_minority(self.labels[i], self.bias[i]),
            None => self.labels[i] != self.bias[i],
        }
    }

    /// Number of bias-conflicting samples.
    pub fn conflicting_count(&self) -> usize {
        (0..self.len()).filter(|&i| self.is_conflicting(i)).count()
    }

    /// The bytes of image `i` (`image_size()` of them, HWC): borrowed from RAM or the map,
    /// or decoded.
    pub fn image(&self, i: usize) -> Result<Cow<'_, [u8]>> {
        if i >= self.len() {
            bail!(
                "sample index {i} is outside the split of {} images",
                self.len()
            );
        }
        self.images.record(i, self.image_size())
    }

    /// Gathers the samples `idx` into `out` as `f32` NCHW in [0, 1] (cleared first), the
    /// layout the models take.
    pub fn gather_nchw(&self, idx: &[usize], out: &mut Vec<f32>) -> Result<()> {
        let (h, w, c) = (self.height, self.width, self.channels);
        let hw = h * w;
        let sz = self.image_size();
        if let Some(&bad) = idx.iter().find(|&&i| i >= self.len()) {
            bail!(
                "sample index {bad} is outside the split of {} images",
                self.len()
            );
        }
        let batch = self.images.batch(idx, sz)?;
        out.clear();
        out.resize(idx.len() * sz, 0.0);
        for (b, &i) in batch.idx.iter().enumerate() {
            let src = &batch.bytes[i * sz..(i + 1) * sz];
            let dst = &mut out[b * sz..(b + 1) * sz];
            for p in 0..hw {
                for ch in 0..c {
                    dst[ch * hw + p] = src[p * c + ch] as f32 * (1.0 / 255.0);
                }
            }
        }
        Ok(())
    }
}

/// A dataset with train, validation and test splits.
#[derive(Debug, Clone)]
pub struct GroupDataset {
    /// Short name used in run directories and reports, e.g. `cmnist-5pct`.
    pub name: String,
    pub num_classes: usize,
    pub train: Split,
    pub valid: Split,
    pub test: Split,
}
