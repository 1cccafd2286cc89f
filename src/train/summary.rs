//! What a finished run reports: `summary.json` (the selected epoch's validation and test
//! metrics, densities, FLOPs, timings, method details) and the outcome `train` returns.

use super::methods::ReweightMode;
use super::methods::{JttReport, Method};
use super::metrics::GroupMetrics;
use super::select::SelectRule;
use serde::Serialize;
use std::path::PathBuf;

/// Per-layer density in the summary.
#[derive(Debug, Clone, Serialize)]
pub struct LayerDensity {
    pub layer: String,
    pub shape: Vec<usize>,
    pub nonzero: usize,
    pub density: f64,
}

/// The content of `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub rest_version: String,
    /// Where the run trained (`cpu`, `cuda:0`).
    pub device: String,
    pub dataset: String,
    pub model: String,
    pub density: f64,
    pub upweight: f64,
    pub reweight_mode: ReweightMode,
    pub seed: u64,
    pub epochs: usize,
    pub method: Method,
    pub select_rule: SelectRule,
    pub selected_epoch: usize,
    pub valid: GroupMetrics,
    pub test: GroupMetrics,
    pub final_density: f64,
    pub layer_densities: Vec<LayerDensity>,
    pub steps: usize,
    pub update_frequency: Option<usize>,
    pub mask_updates: usize,
    /// ITOP exploration rate: the share of maskable weights that were ever active.
    pub itop_rate: Option<f64>,
    pub wall_time_s: f64,
    pub train_samples_per_s: f64,
    /// Inference FLOPs per sample of the final net, of the dense net, and their ratio.
    pub infer_flops: f64,
    pub infer_flops_dense: f64,
    pub infer_flops_vs_dense: f64,
    /// Training FLOPs of the whole run (RigL accounting), of dense training, and their ratio.
    pub train_flops: f64,
    pub train_flops_dense: f64,
    pub train_flops_vs_dense: f64,
    /// JTT: the error set's size and, against the true conflicting set, precision/recall.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jtt: Option<JttReport>,
    /// GroupDRO: the final group weights q (groups as `--groups` numbers them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dro_q: Option<Vec<f64>>,
    /// Table datasets: the rule that chose the minority groups and the training groups (size,
    /// share of their class, minority or not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<crate::data::groups::GroupInfo>,
}

/// What a run returns: its directory and its summary.
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    pub summary: Summary,
}
