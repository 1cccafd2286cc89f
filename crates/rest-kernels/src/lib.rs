//! Dense (and, in `sparse*` modules, sparse) CPU compute kernels for `rest`, on plain `f32`
//! slices with no tensor library attached.
//!
//! Activations between convolution, batch-norm and pooling layers are laid out **CNHW**
//! (`x[c][n][h][w]`): a convolution over the whole batch is then one GEMM
//! `out[OC][N*OH*OW] = W[OC][C*KH*KW] x col[C*KH*KW][N*OH*OW]` whose result is again CNHW, and
//! per-channel batch-norm statistics run over one contiguous row. Weights keep PyTorch's
//! `[OC, IC, KH, KW]` layout.
//!
//! Modules are named by what they compute: `conv`/`im2col`/`gather` (dense convolution),
//! `linear`, `batchnorm`, `pool`, `sparse` (CSR products and the sparse convolution),
//! `conv_stack` (the batch-innermost inference of a conv stack, dense or sparse layers),
//! `layout` (transposes and layout gathers), `isa` (the one instruction-set choice every
//! kernel follows).
//!
//! Conventions: every kernel overwrites its output unless its doc says it accumulates
//! (`col2im`, `max_pool2d_bwd`, ...). Slice lengths are checked with `assert!`: a mismatch is a
//! bug in the caller, never a user-input error (callers validate user shapes first).

pub mod batchnorm;
pub mod conv;
pub mod conv_stack;
pub mod gather;
pub mod im2col;
pub mod isa;
pub mod layout;
pub mod linear;
pub mod pool;
pub mod sparse;
mod stem;
pub mod util;

pub use batchnorm::{
    batch_norm_bwd, batch_norm_eval, batch_norm_train_fwd, channel_affine, channel_affine_inplace,
    update_running_stats, BnBatchStats, BN_EPS, BN_MOMENTUM,
};
pub use conv::{
    conv2d_bwd_input, conv2d_bwd_weight, conv2d_bwd_weight_col, conv2d_fwd, conv2d_fwd_affine,
    conv2d_fwd_affine_maxpool, conv2d_fwd_col, needs_im2col,
};
pub use conv_stack::{
    conv_stack_group_len, conv_stack_pool, ConvStackLayer, ConvStackPlan, ConvStackWeights,
};
pub use im2col::{col2im, im2col, Conv2dGeom};
pub use isa::Isa;
pub use layout::{chwn_to_cnhw, cnhw_to_chwn, transpose};
pub use linear::{
    bias_act_fm, linear_bwd_bias, linear_bwd_bias_fm, linear_bwd_input, linear_bwd_input_fm,
    linear_bwd_weight, linear_bwd_weight_fm, linear_fwd, linear_fwd_fm, output_grad_fm,
};
pub use pool::{
    global_avg_pool_bwd, global_avg_pool_fwd, max_pool2d_bwd, max_pool2d_fwd, MaxPool2dGeom,
};
