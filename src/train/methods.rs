//! Group-robustness methods beyond oracle up-weighting: which training samples are drawn or
//! weighted how. `upweight` (REST: bias-conflicting samples x LAMBDA), `erm` (plain),
//! `jtt` (Just Train Twice: the error set of an ERM identification model x LAMBDA, no
//! training bias labels), `group-dro` (GroupDRO's online group weights q, Sagawa et al. 2020)
//! and `balanced` / `class-balanced` sampling. The trainer asks this module for per-sample
//! weights and, for GroupDRO, for the per-sample loss weights of each batch.

use crate::data::Split;
use crate::util::write_atomic;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::select::SelectRule;

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

/// How bias-conflicting samples are up-weighted (`--reweight-mode`).
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

/// The method section of a run's options: which samples count how much, and how the
/// reported epoch is chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
#[command(next_help_heading = "Method")]
pub struct MethodOptions {
    /// Weight LAMBDA of bias-conflicting samples (1 = plain ERM). Default: paired with
    /// --conflict-pct as in the paper (0.5->10, 1->30, 2->50, 5->80).
    #[arg(long, value_name = "LAMBDA")]
    pub upweight: Option<f64>,
    /// Up-weight by weighted sampling (`sample`) or by per-sample loss weights (`loss`).
    #[arg(long, value_enum, default_value_t = ReweightMode::Sample)]
    pub reweight_mode: ReweightMode,
    /// Group-robustness method: upweight (oracle bias labels, LAMBDA), erm, jtt (Just Train
    /// Twice), group-dro, balanced (every (label, bias) group equally likely) or
    /// class-balanced.
    #[arg(long = "method", id = "method", value_name = "METHOD", value_enum, default_value_t = Method::Upweight)]
    #[serde(rename = "method")]
    pub kind: Method,
    /// Model selection on validation: val-worst-group (default when re-weighting),
    /// val-unbiased, val-accuracy (default for erm and jtt) or last.
    #[arg(long, value_enum)]
    pub select: Option<SelectRule>,
    /// JTT: epochs of the ERM identification model (stage 1).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub jtt_epochs: usize,
    /// JTT: up-weight this error set (an error_set.json) instead of running stage 1.
    #[arg(long, value_name = "FILE")]
    pub error_set: Option<PathBuf>,
    /// GroupDRO step size eta of the group weights.
    #[arg(long, value_name = "ETA", default_value_t = 0.01)]
    pub dro_step_size: f64,
    /// GroupDRO generalisation adjustment C: group loss + C / sqrt(group size).
    #[arg(long, value_name = "C", default_value_t = 0.0)]
    pub dro_adjustment: f64,
    /// Groups of group-dro and balanced: cells ((label, bias)) or aligned-conflict.
    #[arg(long, value_enum, default_value_t = GroupScheme::Cells)]
    pub groups: GroupScheme,
}

impl Default for MethodOptions {
    fn default() -> Self {
        crate::util::args_defaults()
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

impl MethodOptions {
    /// The effective LAMBDA (of conflicting samples, or of JTT's error set) at a conflicting
    /// ratio of `conflict_pct`; 1 for methods that do not up-weight by LAMBDA (erm,
    /// group-dro, balanced, class-balanced).
    pub fn lambda(&self, conflict_pct: f64) -> f64 {
        match self.kind {
            Method::Upweight | Method::Jtt => self
                .upweight
                .unwrap_or_else(|| paired_upweight(conflict_pct)),
            _ => 1.0,
        }
    }

    /// True when re-weighting of any kind is active (LAMBDA != 1, GroupDRO, balanced
    /// sampling).
    pub fn reweighting(&self, conflict_pct: f64) -> bool {
        match self.kind {
            Method::Upweight | Method::Jtt => (self.lambda(conflict_pct) - 1.0).abs() > 1e-12,
            Method::Erm => false,
            Method::GroupDro | Method::Balanced | Method::ClassBalanced => true,
        }
    }

    /// The model-selection rule and, when defaulted, why: `--select` if given; else
    /// val-accuracy when validation bias labels are treated as unavailable (JTT) or nothing
    /// is re-weighted, and val-worst-group otherwise.
    pub fn select_rule(&self, conflict_pct: f64) -> (SelectRule, &'static str) {
        match self.select {
            Some(r) => (r, "--select"),
            None if self.kind == Method::Jtt => (
                SelectRule::ValAccuracy,
                "default for jtt: validation bias labels are treated as unavailable",
            ),
            None if self.reweighting(conflict_pct) => {
                (SelectRule::ValWorstGroup, "default when re-weighting")
            }
            None => (SelectRule::ValAccuracy, "default without re-weighting"),
        }
    }

    /// Checks every value; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        if let Some(u) = self.upweight {
            if !(u.is_finite() && u > 0.0) {
                bail!("--upweight must be a positive number (1 = no re-weighting), got {u}");
            }
        }
        if self.jtt_epochs < 1 {
            bail!("--jtt-epochs must be at least 1");
        }
        for (flag, v) in [
            ("--dro-step-size", self.dro_step_size),
            ("--dro-adjustment", self.dro_adjustment),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{flag} must be >= 0, got {v}");
            }
        }
        if self.error_set.is_some() && self.kind != Method::Jtt {
            bail!("--error-set is only used by --method jtt");
        }
        Ok(())
    }
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Upweight => "upweight",
            Method::Erm => "erm",
            Method::Jtt => "jtt",
            Method::GroupDro => "group-dro",
            Method::Balanced => "balanced",
            Method::ClassBalanced => "class-balanced",
        }
    }
}

/// Group id of every sample and the number of groups. With `Cells`, the ids number the
/// (label, bias) cells present in `labels`/`bias` in sorted order; with `AlignedConflict`,
/// 0 = aligned and 1 = conflicting (always 2 groups).
pub fn group_ids(labels: &[u32], bias: &[u32], scheme: GroupScheme) -> (Vec<usize>, usize) {
    group_ids_with(labels, bias, scheme, |l, b| l != b)
}

/// [`group_ids`] of a split: its aligned/conflicting groups follow `Split::is_conflicting`
/// (a table dataset's minority groups, else the DFA rule).
pub fn split_group_ids(split: &Split, scheme: GroupScheme) -> (Vec<usize>, usize) {
    match &split.groups {
        Some(g) => group_ids_with(&split.labels, &split.bias, scheme, |l, b| {
            g.is_minority(l, b)
        }),
        None => group_ids(&split.labels, &split.bias, scheme),
    }
}

fn group_ids_with(
    labels: &[u32],
    bias: &[u32],
    scheme: GroupScheme,
    conflicting: impl Fn(u32, u32) -> bool,
) -> (Vec<usize>, usize) {
    match scheme {
        GroupScheme::AlignedConflict => (
            labels
                .iter()
                .zip(bias)
                .map(|(&l, &b)| conflicting(l, b) as usize)
                .collect(),
            2,
        ),
        GroupScheme::Cells => {
            let mut cells: BTreeMap<(u32, u32), usize> = BTreeMap::new();
            for (&l, &b) in labels.iter().zip(bias) {
                cells.insert((l, b), 0);
            }
            for (i, v) in cells.values_mut().enumerate() {
                *v = i;
            }
            let ids = labels
                .iter()
                .zip(bias)
                .map(|(&l, &b)| cells[&(l, b)])
                .collect();
            (ids, cells.len())
        }
    }
}

/// Number of samples in each of `n_groups` groups.
pub fn group_counts(ids: &[usize], n_groups: usize) -> Vec<usize> {
    let mut c = vec![0usize; n_groups];
    for &g in ids {
        c[g] += 1;
    }
    c
}

/// Weights that make every group equally likely under weighted sampling: `1 / n_g` for a
/// sample of group `g`.
pub fn balanced_weights(ids: &[usize], n_groups: usize) -> Vec<f64> {
    let c = group_counts(ids, n_groups);
    ids.iter().map(|&g| 1.0 / c[g] as f64).collect()
}

/// Per-sample weights of a method for the training split (`None`: uniform shuffled epochs,
/// as GroupDRO uses). `error_set` is JTT's up-weighted set; `lambda` the up-weight.
pub fn sample_weights(
    method: Method,
    train: &Split,
    lambda: f64,
    scheme: GroupScheme,
    error_set: Option<&[usize]>,
) -> Result<Option<Vec<f64>>> {
    Ok(match method {
        Method::Upweight => Some(crate::data::sampler::group_weights(train, lambda)),
        Method::Erm => Some(vec![1.0; train.len()]),
        Method::Jtt => {
            let e = error_set.context("JTT needs an error set (internal: stage 1 not run)")?;
            let mut w = vec![1.0; train.len()];
            for &i in e {
                w[i] = lambda;
            }
            Some(w)
        }
        Method::GroupDro => None,
        Method::Balanced => {
            let (ids, n) = split_group_ids(train, scheme);
            Some(balanced_weights(&ids, n))
        }
        Method::ClassBalanced => {
            let zeros = vec![0u32; train.len()];
            let (ids, n) = group_ids(&train.labels, &zeros, GroupScheme::Cells);
            Some(balanced_weights(&ids, n))
        }
    })
}

/// GroupDRO's online group weights (Sagawa et al. 2020, Algorithm 1): per batch, with the
/// mean loss `l_g` of each group present, `q_g <- q_g * exp(eta * (l_g + C / sqrt(n_g)))`,
/// then `q` is normalised to sum 1; the batch loss is `sum_g q_g l_g`. Groups absent from a
/// batch keep their q before normalisation. `n_g` is the group's training-set size.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupDro {
    q: Vec<f64>,
    counts: Vec<usize>,
    eta: f64,
    adjustment: f64,
}

impl GroupDro {
    /// Uniform q over the groups of `counts` (training-set group sizes).
    pub fn new(counts: Vec<usize>, eta: f64, adjustment: f64) -> Self {
        let g = counts.len().max(1);
        Self {
            q: vec![1.0 / g as f64; counts.len()],
            counts,
            eta,
            adjustment,
        }
    }

    pub fn q(&self) -> &[f64] {
        &self.q
    }

    /// One update from the batch's group losses (`None` for a group absent from the batch).
    pub fn update(&mut self, group_losses: &[Option<f64>]) {
        for (g, l) in group_losses.iter().enumerate() {
            if let Some(l) = l {
                let adj = self.adjustment / (self.counts[g].max(1) as f64).sqrt();
                self.q[g] *= (self.eta * (l + adj)).exp();
            }
        }
        let s: f64 = self.q.iter().sum();
        if s > 0.0 && s.is_finite() {
            for q in &mut self.q {
                *q /= s;
            }
        }
    }

    /// Updates q from a batch (group id and loss of each sample) and returns each sample's
    /// loss weight `q_g / m_g` (`m_g`: the group's count in the batch), so that
    /// `sum_i w_i loss_i = sum_g q_g l_g`.
    pub fn batch_weights(&mut self, ids: &[usize], losses: &[f32]) -> Vec<f32> {
        let g = self.q.len();
        let mut sum = vec![0.0f64; g];
        let mut m = vec![0usize; g];
        for (&i, &l) in ids.iter().zip(losses) {
            sum[i] += l as f64;
            m[i] += 1;
        }
        let means: Vec<Option<f64>> = (0..g)
            .map(|k| (m[k] > 0).then(|| sum[k] / m[k] as f64))
            .collect();
        self.update(&means);
        ids.iter()
            .map(|&i| (self.q[i] / m[i] as f64) as f32)
            .collect()
    }

    /// q as raw bits, for a checkpoint that restores it exactly.
    pub fn q_bits(&self) -> Vec<u64> {
        self.q.iter().map(|v| v.to_bits()).collect()
    }

    /// Restores q from `q_bits` (errors when the group count differs).
    pub fn set_q_bits(&mut self, bits: &[u64]) -> Result<()> {
        if bits.len() != self.q.len() {
            bail!(
                "the checkpoint holds {} GroupDRO weights, the run has {} groups: it belongs to \
                 another --groups setting",
                bits.len(),
                self.q.len()
            );
        }
        self.q = bits.iter().map(|b| f64::from_bits(*b)).collect();
        Ok(())
    }
}

/// JTT's error set: indices of the samples whose prediction differs from the label.
pub fn error_set(preds: &[u32], labels: &[u32]) -> Vec<usize> {
    preds
        .iter()
        .zip(labels)
        .enumerate()
        .filter(|(_, (p, l))| p != l)
        .map(|(i, _)| i)
        .collect()
}

/// How well an error set recovers the true bias-conflicting set (`summary.json` `jtt`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JttReport {
    /// Samples in the error set.
    pub size: usize,
    pub train_size: usize,
    /// True bias-conflicting training samples.
    pub conflicting: usize,
    /// Error-set samples that are bias-conflicting.
    pub hits: usize,
    /// hits / size (None for an empty error set).
    pub precision: Option<f64>,
    /// hits / conflicting (None without conflicting samples).
    pub recall: Option<f64>,
    /// Epochs of the identification model (None when the set was read with --error-set).
    pub stage1_epochs: Option<usize>,
}

/// Precision and recall of `error` against the samples flagged in `conflicting`.
pub fn jtt_report(error: &[usize], conflicting: &[bool]) -> JttReport {
    let hits = error.iter().filter(|&&i| conflicting[i]).count();
    let n_conf = conflicting.iter().filter(|&&c| c).count();
    let frac = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
    JttReport {
        size: error.len(),
        train_size: conflicting.len(),
        conflicting: n_conf,
        hits,
        precision: frac(hits, error.len()),
        recall: frac(hits, n_conf),
        stage1_epochs: None,
    }
}

#[derive(Serialize, Deserialize)]
struct ErrorSetFile {
    train_size: usize,
    indices: Vec<usize>,
}

/// Writes `error_set.json`: the training-set size and the sorted indices.
pub fn save_error_set(path: &Path, indices: &[usize], train_size: usize) -> Result<()> {
    let f = ErrorSetFile {
        train_size,
        indices: indices.to_vec(),
    };
    write_atomic(path, serde_json::to_string(&f)?.as_bytes())
}

/// Reads an error set written by `save_error_set` (or `{"indices": [...]}` / a bare JSON
/// list), checking every index against the training-set size.
pub fn load_error_set(path: &Path, train_size: usize) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the error set {} (--error-set): check the path",
            path.display()
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} (--error-set) is not JSON", path.display()))?;
    let list = v.get("indices").unwrap_or(&v);
    let idx: Vec<usize> = serde_json::from_value(list.clone()).with_context(|| {
        format!(
            "{} (--error-set) must hold {{\"indices\": [..]}} with non-negative integers, as \
             a JTT run's error_set.json",
            path.display()
        )
    })?;
    if let Some(n) = v.get("train_size").and_then(|n| n.as_u64()) {
        if n as usize != train_size {
            bail!(
                "{} (--error-set) was made for a training set of {n} samples, this run has \
                 {train_size}: use the same data flags as the run that wrote it",
                path.display()
            );
        }
    }
    if let Some(&bad) = idx.iter().find(|&&i| i >= train_size) {
        bail!(
            "{} (--error-set) has index {bad}, but the training set has {train_size} samples",
            path.display()
        );
    }
    let mut idx = idx;
    idx.sort_unstable();
    idx.dedup();
    Ok(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cell_ids_number_present_cells_in_order() {
        let (ids, n) = group_ids(&[1, 0, 1, 0, 2], &[1, 0, 0, 0, 2], GroupScheme::Cells);
        // cells present: (0,0)=0, (1,0)=1, (1,1)=2, (2,2)=3
        assert_eq!(n, 4);
        assert_eq!(ids, vec![2, 0, 1, 0, 3]);
        let (ids, n) = group_ids(&[1, 0, 1], &[1, 1, 0], GroupScheme::AlignedConflict);
        assert_eq!((ids, n), (vec![0, 1, 1], 2));
    }

    #[test]
    fn balanced_weights_equalise_group_mass() {
        let ids = [0, 0, 0, 1, 2, 2];
        let w = balanced_weights(&ids, 3);
        let mut mass = [0.0; 3];
        for (&g, w) in ids.iter().zip(&w) {
            mass[g] += w;
        }
        for m in mass {
            assert!((m - 1.0).abs() < 1e-12);
        }
    }
}
