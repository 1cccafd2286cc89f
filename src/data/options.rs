//! The data section of a run's options (`DataOptions`: which images, how they are loaded and
//! transformed; the `--data`, `--conflict-pct`, ... flags and config keys) and what it
//! resolves to once per run (`DataPlan`: the folder's layout, the image size, the transforms).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use super::colored_mnist::ColoredMnistSpec;
use super::dfa::{resolve_kind, DfaOptions};
use super::groups::{parse_group_list, MinorityRule};
use super::table::TableOptions;
use super::transform::{Normalize, Transform};
use super::{DataSource, DatasetKind, LayoutDefaults};

/// Accepted `--image-size` range.
pub const MIN_IMAGE_SIZE: usize = 8;
pub const MAX_IMAGE_SIZE: usize = 1024;
/// Default `--minority-share`: a group with less than this share of its class's training
/// samples is a minority group.
pub const DEFAULT_MINORITY_SHARE: f64 = 0.2;
/// Default columns of `--dataset table` and attributes of CelebA (group_DRO's).
pub const DEFAULT_IMAGE_COLUMN: &str = "filename";
pub const DEFAULT_LABEL_COLUMN: &str = "y";
pub const DEFAULT_ATTRIBUTE_COLUMN: &str = "a";
pub const DEFAULT_SPLIT_COLUMN: &str = "split";
pub const DEFAULT_TARGET_ATTR: &str = "Blond_Hair";
pub const DEFAULT_CONFOUNDER_ATTR: &str = "Male";

/// Which images a run trains and evaluates on. Without `data`, Colored MNIST is generated from
/// the built-in 10,000 digits (`conflict_pct`, `color_std`, `data_seed` and the split sizes);
/// with it, the folder's images are read at `conflict_pct`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
#[command(next_help_heading = "Data")]
pub struct DataOptions {
    /// Percentage of bias-conflicting training samples, in (0, 100) (paper: 0.5, 1, 2, 5).
    #[arg(long, value_name = "PCT", default_value_t = 5.0)]
    pub conflict_pct: f64,
    /// Std of the per-image colour noise of the built-in data (LfF severities 1-5: 0.05
    /// 0.02 0.01 0.005 0.002).
    #[arg(long, value_name = "SIGMA", default_value_t = 0.005)]
    pub color_std: f64,
    /// Seed of the built-in data's generator (fixed across training seeds, like a released
    /// dataset).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub data_seed: u64,
    /// Training samples of the built-in data (drawn from the 10,000 embedded digits).
    #[arg(long, value_name = "N", default_value_t = 7000)]
    pub train_size: usize,
    /// Validation samples of the built-in data.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub valid_size: usize,
    /// Test samples of the built-in data.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    pub test_size: usize,
    /// Train on a dataset folder: in the DFA layout (PATH/<pct>pct/{align,conflict}/<class>/*,
    /// valid, test; labels from file names `..._<label>_<bias>.png`), at --conflict-pct; or
    /// described by a table (SubpopBench metadata_<name>.csv, Waterbirds metadata.csv, CelebA
    /// list_attr_celeba.csv, or --dataset table --table-file FILE).
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Layout of --data: auto (a known table in it, else from the folder name), cmnist,
    /// cifar10c, bffhq, dfa (any DFA layout), subpop, waterbirds, celeba or table.
    #[arg(long, value_enum, default_value_t = DatasetKind::Auto)]
    pub dataset: DatasetKind,
    /// Skip unreadable or misnamed files in --data (and report how many) instead of failing.
    #[arg(long)]
    pub skip_bad: bool,
    /// Folder for the decoded-image cache of --data (default: inside the --data folder).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Resize every image of --data to SxS pixels (bilinear) when loading; default: 128 for
    /// bffhq (224 is DFA's choice), the images' own size otherwise.
    #[arg(long, value_name = "S")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_size: Option<usize>,
    /// Training augmentation (random crop with padding 4, horizontal flip); `None`: the
    /// layout's default. Flags: `--augment` / `--no-augment`.
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub augment: Option<bool>,
    /// Per-channel mean/std normalisation; `None`: the layout's default. Flags:
    /// `--normalize` / `--no-normalize`.
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalize: Option<bool>,
    /// Prepare the next batch on a worker thread (`None`: yes; results are identical either
    /// way). Flag: `--no-prefetch`.
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<bool>,
    /// The CSV of a table dataset, relative to --data (needed by --dataset table; for subpop,
    /// which metadata_<name>.csv when the folder holds several).
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_file: Option<PathBuf>,
    /// --dataset table: the column of image paths, relative to --data [default: filename].
    #[arg(long, value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_column: Option<String>,
    /// --dataset table: the column of class labels (integers, or names numbered in sorted
    /// order) [default: y].
    #[arg(long, value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_column: Option<String>,
    /// --dataset table: the column of the (bias) attribute (integers or names) [default: a].
    #[arg(long, value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribute_column: Option<String>,
    /// --dataset table: the column of splits (0/1/2 or train/valid/test) [default: split].
    #[arg(long, value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split_column: Option<String>,
    /// CelebA: the attribute to predict [default: Blond_Hair].
    #[arg(long, value_name = "ATTR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_attr: Option<String>,
    /// CelebA: the confounding attribute, whose values with the target's make the groups
    /// [default: Male].
    #[arg(long, value_name = "ATTR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confounder_attr: Option<String>,
    /// Table datasets: a (label, attribute) group holding less than this share of its
    /// class's training samples is a minority (bias-conflicting) group [default: 0.2].
    #[arg(long, value_name = "F")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minority_share: Option<f64>,
    /// Table datasets: the minority groups, listed as LABEL:ATTRIBUTE pairs (e.g. 0:1,1:0),
    /// instead of --minority-share.
    #[arg(long, value_name = "L:A,...")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minority_groups: Option<String>,
}

impl Default for DataOptions {
    fn default() -> Self {
        crate::util::args_defaults()
    }
}

/// What a run's data options resolve to, decided once (`DataOptions::plan`): where the images
/// come from, the folder's layout (`auto` resolved), the size images are resized to, the
/// training and evaluation transforms (the layout's defaults where the run does not say) and
/// whether batches are prepared on a worker thread.
#[derive(Debug, Clone)]
pub struct DataPlan {
    pub source: DataSource,
    /// The layout of the `--data` folder; `None` for the built-in data.
    pub kind: Option<DatasetKind>,
    pub image_size: Option<usize>,
    pub augment: bool,
    pub normalize: Option<Normalize>,
    pub train_transform: Transform,
    pub eval_transform: Transform,
    pub prefetch: bool,
}

impl DataOptions {
    /// The layout of the `--data` folder (`auto` resolved by the folder's name), or `None` for
    /// the built-in Colored MNIST.
    pub fn kind(&self) -> Option<DatasetKind> {
        self.data.as_deref().map(|d| resolve_kind(d, self.dataset))
    }

    /// These options with `dataset = auto` resolved to the folder's layout, as a run records
    /// them in its `config.toml` (so that eval, predict and resume do not depend on the
    /// folder's name).
    pub fn with_resolved_kind(&self) -> DataOptions {
        DataOptions {
            dataset: self.kind().unwrap_or(self.dataset),
            ..self.clone()
        }
    }

    /// The table dataset's options, when `data` is a table layout (`kind` resolved).
    pub fn table_options(&self) -> Option<TableOptions> {
        let kind = self.kind().filter(|k| k.is_table())?;
        let or = |v: &Option<String>, d: &str| v.clone().unwrap_or_else(|| d.to_string());
        Some(TableOptions {
            root: self.data.clone()?,
            kind,
            file: self.table_file.clone(),
            image_column: or(&self.image_column, DEFAULT_IMAGE_COLUMN),
            label_column: or(&self.label_column, DEFAULT_LABEL_COLUMN),
            attribute_column: or(&self.attribute_column, DEFAULT_ATTRIBUTE_COLUMN),
            split_column: or(&self.split_column, DEFAULT_SPLIT_COLUMN),
            target_attr: or(&self.target_attr, DEFAULT_TARGET_ATTR),
            confounder_attr: or(&self.confounder_attr, DEFAULT_CONFOUNDER_ATTR),
            skip_bad: self.skip_bad,
            cache_dir: self.cache_dir.clone(),
        })
    }

    /// How a table dataset's minority groups are chosen (`--minority-groups`, else
    /// `--minority-share`).
    pub fn minority_rule(&self) -> Result<MinorityRule> {
        Ok(match &self.minority_groups {
            Some(list) => MinorityRule::Listed(parse_group_list(list)?),
            None => MinorityRule::ShareBelow(self.minority_share.unwrap_or(DEFAULT_MINORITY_SHARE)),
        })
    }

    /// The folder dataset's loading options, when `data` is set.
    pub fn dfa_options(&self) -> Option<DfaOptions> {
        self.data.as_ref().map(|root| DfaOptions {
            root: root.clone(),
            kind: self.dataset,
            conflict_pct: self.conflict_pct,
            skip_bad: self.skip_bad,
            cache_dir: self.cache_dir.clone(),
        })
    }

    /// Resolves every choice these options leave to the data layout (see [`DataPlan`]).
    pub fn plan(&self) -> DataPlan {
        let kind = self.kind();
        let layout: LayoutDefaults = kind.map(DatasetKind::defaults).unwrap_or_default();
        let image_size = self.image_size.or(layout.image_size);
        let augment = self.augment.unwrap_or(layout.augment);
        let normalize = match self.normalize {
            Some(false) => None,
            // The layout's statistics; ImageNet's for a layout without its own.
            Some(true) => layout.normalize.or(Some(Normalize::IMAGENET)),
            None => layout.normalize,
        };
        let mut train_transform = Transform::for_run(augment, normalize);
        if augment && layout.resized_crop {
            train_transform = Transform::resized_crop(normalize);
        }
        let table = self.table_options();
        let source = match (table, self.dfa_options()) {
            (Some(opts), _) => DataSource::Table {
                geometry: opts.kind.geometry(image_size),
                opts: Box::new(opts),
                // Checked by `validate`; an unparsable list falls back to the share rule.
                rule: self
                    .minority_rule()
                    .unwrap_or(MinorityRule::ShareBelow(DEFAULT_MINORITY_SHARE)),
            },
            (None, Some(opts)) => DataSource::Folder { opts, image_size },
            (None, None) => DataSource::Builtin(ColoredMnistSpec {
                conflict_pct: self.conflict_pct,
                sigma: self.color_std,
                seed: self.data_seed,
                n_train: self.train_size,
                n_valid: self.valid_size,
                n_test: self.test_size,
            }),
        };
        DataPlan {
            source,
            kind,
            image_size,
            augment,
            normalize,
            eval_transform: train_transform.eval(),
            train_transform,
            prefetch: self.prefetch.unwrap_or(true),
        }
    }

    /// Checks every value; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        let pct = self.conflict_pct;
        if !(pct.is_finite() && pct > 0.0 && pct < 100.0) {
            bail!("--conflict-pct must be a percentage in (0, 100), got {pct}");
        }
        if !(self.color_std.is_finite() && self.color_std >= 0.0) {
            bail!("--color-std must be >= 0, got {}", self.color_std);
        }
        for (flag, n) in [
            ("--train-size", self.train_size),
            ("--valid-size", self.valid_size),
            ("--test-size", self.test_size),
        ] {
            if n < 1 {
                bail!("{flag} must be at least 1");
            }
        }
        if self.data.is_none() && self.dataset != DatasetKind::Auto {
            bail!(
                "--dataset {} needs --data DIR (a dataset folder); without --data the built-in \
                 Colored MNIST is used",
                self.dataset.as_str()
            );
        }
        if let Some(d) = &self.data {
            if !d.is_dir() {
                bail!(
                    "--data {}: no such folder; give a dataset folder in the DFA layout (e.g. \
                     one written by `rest data make colored-mnist`) or with a metadata table",
                    d.display()
                );
            }
        }
        let is_table = self.kind().is_some_and(DatasetKind::is_table);
        for (flag, given) in [
            ("--table-file", self.table_file.is_some()),
            ("--image-column", self.image_column.is_some()),
            ("--label-column", self.label_column.is_some()),
            ("--attribute-column", self.attribute_column.is_some()),
            ("--split-column", self.split_column.is_some()),
            ("--target-attr", self.target_attr.is_some()),
            ("--confounder-attr", self.confounder_attr.is_some()),
            ("--minority-share", self.minority_share.is_some()),
            ("--minority-groups", self.minority_groups.is_some()),
        ] {
            if given && !is_table {
                bail!(
                    "{flag} applies to datasets described by a table (--data DIR with \
                     --dataset subpop, waterbirds, celeba or table)"
                );
            }
        }
        if self.dataset == DatasetKind::Table && self.table_file.is_none() {
            bail!("--dataset table needs --table-file FILE (the CSV, relative to --data)");
        }
        if let Some(t) = self.minority_share {
            if !(t.is_finite() && t > 0.0 && t <= 1.0) {
                bail!("--minority-share must be a share in (0, 1], got {t}");
            }
        }
        if self.minority_share.is_some() && self.minority_groups.is_some() {
            bail!("--minority-share and --minority-groups exclude each other; give one");
        }
        self.minority_rule()?;
        if let Some(s) = self.image_size {
            if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&s) {
                bail!(
                    "--image-size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels \
                     (BFFHQ: 128 or 224), got {s}"
                );
            }
            if self.data.is_none() {
                bail!(
                    "--image-size resizes the images of a --data folder; the built-in Colored \
                     MNIST is 28x28"
                );
            }
        }
        Ok(())
    }
}
