//! Which kernel a masked layer runs on (`--kernels`): the sparse kernels, or the dense ones
//! with the mask multiplied in, decided per layer from its density.

use serde::{Deserialize, Serialize};

/// Which kernel a sparse layer runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum KernelMode {
    /// Sparse kernels for convolutions at or below `AUTO_SPARSE_MAX_DENSITY` and for linear
    /// layers at or below `AUTO_SPARSE_LINEAR_MAX_DENSITY`, dense kernels above.
    Auto,
    /// Dense kernels with the mask multiplied in (what public DST code does).
    Dense,
    /// Sparse kernels for every layer that is not fully dense.
    Sparse,
}

/// Layer density at or below which `--kernels auto` runs a convolution on the sparse
/// kernels: the crossover of the sparse and dense training step, as `rest bench --kernels
/// sparse|dense` measures it at several densities (the README's Speed section has the
/// figures).
pub const AUTO_SPARSE_MAX_DENSITY: f64 = 0.3;

/// Layer density at or below which `--kernels auto` runs a linear layer on the sparse
/// (feature-major) kernels, measured the same way with LfF's MLP.
pub const AUTO_SPARSE_LINEAR_MAX_DENSITY: f64 = 0.3;

impl KernelMode {
    /// Whether a layer of `density` runs on the sparse kernels (`conv`: a convolution, else
    /// a linear layer).
    pub fn sparse_for(self, density: f64, conv: bool) -> bool {
        match self {
            KernelMode::Dense => false,
            KernelMode::Sparse => density < 1.0,
            KernelMode::Auto if conv => density <= AUTO_SPARSE_MAX_DENSITY,
            KernelMode::Auto => density <= AUTO_SPARSE_LINEAR_MAX_DENSITY,
        }
    }
}
