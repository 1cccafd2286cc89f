//! The `Layer` trait: what every layer knows about itself besides its forward pass (its
//! parameters, its buffers by name, its FLOPs for an input shape), so that a model is its
//! forward pass plus its list of layers; and the by-name restore of a model's buffers.

use super::{Buffer, Param};
use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;
use std::collections::{HashMap, HashSet};

/// The per-sample shape of an activation, `(channels, height, width)`; the output of a
/// linear layer is `(features, 1, 1)`.
pub type Dims = (usize, usize, usize);

/// The compute of one layer for one input sample, for FLOPs accounting (`crate::sparse::flops`).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerFlops {
    /// Layer name (for a conv/linear layer, its weight parameter is `<name>.weight`).
    pub name: String,
    /// For conv/linear layers: the weight parameter name and the number of output positions
    /// per sample (OH*OW for a conv, 1 for a linear layer): the layer costs
    /// 2 x nonzero weights x positions (a multiply-add is 2 FLOPs), plus its bias.
    pub weight: Option<(String, usize)>,
    /// FLOPs that do not depend on sparsity: bias (1 per output), BatchNorm (2 per element,
    /// folded scale and shift), ReLU (1 per element), average pooling (1 per input
    /// element), max pooling (k*k per output), residual additions (1 per element).
    pub other: f64,
}

/// Elements of an activation of per-sample shape `d`, as FLOPs.
pub fn elems(d: Dims) -> f64 {
    (d.0 * d.1 * d.2) as f64
}

/// A layer's bookkeeping: parameters, buffers and FLOPs. The forward pass stays an inherent
/// method of each layer (its arguments differ, and it is called statically in the hot loop).
/// Composite layers (a conv with its BatchNorm, a residual block) report their parts in order.
pub trait Layer {
    /// Every trainable parameter, named `<layer>.<param>`, in initialisation order.
    fn params(&self) -> Vec<Param>;

    /// Non-trainable state (BatchNorm running statistics), named `<layer>.<buffer>`.
    fn buffers(&self) -> Result<Vec<Buffer>> {
        Ok(Vec::new())
    }

    /// Replaces the buffer `name` (as [`Layer::buffers`] names it) by `tensor`; `Ok(false)`
    /// when `name` is none of this layer's buffers.
    fn set_buffer(&self, name: &str, tensor: &Tensor) -> Result<bool> {
        let _ = (name, tensor);
        Ok(false)
    }

    /// Appends the FLOPs entries of one sample of shape `input` to `out` and returns the
    /// output shape (so that a model's entries are its layers' chained).
    fn flops(&self, input: Dims, out: &mut Vec<LayerFlops>) -> Dims;
}

/// The parameters of `layers`, in order.
pub fn params_of(layers: &[&dyn Layer]) -> Vec<Param> {
    layers.iter().flat_map(|l| l.params()).collect()
}

/// The buffers of `layers`, in order.
pub fn buffers_of(layers: &[&dyn Layer]) -> Result<Vec<Buffer>> {
    let mut out = Vec::new();
    for l in layers {
        out.extend(l.buffers()?);
    }
    Ok(out)
}

/// The FLOPs entries of `layers` applied one after the other to one sample of shape `input`.
pub fn flops_of(layers: &[&dyn Layer], input: Dims) -> Vec<LayerFlops> {
    let mut out = Vec::new();
    let mut dims = input;
    for l in layers {
        dims = l.flops(dims, &mut out);
    }
    out
}

/// Restores the buffers of `layers` from `given`, matched by name (the order of `given` does
/// not matter). Every buffer of the layers must be given exactly once with its shape, and no
/// other: a missing, unknown, repeated or misshapen buffer is an error naming it, and then
/// nothing is changed.
pub fn restore_buffers(layers: &[&dyn Layer], given: &[Buffer]) -> Result<()> {
    let mut owned = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        owned.extend(l.buffers()?.into_iter().map(|b| (i, b)));
    }
    let mut by_name: HashMap<&str, &Tensor> = HashMap::with_capacity(given.len());
    for b in given {
        if by_name.insert(b.name.as_str(), &b.tensor).is_some() {
            bail!("buffer {} is given twice", b.name);
        }
    }
    let known: HashSet<&str> = owned.iter().map(|(_, b)| b.name.as_str()).collect();
    if let Some(b) = given.iter().find(|b| !known.contains(b.name.as_str())) {
        bail!(
            "unknown buffer {}: this model has {} buffers ({})",
            b.name,
            owned.len(),
            name_list(owned.iter().map(|(_, b)| b.name.as_str()))
        );
    }
    for (_, b) in &owned {
        let t = by_name.get(b.name.as_str()).ok_or_else(|| {
            anyhow!(
                "missing buffer {}: this model has {} buffers, {} were given",
                b.name,
                owned.len(),
                given.len()
            )
        })?;
        if t.dims() != b.tensor.dims() {
            bail!(
                "buffer {} has shape {:?}, this model's has {:?}",
                b.name,
                t.dims(),
                b.tensor.dims()
            );
        }
    }
    for (i, b) in &owned {
        if !layers[*i].set_buffer(&b.name, by_name[b.name.as_str()])? {
            bail!("layer did not take its own buffer {}", b.name);
        }
    }
    Ok(())
}

/// `a, b, c, ...`: the first few names of a list, for error messages.
fn name_list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    match names.len() {
        0 => "none".to_string(),
        n if n <= 4 => names.join(", "),
        n => format!("{}, ... {}", names[..3].join(", "), names[n - 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{BatchNorm2d, Conv2d, ConvBn, GlobalAvgPool, Linear, MaxPool2d};
    use candle_core::Device;

    fn bns() -> Result<(BatchNorm2d, BatchNorm2d)> {
        Ok((
            BatchNorm2d::new("a", 2, &Device::Cpu)?,
            BatchNorm2d::new("b", 3, &Device::Cpu)?,
        ))
    }

    fn values(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.to_vec1::<f32>()?)
    }

    #[test]
    fn buffers_round_trip_by_name() -> Result<()> {
        let (a, b) = bns()?;
        let layers: [&dyn Layer; 2] = [&a, &b];
        let names: Vec<String> = buffers_of(&layers)?.into_iter().map(|b| b.name).collect();
        assert_eq!(
            names,
            [
                "a.running_mean",
                "a.running_var",
                "b.running_mean",
                "b.running_var"
            ]
        );
        let given: Vec<Buffer> = names
            .iter()
            .rev()
            .enumerate()
            .map(|(i, n)| {
                let len = if n.starts_with('a') { 2 } else { 3 };
                Ok(Buffer {
                    name: n.clone(),
                    tensor: Tensor::full(i as f32, len, &Device::Cpu)?,
                })
            })
            .collect::<Result<_>>()?;
        restore_buffers(&layers, &given)?;
        let back = buffers_of(&layers)?;
        assert_eq!(values(&back[0].tensor)?, [3.0, 3.0]); // a.running_mean, given last
        assert_eq!(values(&back[3].tensor)?, [0.0; 3]); // b.running_var, given first
        Ok(())
    }

    #[test]
    fn wrong_buffers_are_errors_naming_them() -> Result<()> {
        let (a, b) = bns()?;
        let layers: [&dyn Layer; 2] = [&a, &b];
        let saved = buffers_of(&layers)?;
        let msg = |given: &[Buffer]| match restore_buffers(&layers, given) {
            Ok(()) => panic!(
                "restored {:?}",
                given.iter().map(|b| &b.name).collect::<Vec<_>>()
            ),
            Err(e) => e.to_string(),
        };
        assert!(msg(&saved[..3]).contains("missing buffer b.running_var"));
        let mut unknown = saved.clone();
        unknown[1].name = "a.running_varx".into();
        assert!(msg(&unknown).contains("unknown buffer a.running_varx"));
        let mut twice = saved.clone();
        twice.push(saved[0].clone());
        assert!(msg(&twice).contains("buffer a.running_mean is given twice"));
        let mut misshapen = saved.clone();
        misshapen[2].tensor = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu)?;
        assert!(msg(&misshapen).contains("buffer b.running_mean has shape [2]"));
        // A failed restore changed nothing (b.running_var is still ones).
        let mut partly = saved.clone();
        partly[3].tensor = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu)?;
        partly[0].name = "c.running_mean".into();
        assert!(restore_buffers(&layers, &partly).is_err());
        assert_eq!(values(&buffers_of(&layers)?[3].tensor)?, [1.0; 3]);
        Ok(())
    }

    /// Chained layers compute the geometry (conv, pools, linear) and the per-element FLOPs.
    #[test]
    fn flops_chain_the_geometry() -> Result<()> {
        let mut rng = crate::util::rng(0, 1);
        let dev = Device::Cpu;
        let conv = Conv2d::new("c", 3, 4, 3, 2, 1, true, &mut rng, &dev)?;
        let cb = ConvBn::new("cb", "bn", 4, 6, 3, 1, true, &mut rng, &dev)?;
        let mp = MaxPool2d::new("mp", 3, 2, 1);
        let gap = GlobalAvgPool::new("gap");
        let fc = Linear::new("fc", 6, 5, true, &mut rng, &dev)?.with_relu(true);
        let layers: [&dyn Layer; 5] = [&conv, &cb, &mp, &gap, &fc];
        let f = flops_of(&layers, (3, 9, 7));
        let entry = |name: &str, weight: Option<(&str, usize)>, other: f64| LayerFlops {
            name: name.into(),
            weight: weight.map(|(n, p)| (n.to_string(), p)),
            other,
        };
        assert_eq!(
            f,
            [
                // 9x7 -> 5x4 (k3 s2 p1), bias 1 per output.
                entry("c", Some(("c.weight", 20)), 80.0),
                // Same size (k3 s1 p1): BN 2 + ReLU 1 per element.
                entry("cb", Some(("cb.weight", 20)), 3.0 * 120.0),
                // 5x4 -> 3x2, 9 per output.
                entry("mp", None, 9.0 * 36.0),
                entry("gap", None, 36.0),
                // Bias and ReLU per output.
                entry("fc", Some(("fc.weight", 1)), 10.0),
            ]
        );
        let mut out = Vec::new();
        assert_eq!(fc.flops((6, 1, 1), &mut out), (5, 1, 1));
        let bn = BatchNorm2d::new("bn", 2, &dev)?;
        assert_eq!(bn.flops((2, 3, 3), &mut out), (2, 3, 3));
        assert_eq!(out[1].other, 36.0);
        Ok(())
    }
}
