//! A run's complete configuration, composed of the sections their modules own: data
//! (`data::DataOptions`), model (`models::ModelSpec`), optimisation (`optim::OptimOptions`),
//! method (`methods::MethodOptions`), sparse training (`sparse::SparseOptions`) and run
//! (`output::RunOptions`). Each section is one struct that is both its clap flags (with the
//! defaults, spelled once) and its config keys; here they are composed, checked together and
//! written as one flat `config.toml` (the same keys and order as before sections existed, so
//! config files and config hashes of earlier runs stay valid).
//!
//! Layers of options: defaults < `--config FILE` < flags (`with_overrides`). What the options
//! leave to the data layout is resolved once per run by `DataOptions::plan`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

use super::methods::{Method, MethodOptions};
use super::optim::OptimOptions;
use super::output::RunOptions;
use super::select::SelectRule;
use crate::data::DataOptions;
use crate::models::ModelSpec;
use crate::sparse::SparseOptions;
use crate::util::fmt_num;

/// The complete configuration of a training run. Every key has a default.
#[derive(Debug, Clone, PartialEq, Default, Serialize, clap::Args)]
pub struct TrainConfig {
    #[serde(flatten)]
    #[command(flatten)]
    pub data: DataOptions,
    #[serde(flatten)]
    #[command(flatten)]
    pub model: ModelSpec,
    #[serde(flatten)]
    #[command(flatten)]
    pub optim: OptimOptions,
    #[serde(flatten)]
    #[command(flatten)]
    pub method: MethodOptions,
    #[serde(flatten)]
    #[command(flatten)]
    pub sparse: SparseOptions,
    #[serde(flatten)]
    #[command(flatten)]
    pub run: RunOptions,
}

/// The sections' keys, in config-file order.
fn section_keys() -> [&'static [&'static str]; 6] {
    use crate::util::serde_fields;
    [
        serde_fields::<DataOptions>(),
        serde_fields::<ModelSpec>(),
        serde_fields::<OptimOptions>(),
        serde_fields::<MethodOptions>(),
        serde_fields::<SparseOptions>(),
        serde_fields::<RunOptions>(),
    ]
}

/// Every config key.
pub fn config_keys() -> Vec<&'static str> {
    section_keys().concat()
}

impl TrainConfig {
    /// A config from a flat table of keys (a config file, a sweep's run): each key goes to the
    /// section that owns it; an unknown key is an error naming it and the nearest known key.
    pub fn from_table(table: toml::Table) -> Result<Self> {
        let keys = section_keys();
        let mut parts: [toml::Table; 6] = Default::default();
        for (k, v) in table {
            match keys.iter().position(|s| s.contains(&k.as_str())) {
                Some(i) => {
                    parts[i].insert(k, v);
                }
                None => {
                    let near = keys
                        .concat()
                        .into_iter()
                        .map(|c| (strsim::jaro_winkler(c, &k), c))
                        .filter(|(score, _)| *score > 0.8)
                        .max_by(|a, b| a.0.total_cmp(&b.0));
                    match near {
                        Some((_, c)) => bail!("unknown option `{k}` (did you mean `{c}`?)"),
                        None => bail!(
                            "unknown option `{k}`; the options are the long flags of `rest \
                             train --help` with `_` for `-`"
                        ),
                    }
                }
            }
        }
        let [data, model, optim, method, sparse, run] = parts;
        fn section<T: serde::de::DeserializeOwned>(t: toml::Table) -> Result<T> {
            Ok(toml::Value::Table(t).try_into()?)
        }
        Ok(TrainConfig {
            data: section(data)?,
            model: section(model)?,
            optim: section(optim)?,
            method: section(method)?,
            sparse: section(sparse)?,
            run: section(run)?,
        })
    }

    /// Loads a TOML config file; unknown keys are an error (they are usually typos).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {} (--config)", path.display()))?;
        Self::from_toml_str(&text)
            .with_context(|| format!("config file {} is not a valid run config", path.display()))
    }

    /// Parses the text of a config file.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        Self::from_table(toml::from_str(text)?)
    }

    /// The flat TOML of a run's `config.toml`.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// This config with the values of `flags` (a section or a whole config, as parsed from
    /// the command line) for the keys `given` says were on the command line.
    pub fn with_overrides(
        &self,
        flags: &impl Serialize,
        given: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let mut table = toml::Table::try_from(self)?;
        for (k, v) in toml::Table::try_from(flags)? {
            if given(&k) {
                table.insert(k, v);
            }
        }
        Self::from_table(table)
    }

    /// The effective LAMBDA (of conflicting samples, or of JTT's error set); 1 for methods
    /// that do not up-weight by LAMBDA.
    pub fn effective_upweight(&self) -> f64 {
        self.method.lambda(self.data.conflict_pct)
    }

    /// True when re-weighting of any kind is active.
    pub fn reweighting(&self) -> bool {
        self.method.reweighting(self.data.conflict_pct)
    }

    /// The model-selection rule and, when defaulted, why (`MethodOptions::select_rule`).
    pub fn select_rule(&self) -> (SelectRule, &'static str) {
        self.method.select_rule(self.data.conflict_pct)
    }

    /// The config with `dataset = auto` resolved to the layout of its `data` folder, as a run
    /// records it in its `config.toml`.
    pub fn with_resolved_dataset(&self) -> TrainConfig {
        TrainConfig {
            data: self.data.with_resolved_kind(),
            ..self.clone()
        }
    }

    /// Checks every value (each section's, then those across sections); the error names the
    /// flag and the accepted range.
    pub fn validate(&self) -> Result<()> {
        self.data.validate()?;
        self.model.validate()?;
        self.optim.validate()?;
        self.method.validate()?;
        self.sparse.validate()?;
        self.run.validate()?;
        if self.sparse.dst_options().needs_momentum() && self.optim.momentum <= 0.0 {
            bail!(
                "--growth momentum and --redistribution momentum read the momentum buffers; set \
                 --momentum > 0"
            );
        }
        Ok(())
    }

    /// A short human-readable tag for run directory names, e.g. `cnn-d0.05-u80-c5`.
    pub fn short_name(&self) -> String {
        let method = match self.method.kind {
            Method::Upweight => String::new(),
            m => format!("{}-", m.as_str()),
        };
        format!(
            "{method}{}-d{}-u{}-c{}-s{}",
            self.model.kind.as_str(),
            fmt_num(self.sparse.density),
            fmt_num(self.effective_upweight()),
            fmt_num(self.data.conflict_pct),
            self.optim.seed
        )
    }
}

impl<'de> Deserialize<'de> for TrainConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let table = toml::Table::deserialize(d)?;
        TrainConfig::from_table(table).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ModelKind;
    use crate::train::methods::paired_upweight;

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
        let mut c = TrainConfig::default();
        c.sparse.density = 0.0;
        assert!(c.validate().unwrap_err().to_string().contains("--density"));
        c.sparse.density = 1.5;
        assert!(c.validate().unwrap_err().to_string().contains("--density"));
        c.sparse.density = 1.0;
        c.validate().unwrap();
        c.method.upweight = Some(-1.0);
        assert!(c.validate().unwrap_err().to_string().contains("--upweight"));
        c.method.upweight = None;
        c.data.conflict_pct = 120.0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--conflict-pct"));
    }

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let mut c = TrainConfig::default();
        c.sparse.density = 0.1;
        c.method.upweight = Some(3.0);
        let text = c.to_toml().unwrap();
        let back: TrainConfig = toml::from_str(&text).unwrap();
        assert_eq!(c, back);
        let err = TrainConfig::from_toml_str("densty = 0.1").unwrap_err();
        assert!(err.to_string().contains("did you mean `density`"), "{err}");
        let err = format!("{:#}", TrainConfig::from_toml_str("xyzzy = 1").unwrap_err());
        assert!(err.contains("unknown option `xyzzy`"), "{err}");
        let err = format!(
            "{:#}",
            TrainConfig::from_toml_str("density = \"a\"").unwrap_err()
        );
        assert!(err.contains("density"), "{err}");
        let partial = TrainConfig::from_toml_str("density = 0.2\nmodel = \"mlp\"").unwrap();
        assert_eq!(partial.sparse.density, 0.2);
        assert_eq!(partial.model.kind, ModelKind::Mlp);
        assert_eq!(partial.optim.epochs, TrainConfig::default().optim.epochs);
    }

    /// Config files written before the options were split into sections load, and write back
    /// byte for byte (config hashes, and so sweep run directories, stay the same).
    #[test]
    fn earlier_config_files_load_and_write_back_identically() {
        for text in [
            include_str!("../../tests/fixtures/config-default.toml"),
            include_str!("../../tests/fixtures/config-full.toml"),
        ] {
            let c = TrainConfig::from_toml_str(text).unwrap();
            assert_eq!(c.to_toml().unwrap(), text);
        }
        assert_eq!(
            TrainConfig::default().to_toml().unwrap(),
            include_str!("../../tests/fixtures/config-default.toml")
        );
    }

    /// Every flag of the sections is a config key of the same name: `with_overrides` merges by
    /// that name.
    #[test]
    fn every_flag_is_a_config_key() {
        use clap::Args;
        let cmd = TrainConfig::augment_args(clap::Command::new("t"));
        let keys = config_keys();
        let ids: Vec<String> = cmd
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(ids.len() >= 45, "{ids:?}");
        for id in &ids {
            assert!(keys.contains(&id.as_str()), "flag {id} is no config key");
        }
        // The keys without a flag of their own are the tri-state pairs (--augment /
        // --no-augment, ...), which `rest train` sets itself.
        let mut flagless: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| !ids.iter().any(|i| i == k))
            .collect();
        flagless.sort_unstable();
        assert_eq!(flagless, ["augment", "normalize", "prefetch"]);
    }

    #[test]
    fn short_names() {
        assert_eq!(fmt_num(0.05), "0.05");
        assert_eq!(fmt_num(5.0), "5");
        assert_eq!(TrainConfig::default().short_name(), "cnn-d0.05-u80-c5-s42");
    }
}
