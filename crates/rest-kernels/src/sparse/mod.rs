//! Sparse CPU kernels that make dynamic sparse training pay in wall-clock time.
//!
//! Public DST code multiplies dense weights by a 0/1 mask, so a 99 %-sparse network costs as
//! much as a dense one. Here a masked weight is stored as a [`SparseMatrix`] (CSR over output
//! rows, plus the CSR of its transpose) and the three products of a training step touch only
//! the active weights:
//!
//! | step            | product               | kernel     |
//! |-----------------|-----------------------|------------|
//! | forward         | `out[R][P] = W x`     | [`spmm`]   |
//! | input gradient  | `dx[K][P] = Wᵀ dy`    | [`spmm_t`] |
//! | weight gradient | `dW[r,k] = dy[r]·x[k]` at active `(r,k)` only | [`sddmm`] |
//!
//! # Layout
//! Every dense operand is a row-major `[rows][P]` matrix whose rows are long and contiguous:
//! * **Convolution** (CNHW activations): `x` is the im2col matrix `col[K = IC·KH·KW][P = N·OH·OW]`
//!   and `out[OC][P]` is already the CNHW output.
//! * **Linear layer** `y[N,O] = x[N,I] Wᵀ`: keep activations *feature-major*, `xT[I][N]`, so
//!   that `yT[O][N] = W xT` is the same product with `P = N` (the batch). This is the fast
//!   choice: every nonzero then streams a contiguous batch row with vector FMAs, whereas the
//!   `[N][I]` layout would need a gather per nonzero per sample. Stacked sparse linear layers
//!   stay feature-major end to end; use [`crate::layout::transpose`] only at the boundaries.
//!
//! # Speed
//! The kernels are parallel with rayon (over column blocks, which keeps one pass over `x`,
//! or over nnz-balanced row blocks when `P` is short) and dispatch at run time to AVX-512,
//! AVX2+FMA or portable inner loops, as [`crate::isa`] says (`REST_ISA=avx512|avx2|portable`
//! forces a lower level for debugging or timing).
//! Columns are swept in cache tiles whose `x` slab (`K` rows x tile width) fits in L2; when
//! `K` is large and each `x` row is reused (`nnz >= 2K`), the slab is first copied into a
//! contiguous per-thread buffer (rows of a long `[K][P]` matrix are a page apart each, which
//! defeats the TLB and the hardware prefetcher). Output rows are written contiguously, so
//! `spmm_t` at very low density is bounded by writing the dense `[K][P]` result.
//! Results do not depend on scheduling; they can differ in the last bits between instruction
//! sets and between machines with different thread counts (`sddmm` sums column blocks).
//!
//! `benches/sparse.rs` compares them against dense GEMM (timings: README, Speed).

mod conv;
mod hwn;
mod kernels;
mod matrix;
mod phase;
mod rows;
mod simd;

pub use conv::SparseConv;
pub use hwn::{hwn_plane_stride, HwnConv};
pub use kernels::{sddmm, sddmm_into, spmm, spmm_t};
pub use matrix::{MaskValue, SparseMatrix};
pub use rows::{
    pack_rows, packed_len, sddmm_packed, sddmm_rows, spmm_rows, spmm_rows_fused, spmm_t_rows, LANES,
};

use std::fmt;

/// Error returned when a sparse matrix or a kernel operand has an inconsistent shape.
///
/// The message names the operand and the expected size, e.g.
/// `sparse spmm: x has 100 elements, expected K*P = 48*3 = 144 (x is row-major [K][P])`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseError {
    message: String,
}

impl SparseError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The human-readable description of what is wrong and what to pass instead.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for SparseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SparseError {}

/// Checks `len == rows * cols` for the operand `what` of kernel `op`.
pub(crate) fn check_len(
    op: &str,
    what: &str,
    layout: &str,
    len: usize,
    rows: usize,
    cols: usize,
) -> Result<(), SparseError> {
    match rows.checked_mul(cols) {
        Some(n) if n == len => Ok(()),
        Some(n) => Err(SparseError::new(format!(
            "sparse {op}: {what} has {len} elements, expected {rows}*{cols} = {n} \
             ({what} is row-major {layout})"
        ))),
        None => Err(SparseError::new(format!(
            "sparse {op}: {what} shape {rows}x{cols} overflows usize"
        ))),
    }
}
