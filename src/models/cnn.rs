//! REST's Colored-MNIST CNN: Conv(3->64, k4, s2, p1, no bias)+BN+ReLU, Conv(64->128)+BN+ReLU,
//! Conv(128->256)+BN+ReLU (all k4 s2 p1), global average pooling, Linear(256->classes).

use super::{Model, ModelEntry};
use crate::nn::{ConvBn, GlobalAvgPool, Layer, Linear};
use crate::util::Rng;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// The CNN's registration: 256 Colored-MNIST images in `rest bench`.
pub const ENTRY: ModelEntry = ModelEntry {
    build: |_spec, input, num_classes, rng, device| {
        Ok(Box::new(Cnn::new(input.0, num_classes, rng, device)?))
    },
    bench_batch: 256,
    bench_input: (3, 28, 28),
    any_size: false,
};

pub struct Cnn {
    convs: Vec<ConvBn>,
    pool: GlobalAvgPool,
    fc: Linear,
}

impl Cnn {
    pub fn new(
        in_channels: usize,
        num_classes: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let widths = [in_channels, 64, 128, 256];
        let mut convs = Vec::new();
        for i in 0..3 {
            convs.push(ConvBn::with_padding(
                &format!("conv{}", i + 1),
                &format!("bn{}", i + 1),
                widths[i],
                widths[i + 1],
                4,
                2,
                1,
                true,
                rng,
                device,
            )?);
        }
        let fc = Linear::new("fc", 256, num_classes, true, rng, device)?;
        Ok(Self {
            convs,
            pool: GlobalAvgPool::new("avgpool"),
            fc,
        })
    }
}

impl Model for Cnn {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            // Inference in one batch-innermost pass where it applies (AVX-512 CPUs): straight
            // from the images (any layout) to the pooled features.
            let pairs: Vec<_> = self.convs.iter().map(|l| (&l.conv, &l.bn)).collect();
            if let Some(pooled) = crate::nn::conv_stack_pool_eval(&pairs, x)? {
                return self.fc.forward(&pooled);
            }
        }
        // NCHW images -> CNHW, the layout of every conv/BN/pool kernel.
        let mut h = x.permute((1, 0, 2, 3))?.contiguous()?;
        for l in &self.convs {
            h = l.forward(&h, train)?;
        }
        let pooled = self.pool.forward(&h)?;
        self.fc.forward(&pooled)
    }

    fn layers(&self) -> Vec<&dyn Layer> {
        let mut l: Vec<&dyn Layer> = self.convs.iter().map(|c| c as &dyn Layer).collect();
        l.push(&self.pool);
        l.push(&self.fc);
        l
    }
}
