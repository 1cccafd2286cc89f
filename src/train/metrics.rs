//! Group metrics of a prediction set: overall accuracy, accuracy on bias-aligned and
//! bias-conflicting samples, worst-group accuracy (the lower of the two), worst-cell accuracy
//! (the lowest over the (label, bias) cells present) and unbiased accuracy (the mean over the
//! (label, bias) cells present, as in LfF/REST).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Metrics of one split. Accuracies are fractions in [0, 1]; a group without samples is
/// `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMetrics {
    pub n: usize,
    pub n_conflicting: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub aligned: Option<f64>,
    pub conflicting: Option<f64>,
    pub worst_group: f64,
    pub worst_cell: f64,
    pub unbiased: f64,
}

/// Computes the metrics from predicted classes, true labels, bias attributes and the mean
/// loss. All slices have the same length, which must be non-zero.
pub fn group_metrics(pred: &[u32], labels: &[u32], bias: &[u32], loss: f64) -> GroupMetrics {
    assert_eq!(pred.len(), labels.len());
    assert_eq!(pred.len(), bias.len());
    let n = pred.len();
    let mut cells: BTreeMap<(u32, u32), (usize, usize)> = BTreeMap::new();
    let (mut al, mut al_ok, mut co, mut co_ok, mut ok) = (0, 0, 0, 0, 0);
    for i in 0..n {
        let hit = (pred[i] == labels[i]) as usize;
        ok += hit;
        if labels[i] == bias[i] {
            al += 1;
            al_ok += hit;
        } else {
            co += 1;
            co_ok += hit;
        }
        let c = cells.entry((labels[i], bias[i])).or_insert((0, 0));
        c.0 += 1;
        c.1 += hit;
    }
    let frac = |a: usize, b: usize| {
        if b == 0 {
            None
        } else {
            Some(a as f64 / b as f64)
        }
    };
    let aligned = frac(al_ok, al);
    let conflicting = frac(co_ok, co);
    let worst_group = [aligned, conflicting]
        .into_iter()
        .flatten()
        .fold(f64::INFINITY, f64::min);
    let cell_acc: Vec<f64> = cells.values().map(|&(c, h)| h as f64 / c as f64).collect();
    let unbiased = if cell_acc.is_empty() {
        0.0
    } else {
        cell_acc.iter().sum::<f64>() / cell_acc.len() as f64
    };
    let worst_cell = cell_acc.iter().copied().fold(f64::INFINITY, f64::min);
    GroupMetrics {
        n,
        n_conflicting: co,
        loss,
        accuracy: frac(ok, n).unwrap_or(0.0),
        aligned,
        conflicting,
        worst_group: if worst_group.is_finite() {
            worst_group
        } else {
            0.0
        },
        worst_cell: if worst_cell.is_finite() {
            worst_cell
        } else {
            0.0
        },
        unbiased,
    }
}

/// An optional metric with 3 decimals, or `-`, for the log.
pub(crate) fn fmt_opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_made_prediction_set() {
        // Samples (label, bias, pred):
        //  (0,0,0) ok   aligned  cell(0,0)
        //  (0,0,1) miss aligned  cell(0,0)
        //  (1,1,1) ok   aligned  cell(1,1)
        //  (0,1,0) ok   conflict cell(0,1)
        //  (1,0,0) miss conflict cell(1,0)
        //  (1,0,1) ok   conflict cell(1,0)
        let labels = [0, 0, 1, 0, 1, 1];
        let bias = [0, 0, 1, 1, 0, 0];
        let pred = [0, 1, 1, 0, 0, 1];
        let m = group_metrics(&pred, &labels, &bias, 0.7);
        assert_eq!(m.n, 6);
        assert_eq!(m.n_conflicting, 3);
        assert!((m.accuracy - 4.0 / 6.0).abs() < 1e-12);
        assert!((m.aligned.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.conflicting.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        // cells: (0,0) 1/2, (0,1) 1/1, (1,0) 1/2, (1,1) 1/1 -> mean 0.75, min 0.5
        assert!((m.unbiased - 0.75).abs() < 1e-12);
        assert!((m.worst_cell - 0.5).abs() < 1e-12);
        assert!((m.worst_group - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.loss, 0.7);
    }

    #[test]
    fn missing_group_is_none() {
        let m = group_metrics(&[0, 1], &[0, 1], &[0, 1], 0.0);
        assert_eq!(m.conflicting, None);
        assert_eq!(m.aligned, Some(1.0));
        assert_eq!(m.worst_group, 1.0);
    }
}
