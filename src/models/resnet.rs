//! Variable-width ResNets ("resnet10vw / resnet18vw / resnet50vw" in REST's code), laid out
//! as torchvision's ResNet v1.5: a stem (ImageNet: 7x7 stride-2 conv + BN + ReLU + 3x3
//! stride-2 max pool; CIFAR: 3x3 stride-1 conv + BN + ReLU), four stages of widths
//! `[w, 2w, 4w, 8w]` made of BasicBlocks (ResNet-10/18) or Bottlenecks (ResNet-50, expansion
//! 4, stride on the 3x3 conv), a 1x1 conv + BN shortcut where the shape changes, ReLU after
//! the residual add, global average pooling and a linear classifier. Convs have no bias and
//! are followed by BatchNorm; activations are CNHW throughout. Parameter and buffer names
//! follow torchvision's `state_dict` (`layer2.0.downsample.0.weight`, ...).
//!
//! The residual join `relu(main + shortcut)` is one fused custom op ([`add_relu`]): one pass
//! forward, one pass backward, instead of candle's add, ReLU and ReLU-mask ops.
//!
//! Initialisation is PyTorch's layer default (kaiming-uniform with a = sqrt(5) for convs and
//! the classifier, BN gamma 1 and beta 0); note that torchvision's `resnet*()` constructors
//! instead re-draw conv weights with kaiming-normal (fan-out).

use super::{LayerFlops, Model, ModelSpec};
use crate::config::{ModelKind, Stem};
use crate::kernels;
use crate::nn::{BatchNorm2d, Buffer, Conv2d, Linear, Param};
use crate::util::Rng;
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Elements per parallel task of the fused add + ReLU; smaller tensors stay on the calling
/// thread (waking the pool costs more than the pass).
const ADD_RELU_CHUNK: usize = 1 << 16;

/// `out[i] = f(x[i], y[i])`, in parallel chunks for large tensors.
fn zip_map(out: &mut [f32], x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    let run = |o: &mut [f32], x: &[f32], y: &[f32]| {
        for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
            *o = f(*x, *y);
        }
    };
    if out.len() <= ADD_RELU_CHUNK {
        run(out, x, y);
    } else {
        out.par_chunks_mut(ADD_RELU_CHUNK)
            .zip(
                x.par_chunks(ADD_RELU_CHUNK)
                    .zip(y.par_chunks(ADD_RELU_CHUNK)),
            )
            .for_each(|(o, (x, y))| run(o, x, y));
    }
}

/// `relu(a + b)` with gradient `grad * (out > 0)` to both arguments.
struct AddRelu;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("add_relu: expected contiguous f32 CPU tensors"),
    }
}

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "rest-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        // Every element is written by `zip_map`.
        let mut out = crate::kernels::output_buffer(a.len());
        zip_map(&mut out, a, b, |a, b| {
            let s = a + b;
            // Keeps NaN (like `Tensor::relu`), unlike `f32::max`.
            if s > 0.0 || s.is_nan() {
                s
            } else {
                0.0
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (res, grad) = (res.contiguous()?, grad.contiguous()?);
        // Every element is written by `zip_map`.
        let mut dx = crate::kernels::output_buffer(res.elem_count());
        {
            let (rs, rl) = res.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let (Storage::Cpu(rs), Storage::Cpu(gs)) = (&*rs, &*gs) else {
                candle_core::bail!("add_relu: expected CPU tensors");
            };
            let (r, g) = (f32_slice(rs, rl)?, f32_slice(gs, gl)?);
            zip_map(&mut dx, r, g, |r, g| if r > 0.0 { g } else { 0.0 });
        }
        let dx = Tensor::from_vec(dx, res.shape(), res.device())?;
        Ok((Some(dx.clone()), Some(dx)))
    }
}

/// `relu(a + b)` for two `f32` CPU tensors of the same shape (the residual join), fused
/// into one pass; differentiable in both arguments (the gradient is passed where the output
/// is positive).
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        bail!(
            "add_relu: the residual branch {:?} and the shortcut {:?} differ in shape",
            a.dims(),
            b.dims()
        );
    }
    if crate::kernels::generic_path(a) || a.dtype() != candle_core::DType::F32 {
        // Other devices and types: the same result from candle's ops.
        return Ok((a + b)?.relu()?);
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    // The backward pass reads only the output (its ReLU mask).
    let keep = crate::kernels::tape::Keep::only(0, true);
    Ok(crate::kernels::tape::op2_keep(&a, &b, AddRelu, keep)?)
}

/// A ResNet depth: its block type and the number of blocks per stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// BasicBlock, [1, 1, 1, 1].
    R10,
    /// BasicBlock, [2, 2, 2, 2].
    R18,
    /// Bottleneck, [3, 4, 6, 3].
    R50,
}

impl Depth {
    /// The depth of a ResNet `ModelKind`, `None` for other models.
    pub fn of(kind: ModelKind) -> Option<Depth> {
        match kind {
            ModelKind::Resnet10 => Some(Depth::R10),
            ModelKind::Resnet18 => Some(Depth::R18),
            ModelKind::Resnet50 => Some(Depth::R50),
            ModelKind::Cnn | ModelKind::Mlp => None,
        }
    }

    /// Blocks in each of the four stages.
    pub fn blocks(self) -> [usize; 4] {
        match self {
            Depth::R10 => [1, 1, 1, 1],
            Depth::R18 => [2, 2, 2, 2],
            Depth::R50 => [3, 4, 6, 3],
        }
    }

    /// Whether the blocks are Bottlenecks (1x1, 3x3, 1x1) rather than BasicBlocks (3x3, 3x3).
    pub fn bottleneck(self) -> bool {
        self == Depth::R50
    }

    /// Output channels of a block relative to its stage width (4 for Bottlenecks).
    pub fn expansion(self) -> usize {
        if self.bottleneck() {
            4
        } else {
            1
        }
    }
}

/// A bias-free conv followed by BatchNorm (and optionally ReLU, fused into the BN kernel).
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        conv_name: &str,
        bn_name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(conv_name, cin, cout, k, stride, k / 2, false, rng, device)?,
            bn: BatchNorm2d::new(bn_name, cout, device)?,
        })
    }

    /// `bn(conv(x))`, then ReLU if `relu`, as one fused op ([`crate::nn::conv_bn`]: same
    /// values, but the convolution output never enters candle's gradient accumulation, which
    /// would zero-fill and add a copy of it).
    fn forward(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        crate::nn::conv_bn(&self.conv, &self.bn, x, train, relu)
    }

    fn out_channels(&self) -> usize {
        self.conv.weight.dims()[0]
    }

    fn kernel(&self) -> usize {
        self.conv.weight.dims()[2]
    }

    /// Output spatial size for an input of `(h, w)`.
    fn out_hw(&self, (h, w): (usize, usize)) -> (usize, usize) {
        let (k, s, p) = (self.kernel(), self.conv.stride, self.conv.padding);
        ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1)
    }

    /// FLOPs entry of the conv and its BN (+ ReLU); returns it with the output size.
    fn flops(&self, hw: (usize, usize), relu: bool) -> (LayerFlops, (usize, usize)) {
        let (oh, ow) = self.out_hw(hw);
        let elems = (self.out_channels() * oh * ow) as f64;
        let per_elem = if relu { 3.0 } else { 2.0 };
        let entry = LayerFlops {
            name: self.conv.name.clone(),
            weight: Some((format!("{}.weight", self.conv.name), oh * ow)),
            other: per_elem * elems,
        };
        (entry, (oh, ow))
    }

    fn params(&self) -> Vec<Param> {
        let mut p = self.conv.params();
        p.extend(self.bn.params());
        p
    }
}

/// A residual block: its conv+BN layers (ReLU after all but the last), the optional
/// projection shortcut, then `relu(main + shortcut)`.
struct Block {
    name: String,
    layers: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &str,
        depth: Depth,
        cin: usize,
        planes: usize,
        stride: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let cout = planes * depth.expansion();
        // (input channels, output channels, kernel, stride) of each conv of the main path.
        let specs: Vec<(usize, usize, usize, usize)> = if depth.bottleneck() {
            vec![
                (cin, planes, 1, 1),
                (planes, planes, 3, stride),
                (planes, cout, 1, 1),
            ]
        } else {
            vec![(cin, planes, 3, stride), (planes, cout, 3, 1)]
        };
        let mut layers = Vec::with_capacity(specs.len());
        for (i, (ci, co, k, s)) in specs.into_iter().enumerate() {
            layers.push(ConvBn::new(
                &format!("{name}.conv{}", i + 1),
                &format!("{name}.bn{}", i + 1),
                ci,
                co,
                k,
                s,
                rng,
                device,
            )?);
        }
        let downsample = if stride != 1 || cin != cout {
            Some(ConvBn::new(
                &format!("{name}.downsample.0"),
                &format!("{name}.downsample.1"),
                cin,
                cout,
                1,
                stride,
                rng,
                device,
            )?)
        } else {
            None
        };
        Ok(Self {
            name: name.to_string(),
            layers,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.layers.len() - 1;
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h, train, i < last)?;
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x, train, false)?,
            None => x.clone(),
        };
        add_relu(&h, &shortcut)
    }

    fn flops(&self, hw: (usize, usize), out: &mut Vec<LayerFlops>) -> (usize, usize) {
        let last = self.layers.len() - 1;
        let mut cur = hw;
        for (i, l) in self.layers.iter().enumerate() {
            let (entry, next) = l.flops(cur, i < last);
            out.push(entry);
            cur = next;
        }
        if let Some(d) = &self.downsample {
            out.push(d.flops(hw, false).0);
        }
        let c = self.layers[last].out_channels();
        out.push(LayerFlops {
            name: format!("{}.add", self.name),
            weight: None,
            // Residual addition + ReLU, 1 each per element.
            other: 2.0 * (c * cur.0 * cur.1) as f64,
        });
        cur
    }

    fn conv_bns(&self) -> impl Iterator<Item = &ConvBn> {
        self.layers.iter().chain(self.downsample.iter())
    }
}

/// A torchvision-style ResNet of variable width on CNHW activations.
pub struct ResNet {
    depth: Depth,
    stem_kind: Stem,
    stem: ConvBn,
    blocks: Vec<Block>,
    fc: Linear,
}

impl ResNet {
    /// A freshly initialised ResNet of `depth` whose stages have `[w, 2w, 4w, 8w]` channels
    /// (`w = width`, 64 for torchvision's models), for images of `input = (c, h, w)`.
    pub fn new(
        depth: Depth,
        width: usize,
        stem: Stem,
        input: (usize, usize, usize),
        num_classes: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        if width == 0 {
            bail!("the ResNet width (--width) must be at least 1, got 0");
        }
        if input.0 == 0 || input.1 == 0 || input.2 == 0 {
            bail!("a ResNet needs non-empty images, got (c, h, w) = {input:?}");
        }
        let stem_layer = match stem {
            Stem::Imagenet => ConvBn::new("conv1", "bn1", input.0, width, 7, 2, rng, device)?,
            Stem::Cifar => ConvBn::new("conv1", "bn1", input.0, width, 3, 1, rng, device)?,
        };
        let mut blocks = Vec::new();
        let mut cin = width;
        for (stage, &n) in depth.blocks().iter().enumerate() {
            let planes = width << stage;
            for b in 0..n {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let block = Block::new(
                    &format!("layer{}.{b}", stage + 1),
                    depth,
                    cin,
                    planes,
                    stride,
                    rng,
                    device,
                )?;
                cin = planes * depth.expansion();
                blocks.push(block);
            }
        }
        let fc = Linear::new("fc", cin, num_classes, true, rng, device)?;
        Ok(Self {
            depth,
            stem_kind: stem,
            stem: stem_layer,
            blocks,
            fc,
        })
    }

    /// Builds the ResNet `spec` names; an error if `spec.kind` is not a ResNet.
    pub fn from_spec(
        spec: &ModelSpec,
        input: (usize, usize, usize),
        num_classes: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let Some(depth) = Depth::of(spec.kind) else {
            bail!("model {} is not a ResNet", spec.kind.as_str());
        };
        Self::new(
            depth,
            spec.width,
            spec.stem,
            input,
            num_classes,
            rng,
            device,
        )
    }

    pub fn depth(&self) -> Depth {
        self.depth
    }

    fn conv_bns(&self) -> impl Iterator<Item = &ConvBn> {
        std::iter::once(&self.stem).chain(self.blocks.iter().flat_map(|b| b.conv_bns()))
    }
}

impl Model for ResNet {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // NCHW images -> CNHW, the layout of every conv/BN/pool kernel.
        let x = x.permute((1, 0, 2, 3))?.contiguous()?;
        let mut h = self.stem.forward(&x, train, true)?;
        if self.stem_kind == Stem::Imagenet {
            h = kernels::max_pool2d_cnhw(&h, 3, 2, 1)?;
        }
        for b in &self.blocks {
            h = b.forward(&h, train)?;
        }
        let pooled = kernels::global_avg_pool_cnhw(&h)?;
        self.fc.forward(&pooled)
    }

    fn layer_flops(&self, input: (usize, usize, usize)) -> Vec<LayerFlops> {
        let mut out = Vec::new();
        let (entry, mut hw) = self.stem.flops((input.1, input.2), true);
        out.push(entry);
        if self.stem_kind == Stem::Imagenet {
            // 3x3 stride-2 max pool, padding 1: 9 comparisons per output.
            hw = ((hw.0 - 1) / 2 + 1, (hw.1 - 1) / 2 + 1);
            out.push(LayerFlops {
                name: "maxpool".into(),
                weight: None,
                other: 9.0 * (self.stem.out_channels() * hw.0 * hw.1) as f64,
            });
        }
        for b in &self.blocks {
            hw = b.flops(hw, &mut out);
        }
        let c = self.fc.weight.dims()[1];
        out.push(LayerFlops {
            name: "avgpool".into(),
            weight: None,
            other: (c * hw.0 * hw.1) as f64,
        });
        out.push(LayerFlops {
            name: self.fc.name.clone(),
            weight: Some((format!("{}.weight", self.fc.name), 1)),
            other: self.fc.weight.dims()[0] as f64,
        });
        out
    }

    fn params(&self) -> Vec<Param> {
        let mut p: Vec<Param> = self.conv_bns().flat_map(|cb| cb.params()).collect();
        p.extend(self.fc.params());
        p
    }

    fn buffers(&self) -> Result<Vec<Buffer>> {
        let mut b = Vec::new();
        for cb in self.conv_bns() {
            b.extend(cb.bn.buffers()?);
        }
        Ok(b)
    }

    fn set_buffers(&self, buffers: &[Buffer]) -> Result<()> {
        let bns: Vec<&BatchNorm2d> = self.conv_bns().map(|cb| &cb.bn).collect();
        if buffers.len() != 2 * bns.len() {
            bail!(
                "expected {} BatchNorm buffers for this ResNet, got {}",
                2 * bns.len(),
                buffers.len()
            );
        }
        for (bn, pair) in bns.iter().zip(buffers.chunks(2)) {
            let mean_name = format!("{}.running_mean", bn.name);
            if pair[0].name != mean_name {
                bail!(
                    "BatchNorm buffers out of order: expected {mean_name}, got {}",
                    pair[0].name
                );
            }
            bn.set_buffers(pair[0].tensor.clone(), pair[1].tensor.clone())?;
        }
        Ok(())
    }
}
