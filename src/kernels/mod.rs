//! Candle autograd glue for the CPU kernels of `rest-kernels`: convolution, batch norm (+ fused
//! ReLU), pooling, linear layers and the residual join as candle custom ops on **CNHW**
//! activations, each with a backward pass computed by the same kernels. Tensors off the CPU
//! (CUDA) take the generic path of [`generic`] (candle's tensor ops), the home of GPU kernels;
//! [`generic_path`] is the one dispatch point. The instruction set of the CPU kernels is
//! `rest_kernels::isa`'s.
//!
//! Tensors must be `f32` on the CPU device; non-contiguous inputs are made contiguous first.
//! Backward passes return plain tensors (no second derivatives) and skip the gradients of
//! arguments that do not track gradients (e.g. the input images of the first convolution).

mod choice;
mod conv;
mod conv_stack;
mod fused;
pub mod generic;
mod linear;
mod linear_fm;
mod linear_op;
mod loss;
mod norm;
mod pool;
pub mod profile;
mod residual;
mod scratch;
pub(crate) mod sgd;
mod sparse;
pub mod tape;

pub use choice::{KernelMode, AUTO_SPARSE_LINEAR_MAX_DENSITY, AUTO_SPARSE_MAX_DENSITY};
pub use conv::conv2d_cnhw;
pub use conv_stack::{conv_stack_applies, conv_stack_pool_eval};
pub use fused::{conv_bn_eval, conv_bn_maxpool_eval, conv_bn_train, EvalConvBn};
pub use linear::{linear, linear_act};
pub use linear_fm::{feature_major, linear_fm};
pub use loss::softmax_nll;
pub use norm::{batch_norm_cnhw_eval, batch_norm_cnhw_train};
pub use pool::{global_avg_pool_cnhw, max_pool2d_cnhw};
pub use residual::add_relu;
pub(crate) use scratch::output as output_buffer;
pub use sparse::{
    freeze_weights, sparse_conv2d_cnhw, sparse_linear, sparse_linear_act, sparse_linear_bias,
    FrozenWeights, SparseWeight,
};

use anyhow::{bail, Result};
use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};

/// Which implementation of the layer ops a device's tensors take: rest's CPU kernels, or the
/// generic candle ops of [`generic`] (the GPU path, also forced on the CPU with the environment
/// variable `REST_KERNELS=candle`, to test it without a GPU). Chosen once per device; layers,
/// the optimizer and the masked layers hold it from their construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    #[default]
    Cpu,
    Generic,
}

impl Backend {
    /// The backend of tensors on `device`.
    pub fn of(device: &candle_core::Device) -> Self {
        static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let forced = *FORCED.get_or_init(|| {
            std::env::var("REST_KERNELS").is_ok_and(|v| v.eq_ignore_ascii_case("candle"))
        });
        if !device.is_cpu() || forced {
            Backend::Generic
        } else {
            Backend::Cpu
        }
    }

    pub fn is_generic(self) -> bool {
        self == Backend::Generic
    }
}

/// Warnings for kernel environment variables whose value is not understood (they would
/// otherwise be ignored silently): `REST_ISA` / `REST_SPARSE_ISA` other than `avx512`, `avx2`,
/// `portable` or above what this CPU runs, and `REST_KERNELS` other than `candle`.
pub fn env_warnings() -> Vec<String> {
    use rest_kernels::isa::Isa;
    let mut out = Vec::new();
    for var in ["REST_ISA", "REST_SPARSE_ISA"] {
        if let Ok(v) = std::env::var(var) {
            match Isa::from_name(&v) {
                None => out.push(format!(
                    "{var}={v} is not an instruction set (avx512, avx2 or portable): ignored"
                )),
                Some(i) if !i.is_available() => out.push(format!(
                    "{var}={v}: this CPU cannot run {}; the kernels use {}",
                    i.name(),
                    rest_kernels::isa::active().name()
                )),
                Some(_) => {}
            }
        }
    }
    if let Ok(v) = std::env::var("REST_KERNELS") {
        if !v.eq_ignore_ascii_case("candle") {
            out.push(format!(
                "REST_KERNELS={v} is not understood (only `candle`, the generic path): ignored"
            ));
        }
    }
    out
}

/// Whether an op on `x` runs on the generic candle ops of [`generic`] (`Backend::of` its
/// device): the one dispatch point of the public ops in this module.
pub fn generic_path(x: &Tensor) -> bool {
    Backend::of(x.device()).is_generic()
}

/// Checks that `t` is an `f32` tensor on the CPU with `rank` dimensions and returns a
/// contiguous version of it. `what` names the argument in error messages.
fn prepare(t: &Tensor, rank: usize, what: &str) -> Result<Tensor> {
    if !t.device().is_cpu() {
        bail!(
            "{what}: the rest CPU kernels need tensors on the CPU device, got {:?}; move it \
             with `.to_device(&Device::Cpu)`",
            t.device().location()
        );
    }
    if t.dtype() != DType::F32 {
        bail!(
            "{what}: the rest CPU kernels need f32 tensors, got {:?}; convert with \
             `.to_dtype(DType::F32)`",
            t.dtype()
        );
    }
    if t.rank() != rank {
        bail!(
            "{what}: expected a rank-{rank} tensor, got shape {:?}",
            t.dims()
        );
    }
    Ok(t.contiguous()?)
}

/// Prepares the CNHW input `x` `[C, N, H, W]` and weight `w` `[OC, C, KH, KW]` of convolution op
/// `op` (contiguous f32 CPU tensors) and checks the geometry, with errors naming `op` and both
/// shapes.
fn prepare_conv(
    op: &str,
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: usize,
) -> Result<(Tensor, Tensor, rest_kernels::Conv2dGeom)> {
    let x = prepare(x, 4, &format!("{op} input x [C, N, H, W]"))?;
    let w = prepare(w, 4, &format!("{op} weight w [OC, C, KH, KW]"))?;
    let (c, n, h, wd) = x.dims4()?;
    let (oc, ic, kh, kw) = w.dims4()?;
    if ic != c {
        bail!(
            "{op}: weight {:?} expects {ic} input channels but x {:?} (CNHW) has {c}",
            w.dims(),
            x.dims()
        );
    }
    let geom = rest_kernels::Conv2dGeom {
        c,
        n,
        h,
        w: wd,
        oc,
        kh,
        kw,
        stride,
        pad,
    };
    geom.validate()
        .map_err(|e| anyhow::anyhow!("{op}: x {:?}, w {:?}: {e}", x.dims(), w.dims()))?;
    Ok((x, w, geom))
}

/// The contiguous `f32` slice a custom op's CPU forward receives.
fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{op}: expected f32 storage"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// Runs `f` on the contiguous `f32` data of `t` (copying only if `t` is strided).
pub(crate) fn with_f32<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(cpu_slice(s, layout, op)?),
        _ => candle_core::bail!("{op}: expected a CPU tensor"),
    }
}

/// Whether any tensor in `ts` takes part in gradient tracking.
fn any_tracked(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}
