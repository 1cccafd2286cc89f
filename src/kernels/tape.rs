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
//! Use:
//! ```ignore
//! let guard = tape::start();
//! let logits = model.forward(&x, true)?;
//! let rec = guard.finish(logits)?;
//! let loss = loss_fn(rec.head())?; // candle ops on the logits
//! let grads = rec.backward(&loss)?; // parameter gradients, as from `loss.backward()`
//! ```

use candle_core::backprop::GradStore;
use candle_core::{CustomOp1, CustomOp2, CustomOp3, Tensor, TensorId, Var};
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

/// One recorded op: its arguments and its output.
struct Entry {
    op: OpRef,
    args: Vec<Tensor>,
    out: Tensor,
}

#[derive(Default)]
struct State {
    entries: Vec<Entry>,
    outputs: HashSet<TensorId>,
    /// Why the record cannot replace candle's backward (first reason found).
    broken: Option<String>,
}

thread_local! {
    static ACTIVE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Starts recording on this thread; recording stops when the guard is finished or dropped.
/// A recording already running on this thread is discarded (its step then uses candle's
/// backward).
/// With the environment variable `REST_BACKWARD=candle`, nothing is recorded and every step
/// runs candle's backward (for comparisons).
pub fn start() -> TapeGuard {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| {
        std::env::var("REST_BACKWARD").is_ok_and(|v| v.eq_ignore_ascii_case("candle"))
    });
    ACTIVE.with(|a| *a.borrow_mut() = (!off).then(State::default));
    TapeGuard { _private: () }
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
            let Some(g) = inner.remove(&e.out.id()) else {
                continue;
            };
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
            for (arg, g) in e.args.iter().zip(gs) {
                let Some(g) = g else { continue };
                if state.outputs.contains(&arg.id()) {
                    accumulate_map(&mut inner, arg.id(), g)?;
                } else if arg.is_variable() {
                    let sum = match grads.remove(arg) {
                        Some(prev) => prev.add(&g)?,
                        None => g,
                    };
                    grads.insert(arg, sum);
                } else if arg.track_op() {
                    match derived.iter_mut().find(|(t, _)| t.id() == arg.id()) {
                        Some((_, prev)) => *prev = prev.add(&g)?,
                        None => derived.push((arg.clone(), g)),
                    }
                }
                // Untracked arguments (input images, constants) take no gradient.
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

fn record(op: OpRef, args: &[&Tensor], out: &Tensor) {
    ACTIVE.with(|a| {
        let mut a = a.borrow_mut();
        let Some(st) = a.as_mut() else { return };
        if st.broken.is_some() {
            return;
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
                    return;
                }
            }
        }
        st.outputs.insert(out.id());
        st.entries.push(Entry {
            op,
            args: args.iter().map(|t| (*t).clone()).collect(),
            out: out.clone(),
        });
    })
}

fn op_name(op: &OpRef) -> &'static str {
    match op {
        OpRef::One(o) => o.name(),
        OpRef::Two(o) => o.name(),
        OpRef::Three(o) => o.name(),
    }
}

fn tracked(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// `x.apply_op1(op)` when `x` tracks gradients (recorded on the tape if one is running),
/// else without a backward pass.
pub(crate) fn op1<C: CustomOp1 + Send + Sync + 'static>(
    x: &Tensor,
    op: C,
) -> candle_core::Result<Tensor> {
    if !tracked(&[x]) {
        return x.apply_op1_no_bwd(&op);
    }
    let op: Op1 = Arc::new(Box::new(op));
    let y = x.apply_op1_arc(op.clone())?;
    if is_recording() {
        record(OpRef::One(op), &[x], &y);
    }
    Ok(y)
}

/// [`op1`] for two-argument ops.
pub(crate) fn op2<C: CustomOp2 + Send + Sync + 'static>(
    x: &Tensor,
    a: &Tensor,
    op: C,
) -> candle_core::Result<Tensor> {
    if !tracked(&[x, a]) {
        return x.apply_op2_no_bwd(a, &op);
    }
    let op: Op2 = Arc::new(Box::new(op));
    let y = x.apply_op2_arc(a, op.clone())?;
    if is_recording() {
        record(OpRef::Two(op), &[x, a], &y);
    }
    Ok(y)
}

/// [`op1`] for three-argument ops.
pub(crate) fn op3<C: CustomOp3 + Send + Sync + 'static>(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    op: C,
) -> candle_core::Result<Tensor> {
    if !tracked(&[x, a, b]) {
        return x.apply_op3_no_bwd(a, b, &op);
    }
    let op: Op3 = Arc::new(Box::new(op));
    let y = x.apply_op3_arc(a, b, op.clone())?;
    if is_recording() {
        record(OpRef::Three(op), &[x, a, b], &y);
    }
    Ok(y)
}
