//! The tape: a record of the custom ops of one training forward pass, replayed in reverse for
//! the backward pass instead of candle's `Tensor::backward`.
//!
//! Candle's backward zero-fills a gradient buffer for every tensor it reaches and adds each
//! incoming gradient to it (`GradStore::or_insert` + `add`): two extra passes over every
//! activation gradient and every weight gradient of a step. The ops of our models are all
//! custom ops with their own `bwd`, so the backward pass is just those calls in reverse
//! order: the tape makes them, moves the first gradient of a tensor in place and adds only
//! where a tensor has several consumers (residual joins), and drops each op's saved tensors as
//! soon as its backward has run.
//!
//! The forward pass is unchanged: ops still build candle's graph, and the tape is only used
//! when it is complete, which [`TapeGuard::finish`] checks: the model output must come from a
//! recorded op, and no recorded op may take an input that candle ops computed from a recorded
//! output (that gradient would bypass the tape). Otherwise (a model with a non-custom layer,
//! the generic GPU path) the step falls back to candle's backward with the same result.
//! Inputs that candle ops computed from parameters only (e.g. `cat(gamma, beta)`) are fine:
//! their gradients go back through candle in one small pass at the end.
//!
//! A *lean* recording ([`start_lean`], what training uses) also keeps memory down: each
//! recorded op's output is a fresh graph-less tensor (a candle variable, so that later ops
//! still see a tensor that takes part in autograd), so candle builds no graph over the
//! activations and the tape holds the only references; and each entry keeps only the
//! tensors its op's backward reads ([`Keep`]), the others replaced by shape-only stand-ins.
//! An activation no backward needs (a residual branch's normalised output, the ResNet stem's
//! output that only max pooling reads) is freed as soon as the next op has run. With no graph
//! there is nothing to fall back to: a lean recording that is incomplete (a candle op between
//! recorded ops) is an error, not a silent fallback; models are tested to be complete.
//!
//! Use:
//! ```ignore
//! let guard = tape::start();
//! let logits = model.forward(&x, true)?;
//! let rec = guard.finish(logits)?;
//! let loss = loss_fn(rec.head())?; // candle ops on the logits
//! let grads = rec.backward(&loss)?; // parameter gradients, as from `loss.backward()`
//! ```

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Storage, Tensor, TensorId, Var};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

type Op1 = Arc<Box<dyn CustomOp1 + Send + Sync>>;
type Op2 = Arc<Box<dyn CustomOp2 + Send + Sync>>;
type Op3 = Arc<Box<dyn CustomOp3 + Send + Sync>>;

enum OpRef {
    One(Op1),
    Two(Op2),
    Three(Op3),
}

/// Which of its tensors an op's backward pass reads: the arguments (bit `i` for argument `i`)
/// and the output. In a lean recording the others are kept as shape-only stand-ins (same
/// shape, device, dtype and gradient tracking, one element of storage).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Keep {
    args: u8,
    out: bool,
}

impl Keep {
    /// Every argument and the output.
    pub(crate) const ALL: Keep = Keep {
        args: u8::MAX,
        out: true,
    };

    /// The arguments whose bits are set in `args`, and the output if `out`.
    pub(crate) const fn only(args: u8, out: bool) -> Keep {
        Keep { args, out }
    }

    fn arg(self, i: usize) -> bool {
        self.args & (1 << i) != 0
    }
}

/// Where the gradient of a recorded op's argument goes.
enum Route {
    /// Another recorded op's output (by id).
    Output(TensorId),
    /// A variable (a parameter): into the gradient store.
    Variable(Tensor),
    /// Computed by candle ops from parameters: the surrogate pass at the end.
    Derived(Tensor),
    /// No gradient (input data, constants).
    None,
}

/// One recorded op: its arguments (stand-ins for those its backward does not read), where
/// their gradients go, and its output.
struct Entry {
    op: OpRef,
    args: Vec<Tensor>,
    routes: Vec<Route>,
    out_id: TensorId,
    out: Tensor,
}

#[derive(Default)]
struct State {
    entries: Vec<Entry>,
    outputs: HashSet<TensorId>,
    /// Why the record cannot replace candle's backward (first reason found).
    broken: Option<String>,
    /// Lean recording (see the module docs).
    lean: bool,
    /// Whether a lean output (a graph-less tensor) was made: candle's backward can then no
    /// longer stand in.
    lean_outputs: bool,
}

thread_local! {
    static ACTIVE: RefCell<Option<State>> = const { RefCell::new(None) };
    static NO_GRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Until the guard drops, this thread's custom ops build no autograd graph, whatever their
/// inputs (PyTorch's `no_grad`): for inference passes, where candle would otherwise link every
/// activation to the logits through the graph and keep a whole batch's activations alive (as
/// much memory as a training step) until the logits are dropped.
pub fn no_grad() -> NoGradGuard {
    NoGradGuard {
        prev: NO_GRAD.with(|n| n.replace(true)),
    }
}

/// Restores the previous gradient mode when dropped (see [`no_grad`]).
pub struct NoGradGuard {
    prev: bool,
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        NO_GRAD.with(|n| n.set(self.prev));
    }
}

fn grad_off() -> bool {
    NO_GRAD.with(|n| n.get())
}

/// Starts recording on this thread; recording stops when the guard is finished or dropped.
/// A recording already running on this thread is discarded (its step then uses candle's
/// backward).
/// With the environment variable `REST_BACKWARD=candle`, nothing is recorded and every step
/// runs candle's backward (for comparisons).
pub fn start() -> TapeGuard {
    start_with(false)
}

/// [`start`], recording leanly (see the module docs): less memory, and an incomplete
/// recording is an error from [`TapeGuard::finish`] instead of a fallback to candle.
pub fn start_lean() -> TapeGuard {
    start_with(true)
}

fn start_with(lean: bool) -> TapeGuard {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| {
        std::env::var("REST_BACKWARD").is_ok_and(|v| v.eq_ignore_ascii_case("candle"))
    });
    ACTIVE.with(|a| {
        *a.borrow_mut() = (!off).then(|| State {
            lean,
            ..State::default()
        })
    });
    TapeGuard { _private: () }
}

/// Whether this thread is recording leanly.
fn is_lean() -> bool {
    ACTIVE.with(|a| a.borrow().as_ref().is_some_and(|s| s.lean))
}

/// Whether this thread is recording.
pub fn is_recording() -> bool {
    ACTIVE.with(|a| a.borrow().is_some())
}

/// The recording of one forward pass in progress (see [`start`]).
pub struct TapeGuard {
    _private: (),
}

impl Drop for TapeGuard {
    fn drop(&mut self) {
        ACTIVE.with(|a| *a.borrow_mut() = None);
    }
}

impl TapeGuard {
    /// Stops recording. `logits` is the model output the loss will be computed from.
    pub fn finish(self, logits: Tensor) -> candle_core::Result<Recorded> {
        let state = ACTIVE.with(|a| a.borrow_mut().take());
        drop(self);
        if let Some(s) = &state {
            if s.lean_outputs && (s.broken.is_some() || !s.outputs.contains(&logits.id())) {
                candle_core::bail!(
                    "internal error: the model's training forward pass is not fully recorded \
                     on the tape ({}), and a lean recording cannot fall back to candle's \
                     backward; set REST_BACKWARD=candle to train this model",
                    s.broken
                        .as_deref()
                        .unwrap_or("the model output is not the output of a recorded op")
                );
            }
        }
        let reason = match &state {
            None => Some(
                "nothing was recorded (REST_BACKWARD=candle, or a nested recording)".to_string(),
            ),
            Some(s) if s.broken.is_some() => s.broken.clone(),
            Some(s) if !s.outputs.contains(&logits.id()) => {
                Some("the model output is not the output of a recorded op".to_string())
            }
            Some(_) => None,
        };
        match (state, reason) {
            (Some(state), None) => {
                // The loss is computed on a detached copy: candle's backward stops there and
                // hands its gradient to the tape.
                let head = Var::from_tensor(&logits.detach())?.as_tensor().clone();
                Ok(Recorded {
                    head,
                    backward: Backward::Tape(state, logits.id()),
                })
            }
            (_, reason) => Ok(Recorded {
                head: logits,
                backward: Backward::Candle(reason.unwrap_or_default()),
            }),
        }
    }
}

/// How a [`Recorded`] step runs its backward pass.
enum Backward {
    /// The tape, from the gradient of the logits (their id).
    Tape(State, TensorId),
    /// Candle's backward, for the reason given.
    Candle(String),
}

/// A finished recording: compute the loss from [`Recorded::head`], then call
/// [`Recorded::backward`].
pub struct Recorded {
    head: Tensor,
    backward: Backward,
}

impl Recorded {
    /// The tensor to compute the loss from: the model output (detached when the tape runs the
    /// backward pass, so candle's backward stops at it).
    pub fn head(&self) -> &Tensor {
        &self.head
    }

    /// Why the backward pass falls back to candle's (`None` when the tape runs it).
    pub fn fallback_reason(&self) -> Option<&str> {
        match &self.backward {
            Backward::Tape(..) => None,
            Backward::Candle(why) => Some(why),
        }
    }

    /// The gradients of `loss` (computed from [`Self::head`]) with respect to every variable,
    /// as `loss.backward()` on the undetached graph would give them.
    pub fn backward(self, loss: &Tensor) -> candle_core::Result<GradStore> {
        let mut grads = loss.backward()?;
        let Backward::Tape(mut state, logits_id) = self.backward else {
            return Ok(grads);
        };
        let Some(g) = grads.remove(&self.head) else {
            return Ok(grads);
        };
        drop(self.head);
        let mut inner: HashMap<TensorId, Tensor> = HashMap::new();
        inner.insert(logits_id, g);
        let mut derived: Vec<(Tensor, Tensor)> = Vec::new();
        while let Some(e) = state.entries.pop() {
            let Some(g) = inner.remove(&e.out_id) else {
                continue;
            };
            let t0 = super::profile::enabled().then(std::time::Instant::now);
            let gs = match &e.op {
                OpRef::One(op) => vec![op.bwd(&e.args[0], &e.out, &g)?],
                OpRef::Two(op) => {
                    let (a, b) = op.bwd(&e.args[0], &e.args[1], &e.out, &g)?;
                    vec![a, b]
                }
                OpRef::Three(op) => {
                    let (a, b, c) = op.bwd(&e.args[0], &e.args[1], &e.args[2], &e.out, &g)?;
                    vec![a, b, c]
                }
            };
            drop(g);
            if let Some(t0) = t0 {
                super::profile::add_backward(op_name(&e.op), e.out.dims(), t0.elapsed());
            }
            let Entry { args, routes, .. } = e;
            drop(args);
            for (route, g) in routes.into_iter().zip(gs) {
                let Some(g) = g else { continue };
                match route {
                    Route::Output(id) => accumulate_map(&mut inner, id, g)?,
                    Route::Variable(v) => {
                        let sum = match grads.remove(&v) {
                            Some(prev) => prev.add(&g)?,
                            None => g,
                        };
                        grads.insert(&v, sum);
                    }
                    Route::Derived(t) => match derived.iter_mut().find(|(d, _)| d.id() == t.id()) {
                        Some((_, prev)) => *prev = prev.add(&g)?,
                        None => derived.push((t, g)),
                    },
                    // Untracked arguments (input images, constants) take no gradient.
                    Route::None => {}
                }
            }
        }
        if !derived.is_empty() {
            // Inputs computed by candle ops from parameters: one surrogate backward,
            // d/dθ Σ <t(θ), g> = (dt/dθ)^T g.
            let mut s: Option<Tensor> = None;
            for (t, g) in &derived {
                let term = t.mul(&g.detach())?.sum_all()?;
                s = Some(match s {
                    Some(s) => s.add(&term)?,
                    None => term,
                });
            }
            if let Some(s) = s {
                grads.extend(s.backward()?)?;
            }
        }
        Ok(grads)
    }
}

fn accumulate_map(
    map: &mut HashMap<TensorId, Tensor>,
    id: TensorId,
    g: Tensor,
) -> candle_core::Result<()> {
    let sum = match map.remove(&id) {
        Some(prev) => prev.add(&g)?,
        None => g,
    };
    map.insert(id, sum);
    Ok(())
}

/// Records `op` (arguments `args`, output `out`) on this thread's tape; `lean_out` says that
/// `out` is a graph-less lean output.
fn record(
    op: OpRef,
    args: &[&Tensor],
    out: &Tensor,
    keep: Keep,
    lean_out: bool,
) -> candle_core::Result<()> {
    ACTIVE.with(|a| {
        let mut a = a.borrow_mut();
        let Some(st) = a.as_mut() else { return Ok(()) };
        st.lean_outputs |= lean_out;
        if st.broken.is_some() {
            return Ok(());
        }
        for arg in args {
            if arg.track_op() && !arg.is_variable() && !st.outputs.contains(&arg.id()) {
                // Computed by candle ops: fine from parameters only, not from recorded outputs.
                let from_record = arg
                    .sorted_nodes()
                    .iter()
                    .any(|n| st.outputs.contains(&n.id()));
                if from_record {
                    st.broken = Some(format!(
                        "an input of op `{}` was computed by candle ops from a recorded output",
                        op_name(&op)
                    ));
                    return Ok(());
                }
            }
        }
        let routes = args
            .iter()
            .map(|t| {
                if st.outputs.contains(&t.id()) {
                    Route::Output(t.id())
                } else if t.is_variable() {
                    Route::Variable((*t).clone())
                } else if t.track_op() {
                    Route::Derived((*t).clone())
                } else {
                    Route::None
                }
            })
            .collect();
        let lean = st.lean;
        let kept = |t: &Tensor, read: bool| {
            if read || !lean {
                Ok(t.clone())
            } else {
                stand_in(t)
            }
        };
        let args = args
            .iter()
            .enumerate()
            .map(|(i, t)| kept(t, keep.arg(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        st.outputs.insert(out.id());
        st.entries.push(Entry {
            op,
            args,
            routes,
            out_id: out.id(),
            out: kept(out, keep.out)?,
        });
        Ok(())
    })
}

/// A tensor with `t`'s shape, dtype, device and gradient tracking, holding one element (a
/// broadcast zero): what an op's backward receives for a tensor it does not read.
fn stand_in(t: &Tensor) -> candle_core::Result<Tensor> {
    let z = Tensor::zeros((), t.dtype(), t.device())?;
    let z = if t.track_op() {
        Var::from_tensor(&z)?.as_tensor().clone()
    } else {
        z
    };
    z.broadcast_as(t.shape())
}

/// The output of a custom op computed on the CPU storages of its arguments, as a fresh
/// variable without a graph (lean recording), or `None` when an argument is not on the CPU
/// or the result is not `f32` (the op then runs through candle as usual).
fn lean_forward(
    args: &[&Tensor],
    fwd: impl FnOnce(
        &[(&CpuStorage, &candle_core::Layout)],
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)>,
) -> candle_core::Result<Option<Tensor>> {
    let guards: Vec<_> = args.iter().map(|t| t.storage_and_layout()).collect();
    let mut cpu = Vec::with_capacity(args.len());
    for (s, l) in &guards {
        match &**s {
            Storage::Cpu(c) => cpu.push((c, *l)),
            _ => return Ok(None),
        }
    }
    let (out, shape) = fwd(&cpu)?;
    drop(cpu);
    drop(guards);
    match out {
        CpuStorage::F32(v) => Ok(Some(
            Var::from_vec(v, shape, args[0].device())?
                .as_tensor()
                .clone(),
        )),
        _ => Ok(None),
    }
}

/// Runs a tracked custom op while recording: leanly through `cpu_fwd` when the recording is
/// lean and the arguments are on the CPU, else through candle (`candle_fwd`, which builds
/// the graph); then records it.
fn apply_recorded(
    op: OpRef,
    args: &[&Tensor],
    keep: Keep,
    cpu_fwd: impl FnOnce(
        &[(&CpuStorage, &candle_core::Layout)],
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)>,
    candle_fwd: impl FnOnce() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let t0 = super::profile::enabled().then(std::time::Instant::now);
    let lean = match is_lean() {
        true => lean_forward(args, cpu_fwd)?,
        false => None,
    };
    let lean_out = lean.is_some();
    let y = match lean {
        Some(y) => y,
        None => candle_fwd()?,
    };
    if let Some(t0) = t0 {
        super::profile::add_forward(op_name(&op), y.dims(), t0.elapsed());
    }
    record(op, args, &y, keep, lean_out)?;
    Ok(y)
}

fn op_name(op: &OpRef) -> &'static str {
    match op {
        OpRef::One(o) => o.name(),
        OpRef::Two(o) => o.name(),
        OpRef::Three(o) => o.name(),
    }
}

/// Runs an op outside a recording (inference, or no tape), its time added to the profile
/// when one is being collected.
fn untracked(
    name: &str,
    f: impl FnOnce() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    if !super::profile::enabled() {
        return f();
    }
    let t0 = std::time::Instant::now();
    let y = f()?;
    super::profile::add_forward(name, y.dims(), t0.elapsed());
    Ok(y)
}

fn tracked(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// `x.apply_op1(op)` when `x` tracks gradients (recorded on the tape if one is running),
/// else without a backward pass. The op's backward reads every tensor.
pub(crate) fn op1<C: CustomOp1 + Send + Sync + 'static>(
    x: &Tensor,
    op: C,
) -> candle_core::Result<Tensor> {
    op1_keep(x, op, Keep::ALL)
}

/// [`op1`] for an op whose backward reads only the tensors in `keep`.
pub(crate) fn op1_keep<C: CustomOp1 + Send + Sync + 'static>(
    x: &Tensor,
    op: C,
    keep: Keep,
) -> candle_core::Result<Tensor> {
    if grad_off() || !tracked(&[x]) {
        return untracked(op.name(), || x.apply_op1_no_bwd(&op));
    }
    let op: Op1 = Arc::new(Box::new(op));
    if !is_recording() {
        let name = op.name();
        return untracked(name, || x.apply_op1_arc(op));
    }
    apply_recorded(
        OpRef::One(op.clone()),
        &[x],
        keep,
        |s| op.cpu_fwd(s[0].0, s[0].1),
        || x.apply_op1_arc(op.clone()),
    )
}

/// [`op1`] for two-argument ops.
pub(crate) fn op2<C: CustomOp2 + Send + Sync + 'static>(
    x: &Tensor,
    a: &Tensor,
    op: C,
) -> candle_core::Result<Tensor> {
    op2_keep(x, a, op, Keep::ALL)
}

/// [`op2`] for an op whose backward reads only the tensors in `keep`.
pub(crate) fn op2_keep<C: CustomOp2 + Send + Sync + 'static>(
    x: &Tensor,
    a: &Tensor,
    op: C,
    keep: Keep,
) -> candle_core::Result<Tensor> {
    if grad_off() || !tracked(&[x, a]) {
        return untracked(op.name(), || x.apply_op2_no_bwd(a, &op));
    }
    let op: Op2 = Arc::new(Box::new(op));
    if !is_recording() {
        let name = op.name();
        return untracked(name, || x.apply_op2_arc(a, op));
    }
    apply_recorded(
        OpRef::Two(op.clone()),
        &[x, a],
        keep,
        |s| op.cpu_fwd(s[0].0, s[0].1, s[1].0, s[1].1),
        || x.apply_op2_arc(a, op.clone()),
    )
}

/// [`op1`] for three-argument ops.
pub(crate) fn op3<C: CustomOp3 + Send + Sync + 'static>(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    op: C,
) -> candle_core::Result<Tensor> {
    op3_keep(x, a, b, op, Keep::ALL)
}

/// [`op3`] for an op whose backward reads only the tensors in `keep`.
pub(crate) fn op3_keep<C: CustomOp3 + Send + Sync + 'static>(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    op: C,
    keep: Keep,
) -> candle_core::Result<Tensor> {
    if grad_off() || !tracked(&[x, a, b]) {
        return untracked(op.name(), || x.apply_op3_no_bwd(a, b, &op));
    }
    let op: Op3 = Arc::new(Box::new(op));
    if !is_recording() {
        let name = op.name();
        return untracked(name, || x.apply_op3_arc(a, b, op));
    }
    apply_recorded(
        OpRef::Three(op.clone()),
        &[x, a, b],
        keep,
        |s| op.cpu_fwd(s[0].0, s[0].1, s[1].0, s[1].1, s[2].0, s[2].1),
        || x.apply_op3_arc(a, b, op.clone()),
    )
}
