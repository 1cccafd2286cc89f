//! Group metrics of a prediction set: overall accuracy, accuracy on bias-aligned and
//! bias-conflicting samples, worst-group accuracy (the lower of the two), worst-cell accuracy
//! (the lowest over the (label, bias) cells present) and unbiased accuracy (the mean over the
//! (label, bias) cells present, as in LfF/REST).
//!
//! On a table dataset (`Split::groups`), aligned/conflicting are the majority/minority
//! groups, worst-group accuracy is the lowest over all (label, attribute) groups present,
//! and each group's accuracy and the average weighted by the training group proportions
//! (Waterbirds' reported "average accuracy") are added.

use crate::data::groups::GroupInfo;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One (label, attribute) group's accuracy on a split of a table dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupAccuracy {
    pub label: u32,
    pub attribute: u32,
    pub n: usize,
    pub accuracy: f64,
    pub minority: bool,
}

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
    /// Table datasets: every group's accuracy, in (label, attribute) order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<GroupAccuracy>>,
    /// Table datasets: the mean of the group accuracies weighted by each group's share of the
    /// training split (over the groups present in this split, weights renormalised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weighted_accuracy: Option<f64>,
}

/// Computes the metrics from predicted classes, true labels, bias attributes and the mean
/// loss. All slices have the same length, which must be non-zero.
pub fn group_metrics(pred: &[u32], labels: &[u32], bias: &[u32], loss: f64) -> GroupMetrics {
    group_metrics_in(pred, labels, bias, loss, None)
}

/// [`group_metrics`] with a table dataset's groups (`Split::groups`; `None`: the DFA rule).
pub fn group_metrics_in(
    pred: &[u32],
    labels: &[u32],
    bias: &[u32],
    loss: f64,
    groups: Option<&GroupInfo>,
) -> GroupMetrics {
    assert_eq!(pred.len(), labels.len());
    assert_eq!(pred.len(), bias.len());
    let n = pred.len();
    let mut cells: BTreeMap<(u32, u32), (usize, usize)> = BTreeMap::new();
    let (mut al, mut al_ok, mut co, mut co_ok, mut ok) = (0, 0, 0, 0, 0);
    for i in 0..n {
        let hit = (pred[i] == labels[i]) as usize;
        ok += hit;
        let conflicting = match groups {
            Some(g) => g.is_minority(labels[i], bias[i]),
            None => labels[i] != bias[i],
        };
        if !conflicting {
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
    // Table datasets: the worst group is the worst (label, attribute) group.
    let worst_group = if groups.is_some() {
        worst_cell
    } else {
        worst_group
    };
    let (group_accs, weighted_accuracy) = match groups {
        None => (None, None),
        Some(g) => {
            let accs: Vec<GroupAccuracy> = cells
                .iter()
                .map(|(&(l, a), &(c, h))| GroupAccuracy {
                    label: l,
                    attribute: a,
                    n: c,
                    accuracy: h as f64 / c as f64,
                    minority: g.is_minority(l, a),
                })
                .collect();
            let p = g.train_proportions();
            let (mut num, mut den) = (0.0, 0.0);
            for ga in &accs {
                let w = p.get(&(ga.label, ga.attribute)).copied().unwrap_or(0.0);
                num += w * ga.accuracy;
                den += w;
            }
            (Some(accs), Some(if den > 0.0 { num / den } else { 0.0 }))
        }
    };
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
        groups: group_accs,
        weighted_accuracy,
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
    fn table_groups_give_minority_worst_group_and_weighted_average() -> anyhow::Result<()> {
        use crate::data::groups::MinorityRule;
        // Training groups: (0,0) x6, (0,1) x2, (1,1) x2: proportions 0.6, 0.2, 0.2; minority
        // by share < 0.3 within class: (0,1) (2/8).
        let g = GroupInfo::choose(
            &[0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
            &[0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
            &MinorityRule::ShareBelow(0.3),
        )?;
        // Evaluated: (0,0): 2 of 2 right; (0,1): 0 of 1; (1,1): 1 of 2; (1,0) (absent in
        // training): 1 of 1.
        let labels = [0, 0, 0, 1, 1, 1];
        let attrs = [0, 0, 1, 1, 1, 0];
        let pred = [0, 0, 1, 1, 0, 1];
        let m = group_metrics_in(&pred, &labels, &attrs, 0.0, Some(&g));
        assert_eq!(m.n_conflicting, 1);
        assert_eq!(m.conflicting, Some(0.0));
        assert!((m.aligned.unwrap() - 4.0 / 5.0).abs() < 1e-12);
        assert_eq!(m.worst_group, 0.0);
        let ga = m.groups.clone().unwrap();
        assert_eq!(ga.len(), 4);
        assert_eq!((ga[1].label, ga[1].attribute, ga[1].n), (0, 1, 1));
        assert!(ga[1].minority && !ga[0].minority);
        // Weighted: (0.6 * 1 + 0.2 * 0 + 0.2 * 0.5) / (0.6 + 0.2 + 0.2) = 0.7 ((1,0) has
        // training weight 0).
        assert!((m.weighted_accuracy.unwrap() - 0.7).abs() < 1e-12);
        // The DFA rule gives none of these and the two-group worst group.
        let d = group_metrics(&pred, &labels, &attrs, 0.0);
        assert_eq!((d.groups, d.weighted_accuracy), (None, None));
        assert_eq!(d.n_conflicting, 2);
        Ok(())
    }

    #[test]
    fn missing_group_is_none() {
        let m = group_metrics(&[0, 1], &[0, 1], &[0, 1], 0.0);
        assert_eq!(m.conflicting, None);
        assert_eq!(m.aligned, Some(1.0));
        assert_eq!(m.worst_group, 1.0);
    }
}
