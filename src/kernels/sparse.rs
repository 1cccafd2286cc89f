//! Sparse convolution and linear layers as candle custom ops: the weight is held compactly
//! (CSR over output rows, with its transpose) and the compute scales with the number of
//! active weights. Forward is sparse x dense; the input gradient runs through the transposed
//! structure; the weight gradient is computed only at active positions (SDDMM), except when
//! the layer is asked for the dense gradient (on mask-update steps, where RigL's growth needs
//! it). The CSR pattern is rebuilt only when the mask changes; its values are refreshed from
//! the dense weight tensor at every forward pass (O(nnz)).

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rest_kernels::sparse::{
    packed_len, sddmm_into, sddmm_packed, sddmm_rows, spmm, spmm_rows_fused, spmm_t, spmm_t_rows,
    HwnConv, SparseConv, SparseMatrix,
};
use rest_kernels::{
    conv2d_bwd_weight, linear_bwd_bias, linear_bwd_weight, transpose, Conv2dGeom, ConvStackPlan,
};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::linear_op::{self, Grads, LinearKernel};
use super::tape::Keep;
use super::{any_tracked, cpu_slice, prepare, scratch, with_f32};

/// The compact weight of one layer, shared by the layer and the ops it creates.
#[derive(Debug)]
pub struct SparseWeight {
    state: Mutex<State>,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) matrix: SparseMatrix,
    pub(super) dense_grad: bool,
    /// Keep the weight gradient compact (`grad`) instead of handing candle a dense one (see
    /// [`SparseWeight::set_compact_grad`]).
    pub(super) compact_grad: bool,
    /// The compact weight gradient of the last backward pass (CSR order), until taken.
    pub(super) grad: Option<Vec<f32>>,
    /// Row-major dense index of every stored value (CSR order).
    flat: Arc<[usize]>,
    /// The pattern laid out for the last convolution geometry (rebuilt when the batch or
    /// image size changes; the pattern itself never changes within a `SparseWeight`).
    conv: Option<Arc<ConvPlan>>,
    /// The pattern laid out for the inference stack (`kernels::conv_stack`), per geometry.
    conv_stack: Option<Arc<ConvStackPlan>>,
    /// The [`FrozenWeights`] scope in which `matrix`'s values were last read from the dense
    /// weight by an inference call (0: none, or a training call read them since).
    fresh_in: u64,
    /// The batch-innermost plan's forward values and the [`FrozenWeights`] scope they were
    /// laid out in (reused while `fresh_in` is that scope, never for 0, so any new read of
    /// the values lays them out again; dropped with the plan).
    hwn_vals: Option<(u64, Vec<f32>)>,
}

thread_local! {
    /// This thread's innermost [`FrozenWeights`] scope (0: none).
    static FROZEN: Cell<u64> = const { Cell::new(0) };
}

/// Scope ids of [`FrozenWeights`] (each scope a new one, so a new scope reads values again).
static NEXT_SCOPE: AtomicU64 = AtomicU64::new(1);

/// A promise that no weight changes while it lives: inference calls on this thread (forward
/// passes that keep nothing for a backward pass) read each sparse layer's values from its
/// dense weight once per scope instead of once per call. On ResNet18 at density 0.05 that
/// read is ~8 % of an inference batch (layer4's 512x4608 weights at 3 % density touch a
/// third of their cache lines). Evaluation loops (`train::eval::predict`) and `rest bench`'s
/// inference timing hold one; training passes always read the current values (and make the next
/// inference call read them again), so a training step inside a scope stays correct for the
/// trained layers, but writing weights otherwise (loading a checkpoint into the same
/// variables) inside a scope would leave stale values: end the scope first.
#[must_use = "the values are only reused while the scope is alive"]
pub struct FrozenWeights {
    prev: u64,
    /// Thread-bound: the scope marks this thread's calls.
    _thread: std::marker::PhantomData<*const ()>,
}

/// Opens a [`FrozenWeights`] scope on this thread.
pub fn freeze_weights() -> FrozenWeights {
    let id = NEXT_SCOPE.fetch_add(1, Ordering::Relaxed);
    FrozenWeights {
        prev: FROZEN.replace(id),
        _thread: std::marker::PhantomData,
    }
}

impl Drop for FrozenWeights {
    fn drop(&mut self) {
        FROZEN.set(self.prev);
    }
}

impl State {
    /// Reads the active values from the dense weight `w`, unless this is an `inference` call
    /// in a [`FrozenWeights`] scope that already read them.
    pub(super) fn refresh_values(&mut self, w: &[f32], inference: bool) -> candle_core::Result<()> {
        let scope = if inference { FROZEN.get() } else { 0 };
        if scope != 0 && self.fresh_in == scope {
            return Ok(());
        }
        self.matrix
            .update_values_from_dense(w)
            .map_err(kernel_err)?;
        self.fresh_in = scope;
        Ok(())
    }

    /// The forward values of the batch-innermost plan `hwn` (the current `conv`) for the
    /// current values: laid out once per [`FrozenWeights`] scope (inference calls), else on
    /// every call.
    fn hwn_values(&mut self, hwn: &HwnConv) -> &[f32] {
        let scope = self.fresh_in;
        if !matches!(&self.hwn_vals, Some((s, _)) if scope != 0 && *s == scope) {
            self.hwn_vals = None;
        }
        let matrix = &self.matrix;
        &self
            .hwn_vals
            .get_or_insert_with(|| (scope, hwn.forward_values(matrix)))
            .1
    }

    /// Keeps `vals` as the compact weight gradient; a layer applied more than once in a graph
    /// adds up its gradients.
    pub(super) fn add_compact_grad(&mut self, vals: Vec<f32>) {
        match &mut self.grad {
            Some(acc) if acc.len() == vals.len() => {
                acc.iter_mut().zip(&vals).for_each(|(a, v)| *a += v);
            }
            g => *g = Some(vals),
        }
    }

    /// The pattern laid out for the inference stack with geometry `g` (its batch size does
    /// not matter), cached like [`Self::conv_plan`].
    pub(super) fn conv_stack_plan(
        &mut self,
        g: &Conv2dGeom,
    ) -> candle_core::Result<Arc<ConvStackPlan>> {
        let key = Conv2dGeom {
            n: rest_kernels::conv_stack::LANES,
            ..*g
        };
        match &self.conv_stack {
            Some(c) if *c.geom() == key => Ok(c.clone()),
            _ => {
                let c = Arc::new(ConvStackPlan::new(&self.matrix, g).map_err(kernel_err)?);
                self.conv_stack = Some(c.clone());
                Ok(c)
            }
        }
    }

    fn conv_plan(&mut self, g: &Conv2dGeom) -> candle_core::Result<Arc<ConvPlan>> {
        match &self.conv {
            Some(c) if c.geom() == g => Ok(c.clone()),
            _ => {
                let plan = if ConvPlan::batch_innermost(g, self.matrix.nnz()) {
                    ConvPlan::Hwn(HwnConv::new(&self.matrix, g).map_err(kernel_err)?)
                } else {
                    ConvPlan::Phase(SparseConv::new(&self.matrix, g).map_err(kernel_err)?)
                };
                let c = Arc::new(plan);
                self.conv = Some(c.clone());
                // Laid out for the old plan.
                self.hwn_vals = None;
                Ok(c)
            }
        }
    }
}

/// Sparse convolutions run the batch-innermost layout ([`HwnConv`]) when the batch has at
/// least this many images and either the work per output pixel reaches [`HWN_MIN_ROW_WORK`]
/// or the kernel is 3x3 on an output map of at most 4x4; 1x1 kernels (ResNet's shortcuts)
/// keep the polyphase layout. On ResNet18 at density 0.05 (`rest bench --models resnet18
/// --densities 0.05`, 2 threads, `REST_CONV_LAYOUT=phase` against the default) a training
/// step takes 203 -> 118 ms at 32 px batch 256 and 584 -> 491 ms at 128 px batch 64
/// (inference 68 -> 38.5 and 194 -> 159 ms), REST's CNN 33.9 -> 30.9 ms: on small maps the
/// polyphase layout computes many junk positions (a 4x4 map under a 3x3 kernel as 6x6) and,
/// on the tiniest, im2col rows; on 16x16 and 32x32 maps the batch rows are still the faster
/// operand once the weight gradient walks the map in blocks of rows that stay in L2
/// (`hwn_cpu 64 128`: layer1's weight gradient 81.5 -> 21.5 ms).
///
/// Batches below this size keep the polyphase layout: a batch row of a few images fills a
/// fraction of one vector, while the polyphase rows span the whole map. ResNet18 at 32 px,
/// density 0.05, inference ms polyphase / batch-innermost (`rest bench --batch B`): batch 1
/// 2.9 / 8.5, 4 4.7 / 9.9, 16 10.7 / 10.8, 32 17.3 / 12.4, 64 32.2 / 19.0.
const HWN_MIN_BATCH: usize = 16;

/// The batch-innermost layout needs this many multiply-adds per output pixel and channel
/// (active weights per output channel x batch) to pay for its per-pixel work (the live taps,
/// the stores of whole batch rows), except for 3x3 kernels on maps of at most 4x4: ResNet18
/// at 128 px batch 64, forward + backward ms of all layers of a size (`--profile`, polyphase
/// / batch-innermost): at density 0.05 (about 130 weights per channel) 32x32 196 / 188, 16x16
/// 124 / 104, 8x8 65 / 54; at density 0.01 (about 25) 75 / 83, 51 / 57, 30 / 32, while 4x4
/// maps gain at both (33 / 28 at 0.01). REST's CNN (4x4 stride-2 kernels, batch 256): its
/// 7x7 and 3x3 layers gain at density 0.05 (about 70 weights per channel: 16.4 / 15.7 and
/// 8.1 / 7.4 ms) and lose at 0.01 (about 11: 6.9 / 8.2 and 3.8 / 4.3, even on the 3x3 map).
const HWN_MIN_ROW_WORK: usize = 4096;

/// The layout of one sparse convolution: polyphase CNHW or batch-innermost CHWN (whose
/// operands are converted from and to the network's CNHW inside the op).
// Built once per geometry and held in an `Arc`: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum ConvPlan {
    Phase(SparseConv),
    Hwn(HwnConv),
}

impl ConvPlan {
    fn geom(&self) -> &Conv2dGeom {
        match self {
            ConvPlan::Phase(p) => p.geom(),
            ConvPlan::Hwn(h) => h.geom(),
        }
    }

    /// Whether geometry `g` with `nnz` active weights takes the batch-innermost layout: kernels
    /// larger than 1x1 with batches of at least [`HWN_MIN_BATCH`], with at least
    /// [`HWN_MIN_ROW_WORK`] multiply-adds per output pixel and channel or 3x3 on maps of at
    /// most 4x4 (see both); `REST_CONV_LAYOUT=phase|hwn` forces one for comparisons.
    fn batch_innermost(g: &Conv2dGeom, nnz: usize) -> bool {
        static FORCE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
        let force = *FORCE.get_or_init(|| match std::env::var("REST_CONV_LAYOUT").as_deref() {
            Ok("phase") => Some(false),
            Ok("hwn") => Some(true),
            _ => None,
        });
        force.unwrap_or(
            g.kh * g.kw > 1
                && g.n >= HWN_MIN_BATCH
                && (nnz / g.oc.max(1) * g.n >= HWN_MIN_ROW_WORK
                    || (g.kh == 3 && g.kw == 3 && g.oh() * g.ow() <= 16)),
        )
    }
}

/// `x` (CNHW) as the CHWN copy `plan` reads.
fn to_chwn(plan: &HwnConv, x: &[f32]) -> Vec<f32> {
    let mut xh = scratch::output(plan.x_len());
    plan.input_to_chwn(x, &mut xh);
    xh
}

impl SparseWeight {
    /// Builds the CSR structure of `weight` (`rows` output units x `cols` inputs, row-major)
    /// restricted to `mask` (nonzero = active).
    pub fn new(weight: &[f32], mask: &[f32], rows: usize, cols: usize) -> Result<Arc<Self>> {
        let matrix = SparseMatrix::from_dense_masked(weight, mask, rows, cols)
            .map_err(|e| anyhow::anyhow!("building the sparse weight: {}", e.message()))?;
        let flat: Arc<[usize]> = matrix
            .row_ptr()
            .windows(2)
            .enumerate()
            .flat_map(|(r, w)| {
                matrix.col_idx()[w[0]..w[1]]
                    .iter()
                    .map(move |&c| r * cols + c as usize)
            })
            .collect();
        Ok(Arc::new(Self {
            state: Mutex::new(State {
                matrix,
                dense_grad: false,
                compact_grad: false,
                grad: None,
                flat,
                conv: None,
                conv_stack: None,
                fresh_in: 0,
                hwn_vals: None,
            }),
        }))
    }

    /// With `on`, backward passes (other than dense-gradient ones, see
    /// [`Self::set_dense_grad`]) give candle no weight gradient and keep the gradient at the
    /// active positions here instead, for the optimizer to [`Self::take_grad`]; nothing of
    /// the dense weight's size is built. Off (the default), the gradient is scattered into a
    /// dense tensor that is zero outside the pattern.
    pub fn set_compact_grad(&self, on: bool) {
        let mut st = self.lock();
        st.compact_grad = on;
        st.grad = None;
    }

    /// Takes the compact weight gradient left by the last backward pass (see
    /// [`Self::set_compact_grad`]): the row-major dense index of every active weight and the
    /// gradient there, in the same order. `None` when there is none (or it was taken).
    pub fn take_grad(&self) -> Option<(Arc<[usize]>, Vec<f32>)> {
        let mut st = self.lock();
        let g = st.grad.take()?;
        Some((st.flat.clone(), g))
    }

    /// Asks the next backward passes for the dense weight gradient (mask-update steps).
    pub fn set_dense_grad(&self, on: bool) {
        self.lock().dense_grad = on;
    }

    pub fn nnz(&self) -> usize {
        self.lock().matrix.nnz()
    }

    /// Errors (naming `op`) unless the pattern is `rows x cols`.
    pub(super) fn check_shape(&self, rows: usize, cols: usize, op: &str) -> Result<()> {
        let st = self.lock();
        if st.matrix.rows() != rows || st.matrix.cols() != cols {
            bail!(
                "{op}: the sparse pattern is {}x{}, the weight is {rows}x{cols}",
                st.matrix.rows(),
                st.matrix.cols()
            );
        }
        Ok(())
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-op; the CSR data is still
        // structurally valid, so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) fn kernel_err(e: rest_kernels::sparse::SparseError) -> candle_core::Error {
    candle_core::Error::Msg(e.message().to_string())
}

struct SparseConvOp {
    geom: Conv2dGeom,
    weight: Arc<SparseWeight>,
    /// The polyphase copy of the forward input, kept for the weight gradient when gradients
    /// are tracked (freed after the backward pass, or with the op).
    xph: Mutex<Option<Vec<f32>>>,
    keep_input: bool,
}

impl CustomOp2 for SparseConvOp {
    fn name(&self) -> &'static str {
        "rest-sparse-conv2d-cnhw"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.geom;
        let x = cpu_slice(s1, l1, self.name())?;
        let w = cpu_slice(s2, l2, self.name())?;
        let mut out = scratch::output(g.out_len());
        let xph = sparse_conv_forward(&self.weight, g, x, w, &mut out, self.keep_input)?;
        *self.xph.lock().unwrap_or_else(|e| e.into_inner()) = xph;
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.oc, g.n, g.oh(), g.ow())),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let xph = self.xph.lock().unwrap_or_else(|e| e.into_inner()).take();
        with_f32(grad, self.name(), |dout| {
            sparse_conv_backward(&self.weight, &self.geom, x, w, dout, xph)
        })
    }
}

/// Sparse convolution forward into `out` (CNHW, overwritten) with the current values of `w`;
/// returns the polyphase input when `keep_input`, for the weight gradient.
pub(super) fn sparse_conv_forward(
    weight: &SparseWeight,
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    keep_input: bool,
) -> candle_core::Result<Option<Vec<f32>>> {
    sparse_conv_forward_affine(weight, g, x, w, out, keep_input, None)
}

/// [`sparse_conv_forward`] with a per-channel affine (+ ReLU) epilogue applied as the output
/// is written (`SparseConv::forward_affine`): a folded inference BatchNorm. Returns the phase
/// buffer of the input when `keep_input` (for the weight gradient).
pub(super) fn sparse_conv_forward_affine(
    weight: &SparseWeight,
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    keep_input: bool,
    epilogue: Option<(&[f32], &[f32], bool)>,
) -> candle_core::Result<Option<Vec<f32>>> {
    let mut st = weight.lock();
    if keep_input {
        // A new graph: a compact gradient not taken since the last one is stale.
        st.grad = None;
    }
    st.refresh_values(w, !keep_input)?;
    let plan = st.conv_plan(g)?;
    match &*plan {
        ConvPlan::Phase(plan) => {
            let mut xph = scratch::output(plan.phase_len());
            plan.pack_input(x, &mut xph).map_err(kernel_err)?;
            plan.forward_affine(&st.matrix, &xph, out, epilogue)
                .map_err(kernel_err)?;
            Ok(keep_input.then_some(xph))
        }
        ConvPlan::Hwn(hwn) => {
            let xh = to_chwn(hwn, x);
            let mut yh = scratch::output(hwn.out_len());
            let vals = st.hwn_values(hwn);
            hwn.forward_with(vals, &xh, &mut yh, epilogue)
                .map_err(kernel_err)?;
            hwn.output_to_cnhw(&yh, out);
            Ok(keep_input.then_some(xh))
        }
    }
}

/// Gradients of a sparse convolution from the CNHW output gradient `dout`: the input's if
/// `x` tracks gradients, the weight's (at the pattern, or dense on mask-update steps) if `w`
/// does. `xph` is the polyphase input kept by the forward pass, if any.
pub(super) fn sparse_conv_backward(
    weight: &SparseWeight,
    g: &Conv2dGeom,
    x: &Tensor,
    w: &Tensor,
    dout: &[f32],
    mut xph: Option<Vec<f32>>,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    const OP: &str = "rest-sparse-conv2d-cnhw";
    let mut st = weight.lock();
    let plan = st.conv_plan(g)?;
    // The input gradient, and the output gradient in the layout the weight gradient reads.
    let (dx, mut dyv) = match &*plan {
        ConvPlan::Phase(plan) => {
            let mut dyv = scratch::output(plan.grad_len());
            let dx = if x.track_op() {
                let mut dx = scratch::output(g.x_len());
                plan.backward_input(&st.matrix, dout, &mut dyv, &mut dx)
                    .map_err(kernel_err)?;
                Some(dx)
            } else {
                None
            };
            (dx, dyv)
        }
        ConvPlan::Hwn(plan) => {
            let mut dyh = scratch::output(plan.out_len());
            plan.output_to_chwn(dout, &mut dyh);
            let dx = if x.track_op() {
                let mut dxh = scratch::output(plan.x_len());
                plan.backward_input(&st.matrix, &dyh, &mut dxh)
                    .map_err(kernel_err)?;
                let mut dx = scratch::output(g.x_len());
                plan.input_to_cnhw(&dxh, &mut dx);
                Some(dx)
            } else {
                None
            };
            (dx, dyh)
        }
    };
    let dx_done = dx.is_some();
    let dx = dx
        .map(|dx| Tensor::from_vec(dx, x.shape(), x.device()))
        .transpose()?;
    let dw = if !w.track_op() {
        None
    } else if st.dense_grad {
        // Mask-update steps: the dense gradient RigL's growth ranks.
        let mut dw = scratch::output(g.w_len());
        with_f32(x, OP, |xs| {
            conv2d_bwd_weight(xs, dout, g, &mut dw);
            Ok(())
        })?;
        Some(Tensor::from_vec(dw, w.shape(), w.device())?)
    } else {
        let mut vals = scratch::output(st.matrix.nnz());
        match &*plan {
            ConvPlan::Phase(plan) => {
                let xph = match xph.take() {
                    Some(b) => b,
                    None => {
                        let mut b = scratch::output(plan.phase_len());
                        with_f32(x, OP, |xs| plan.pack_input(xs, &mut b).map_err(kernel_err))?;
                        b
                    }
                };
                if !dx_done {
                    // Else `backward_input` left the expanded gradient in `dyv`.
                    plan.expand_grad(dout, &mut dyv).map_err(kernel_err)?;
                }
                plan.grad_weight(&st.matrix, &dyv, &xph, &mut vals)
                    .map_err(kernel_err)?;
            }
            ConvPlan::Hwn(plan) => {
                let xh = match xph.take() {
                    Some(b) => b,
                    None => with_f32(x, OP, |xs| Ok(to_chwn(plan, xs)))?,
                };
                plan.grad_weight(&st.matrix, &dyv, &xh, &mut vals)
                    .map_err(kernel_err)?;
            }
        }
        drop(xph);
        if st.compact_grad {
            // Kept at the active weights for the optimizer (`SparseWeight::take_grad`).
            st.add_compact_grad(vals);
            None
        } else {
            let mut dw = scratch::output(g.w_len());
            st.matrix
                .scatter_to_dense(&vals, &mut dw)
                .map_err(kernel_err)?;
            Some(Tensor::from_vec(dw, w.shape(), w.device())?)
        }
    };
    Ok((dx, dw))
}

/// Sparse convolution of a CNHW input `x` `[C, N, H, W]` with `w` `[OC, C, KH, KW]` whose
/// active pattern is `weight`'s; returns `[OC, N, OH, OW]`. Differentiable in `x` and `w`
/// (the gradient of `w` is zero outside the pattern unless the dense gradient was asked for).
pub fn sparse_conv2d_cnhw(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: usize,
    weight: &Arc<SparseWeight>,
) -> Result<Tensor> {
    if super::generic_path(x) {
        // Masked weights are zero: the dense product is the sparse one.
        let _ = weight;
        return super::generic::conv2d_cnhw(x, w, stride, pad);
    }
    let (x, w, geom) = super::prepare_conv("sparse_conv2d_cnhw", x, w, stride, pad)?;
    let oc = geom.oc;
    {
        let st = weight.lock();
        if st.matrix.rows() != oc || st.matrix.cols() != geom.k() {
            bail!(
                "sparse_conv2d_cnhw: the sparse pattern is {}x{}, the weight is {oc}x{}",
                st.matrix.rows(),
                st.matrix.cols(),
                geom.k()
            );
        }
    }
    let tracked = any_tracked(&[&x, &w]);
    let op = SparseConvOp {
        geom,
        weight: weight.clone(),
        xph: Mutex::new(None),
        keep_input: tracked && w.track_op(),
    };
    Ok(super::tape::op2(&x, &w, op)?)
}

/// The name of the sparse linear op (without bias).
const SPARSE_LINEAR: &str = "rest-sparse-linear";

struct SparseLinearOp {
    n: usize,
    i: usize,
    o: usize,
    weight: Arc<SparseWeight>,
    /// `y = relu(x W^T + b)`: the backward pass masks the output gradient with `y > 0`.
    relu: bool,
    /// Whether the forward pass keeps its input packed for the weight gradient
    /// ([`sddmm_packed`]): the batch-major path with a compact weight gradient.
    keep_pack: bool,
    /// The packed input (freed after the backward pass, or with the op).
    pack: Mutex<Option<Vec<f32>>>,
}

impl SparseLinearOp {
    /// `y = x W^T (+ b)`, then ReLU if asked for.
    fn forward(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, i, o) = (self.n, self.i, self.o);
        let mut st = self.weight.lock();
        st.matrix.update_values_from_dense(w).map_err(kernel_err)?;
        if rows_path(st.matrix.nnz(), i, o) {
            let mut y = scratch::output(n * o);
            let mut pack = if self.keep_pack {
                scratch::output(packed_len(&st.matrix, n))
            } else {
                Vec::new()
            };
            spmm_rows_fused(&st.matrix, x, n, b, self.relu, &mut y, &mut pack)
                .map_err(kernel_err)?;
            if self.keep_pack {
                *self.pack.lock().unwrap_or_else(|e| e.into_inner()) = Some(pack);
            }
            return Ok((CpuStorage::F32(y), Shape::from((n, o))));
        }
        let mut xt = scratch::output(n * i);
        transpose(x, n, i, &mut xt);
        let mut yt = scratch::output(o * n);
        spmm(&st.matrix, &xt, n, &mut yt).map_err(kernel_err)?;
        let mut y = scratch::output(n * o);
        transpose(&yt, o, n, &mut y);
        add_bias(&mut y, b);
        if self.relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        Ok((CpuStorage::F32(y), Shape::from((n, o))))
    }

    /// The input, weight and (with `bias`) bias gradients from the gradient of the op's output
    /// `res` (see [`SparseWeight::set_compact_grad`] for the weight's).
    fn all_grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let pack = self.pack.lock().unwrap_or_else(|e| e.into_inner()).take();
        let out = with_f32(grad, SPARSE_LINEAR, |g| {
            if !self.relu {
                return self.grads_from(x, w, bias, g, pack.as_deref());
            }
            // Through the ReLU: the gradient where the output is positive.
            let mut dy = scratch::output(g.len());
            with_f32(res, SPARSE_LINEAR, |y| {
                for ((d, &gv), &yv) in dy.iter_mut().zip(g).zip(y) {
                    *d = if yv > 0.0 { gv } else { 0.0 };
                }
                Ok(())
            })?;
            self.grads_from(x, w, bias, &dy, pack.as_deref())
        });
        out
    }

    /// [`Self::all_grads`] from the gradient `dy` of the linear part (before any ReLU).
    fn grads_from(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        dy: &[f32],
        pack: Option<&[f32]>,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, i, o) = (self.n, self.i, self.o);
        let db = match bias {
            Some(b) if b.track_op() => {
                let mut db = vec![0.0f32; o];
                linear_bwd_bias(dy, n, o, &mut db);
                Some(Tensor::from_vec(db, o, b.device())?)
            }
            _ => None,
        };
        let mut st = self.weight.lock();
        let rows = rows_path(st.matrix.nnz(), i, o);
        if w.track_op() && st.compact_grad && !st.dense_grad {
            let mut vals = scratch::output(st.matrix.nnz());
            let mut dx = None;
            if rows {
                if x.track_op() {
                    let mut d = scratch::output(n * i);
                    spmm_t_rows(&st.matrix, dy, n, &mut d).map_err(kernel_err)?;
                    dx = Some(Tensor::from_vec(d, (n, i), x.device())?);
                }
                match pack {
                    Some(p) if p.len() == packed_len(&st.matrix, n) => {
                        sddmm_packed(&st.matrix, dy, p, n, &mut vals).map_err(kernel_err)?
                    }
                    _ => with_f32(x, SPARSE_LINEAR, |xs| {
                        sddmm_rows(&st.matrix, dy, xs, n, &mut vals).map_err(kernel_err)
                    })?,
                }
            } else {
                let mut dyt = scratch::output(o * n);
                transpose(dy, n, o, &mut dyt);
                if x.track_op() {
                    let mut dxt = scratch::output(i * n);
                    spmm_t(&st.matrix, &dyt, n, &mut dxt).map_err(kernel_err)?;
                    let mut d = scratch::output(n * i);
                    transpose(&dxt, i, n, &mut d);
                    dx = Some(Tensor::from_vec(d, (n, i), x.device())?);
                }
                with_f32(x, SPARSE_LINEAR, |xs| {
                    let mut xt = scratch::output(n * i);
                    transpose(xs, n, i, &mut xt);
                    sddmm_into(&st.matrix, &dyt, &xt, n, &mut vals).map_err(kernel_err)
                })?;
            }
            st.add_compact_grad(vals);
            return Ok((dx, None, db));
        }
        if rows {
            let dx = if x.track_op() {
                let mut dx = scratch::output(n * i);
                spmm_t_rows(&st.matrix, dy, n, &mut dx).map_err(kernel_err)?;
                Some(Tensor::from_vec(dx, (n, i), x.device())?)
            } else {
                None
            };
            let dw = if w.track_op() {
                let mut dw = scratch::output(o * i);
                with_f32(x, SPARSE_LINEAR, |xs| {
                    if st.dense_grad {
                        linear_bwd_weight(dy, xs, n, i, o, &mut dw);
                    } else {
                        let mut vals = scratch::output(st.matrix.nnz());
                        sddmm_rows(&st.matrix, dy, xs, n, &mut vals).map_err(kernel_err)?;
                        st.matrix
                            .scatter_to_dense(&vals, &mut dw)
                            .map_err(kernel_err)?;
                    }
                    Ok(())
                })?;
                Some(Tensor::from_vec(dw, (o, i), w.device())?)
            } else {
                None
            };
            return Ok((dx, dw, db));
        }
        let mut dyt = scratch::output(o * n);
        transpose(dy, n, o, &mut dyt);
        let dx = if x.track_op() {
            let mut dxt = scratch::output(i * n);
            spmm_t(&st.matrix, &dyt, n, &mut dxt).map_err(kernel_err)?;
            let mut dx = scratch::output(n * i);
            transpose(&dxt, i, n, &mut dx);
            Some(Tensor::from_vec(dx, (n, i), x.device())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let mut dw = scratch::output(o * i);
            with_f32(x, SPARSE_LINEAR, |xs| {
                if st.dense_grad {
                    linear_bwd_weight(dy, xs, n, i, o, &mut dw);
                } else {
                    let mut xt = scratch::output(n * i);
                    transpose(xs, n, i, &mut xt);
                    scatter_dense_grad(&st.matrix, &dyt, &xt, n, &mut dw).map_err(kernel_err)?;
                }
                Ok(())
            })?;
            Some(Tensor::from_vec(dw, (o, i), w.device())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// `y[n][o] += b[o]` (the same single rounding as candle's `broadcast_add`).
fn add_bias(y: &mut [f32], b: Option<&[f32]>) {
    if let Some(b) = b {
        for row in y.chunks_exact_mut(b.len().max(1)) {
            row.iter_mut().zip(b).for_each(|(v, &bv)| *v += bv);
        }
    }
}

impl LinearKernel for SparseLinearOp {
    const NAMES: [&'static str; 2] = [SPARSE_LINEAR, "rest-sparse-linear-bias"];

    fn fwd(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(x, w, b)
    }

    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Grads> {
        self.all_grads(x, w, b, res, grad)
    }
}

/// Whether a sparse linear layer on batch-major activations (the classifier heads after
/// pooling; the MLP runs feature-major, see `linear_fm`) runs the batch-major kernels
/// (`spmm_rows`, ...) rather than transposing its activations for the feature-major ones:
/// their `N·nnz` indexed multiply-adds beat the transposes (`N·(I + O)` scattered moves each
/// way) up to about `nnz = 4 (I + O)` (measured on the MLP's layers when it ran batch-major).
fn rows_path(nnz: usize, i: usize, o: usize) -> bool {
    nnz <= ROWS_PATH_NNZ_PER_DIM * (i + o)
}

/// See [`rows_path`].
const ROWS_PATH_NNZ_PER_DIM: usize = 4;

/// Sparse `y = x W^T` for `x` `[N, I]`, `w` `[O, I]` with `weight`'s pattern (no bias: see
/// [`sparse_linear_bias`]). Differentiable in `x` and `w`.
pub fn sparse_linear(x: &Tensor, w: &Tensor, weight: &Arc<SparseWeight>) -> Result<Tensor> {
    sparse_linear_bias(x, w, None, weight)
}

/// Sparse `y = x W^T + b` for `x` `[N, I]`, `w` `[O, I]` with `weight`'s pattern and an
/// optional bias `b` `[O]`, added in the same op. Differentiable in `x`, `w` and `b`.
pub fn sparse_linear_bias(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    weight: &Arc<SparseWeight>,
) -> Result<Tensor> {
    sparse_linear_act(x, w, b, false, true, weight)
}

/// [`sparse_linear_bias`], followed by a ReLU in the same op when `relu`:
/// `relu(x W^T + b)`, the hidden layer of an MLP in one op (forward and backward). With
/// `train`, a backward pass is expected: the forward pass then keeps its input packed at the
/// active input features for the weight gradient (no second gather from the input); without
/// it, the result and any gradients are the same, only slower to get.
pub fn sparse_linear_act(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    relu: bool,
    train: bool,
    weight: &Arc<SparseWeight>,
) -> Result<Tensor> {
    if super::generic_path(x) {
        let _ = weight;
        let y = super::generic::linear(x, w, b)?;
        return Ok(if relu { y.relu()? } else { y });
    }
    let x = prepare(x, 2, "sparse_linear input x [N, I]")?;
    let w = prepare(w, 2, "sparse_linear weight w [O, I]")?;
    let (n, i) = x.dims2()?;
    let (o, wi) = w.dims2()?;
    if wi != i {
        bail!(
            "sparse_linear: weight {:?} expects {wi} inputs, x {:?} has {i}",
            w.dims(),
            x.dims()
        );
    }
    let keep_pack = {
        let mut st = weight.lock();
        if st.matrix.rows() != o || st.matrix.cols() != i {
            bail!(
                "sparse_linear: the sparse pattern is {}x{}, the weight is {o}x{i}",
                st.matrix.rows(),
                st.matrix.cols()
            );
        }
        if w.track_op() {
            // A new graph: a compact gradient not taken since the last one is stale.
            st.grad = None;
        }
        train
            && w.track_op()
            && st.compact_grad
            && !st.dense_grad
            && rows_path(st.matrix.nnz(), i, o)
    };
    let op = SparseLinearOp {
        n,
        i,
        o,
        weight: weight.clone(),
        relu,
        keep_pack,
        pack: Mutex::new(None),
    };
    linear_op::apply(&x, &w, b, o, op, "sparse_linear", Keep::ALL)
}

/// The weight gradient at the active positions (SDDMM), scattered into a dense buffer that is
/// zero elsewhere: `dw[r, k] = dot(dy[r, :], x[k, :])` for active (r, k).
fn scatter_dense_grad(
    m: &SparseMatrix,
    dy: &[f32],
    x: &[f32],
    p: usize,
    dw: &mut [f32],
) -> Result<(), rest_kernels::sparse::SparseError> {
    let mut vals = scratch::output(m.nnz());
    sddmm_into(m, dy, x, p, &mut vals)?;
    m.scatter_to_dense(&vals, dw)
}
