//! Model selection on validation only (`--select`): which epoch's weights are reported. The
//! best validation worst-group accuracy, unbiased accuracy or accuracy, or the last epoch;
//! ties keep the earlier epoch. The test split never influences the choice.

use super::metrics::GroupMetrics;
use super::output::MetricsRow;
use serde::{Deserialize, Serialize};

/// The model-selection rule (`--select`).
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

impl SelectRule {
    /// The validation score the rule maximises (`Last`: 0, every epoch ties and the later one
    /// wins, see `Selector::observe`).
    pub fn score(self, valid: &GroupMetrics) -> f64 {
        match self {
            SelectRule::ValWorstGroup => valid.worst_group,
            SelectRule::ValUnbiased => valid.unbiased,
            SelectRule::ValAccuracy => valid.accuracy,
            SelectRule::Last => 0.0,
        }
    }

    /// True when the rule reads validation bias labels.
    pub fn needs_bias_labels(self) -> bool {
        matches!(self, SelectRule::ValWorstGroup | SelectRule::ValUnbiased)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SelectRule::ValWorstGroup => "val-worst-group",
            SelectRule::ValUnbiased => "val-unbiased",
            SelectRule::ValAccuracy => "val-accuracy",
            SelectRule::Last => "last",
        }
    }
}

/// The epoch `rule` selects from a metrics log (its `valid` rows, in epoch order).
pub fn select_epoch(rule: SelectRule, rows: &[MetricsRow]) -> Option<usize> {
    let mut s = Selector::new(rule);
    for r in rows.iter().filter(|r| r.split == "valid") {
        s.observe(r.epoch, &r.m);
    }
    s.best_epoch
}

/// Tracks the best epoch so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Selector {
    pub rule: SelectRule,
    pub best_epoch: Option<usize>,
    pub best_score: f64,
}

impl Selector {
    pub fn new(rule: SelectRule) -> Self {
        Self {
            rule,
            best_epoch: None,
            best_score: f64::MIN,
        }
    }

    /// Feeds one epoch's validation metrics; true when this epoch becomes the selected one.
    pub fn observe(&mut self, epoch: usize, valid: &GroupMetrics) -> bool {
        let s = self.rule.score(valid);
        if s > self.best_score || self.best_epoch.is_none() || self.rule == SelectRule::Last {
            self.best_score = s;
            self.best_epoch = Some(epoch);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::metrics::group_metrics;

    #[test]
    fn picks_best_validation_epoch_and_keeps_earlier_on_ties() {
        let mk = |acc_pred: &[u32]| group_metrics(acc_pred, &[0, 1, 1, 0], &[0, 1, 0, 1], 0.0);
        // epoch 1: all wrong; epoch 2: conflicting right (worst-group 0 since aligned wrong);
        // epoch 3: 3/4 right with worst group 0.5; epoch 4: same as 3.
        let epochs = [
            mk(&[1, 0, 0, 1]),
            mk(&[1, 0, 1, 0]),
            mk(&[0, 1, 1, 1]),
            mk(&[0, 1, 1, 1]),
        ];
        let mut wg = Selector::new(SelectRule::ValWorstGroup);
        let mut acc = Selector::new(SelectRule::ValAccuracy);
        for (e, m) in epochs.iter().enumerate() {
            wg.observe(e + 1, m);
            acc.observe(e + 1, m);
        }
        assert_eq!(wg.best_epoch, Some(3));
        assert_eq!(wg.best_score, 0.5);
        assert_eq!(acc.best_epoch, Some(3));
        assert_eq!(acc.best_score, 0.75);
    }
}
