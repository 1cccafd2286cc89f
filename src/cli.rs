//! The command-line interface: clap definitions and the merge of `--config FILE` with flags
//! into one `TrainConfig` (defaults < config file < flags). `main.rs` only dispatches.

use crate::data::{DataOptions, DatasetKind};
use crate::models::ModelKind;
use crate::train::TrainConfig;
use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "rest",
    version,
    about = "Reweighted sparse training (REST): group-robust, sparse and fast image classifiers",
    long_about = "Trains image classifiers that stay accurate on the minority groups of biased \
                  data (REST: up-weighting of bias-conflicting samples + dynamic sparse \
                  training). `rest train` with no arguments runs REST on the built-in Colored \
                  MNIST.",
    allow_negative_numbers = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the `Train` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model with REST (defaults: CNN, built-in Colored MNIST at 5 % conflicting,
    /// density 0.05, lambda 80).
    Train(TrainArgs),
    /// Dataset utilities.
    #[command(subcommand)]
    Data(DataCommand),
    /// Print per-layer densities and inference FLOPs of a model at a density, without
    /// training.
    Flops(FlopsArgs),
    /// Time training steps and inference per model and density (sparse vs dense kernels).
    Bench(crate::bench::BenchArgs),
    /// Evaluate a trained model (a run's best.safetensors or a `rest export` file) on the
    /// validation and test splits; prints group metrics and writes eval.json.
    Eval(EvalArgs),
    /// Classify PNG/JPEG images; prints one JSON line per image with the top-k classes.
    Predict(PredictArgs),
    /// Write a trained sparse model compactly (CSR weights + config in one safetensors file).
    Export(ModelExportArgs),
    /// Run a sweep file (a base config and a grid of values) locally or as a Slurm job
    /// array; resumable: finished runs are skipped.
    Sweep(crate::sweep::SweepArgs),
    /// Summarise runs: for a directory of runs, results.csv, report.md (mean ± std tables over
    /// seeds) and accuracy plots; for one run directory, its learning curves.
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A run directory (learning curves) or a directory with runs anywhere below it.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct EvalArgs {
    /// A run's best.safetensors (config.toml beside it) or a file written by `rest export`.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    /// Evaluation data: `builtin`, the run's own data (the built-in Colored MNIST generated
    /// from the run's data settings, or the run's --data folder).
    #[arg(long, default_value = "builtin")]
    pub data: crate::infer::DataSource,
    /// Override the run's percentage of bias-conflicting samples.
    #[arg(long, value_name = "PCT")]
    pub conflict_pct: Option<f64>,
    /// Override the run's colour noise std.
    #[arg(long, value_name = "SIGMA")]
    pub color_std: Option<f64>,
    /// Override the run's dataset seed.
    #[arg(long, value_name = "N")]
    pub data_seed: Option<u64>,
    /// Where to write the metrics (default: eval.json next to the checkpoint).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// A run's best.safetensors (config.toml beside it) or a file written by `rest export`.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    /// PNG or JPEG images.
    #[arg(value_name = "IMAGE", required = true)]
    pub images: Vec<PathBuf>,
    /// Number of classes to report per image.
    #[arg(long, default_value_t = 3)]
    pub top_k: usize,
}

#[derive(Debug, Args)]
pub struct ModelExportArgs {
    /// A run's best.safetensors (config.toml beside it).
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    /// The file to write.
    #[arg(long, value_name = "MODEL")]
    pub out: PathBuf,
    /// Store the weight values in half precision.
    #[arg(long)]
    pub f16: bool,
}

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct FlopsArgs {
    /// Network.
    #[arg(long, value_enum, default_value = "cnn")]
    pub model: ModelKind,
    /// Overall density in (0, 1].
    #[arg(long, default_value_t = 0.05)]
    pub density: f64,
    /// ERK power scale.
    #[arg(long, default_value_t = 1.0)]
    pub erk_power_scale: f64,
    /// Input image as CHANNELS,HEIGHT,WIDTH.
    #[arg(long, default_value = "3,28,28", value_parser = parse_input)]
    pub input: (usize, usize, usize),
    /// Number of classes.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_input(s: &str) -> Result<(usize, usize, usize), String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("expected CHANNELS,HEIGHT,WIDTH like 3,28,28, got {s:?}"))?;
    match v[..] {
        [c, h, w] if c > 0 && h > 0 && w > 0 => Ok((c, h, w)),
        _ => Err(format!(
            "expected three positive numbers CHANNELS,HEIGHT,WIDTH, got {s:?}"
        )),
    }
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write the generated Colored MNIST splits as .npy files (uint8 NHWC images, int64
    /// labels and bias attributes) so other frameworks train on exactly the same images.
    Export(Box<ExportArgs>),
    /// Generate a dataset as image files in the DFA layout (for --data).
    #[command(subcommand)]
    Make(MakeCommand),
    /// Write a contact sheet of a dataset folder: one row per class, aligned samples framed
    /// green, conflicting ones red.
    Preview(PreviewArgs),
}

#[derive(Debug, Subcommand)]
pub enum MakeCommand {
    /// Colored MNIST as PNGs for 0.5, 1, 2 and 5 % conflicting (LfF colour assignment).
    ColoredMnist(MakeColoredMnistArgs),
    /// Corrupted CIFAR-10 (LfF Type0/Type1, CIFAR-10-C severities) as PNGs for 0.5, 1, 2 and
    /// 5 % conflicting, from the CIFAR-10 binary batches.
    CorruptedCifar10(MakeCorruptedCifar10Args),
}

#[derive(Debug, Args)]
pub struct MakeCorruptedCifar10Args {
    /// Folder with the CIFAR-10 binary batches (data_batch_1.bin .. data_batch_5.bin,
    /// test_batch.bin), or the folder holding cifar-10-batches-bin/.
    #[arg(long, value_name = "DIR")]
    pub source: PathBuf,
    /// Output folder (new or empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// 0: snow, frost, fog, brightness, contrast, spatter, elastic, JPEG, pixelate, saturate;
    /// 1: Gaussian/shot/impulse/speckle noise, Gaussian/defocus/glass/motion/zoom blur,
    /// original. Class i takes corruption i.
    #[arg(long = "type", value_name = "0|1", default_value_t = 0)]
    pub kind: u8,
    /// CIFAR-10-C severity 1-5 (4 = LfF's and DFA's released data).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub severity: u8,
    /// Seed of the corruptions and of the validation/test split of the test batch.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
}

impl MakeCorruptedCifar10Args {
    pub fn spec(&self) -> crate::data::make_cifar::CifarSpec {
        crate::data::make_cifar::CifarSpec {
            source: self.source.clone(),
            out: self.out.clone(),
            kind: self.kind,
            severity: self.severity,
            seed: self.seed,
        }
    }
}

#[derive(Debug, Args)]
pub struct MakeColoredMnistArgs {
    /// Folder with the MNIST IDX files (train-images-idx3-ubyte[.gz], ...), or `builtin`
    /// for the embedded 10,000 digits.
    #[arg(long, value_name = "DIR|builtin")]
    pub source: PathBuf,
    /// Output folder (new or empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Colours: dfa (DFA's release) or lff (LfF's, as the built-in data).
    #[arg(long, value_enum, default_value = "dfa")]
    pub palette: crate::data::make::Palette,
    /// Colour-noise severity 1-5 (LfF levels; 4 = std 0.005).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub severity: u8,
    /// Seed of the colour noise and of the split of the held-out digits.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// Layout: dfa (folders, every ratio), subpopbench (metadata_cmnist.csv) or waterbirds
    /// (metadata.csv), the tables with images/ and one ratio, --conflict-pct.
    #[arg(long, value_enum, default_value = "dfa")]
    pub format: crate::data::make::MakeFormat,
    /// Table formats: percentage of bias-conflicting training and validation samples.
    #[arg(long, value_name = "PCT", default_value_t = 5.0)]
    pub conflict_pct: f64,
}

impl MakeColoredMnistArgs {
    pub fn spec(&self) -> crate::data::make::MakeSpec {
        use crate::data::make::{MakeSpec, MnistSource};
        MakeSpec {
            source: if self.source.as_os_str() == "builtin" {
                MnistSource::Builtin
            } else {
                MnistSource::Dir(self.source.clone())
            },
            out: self.out.clone(),
            palette: self.palette,
            severity: self.severity,
            seed: self.seed,
        }
    }
}

#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// Dataset folder in the DFA layout.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// PNG file to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Which <pct>pct folder to show.
    #[arg(long, value_name = "PCT", default_value_t = 5.0)]
    pub conflict_pct: f64,
    /// Split to show: train, valid or test.
    #[arg(long, default_value = "train", value_parser = ["train", "valid", "test"])]
    pub split: String,
    /// Samples per class and group (aligned, conflicting).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub per_class: usize,
    /// Layout of PATH.
    #[arg(long, value_enum, default_value = "auto")]
    pub dataset: DatasetKind,
    /// Skip unreadable or misnamed files.
    #[arg(long)]
    pub skip_bad: bool,
    /// Folder for the decoded-image cache (default: inside PATH).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// Which flags were on the command line (clap ids), whatever struct holds them: flattened
/// into an argument struct, it records the flags of that struct's (sub)command. The layers of
/// options merge by it: defaults < `--config FILE` < the flags given.
#[derive(Debug, Clone, Default)]
pub struct GivenFlags(std::collections::BTreeSet<String>);

impl GivenFlags {
    pub fn contains(&self, id: &str) -> bool {
        self.0.contains(id)
    }
}

impl clap::FromArgMatches for GivenFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let given = m
            .ids()
            .filter(|id| {
                matches!(
                    m.value_source(id.as_str()),
                    Some(clap::parser::ValueSource::CommandLine)
                )
            })
            .map(|id| id.to_string())
            .collect();
        Ok(GivenFlags(given))
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for GivenFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        cmd
    }
}

/// `--config FILE`: the middle layer of a run's options.
#[derive(Debug, Args, Default, Clone)]
pub struct ConfigFileArg {
    /// Read defaults from this TOML file (keys as in a run's config.toml, i.e. the long flags
    /// with `_` for `-`); flags override.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConfigFileArg {
    /// The file's config, or the defaults.
    pub fn load(&self) -> Result<TrainConfig> {
        match &self.config {
            Some(p) => TrainConfig::from_toml_file(p),
            None => Ok(TrainConfig::default()),
        }
    }
}

#[derive(Debug, Args, Clone)]
#[command(allow_negative_numbers = true)]
pub struct ExportArgs {
    /// Which flags were given; first, because clap's derived parsers take each value out of
    /// the matches as they read it.
    #[command(flatten)]
    pub given: GivenFlags,
    /// Directory to write the .npy files to.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub config: ConfigFileArg,
    #[command(flatten)]
    pub data: DataOptions,
}

impl ExportArgs {
    /// The config file (or defaults) with the data flags given applied.
    pub fn resolve(&self) -> Result<TrainConfig> {
        let cfg = self
            .config
            .load()?
            .with_overrides(&self.data, |k| self.given.contains(k))?;
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Debug, Args, Clone)]
#[command(allow_negative_numbers = true)]
pub struct TrainArgs {
    /// Which flags were given; first, because clap's derived parsers take each value out of
    /// the matches as they read it.
    #[command(flatten)]
    pub given: GivenFlags,
    #[command(flatten)]
    pub config: ConfigFileArg,
    /// Every option of a run, by section (`TrainConfig`).
    #[command(flatten)]
    pub cfg: TrainConfig,
    /// Augment training images: random crop with padding 4 and horizontal flip (waterbirds:
    /// random resized crop and flip) (default: on for cifar10c, bffhq and waterbirds, off for
    /// Colored MNIST and the other tables).
    #[arg(long, conflicts_with = "no_augment", help_heading = "Data")]
    pub augment: bool,
    /// Do not augment training images.
    #[arg(long, help_heading = "Data")]
    pub no_augment: bool,
    /// Normalise images by channel mean/std (default: CIFAR statistics for cifar10c,
    /// ImageNet's for bffhq, none for Colored MNIST).
    #[arg(long, conflicts_with = "no_normalize", help_heading = "Data")]
    pub normalize: bool,
    /// Do not normalise images (values stay in [0, 1]).
    #[arg(long, help_heading = "Data")]
    pub no_normalize: bool,
    /// Prepare batches on the training thread instead of a worker thread (for timing; the
    /// results are identical).
    #[arg(long, hide = true)]
    pub no_prefetch: bool,
    /// Continue the run in this directory from its last checkpoint (written every epoch and
    /// on Ctrl-C); the run's own config.toml is used, other flags except --threads are
    /// ignored.
    #[arg(long, value_name = "RUN_DIR", help_heading = "Run")]
    pub resume: Option<PathBuf>,
    /// Replace the run that --out already holds (its config, metrics, summary, checkpoints,
    /// weights and JTT stage 1 are deleted first; other files stay).
    #[arg(long, conflicts_with = "resume", help_heading = "Run")]
    pub overwrite: bool,
    /// Train one run of a sweep (its directory, prepared by `rest sweep`): claims it, skips it
    /// if done, resumes it if it has a checkpoint; exit code 75 if another process holds it.
    #[arg(long, value_name = "RUN_DIR", hide = true, conflicts_with_all = ["resume", "overwrite"])]
    pub sweep_task: Option<PathBuf>,
}

impl TrainArgs {
    /// The complete, validated configuration: defaults < `--config FILE` < the flags given.
    pub fn resolve(&self) -> Result<TrainConfig> {
        let mut cfg = self
            .config
            .load()?
            .with_overrides(&self.cfg, |k| self.given.contains(k))?;
        // The tri-state switches: a flag pair each, absent = the data layout's default.
        if self.augment || self.no_augment {
            cfg.data.augment = Some(self.augment);
        }
        if self.normalize || self.no_normalize {
            cfg.data.normalize = Some(self.normalize);
        }
        if self.no_prefetch {
            cfg.data.prefetch = Some(false);
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Stem;
    use crate::train::{GroupScheme, Method, SelectRule};

    fn parse(args: &[&str]) -> Result<TrainConfig> {
        let cli = Cli::try_parse_from(args)?;
        match cli.command {
            Command::Train(t) => t.resolve(),
            _ => anyhow::bail!("not train"),
        }
    }

    #[test]
    fn flags_override_config_file_which_overrides_defaults() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("run.toml");
        std::fs::write(&f, "density = 0.2\nepochs = 3\nseed = 7\n")?;
        let cfg = parse(&[
            "rest",
            "train",
            "--config",
            f.to_str().unwrap_or(""),
            "--seed",
            "9",
        ])?;
        assert_eq!(cfg.sparse.density, 0.2);
        assert_eq!(cfg.optim.epochs, 3);
        assert_eq!(cfg.optim.seed, 9);
        assert_eq!(cfg.optim.lr, TrainConfig::default().optim.lr);
        Ok(())
    }

    #[test]
    fn resnet_flags() -> Result<()> {
        let cfg = parse(&["rest", "train", "--model", "resnet18"])?;
        assert_eq!(cfg.model.kind, ModelKind::Resnet18);
        assert_eq!((cfg.model.width, cfg.model.stem), (64, Stem::Imagenet));
        let cfg = parse(&[
            "rest", "train", "--model", "resnet50", "--width", "16", "--stem", "cifar",
        ])?;
        assert_eq!(cfg.model.kind, ModelKind::Resnet50);
        assert_eq!((cfg.model.width, cfg.model.stem), (16, Stem::Cifar));
        assert!(parse(&["rest", "train", "--stem", "tiny"]).is_err());
        Ok(())
    }

    #[test]
    fn method_flags() -> Result<()> {
        let cfg = parse(&[
            "rest",
            "train",
            "--method",
            "group-dro",
            "--dro-step-size",
            "0.1",
            "--dro-adjustment",
            "2",
            "--groups",
            "aligned-conflict",
            "--select",
            "val-unbiased",
        ])?;
        assert_eq!(cfg.method.kind, Method::GroupDro);
        assert_eq!(
            (cfg.method.dro_step_size, cfg.method.dro_adjustment),
            (0.1, 2.0)
        );
        assert_eq!(cfg.method.groups, GroupScheme::AlignedConflict);
        assert_eq!(cfg.method.select, Some(SelectRule::ValUnbiased));
        let cfg = parse(&["rest", "train", "--method", "jtt", "--jtt-epochs", "3"])?;
        assert_eq!((cfg.method.kind, cfg.method.jtt_epochs), (Method::Jtt, 3));
        assert!(parse(&["rest", "train", "--error-set", "e.json"])
            .expect_err("error set without jtt")
            .to_string()
            .contains("--error-set"));
        assert!(parse(&["rest", "train", "--method", "dro"]).is_err());
        Ok(())
    }

    #[test]
    fn data_folder_flags() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let d = dir.path().to_str().unwrap_or("");
        let cfg = parse(&[
            "rest",
            "train",
            "--data",
            d,
            "--dataset",
            "cifar10c",
            "--skip-bad",
            "--cache-dir",
            "/tmp/c",
        ])?;
        assert_eq!(cfg.data.data.as_deref(), Some(dir.path()));
        assert_eq!(cfg.data.dataset, DatasetKind::Cifar10c);
        assert!(cfg.data.skip_bad);
        assert_eq!(cfg.data.cache_dir, Some(PathBuf::from("/tmp/c")));
        let back: TrainConfig = toml::from_str(&cfg.to_toml()?)?;
        assert_eq!(back, cfg);
        let err = parse(&["rest", "train", "--dataset", "bffhq"]).expect_err("no --data");
        assert!(err.to_string().contains("--data"), "{err}");
        Ok(())
    }

    #[test]
    fn pipeline_flags() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let d = dir.path().to_str().unwrap_or("");
        let cfg = parse(&["rest", "train", "--data", d])?;
        assert_eq!(
            (cfg.data.image_size, cfg.data.augment, cfg.data.normalize),
            (None, None, None)
        );
        assert_eq!(cfg.data.prefetch, None);
        let cfg = parse(&[
            "rest",
            "train",
            "--data",
            d,
            "--image-size",
            "224",
            "--no-augment",
            "--normalize",
            "--no-prefetch",
        ])?;
        assert_eq!(cfg.data.image_size, Some(224));
        assert_eq!(
            (cfg.data.augment, cfg.data.normalize),
            (Some(false), Some(true))
        );
        assert_eq!(cfg.data.prefetch, Some(false));
        let cfg = parse(&["rest", "train", "--augment", "--no-normalize"])?;
        assert_eq!(
            (cfg.data.augment, cfg.data.normalize),
            (Some(true), Some(false))
        );
        assert!(parse(&["rest", "train", "--augment", "--no-augment"]).is_err());
        let err = parse(&["rest", "train", "--image-size", "64"]).expect_err("no --data");
        assert!(err.to_string().contains("--image-size"), "{err}");
        let err = parse(&["rest", "train", "--data", d, "--image-size", "2"]).expect_err("tiny");
        assert!(err.to_string().contains("--image-size"), "{err}");
        Ok(())
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag) in [
            (vec!["rest", "train", "--density", "0"], "--density"),
            (vec!["rest", "train", "--density", "1.5"], "--density"),
            (vec!["rest", "train", "--upweight", "-1"], "--upweight"),
            (vec!["rest", "train", "--width", "0"], "--width"),
            (vec!["rest", "train", "--jtt-epochs", "0"], "--jtt-epochs"),
            (
                vec!["rest", "train", "--dro-step-size", "-1"],
                "--dro-step-size",
            ),
            (
                vec!["rest", "train", "--conflict-pct", "120"],
                "--conflict-pct",
            ),
        ] {
            let err = parse(&args).expect_err("must fail").to_string();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
    }
}
