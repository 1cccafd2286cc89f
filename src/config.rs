//! The run configuration shared by every command: one serde type with defaults, loadable
//! from TOML (`--config run.toml`), overridable by command-line flags, validated in one place,
//! and written back to the run directory as the resolved `config.toml`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::sparse::{DeathMode, DecaySchedule, DstOptions, GrowthMode, Redistribution, SparseInit};

/// Network architecture: declared with the model registry (`crate::models`), re-exported
/// here for `crate::config::ModelKind` paths.
pub use crate::data::DatasetKind;
pub use crate::models::{ModelKind, Stem};

/// The training method (`--method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// REST's re-weighting with oracle bias labels: conflicting samples x LAMBDA.
    #[default]
    Upweight,
    /// Plain empirical risk minimisation (LAMBDA = 1 whatever --upweight says).
    Erm,
    /// Just Train Twice: an ERM model's misclassified training samples x LAMBDA.
    Jtt,
    /// GroupDRO: minimise the q-weighted sum of group losses, q updated online.
    GroupDro,
    /// Group-balanced sampling: every group equally likely.
    Balanced,
    /// Class-balanced sampling: every class equally likely.
    ClassBalanced,
}

/// What a group is for GroupDRO and balanced sampling (`--groups`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum GroupScheme {
    /// One group per (label, bias) cell present in the training split.
    #[default]
    Cells,
    /// Two groups: bias-aligned and bias-conflicting samples.
    AlignedConflict,
}

/// The model-selection rule (`--select`); `train::select` scores epochs by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SelectRule {
    /// Best validation worst-group accuracy (needs validation bias labels).
    ValWorstGroup,
    /// Best validation unbiased accuracy: mean over (label, bias) cells (needs bias labels).
    ValUnbiased,
    /// Best validation accuracy (no bias labels needed).
    ValAccuracy,
    /// The last epoch.
    Last,
}

/// How bias-conflicting samples are up-weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ReweightMode {
    /// Weighted sampling with replacement: a conflicting sample is LAMBDA times as likely to be
    /// drawn; an epoch is N draws.
    Sample,
    /// Uniform shuffling; each sample's loss is weighted (LAMBDA for conflicting samples) and
    /// the batch loss is normalised by the sum of weights.
    Loss,
}

/// Which kernel a sparse layer runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum KernelMode {
    /// Sparse kernels for convolutions at or below `AUTO_SPARSE_MAX_DENSITY` and for linear
    /// layers at or below `AUTO_SPARSE_LINEAR_MAX_DENSITY`, dense kernels above (the measured
    /// crossovers; see `rest bench`).
    Auto,
    /// Dense kernels with the mask multiplied in (what public DST code does).
    Dense,
    /// Sparse kernels for every layer that is not fully dense.
    Sparse,
}

/// Layer density at or below which `--kernels auto` runs a convolution on the sparse
/// kernels: the crossover of the sparse and dense training step, measured with
/// `rest bench --kernels sparse|dense` at several densities (README, Speed).
pub const AUTO_SPARSE_MAX_DENSITY: f64 = 0.3;

/// Layer density at or below which `--kernels auto` runs a linear layer on the sparse
/// (feature-major) kernels, measured the same way with LfF's MLP.
pub const AUTO_SPARSE_LINEAR_MAX_DENSITY: f64 = 0.3;

impl KernelMode {
    /// Whether a layer of `density` runs on the sparse kernels (`conv`: a convolution, else
    /// a linear layer).
    pub fn sparse_for(self, density: f64, conv: bool) -> bool {
        match self {
            KernelMode::Dense => false,
            KernelMode::Sparse => density < 1.0,
            KernelMode::Auto if conv => density <= AUTO_SPARSE_MAX_DENSITY,
            KernelMode::Auto => density <= AUTO_SPARSE_LINEAR_MAX_DENSITY,
        }
    }
}

/// The complete configuration of a training run. Every field has a default; see
/// `TrainConfig::default()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // --- data ---
    /// Percentage of bias-conflicting training (and validation) samples, in (0, 100).
    pub conflict_pct: f64,
    /// Standard deviation of the per-image colour noise (LfF severities 1-5: 0.05, 0.02,
    /// 0.01, 0.005, 0.002).
    pub color_std: f64,
    /// Seed of the dataset generator (kept fixed across training seeds, like a released
    /// dataset).
    pub data_seed: u64,
    /// Samples per split drawn from the built-in 10,000 digits.
    pub train_size: usize,
    pub valid_size: usize,
    pub test_size: usize,
    /// Dataset folder in the DFA layout (`<pct>pct/align|conflict/<class>/*`, ...); `None`
    /// generates Colored MNIST from the built-in digits (then the sizes above apply).
    pub data: Option<PathBuf>,
    /// Layout of `data`.
    pub dataset: DatasetKind,
    /// Skip (and count) unreadable or misnamed files in `data` instead of failing.
    pub skip_bad: bool,
    /// Where the decoded-image cache of `data` is kept (default: inside `data`).
    pub cache_dir: Option<PathBuf>,
    /// Resize every image of `data` to `S x S` (bilinear) when it is loaded; `None`: the
    /// dataset's default (bffhq 128, others keep their size, which must then be one size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_size: Option<usize>,
    /// Training augmentation (random crop with padding 4, horizontal flip); `None`: the
    /// dataset's default (on for cifar10c and bffhq, off otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub augment: Option<bool>,
    /// Per-channel mean/std normalisation (training and evaluation); `None`: the dataset's
    /// default (CIFAR statistics for cifar10c, ImageNet's for bffhq, none otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalize: Option<bool>,
    /// Prepare the next batch on a worker thread while the current step runs (`None`: on).
    /// Results are identical either way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<bool>,

    // --- model and optimisation ---
    pub model: ModelKind,
    /// ResNet width: channels of the first stage (stages have w, 2w, 4w, 8w); 64 is
    /// torchvision's ResNet.
    pub width: usize,
    /// ResNet input stem.
    pub stem: Stem,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// ReduceLROnPlateau on validation loss: factor and patience (epochs).
    pub lr_factor: f64,
    pub lr_patience: usize,
    pub seed: u64,

    // --- re-weighting ---
    /// LAMBDA: weight of bias-conflicting samples. `None` pairs it with the conflicting
    /// ratio as the paper does (0.5 % -> 10, 1 % -> 30, 2 % -> 50, 5 % -> 80).
    pub upweight: Option<f64>,
    pub reweight_mode: ReweightMode,

    // --- group-robustness method and model selection (see `crate::train::methods`) ---
    pub method: Method,
    /// Model selection rule; `None`: val-worst-group when re-weighting, else val-accuracy.
    pub select: Option<SelectRule>,
    /// JTT: epochs of the ERM identification model (stage 1).
    pub jtt_epochs: usize,
    /// JTT: reuse this error set (`error_set.json`) instead of running stage 1.
    pub error_set: Option<PathBuf>,
    /// GroupDRO step size eta of the group weights.
    pub dro_step_size: f64,
    /// GroupDRO generalisation adjustment C (loss_g + C / sqrt(n_g)).
    pub dro_adjustment: f64,
    /// Groups of GroupDRO and balanced sampling.
    pub groups: GroupScheme,

    // --- dynamic sparse training ---
    /// Overall weight density of the conv/linear layers, in (0, 1]; 1 is dense training.
    pub density: f64,
    /// Steps between mask updates (scaled down when a run has fewer than 10 updates).
    pub update_frequency: usize,
    /// Initial fraction of a layer's active weights pruned and regrown per update.
    pub prune_rate: f64,
    /// The value the cosine schedule decays the prune rate to.
    pub final_prune_rate: f64,
    /// ERK power scale (1 = ERK).
    pub erk_power_scale: f64,
    /// Dense or sparse kernels for sparse layers.
    pub kernels: KernelMode,
    /// Dynamic-sparse-training modes (see `crate::sparse::DstOptions` for each meaning).
    pub sparse_init: SparseInit,
    pub dense_first_layer: bool,
    pub death: DeathMode,
    pub death_threshold: f64,
    pub growth: GrowthMode,
    pub redistribution: Redistribution,
    pub decay_schedule: DecaySchedule,
    pub update_end: f64,
    pub fix: bool,

    // --- run ---
    /// Run directory; default `runs/<timestamp>-<short-config>/`.
    pub out: Option<PathBuf>,
    /// Worker threads (default: all cores).
    pub threads: Option<usize>,
    /// Device of the run's tensors (`None`: the CPU); see `crate::device`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<crate::device::DeviceSpec>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            conflict_pct: 5.0,
            color_std: 0.005,
            data_seed: 0,
            train_size: 7000,
            valid_size: 1000,
            test_size: 2000,
            data: None,
            dataset: DatasetKind::Auto,
            skip_bad: false,
            cache_dir: None,
            image_size: None,
            augment: None,
            normalize: None,
            prefetch: None,
            model: ModelKind::Cnn,
            width: 64,
            stem: Stem::Imagenet,
            epochs: 20,
            batch_size: 256,
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 0.0,
            lr_factor: 0.1,
            lr_patience: 5,
            seed: 42,
            upweight: None,
            reweight_mode: ReweightMode::Sample,
            method: Method::Upweight,
            select: None,
            jtt_epochs: 2,
            error_set: None,
            dro_step_size: 0.01,
            dro_adjustment: 0.0,
            groups: GroupScheme::Cells,
            density: 0.05,
            update_frequency: 1000,
            prune_rate: 0.5,
            final_prune_rate: 0.005,
            erk_power_scale: 1.0,
            kernels: KernelMode::Auto,
            sparse_init: DstOptions::default().sparse_init,
            dense_first_layer: false,
            death: DstOptions::default().death,
            death_threshold: DstOptions::default().death_threshold,
            growth: DstOptions::default().growth,
            redistribution: DstOptions::default().redistribution,
            decay_schedule: DstOptions::default().decay_schedule,
            update_end: 1.0,
            fix: false,
            out: None,
            threads: None,
            device: None,
        }
    }
}

/// The paper's pairing of conflicting ratio and up-weight: 0.5 % -> 10, 1 % -> 30,
/// 2 % -> 50, 5 % -> 80. Other ratios take the weight of the nearest listed ratio (on a log
/// scale).
pub fn paired_upweight(conflict_pct: f64) -> f64 {
    const PAIRS: [(f64, f64); 4] = [(0.5, 10.0), (1.0, 30.0), (2.0, 50.0), (5.0, 80.0)];
    let mut best = PAIRS[0];
    for p in PAIRS {
        if (p.0.ln() - conflict_pct.ln()).abs() < (best.0.ln() - conflict_pct.ln()).abs() {
            best = p;
        }
    }
    best.1
}

impl TrainConfig {
    /// Loads a TOML config file; unknown keys are an error (they are usually typos).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {} (--config)", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("config file {} is not a valid run config", path.display()))
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// The effective LAMBDA (of conflicting samples, or of JTT's error set); 1 for methods
    /// that do not up-weight by LAMBDA (erm, group-dro, balanced, class-balanced).
    pub fn effective_upweight(&self) -> f64 {
        match self.method {
            Method::Upweight | Method::Jtt => self
                .upweight
                .unwrap_or_else(|| paired_upweight(self.conflict_pct)),
            _ => 1.0,
        }
    }

    /// True when re-weighting of any kind is active (LAMBDA != 1, GroupDRO, balanced
    /// sampling).
    pub fn reweighting(&self) -> bool {
        match self.method {
            Method::Upweight | Method::Jtt => (self.effective_upweight() - 1.0).abs() > 1e-12,
            Method::Erm => false,
            Method::GroupDro | Method::Balanced | Method::ClassBalanced => true,
        }
    }

    /// The model-selection rule and, when defaulted, why: `--select` if given; else
    /// val-accuracy when validation bias labels are treated as unavailable (JTT) or nothing
    /// is re-weighted, and val-worst-group otherwise.
    pub fn select_rule(&self) -> (SelectRule, &'static str) {
        match self.select {
            Some(r) => (r, "--select"),
            None if self.method == Method::Jtt => (
                SelectRule::ValAccuracy,
                "default for jtt: validation bias labels are treated as unavailable",
            ),
            None if self.reweighting() => (SelectRule::ValWorstGroup, "default when re-weighting"),
            None => (SelectRule::ValAccuracy, "default without re-weighting"),
        }
    }

    /// The layout of the run's data folder (`Auto` resolved by the folder name), or `None`
    /// for the built-in Colored MNIST.
    pub fn data_kind(&self) -> Option<DatasetKind> {
        self.data
            .as_deref()
            .map(|d| crate::data::dfa::resolve_kind(d, self.dataset))
    }

    /// The config with `dataset = auto` resolved to the layout of its `data` folder, as a run
    /// records it in its `config.toml` (so that eval, predict and resume do not depend on the
    /// folder's name).
    pub fn with_resolved_dataset(&self) -> TrainConfig {
        match self.data_kind() {
            Some(kind) if kind != self.dataset => TrainConfig {
                dataset: kind,
                ..self.clone()
            },
            _ => self.clone(),
        }
    }

    /// What the run's data layout implies where the run does not say (`DatasetKind::defaults`;
    /// the built-in data: nothing).
    fn layout_defaults(&self) -> crate::data::LayoutDefaults {
        self.data_kind()
            .map(DatasetKind::defaults)
            .unwrap_or_default()
    }

    /// The size images are resized to on load: `image_size`, else the layout's default.
    pub fn image_size_resolved(&self) -> Option<usize> {
        self.image_size.or(self.layout_defaults().image_size)
    }

    /// Whether training batches are augmented: `augment`, else the layout's default.
    pub fn augment_resolved(&self) -> bool {
        self.augment.unwrap_or(self.layout_defaults().augment)
    }

    /// The normalisation of training and evaluation batches: `normalize` (with the layout's
    /// statistics; ImageNet's for a layout without its own), else the layout's default.
    pub fn normalize_resolved(&self) -> Option<crate::data::transform::Normalize> {
        let layout = self.layout_defaults().normalize;
        match self.normalize {
            Some(false) => None,
            Some(true) => layout.or(Some(crate::data::transform::Normalize::IMAGENET)),
            None => layout,
        }
    }

    /// The folder dataset's loading options, when `data` is set.
    pub fn dfa_options(&self) -> Option<crate::data::dfa::DfaOptions> {
        self.data.as_ref().map(|root| crate::data::dfa::DfaOptions {
            root: root.clone(),
            kind: self.dataset,
            conflict_pct: self.conflict_pct,
            skip_bad: self.skip_bad,
            cache_dir: self.cache_dir.clone(),
        })
    }

    /// Where the run's images come from: its `--data` folder (resized to the run's image
    /// size), or Colored MNIST generated from the built-in digits.
    pub fn data_source(&self) -> crate::data::DataSource {
        match self.dfa_options() {
            Some(opts) => crate::data::DataSource::Folder {
                opts,
                image_size: self.image_size_resolved(),
            },
            None => {
                crate::data::DataSource::Builtin(crate::data::colored_mnist::ColoredMnistSpec {
                    conflict_pct: self.conflict_pct,
                    sigma: self.color_std,
                    seed: self.data_seed,
                    n_train: self.train_size,
                    n_valid: self.valid_size,
                    n_test: self.test_size,
                })
            }
        }
    }

    /// The training transform of the run (`augment` and `normalize` resolved per dataset).
    pub fn train_transform(&self) -> crate::data::transform::Transform {
        crate::data::transform::Transform::for_run(
            self.augment_resolved(),
            self.normalize_resolved(),
        )
    }

    /// The evaluation transform of the run: its normalisation, no augmentation.
    pub fn eval_transform(&self) -> crate::data::transform::Transform {
        self.train_transform().eval()
    }

    /// Whether batches are prepared on a worker thread.
    pub fn prefetch_resolved(&self) -> bool {
        self.prefetch.unwrap_or(true)
    }

    /// True when dynamic sparse training is on.
    pub fn sparse(&self) -> bool {
        self.density < 1.0
    }

    /// The sparse engine's mode choices.
    pub fn dst_options(&self) -> DstOptions {
        DstOptions {
            sparse_init: self.sparse_init,
            dense_first_layer: self.dense_first_layer,
            death: self.death,
            death_threshold: self.death_threshold,
            growth: self.growth,
            redistribution: self.redistribution,
            decay_schedule: self.decay_schedule,
            update_end: self.update_end,
            fix: self.fix,
        }
    }

    /// Checks every value; the error names the flag and the accepted range.
    pub fn validate(&self) -> Result<()> {
        fn check(ok: bool, msg: String) -> Result<()> {
            if ok {
                Ok(())
            } else {
                bail!(msg)
            }
        }
        check(
            self.conflict_pct.is_finite() && self.conflict_pct > 0.0 && self.conflict_pct < 100.0,
            format!(
                "--conflict-pct must be a percentage in (0, 100), got {}",
                self.conflict_pct
            ),
        )?;
        check(
            self.color_std.is_finite() && self.color_std >= 0.0,
            format!("--color-std must be >= 0, got {}", self.color_std),
        )?;
        check(
            self.density.is_finite() && self.density > 0.0 && self.density <= 1.0,
            format!(
                "--density must be in (0, 1] (1 = dense, 0.05 = 5 % of weights), got {}",
                self.density
            ),
        )?;
        if let Some(u) = self.upweight {
            check(
                u.is_finite() && u > 0.0,
                format!("--upweight must be a positive number (1 = no re-weighting), got {u}"),
            )?;
        }
        check(
            self.width >= 1,
            "--width must be at least 1 (64 = torchvision's ResNet)".into(),
        )?;
        check(self.epochs >= 1, "--epochs must be at least 1".into())?;
        check(
            self.batch_size >= 1,
            "--batch-size must be at least 1".into(),
        )?;
        check(
            self.lr.is_finite() && self.lr > 0.0,
            format!("--lr must be a positive number, got {}", self.lr),
        )?;
        check(
            self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum),
            format!("--momentum must be in [0, 1), got {}", self.momentum),
        )?;
        check(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            format!("--weight-decay must be >= 0, got {}", self.weight_decay),
        )?;
        check(
            self.lr_factor.is_finite() && self.lr_factor > 0.0 && self.lr_factor < 1.0,
            format!("--lr-factor must be in (0, 1), got {}", self.lr_factor),
        )?;
        check(
            self.update_frequency >= 1,
            "--update-frequency must be at least 1".into(),
        )?;
        check(
            self.prune_rate.is_finite() && self.prune_rate >= 0.0 && self.prune_rate < 1.0,
            format!("--prune-rate must be in [0, 1), got {}", self.prune_rate),
        )?;
        check(
            self.final_prune_rate.is_finite()
                && self.final_prune_rate >= 0.0
                && self.final_prune_rate <= self.prune_rate.max(self.final_prune_rate)
                && self.final_prune_rate < 1.0,
            format!(
                "--final-prune-rate must be in [0, 1), got {}",
                self.final_prune_rate
            ),
        )?;
        check(
            self.erk_power_scale.is_finite() && self.erk_power_scale >= 0.0,
            format!(
                "--erk-power-scale must be >= 0, got {}",
                self.erk_power_scale
            ),
        )?;
        let dst = self.dst_options();
        dst.validate()?;
        check(
            !dst.needs_momentum() || self.momentum > 0.0,
            "--growth momentum and --redistribution momentum read the momentum buffers; set \
             --momentum > 0"
                .into(),
        )?;
        check(
            self.jtt_epochs >= 1,
            "--jtt-epochs must be at least 1".into(),
        )?;
        check(
            self.dro_step_size.is_finite() && self.dro_step_size >= 0.0,
            format!("--dro-step-size must be >= 0, got {}", self.dro_step_size),
        )?;
        check(
            self.dro_adjustment.is_finite() && self.dro_adjustment >= 0.0,
            format!("--dro-adjustment must be >= 0, got {}", self.dro_adjustment),
        )?;
        check(
            self.error_set.is_none() || self.method == Method::Jtt,
            "--error-set is only used by --method jtt".into(),
        )?;
        check(self.train_size >= 1, "train_size must be at least 1".into())?;
        check(self.valid_size >= 1, "valid_size must be at least 1".into())?;
        check(self.test_size >= 1, "test_size must be at least 1".into())?;
        check(
            self.data.is_some() || self.dataset == DatasetKind::Auto,
            format!(
                "--dataset {} needs --data DIR (a dataset folder); without --data the built-in \
                 Colored MNIST is used",
                self.dataset.as_str()
            ),
        )?;
        if let Some(d) = &self.data {
            check(
                d.is_dir(),
                format!(
                    "--data {}: no such folder; give a dataset folder in the DFA layout (e.g. \
                     one written by `rest data make colored-mnist`)",
                    d.display()
                ),
            )?;
        }
        if let Some(s) = self.image_size {
            check(
                (MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&s),
                format!(
                    "--image-size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels \
                     (BFFHQ: 128 or 224), got {s}"
                ),
            )?;
            check(
                self.data.is_some(),
                "--image-size resizes the images of a --data folder; the built-in Colored \
                 MNIST is 28x28"
                    .into(),
            )?;
        }
        if let Some(t) = self.threads {
            check(t >= 1, "--threads must be at least 1".into())?;
        }
        Ok(())
    }

    /// A short human-readable tag for run directory names, e.g. `cnn-d0.05-u80-c5`.
    pub fn short_name(&self) -> String {
        let method = match self.method {
            Method::Upweight => String::new(),
            m => format!("{}-", m.as_str()),
        };
        format!(
            "{method}{}-d{}-u{}-c{}-s{}",
            self.model.as_str(),
            fmt_num(self.density),
            fmt_num(self.effective_upweight()),
            fmt_num(self.conflict_pct),
            self.seed
        )
    }
}

pub use crate::data::BFFHQ_IMAGE_SIZE;
/// Accepted `--image-size` range.
pub const MIN_IMAGE_SIZE: usize = 8;
pub const MAX_IMAGE_SIZE: usize = 1024;

/// Formats a number without trailing zeros (`0.5`, `5`, `0.05`).
pub fn fmt_num(x: f64) -> String {
    let s = format!("{x:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

impl From<&TrainConfig> for crate::models::ModelSpec {
    fn from(cfg: &TrainConfig) -> Self {
        Self {
            kind: cfg.model,
            width: cfg.width,
            stem: cfg.stem,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairing_follows_the_paper() {
        assert_eq!(paired_upweight(0.5), 10.0);
        assert_eq!(paired_upweight(1.0), 30.0);
        assert_eq!(paired_upweight(2.0), 50.0);
        assert_eq!(paired_upweight(5.0), 80.0);
        assert_eq!(paired_upweight(10.0), 80.0);
        assert_eq!(paired_upweight(0.1), 10.0);
    }

    #[test]
    fn validation_names_the_flag() {
        let mut c = TrainConfig {
            density: 0.0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("--density"));
        c.density = 1.5;
        assert!(c.validate().unwrap_err().to_string().contains("--density"));
        c.density = 1.0;
        c.validate().unwrap();
        c.upweight = Some(-1.0);
        assert!(c.validate().unwrap_err().to_string().contains("--upweight"));
        c.upweight = None;
        c.conflict_pct = 120.0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--conflict-pct"));
    }

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let c = TrainConfig {
            density: 0.1,
            upweight: Some(3.0),
            ..Default::default()
        };
        let text = c.to_toml().unwrap();
        let back: TrainConfig = toml::from_str(&text).unwrap();
        assert_eq!(c, back);
        assert!(toml::from_str::<TrainConfig>("densty = 0.1").is_err());
        let partial: TrainConfig = toml::from_str("density = 0.2\nmodel = \"mlp\"").unwrap();
        assert_eq!(partial.density, 0.2);
        assert_eq!(partial.model, ModelKind::Mlp);
        assert_eq!(partial.epochs, TrainConfig::default().epochs);
    }

    #[test]
    fn short_names() {
        assert_eq!(fmt_num(0.05), "0.05");
        assert_eq!(fmt_num(5.0), "5");
        assert_eq!(TrainConfig::default().short_name(), "cnn-d0.05-u80-c5-s42");
    }
}
