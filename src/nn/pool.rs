//! Pooling layers on CNHW activations: max pooling (`MaxPool2d`) and global average pooling
//! (`GlobalAvgPool`, to `[N, C]`). No parameters; they are layers for their FLOPs.

use super::layer::{elems, Dims, Layer, LayerFlops};
use super::Param;
use crate::kernels;
use anyhow::Result;
use candle_core::Tensor;

/// `k`x`k` max pooling with `stride` and zero `padding` (padding never wins).
#[derive(Debug, Clone)]
pub struct MaxPool2d {
    pub name: String,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl MaxPool2d {
    pub fn new(name: &str, kernel: usize, stride: usize, padding: usize) -> Self {
        Self {
            name: name.to_string(),
            kernel,
            stride,
            padding,
        }
    }

    /// `x` is CNHW; returns CNHW.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::max_pool2d_cnhw(x, self.kernel, self.stride, self.padding)
    }
}

impl Layer for MaxPool2d {
    fn params(&self) -> Vec<Param> {
        Vec::new()
    }

    /// One entry: k*k comparisons per output.
    fn flops(&self, (c, h, w): Dims, out: &mut Vec<LayerFlops>) -> Dims {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let dims = (c, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        out.push(LayerFlops {
            name: self.name.clone(),
            weight: None,
            other: (k * k) as f64 * elems(dims),
        });
        dims
    }
}

/// Global average pooling: CNHW `[C, N, H, W]` to `[N, C]`.
#[derive(Debug, Clone)]
pub struct GlobalAvgPool {
    pub name: String,
}

impl GlobalAvgPool {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
        }
    }

    /// `x` is CNHW; returns `[N, C]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::global_avg_pool_cnhw(x)
    }
}

impl Layer for GlobalAvgPool {
    fn params(&self) -> Vec<Param> {
        Vec::new()
    }

    /// One entry: 1 per input element.
    fn flops(&self, input: Dims, out: &mut Vec<LayerFlops>) -> Dims {
        out.push(LayerFlops {
            name: self.name.clone(),
            weight: None,
            other: elems(input),
        });
        (input.0, 1, 1)
    }
}
