//! Variable-width ResNets ("resnet10vw / resnet18vw / resnet50vw" in REST's code), laid out
//! as torchvision's ResNet v1.5: a stem (ImageNet: 7x7 stride-2 conv + BN + ReLU + 3x3
//! stride-2 max pool; CIFAR: 3x3 stride-1 conv + BN + ReLU), four stages of widths
//! `[w, 2w, 4w, 8w]` made of BasicBlocks (ResNet-10/18) or Bottlenecks (ResNet-50, expansion
//! 4, stride on the 3x3 conv), a 1x1 conv + BN shortcut where the shape changes, ReLU after
//! the residual add, global average pooling and a linear classifier. Convs have no bias and
//! are followed by BatchNorm; activations are CNHW throughout. Parameter and buffer names
//! follow torchvision's `state_dict` (`layer2.0.downsample.0.weight`, ...).
//!
//! Initialisation is PyTorch's layer default (kaiming-uniform with a = sqrt(5) for convs and
//! the classifier, BN gamma 1 and beta 0), as the brief of REST's experiments specifies;
//! torchvision's `resnet*()` constructors would instead re-draw convs with kaiming-normal
//! (fan-out).

use super::{LayerFlops, Model, ModelSpec};
use crate::config::{ModelKind, Stem};
use crate::kernels;
use crate::nn::{BatchNorm2d, Buffer, Conv2d, Linear, Param};
use crate::util::Rng;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

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

    fn forward(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        self.bn.forward(&self.conv.forward(x)?, train, relu)
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
        Ok((h + shortcut)?.relu()?)
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
