//! Dense and sparse CPU compute kernels for `rest` (placeholder, filled by the kernels issue).
pub mod sparse;
