//! REST's Colored-MNIST CNN: Conv(3->64, k4, s2, p1, no bias)+BN+ReLU, Conv(64->128)+BN+ReLU,
//! Conv(128->256)+BN+ReLU (all k4 s2 p1), global average pooling, Linear(256->classes).

use super::{LayerFlops, Model};
use crate::nn::{BatchNorm2d, Buffer, Conv2d, Linear, Param};
use crate::util::Rng;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

pub struct Cnn {
    convs: Vec<Conv2d>,
    bns: Vec<BatchNorm2d>,
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
        let mut bns = Vec::new();
        for i in 0..3 {
            convs.push(Conv2d::new(
                &format!("conv{}", i + 1),
                widths[i],
                widths[i + 1],
                4,
                2,
                1,
                false,
                rng,
                device,
            )?);
            bns.push(BatchNorm2d::new(
                &format!("bn{}", i + 1),
                widths[i + 1],
                device,
            )?);
        }
        let fc = Linear::new("fc", 256, num_classes, true, rng, device)?;
        Ok(Self { convs, bns, fc })
    }
}

impl Model for Cnn {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            // Inference in one batch-innermost pass where it applies (AVX-512 CPUs): straight
            // from the images (any layout) to the pooled features.
            let pairs: Vec<_> = self.convs.iter().zip(&self.bns).collect();
            if let Some(pooled) = crate::nn::conv_stack_pool_eval(&pairs, x)? {
                return self.fc.forward(&pooled);
            }
        }
        // NCHW images -> CNHW, the layout of every conv/BN/pool kernel.
        let mut h = x.permute((1, 0, 2, 3))?.contiguous()?;
        for (conv, bn) in self.convs.iter().zip(&self.bns) {
            h = crate::nn::conv_bn_relu(conv, bn, &h, train)?;
        }
        let pooled = crate::kernels::global_avg_pool_cnhw(&h)?;
        self.fc.forward(&pooled)
    }

    fn layer_flops(&self, input: (usize, usize, usize)) -> Vec<LayerFlops> {
        let (mut h, mut w) = (input.1, input.2);
        let mut out = Vec::new();
        for conv in &self.convs {
            let dims = conv.weight.dims();
            let (oc, k) = (dims[0], dims[2]);
            h = (h + 2 * conv.padding - k) / conv.stride + 1;
            w = (w + 2 * conv.padding - k) / conv.stride + 1;
            let elems = (oc * h * w) as f64;
            out.push(LayerFlops {
                name: conv.name.clone(),
                weight: Some((format!("{}.weight", conv.name), h * w)),
                // BatchNorm (2 per element) + ReLU (1 per element).
                other: 3.0 * elems,
            });
        }
        let c = self.convs.last().map(|c| c.weight.dims()[0]).unwrap_or(0);
        out.push(LayerFlops {
            name: "avgpool".into(),
            weight: None,
            other: (c * h * w) as f64,
        });
        let classes = self.fc.weight.dims()[0];
        out.push(LayerFlops {
            name: self.fc.name.clone(),
            weight: Some((format!("{}.weight", self.fc.name), 1)),
            other: classes as f64,
        });
        out
    }

    fn params(&self) -> Vec<Param> {
        let mut p = Vec::new();
        for (conv, bn) in self.convs.iter().zip(&self.bns) {
            p.extend(conv.params());
            p.extend(bn.params());
        }
        p.extend(self.fc.params());
        p
    }

    fn buffers(&self) -> Result<Vec<Buffer>> {
        let mut b = Vec::new();
        for bn in &self.bns {
            b.extend(bn.buffers()?);
        }
        Ok(b)
    }

    fn set_buffers(&self, buffers: &[Buffer]) -> Result<()> {
        if buffers.len() != 2 * self.bns.len() {
            bail!(
                "expected {} BatchNorm buffers, got {}",
                2 * self.bns.len(),
                buffers.len()
            );
        }
        for (bn, pair) in self.bns.iter().zip(buffers.chunks(2)) {
            bn.set_buffers(pair[0].tensor.clone(), pair[1].tensor.clone())?;
        }
        Ok(())
    }
}
