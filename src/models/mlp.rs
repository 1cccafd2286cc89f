//! LfF's MLP for Colored MNIST: flatten, 3 hidden layers of 100 units with ReLU, linear
//! classifier. On the CPU it runs feature-major (`kernels::linear_fm`): it asks the loader
//! for feature-major batches, its activations stay `[features, N]` from layer to layer, and
//! the classifier hands out batch-major logits.

use super::{LayerFlops, Model};
use crate::data::transform::BatchLayout;
use crate::kernels;
use crate::nn::{slot_weight, Buffer, Linear, Param};
use crate::util::Rng;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

pub struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(
        in_features: usize,
        num_classes: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let dims = [in_features, 100, 100, 100, num_classes];
        let layers = (0..4)
            .map(|i| {
                Linear::new(
                    &format!("fc{}", i + 1),
                    dims[i],
                    dims[i + 1],
                    true,
                    rng,
                    device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}

impl Model for Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.layers.len() - 1;
        if !kernels::generic_path(x) {
            // Each layer with its ReLU is one op (forward and backward), feature-major.
            let mut h = kernels::feature_major(x)?;
            for (i, l) in self.layers.iter().enumerate() {
                let (w, b) = (l.weight.as_tensor(), l.bias.as_ref().map(|b| b.as_tensor()));
                let sw = slot_weight(&l.slot);
                h = kernels::linear_fm(&h, w, b, i < last, i == last, sw.as_ref())?;
            }
            return Ok(h);
        }
        let mut h = x.flatten_from(1)?;
        for (i, l) in self.layers.iter().enumerate() {
            // Each layer with its ReLU is one op (forward and backward): at this size the
            // per-op bookkeeping of separate bias, ReLU and mask ops costs as much as the
            // products themselves.
            let (w, b) = (l.weight.as_tensor(), l.bias.as_ref().map(|b| b.as_tensor()));
            let relu = i < last;
            h = match slot_weight(&l.slot) {
                Some(sw) => kernels::sparse_linear_act(&h, w, b, relu, train, &sw)?,
                None => kernels::linear_act(&h, w, b, relu)?,
            };
        }
        Ok(h)
    }

    fn layer_flops(&self, _input: (usize, usize, usize)) -> Vec<LayerFlops> {
        let last = self.layers.len() - 1;
        self.layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let out = l.weight.dims()[0] as f64;
                LayerFlops {
                    name: l.name.clone(),
                    weight: Some((format!("{}.weight", l.name), 1)),
                    // Bias, plus ReLU on hidden layers.
                    other: if i < last { 2.0 * out } else { out },
                }
            })
            .collect()
    }

    fn input_layout(&self) -> BatchLayout {
        match self.layers[0].weight.as_tensor() {
            w if kernels::generic_path(w) => BatchLayout::Nchw,
            _ => BatchLayout::FeatureMajor,
        }
    }

    fn params(&self) -> Vec<Param> {
        self.layers.iter().flat_map(|l| l.params()).collect()
    }

    fn buffers(&self) -> Result<Vec<Buffer>> {
        Ok(Vec::new())
    }

    fn set_buffers(&self, buffers: &[Buffer]) -> Result<()> {
        if !buffers.is_empty() {
            bail!("the MLP has no buffers, got {}", buffers.len());
        }
        Ok(())
    }
}
