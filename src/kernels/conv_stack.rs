//! The inference stack: inference of a stack of conv + BatchNorm (+ ReLU) layers and the
//! global average pool that ends it, in one pass per group of 16 images with the batch
//! innermost (`rest_kernels::conv_stack`): only valid output positions are computed, each
//! layer writes straight into the next one's input layout, and a group's activations stay in
//! the core's cache through the whole stack. Sparse layers run their patterns, dense ones a
//! register-tiled dense kernel (4 channels x 6 positions per tile). The CNN's inference path on
//! AVX-512 CPUs; the same values as the layer-by-layer ops (bit for bit for sparse layers and
//! short dense ones; long dense rows are summed in another order than the blocked GEMM's).

use anyhow::{bail, Result};
use candle_core::{Storage, Tensor};
use rest_kernels::{
    conv_stack_group_len, conv_stack_pool, isa, Conv2dGeom, ConvStackLayer, ConvStackPlan,
    ConvStackWeights, Isa,
};
use std::sync::Arc;

use super::fused::{fold_bn, EvalConvBn};
use super::sparse::kernel_err;

/// Whether [`conv_stack_pool_eval`] runs these layers on `x` (else the caller runs them
/// layer by layer): f32 images on the CPU with AVX-512, no pattern shared between layers, a
/// group's activations within [`MAX_GROUP_FLOATS`], and not turned off with the environment
/// variable `REST_STACK=off` (for comparisons).
pub fn conv_stack_applies(x: &Tensor, layers: &[EvalConvBn]) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF
        .get_or_init(|| std::env::var("REST_STACK").is_ok_and(|v| v.eq_ignore_ascii_case("off")));
    let shared = layers.iter().enumerate().any(|(i, a)| {
        layers[i + 1..].iter().any(|b| match (a.sparse, b.sparse) {
            (Some(p), Some(q)) => Arc::ptr_eq(p, q),
            _ => false,
        })
    });
    !off && !layers.is_empty()
        && !super::generic_path(x)
        && isa::active() == Isa::Avx512
        && x.dtype() == candle_core::DType::F32
        && x.rank() == 4
        && !shared
        && group_fits(x, layers)
}

/// Floats a group's activations may take (16 MiB): larger images (e.g. the CNN at 128 px,
/// ~35 MiB per group) would not stay in cache anyway, and every worker thread keeps a buffer
/// of this size; they run layer by layer.
const MAX_GROUP_FLOATS: usize = 1 << 22;

/// Whether one group's activations of these layers on `x` stay within [`MAX_GROUP_FLOATS`]
/// (false for shapes that do not chain: the layer-by-layer path reports those).
fn group_fits(x: &Tensor, layers: &[EvalConvBn]) -> bool {
    chain_geoms("", x, layers).is_ok_and(|geoms| conv_stack_group_len(&geoms) <= MAX_GROUP_FLOATS)
}

/// The geometry of each layer on `x` `[N, C, H, W]`, each taking the previous one's output;
/// errors (naming `op`) where the channels do not chain or a kernel does not fit.
fn chain_geoms(op: &str, x: &Tensor, layers: &[EvalConvBn]) -> Result<Vec<Conv2dGeom>> {
    let (n, mut c, mut h, mut w) = x.dims4()?;
    let mut geoms = Vec::with_capacity(layers.len());
    for (i, l) in layers.iter().enumerate() {
        let (oc, ic, kh, kw) = l.w.dims4()?;
        if ic != c {
            bail!(
                "{op}: layer {i}'s weight {:?} expects {ic} input channels, its input has {c}",
                l.w.dims()
            );
        }
        let g = Conv2dGeom {
            c,
            n,
            h,
            w,
            oc,
            kh,
            kw,
            stride: l.stride,
            pad: l.pad,
        };
        g.validate()
            .map_err(|e| anyhow::anyhow!("{op}: layer {i} {:?}: {e}", l.w.dims()))?;
        (c, h, w) = (oc, g.oh(), g.ow());
        geoms.push(g);
    }
    Ok(geoms)
}

/// `global_avg_pool(layer_k(... layer_1(x)))` `[N, OC_k]` for NCHW images `x` `[N, C, H, W]`
/// (any strides, e.g. the feature-major batch layout), each layer a convolution with its
/// inference BatchNorm (+ ReLU). Requires [`conv_stack_applies`]. Not differentiable.
pub fn conv_stack_pool_eval(x: &Tensor, layers: &[EvalConvBn]) -> Result<Tensor> {
    let t0 = super::profile::enabled().then(std::time::Instant::now);
    let y = stack_pool(x, layers)?;
    if let Some(t0) = t0 {
        super::profile::add_forward("rest-conv-stack-pool-eval", y.dims(), t0.elapsed());
    }
    Ok(y)
}

fn stack_pool(x: &Tensor, layers: &[EvalConvBn]) -> Result<Tensor> {
    const F: &str = "conv_stack_pool_eval";
    if !conv_stack_applies(x, layers) {
        bail!("{F}: needs an f32 [N, C, H, W] CPU tensor, AVX-512 and a pattern per layer");
    }
    let geoms = chain_geoms(F, x, layers)?;
    let weights: Vec<Tensor> = layers
        .iter()
        .map(|l| super::prepare(l.w, 4, &format!("{F} weight [OC, C, KH, KW]")))
        .collect::<Result<_>>()?;
    let mut folded = Vec::with_capacity(layers.len());
    for (l, g) in layers.iter().zip(&geoms) {
        if let Some(sw) = l.sparse {
            sw.check_shape(g.oc, g.k(), F)?;
        }
        let bn = (l.gamma, l.beta, l.running_mean, l.running_var, l.eps);
        folded.push(fold_bn(F, g.oc, bn.0, bn.1, bn.2, bn.3, bn.4)?);
    }
    // The weights' host data (borrowed, not copied).
    let storages: Vec<_> = weights.iter().map(|t| t.storage_and_layout()).collect();
    let mut wdata = Vec::with_capacity(storages.len());
    for (s, l) in &storages {
        match &**s {
            Storage::Cpu(cpu) => wdata.push(super::cpu_slice(cpu, l, F)?),
            _ => bail!("{F}: expected CPU weights"),
        }
    }
    // Sparse layers: current values into their patterns (held locked for the call); dense
    // layers run from their weight tensors.
    let mut states = Vec::new();
    let mut plans = Vec::with_capacity(layers.len());
    for ((l, g), wd) in layers.iter().zip(&geoms).zip(&wdata) {
        match l.sparse {
            Some(sw) => {
                let mut st = sw.lock();
                st.refresh_values(wd, true)?;
                plans.push(st.conv_stack_plan(g)?);
                states.push(st);
            }
            None => plans.push(Arc::new(ConvStackPlan::dense(g).map_err(kernel_err)?)),
        }
    }
    let mut sparse = states.iter();
    let mut stack = Vec::with_capacity(layers.len());
    for (((l, plan), (scale, shift)), wd) in layers.iter().zip(&plans).zip(&folded).zip(&wdata) {
        // One locked state per sparse layer, in order.
        let w = match l.sparse.and_then(|_| sparse.next()) {
            Some(st) => ConvStackWeights::Sparse(&st.matrix),
            None => ConvStackWeights::Dense(wd),
        };
        stack.push(ConvStackLayer {
            conv: plan,
            w,
            scale,
            shift,
            relu: l.relu,
        });
    }
    let (n, c) = (x.dim(0)?, geoms.last().map_or(0, |g| g.oc));
    let mut pooled = vec![0f32; n * c];
    let (xs, xl) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*xs else {
        bail!("{F}: expected a CPU input");
    };
    let data = match cpu {
        candle_core::CpuStorage::F32(v) => &v[xl.start_offset()..],
        _ => bail!("{F}: expected an f32 input"),
    };
    let st = xl.stride();
    conv_stack_pool(&stack, data, n, [st[0], st[1], st[2], st[3]], &mut pooled)
        .map_err(kernel_err)?;
    drop(states);
    Ok(Tensor::from_vec(pooled, (n, c), x.device())?)
}
