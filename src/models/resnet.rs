//! Variable-width ResNets ("resnet10vw / resnet18vw / resnet50vw" in REST's code), laid out
//! as torchvision's ResNet v1.5: a stem (ImageNet: 7x7 stride-2 conv + BN + ReLU + 3x3
//! stride-2 max pool; CIFAR: 3x3 stride-1 conv + BN + ReLU), four stages of widths
//! `[w, 2w, 4w, 8w]` made of BasicBlocks (ResNet-10/18) or Bottlenecks (ResNet-50, expansion
//! 4, stride on the 3x3 conv), a 1x1 conv + BN shortcut where the shape changes, ReLU after
//! the residual add, global average pooling and a linear classifier. Convs have no bias and
//! are followed by BatchNorm; activations are CNHW throughout. Parameter and buffer names
//! follow torchvision's `state_dict` (`layer2.0.downsample.0.weight`, ...).
//!
//! The residual join `relu(main + shortcut)` is one fused custom op
//! ([`crate::kernels::add_relu`]).
//!
//! Initialisation is PyTorch's layer default (kaiming-uniform with a = sqrt(5) for convs and
//! the classifier, BN gamma 1 and beta 0); note that torchvision's `resnet*()` constructors
//! instead re-draw conv weights with kaiming-normal (fan-out).

use super::{Model, ModelEntry, ModelSpec};
use super::{ModelKind, Stem};
use crate::nn::layer::{elems, Dims};
use crate::nn::{Buffer, ConvBn, GlobalAvgPool, Layer, LayerFlops, Linear, MaxPool2d, Param};
use crate::util::Rng;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// The residual join, now in `crate::kernels` (kept here for existing callers).
pub use crate::kernels::add_relu;

/// The ResNets' registration (the depth follows from the kind, [`Depth::of`]): 64
/// CIFAR-sized images in `rest bench`, any image size.
pub const ENTRY: ModelEntry = ModelEntry {
    build: |spec, input, num_classes, rng, device| {
        Ok(Box::new(ResNet::from_spec(
            spec,
            input,
            num_classes,
            rng,
            device,
        )?))
    },
    bench_batch: 64,
    bench_input: (3, 32, 32),
    any_size: true,
};

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
            _ => None,
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
        let last = specs.len() - 1;
        let mut layers = Vec::with_capacity(specs.len());
        for (i, (ci, co, k, s)) in specs.into_iter().enumerate() {
            layers.push(ConvBn::new(
                &format!("{name}.conv{}", i + 1),
                &format!("{name}.bn{}", i + 1),
                ci,
                co,
                k,
                s,
                i < last,
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
                false,
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
        let mut h = x.clone();
        for l in &self.layers {
            h = l.forward(&h, train)?;
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x, train)?,
            None => x.clone(),
        };
        crate::kernels::add_relu(&h, &shortcut)
    }

    /// The conv+BN layers: the main path, then the shortcut's.
    fn conv_bns(&self) -> impl Iterator<Item = &ConvBn> {
        self.layers.iter().chain(self.downsample.iter())
    }
}

impl Layer for Block {
    fn params(&self) -> Vec<Param> {
        self.conv_bns().flat_map(|l| l.params()).collect()
    }

    fn buffers(&self) -> Result<Vec<Buffer>> {
        let mut b = Vec::new();
        for l in self.conv_bns() {
            b.extend(l.buffers()?);
        }
        Ok(b)
    }

    fn set_buffer(&self, name: &str, tensor: &Tensor) -> Result<bool> {
        for l in self.conv_bns() {
            if l.set_buffer(name, tensor)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The main path's entries, the shortcut's (from the block's input), then the residual
    /// addition + ReLU (1 each per element) as `<block>.add`.
    fn flops(&self, input: Dims, out: &mut Vec<LayerFlops>) -> Dims {
        let mut dims = input;
        for l in &self.layers {
            dims = l.flops(dims, out);
        }
        if let Some(d) = &self.downsample {
            d.flops(input, out);
        }
        out.push(LayerFlops {
            name: format!("{}.add", self.name),
            weight: None,
            other: 2.0 * elems(dims),
        });
        dims
    }
}

/// A torchvision-style ResNet of variable width on CNHW activations.
pub struct ResNet {
    depth: Depth,
    stem: ConvBn,
    /// The ImageNet stem's 3x3 stride-2 max pool.
    maxpool: Option<MaxPool2d>,
    blocks: Vec<Block>,
    pool: GlobalAvgPool,
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
        let (stem_layer, maxpool) = match stem {
            Stem::Imagenet => (
                ConvBn::new("conv1", "bn1", input.0, width, 7, 2, true, rng, device)?,
                Some(MaxPool2d::new("maxpool", 3, 2, 1)),
            ),
            Stem::Cifar => (
                ConvBn::new("conv1", "bn1", input.0, width, 3, 1, true, rng, device)?,
                None,
            ),
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
            stem: stem_layer,
            maxpool,
            blocks,
            pool: GlobalAvgPool::new("avgpool"),
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
}

impl Model for ResNet {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // NCHW images -> CNHW, the layout of every conv/BN/pool kernel.
        let x = x.permute((1, 0, 2, 3))?.contiguous()?;
        // At inference the ImageNet stem and its max pool run as one op where they can (the
        // stem's output, the largest activation, is pooled while in cache).
        let fused = match (&self.maxpool, train) {
            (Some(mp), false) => self.stem.forward_eval_maxpool(&x, mp)?,
            _ => None,
        };
        let mut h = match fused {
            Some(h) => h,
            None => {
                let mut h = self.stem.forward(&x, train)?;
                if let Some(mp) = &self.maxpool {
                    h = mp.forward(&h)?;
                }
                h
            }
        };
        for b in &self.blocks {
            h = b.forward(&h, train)?;
        }
        let pooled = self.pool.forward(&h)?;
        self.fc.forward(&pooled)
    }

    fn layers(&self) -> Vec<&dyn Layer> {
        let mut l: Vec<&dyn Layer> = vec![&self.stem];
        if let Some(mp) = &self.maxpool {
            l.push(mp);
        }
        l.extend(self.blocks.iter().map(|b| b as &dyn Layer));
        l.push(&self.pool);
        l.push(&self.fc);
        l
    }
}
