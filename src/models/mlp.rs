//! LfF's MLP for Colored MNIST: flatten, 3 hidden layers of 100 units with ReLU, linear
//! classifier. On the CPU it runs feature-major (`kernels::linear_fm`): it asks the loader
//! for feature-major batches, its activations stay `[features, N]` from layer to layer, and
//! the classifier hands out batch-major logits.

use super::{Model, ModelEntry};
use crate::data::transform::BatchLayout;
use crate::kernels;
use crate::nn::{slot_weight, Layer, Linear};
use crate::util::Rng;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// The MLP's registration: 256 Colored-MNIST images in `rest bench`.
pub const ENTRY: ModelEntry = ModelEntry {
    build: |_spec, input, num_classes, rng, device| {
        let features = input.0 * input.1 * input.2;
        Ok(Box::new(Mlp::new(features, num_classes, rng, device)?))
    },
    bench_batch: 256,
    bench_input: (3, 28, 28),
    any_size: false,
};

pub struct Mlp {
    /// `fc1`..`fc4`, each with its ReLU but the last.
    fcs: Vec<Linear>,
}

impl Mlp {
    pub fn new(
        in_features: usize,
        num_classes: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let dims = [in_features, 100, 100, 100, num_classes];
        let fcs = (0..4)
            .map(|i| {
                let fc = Linear::new(
                    &format!("fc{}", i + 1),
                    dims[i],
                    dims[i + 1],
                    true,
                    rng,
                    device,
                )?;
                Ok(fc.with_relu(i < 3))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { fcs })
    }
}

impl Model for Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.fcs.len() - 1;
        if !self.fcs[0].backend.is_generic() {
            // Each layer with its ReLU is one op (forward and backward), feature-major.
            let mut h = kernels::feature_major(x)?;
            for (i, l) in self.fcs.iter().enumerate() {
                let (w, b) = (l.weight.as_tensor(), l.bias.as_ref().map(|b| b.as_tensor()));
                let sw = slot_weight(&l.slot);
                h = kernels::linear_fm(&h, w, b, l.relu, i == last, sw.as_ref())?;
            }
            return Ok(h);
        }
        let mut h = x.flatten_from(1)?;
        for l in &self.fcs {
            // Each layer with its ReLU is one op (forward and backward): at this size the
            // per-op bookkeeping of separate bias, ReLU and mask ops costs as much as the
            // products themselves.
            h = l.forward_t(&h, train)?;
        }
        Ok(h)
    }

    fn layers(&self) -> Vec<&dyn Layer> {
        self.fcs.iter().map(|l| l as &dyn Layer).collect()
    }

    fn input_layout(&self) -> BatchLayout {
        match self.fcs[0].backend {
            kernels::Backend::Generic => BatchLayout::Nchw,
            kernels::Backend::Cpu => BatchLayout::FeatureMajor,
        }
    }
}
