//! FLOPs accounting of sparse networks, as in the REST/RigL papers: the inference FLOPs of the
//! current sparse net (2 x nonzero weights x output positions per conv/linear layer, plus
//! BatchNorm, ReLU, pooling and residual adds, which sparsity does not change), and the
//! training FLOPs integrated over a run with RigL's accounting: a sparse step costs
//! forward + 2 x backward on the sparse net (3 f_S), a mask-update step pays the dense weight
//! gradient instead of the sparse one (2 f_S + f_D), and dense training costs 3 f_D per step.

use crate::nn::LayerFlops;
use serde::Serialize;

/// One layer's line of a FLOPs table (per sample).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerFlopsRow {
    pub layer: String,
    /// Weight elements and active (nonzero) weights; 0 / 0 for layers without weights.
    pub numel: usize,
    pub nonzero: usize,
    pub dense_flops: f64,
    pub sparse_flops: f64,
}

/// Inference FLOPs per sample of a net, dense and at its current sparsity.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FlopsTable {
    pub layers: Vec<LayerFlopsRow>,
    pub dense: f64,
    pub sparse: f64,
}

impl FlopsTable {
    /// Builds the table from a model's `layer_flops` and, for each weight parameter name, its
    /// `(numel, nonzero)` count (`counts` returns `None` for an unknown name: counted dense).
    pub fn new(layers: &[LayerFlops], counts: impl Fn(&str) -> Option<(usize, usize)>) -> Self {
        let mut rows = Vec::with_capacity(layers.len());
        let (mut dense, mut sparse) = (0.0, 0.0);
        for l in layers {
            let (numel, nonzero, d, s) = match &l.weight {
                Some((w, positions)) => {
                    let (numel, nz) = counts(w).unwrap_or((0, 0));
                    let pos = *positions as f64;
                    (
                        numel,
                        nz,
                        2.0 * numel as f64 * pos + l.other,
                        2.0 * nz as f64 * pos + l.other,
                    )
                }
                None => (0, 0, l.other, l.other),
            };
            dense += d;
            sparse += s;
            rows.push(LayerFlopsRow {
                layer: l.name.clone(),
                numel,
                nonzero,
                dense_flops: d,
                sparse_flops: s,
            });
        }
        Self {
            layers: rows,
            dense,
            sparse,
        }
    }

    /// Sparse over dense inference FLOPs.
    pub fn ratio(&self) -> f64 {
        if self.dense > 0.0 {
            self.sparse / self.dense
        } else {
            1.0
        }
    }

    /// A human-readable table.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<12} {:>10} {:>10} {:>8} {:>14} {:>14}",
            "layer", "weights", "nonzero", "density", "dense FLOPs", "sparse FLOPs"
        );
        for r in &self.layers {
            let dens = if r.numel > 0 {
                format!("{:.4}", r.nonzero as f64 / r.numel as f64)
            } else {
                "-".into()
            };
            let _ = writeln!(
                s,
                "{:<12} {:>10} {:>10} {:>8} {:>14} {:>14}",
                r.layer,
                r.numel,
                r.nonzero,
                dens,
                fmt_flops(r.dense_flops),
                fmt_flops(r.sparse_flops)
            );
        }
        let _ = write!(
            s,
            "total per sample: dense {}, sparse {} ({:.4} of dense)",
            fmt_flops(self.dense),
            fmt_flops(self.sparse),
            self.ratio()
        );
        s
    }
}

/// Formats a FLOPs count with an SI prefix (`1.23 GFLOPs`).
pub fn fmt_flops(f: f64) -> String {
    let (v, p) = if f >= 1e12 {
        (f / 1e12, "T")
    } else if f >= 1e9 {
        (f / 1e9, "G")
    } else if f >= 1e6 {
        (f / 1e6, "M")
    } else if f >= 1e3 {
        (f / 1e3, "K")
    } else {
        (f, "")
    };
    format!("{v:.3} {p}FLOPs")
}

/// Integrates training FLOPs over a run (RigL's accounting).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct TrainFlops {
    /// FLOPs spent so far.
    pub sparse: f64,
    /// FLOPs dense training would have spent on the same samples.
    pub dense: f64,
}

impl TrainFlops {
    /// Accounts one optimizer step over `batch` samples, with per-sample inference FLOPs
    /// `f_sparse` (current masks) and `f_dense`; `dense_grad` marks a mask-update step.
    pub fn step(&mut self, batch: usize, f_sparse: f64, f_dense: f64, dense_grad: bool) {
        let b = batch as f64;
        self.sparse += b * if dense_grad {
            2.0 * f_sparse + f_dense
        } else {
            3.0 * f_sparse
        };
        self.dense += b * 3.0 * f_dense;
    }

    pub fn ratio(&self) -> f64 {
        if self.dense > 0.0 {
            self.sparse / self.dense
        } else {
            1.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_sized_conv_and_linear() {
        // Conv 2->3, k3, on 4x4 with padding 1 stride 1: 4x4 = 16 positions, 54 weights of
        // which 9 active; BN+ReLU 3 per element on 3x16 outputs = 144. Linear 48->5 with 24
        // active weights, bias 5.
        let layers = vec![
            LayerFlops {
                name: "conv".into(),
                weight: Some(("conv.weight".into(), 16)),
                other: 144.0,
            },
            LayerFlops {
                name: "pool".into(),
                weight: None,
                other: 48.0,
            },
            LayerFlops {
                name: "fc".into(),
                weight: Some(("fc.weight".into(), 1)),
                other: 5.0,
            },
        ];
        let t = FlopsTable::new(&layers, |n| match n {
            "conv.weight" => Some((54, 9)),
            "fc.weight" => Some((240, 24)),
            _ => None,
        });
        // dense: 2*54*16 + 144 = 1872; 48; 2*240 + 5 = 485 -> 2405
        // sparse: 2*9*16 + 144 = 432; 48; 2*24 + 5 = 53 -> 533
        assert_eq!(t.layers[0].dense_flops, 1872.0);
        assert_eq!(t.layers[0].sparse_flops, 432.0);
        assert_eq!(t.dense, 2405.0);
        assert_eq!(t.sparse, 533.0);
        assert!((t.ratio() - 533.0 / 2405.0).abs() < 1e-15);
    }

    #[test]
    fn training_integral_of_a_tiny_schedule() {
        // 5 steps of batch 2, update at step 3 only; f_S = 10, f_D = 100.
        let mut tf = TrainFlops::default();
        for step in 1..=5 {
            tf.step(2, 10.0, 100.0, step == 3);
        }
        // sparse: 4 steps x 2 x 30 + 1 step x 2 x (20 + 100) = 240 + 240 = 480
        // dense: 5 x 2 x 300 = 3000
        assert_eq!(tf.sparse, 480.0);
        assert_eq!(tf.dense, 3000.0);
        assert!((tf.ratio() - 0.16).abs() < 1e-15);
    }
}
