//! The CSR weight matrix (and the CSR of its transpose) that the sparse kernels consume.

use super::SparseError;
use rayon::prelude::*;

/// Active weights from which value refreshes run on several threads.
const PARALLEL_NNZ: usize = 1 << 15;

/// A mask element: `bool` (`true` = active) or `f32` (nonzero = active, the usual 0/1 mask).
pub trait MaskValue: Copy + Sync {
    /// Whether the weight at this position is part of the sparse pattern.
    fn is_active(self) -> bool;
}

impl MaskValue for bool {
    #[inline]
    fn is_active(self) -> bool {
        self
    }
}

impl MaskValue for f32 {
    #[inline]
    fn is_active(self) -> bool {
        self != 0.0
    }
}

/// Borrowed CSR arrays, the form the kernels work on (either `W` or `Wᵀ`).
#[derive(Clone, Copy)]
pub(crate) struct Csr<'a> {
    pub rows: usize,
    pub cols: usize,
    pub row_ptr: &'a [usize],
    pub col_idx: &'a [u32],
    pub values: &'a [f32],
}

impl Csr<'_> {
    pub fn nnz(&self) -> usize {
        self.values.len()
    }
}

/// A sparse `rows x cols` weight matrix `W` (row-major dense shape `[rows][cols]`, e.g.
/// `[OC][IC·KH·KW]` for a convolution or `[O][I]` for a linear layer).
///
/// Stored twice, so that both `W x` and `Wᵀ dy` run row-parallel without atomics:
/// * CSR of `W`: `row_ptr` (`rows + 1` offsets), `col_idx` (sorted within each row) and
///   `values`;
/// * CSR of `Wᵀ` with a map from each transposed entry back to its CSR position.
///
/// The pattern comes from a mask and changes only on mask updates (rebuild with
/// [`SparseMatrix::from_dense_masked`]); the values change every optimiser step and are
/// refreshed in `O(nnz)` by [`SparseMatrix::update_values_from_dense`] or
/// [`SparseMatrix::set_values`]. An active position whose weight is `0.0` (e.g. a freshly
/// regrown RigL connection) stays in the pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseMatrix {
    rows: usize,
    cols: usize,
    row_ptr: Vec<usize>,
    col_idx: Vec<u32>,
    values: Vec<f32>,
    t_row_ptr: Vec<usize>,
    t_col_idx: Vec<u32>,
    t_values: Vec<f32>,
    /// `t_src[j]` = index into `values` of transposed entry `j`.
    t_src: Vec<u32>,
}

impl SparseMatrix {
    /// Builds the CSR of `w ⊙ mask` keeping exactly the positions where `mask` is active.
    ///
    /// `w` and `mask` are row-major `[rows][cols]`. Errors if their lengths differ from
    /// `rows * cols` or if the matrix is too large for 32-bit column / entry indices.
    pub fn from_dense_masked<M: MaskValue>(
        w: &[f32],
        mask: &[M],
        rows: usize,
        cols: usize,
    ) -> Result<Self, SparseError> {
        super::check_len(
            "from_dense_masked",
            "w",
            "[rows][cols]",
            w.len(),
            rows,
            cols,
        )?;
        super::check_len(
            "from_dense_masked",
            "mask",
            "[rows][cols]",
            mask.len(),
            rows,
            cols,
        )?;
        if cols > u32::MAX as usize || rows > u32::MAX as usize {
            return Err(SparseError::new(format!(
                "sparse from_dense_masked: {rows}x{cols} matrix exceeds the 32-bit index range; \
                 split the layer"
            )));
        }
        let mut row_ptr = Vec::with_capacity(rows + 1);
        row_ptr.push(0);
        let mut col_idx = Vec::new();
        let mut values = Vec::new();
        if cols > 0 {
            for (wr, mr) in w.chunks_exact(cols).zip(mask.chunks_exact(cols)) {
                for (c, (&wv, &mv)) in wr.iter().zip(mr).enumerate() {
                    if mv.is_active() {
                        col_idx.push(c as u32);
                        values.push(wv);
                    }
                }
                row_ptr.push(values.len());
            }
        } else {
            row_ptr.resize(rows + 1, 0);
        }
        if values.len() > u32::MAX as usize {
            return Err(SparseError::new(format!(
                "sparse from_dense_masked: {} active weights exceed the 32-bit index range; \
                 split the layer",
                values.len()
            )));
        }
        let (t_row_ptr, t_col_idx, t_src) = transpose_pattern(rows, cols, &row_ptr, &col_idx);
        let t_values = t_src.iter().map(|&s| values[s as usize]).collect();
        Ok(Self {
            rows,
            cols,
            row_ptr,
            col_idx,
            values,
            t_row_ptr,
            t_col_idx,
            t_values,
            t_src,
        })
    }

    /// Refreshes the values (of `W` and `Wᵀ`) from a dense row-major `[rows][cols]` weight,
    /// keeping the pattern. `O(nnz)`.
    pub fn update_values_from_dense(&mut self, w: &[f32]) -> Result<(), SparseError> {
        super::check_len(
            "update_values_from_dense",
            "w",
            "[rows][cols]",
            w.len(),
            self.rows,
            self.cols,
        )?;
        let (rows, cols) = (self.rows, self.cols);
        let (row_ptr, col_idx) = (&self.row_ptr, &self.col_idx);
        // Rows r0..r1, whose values are `vals` (entries row_ptr[r0]..row_ptr[r1]).
        let gather = |(r0, r1, vals): (usize, usize, &mut [f32])| {
            let base = row_ptr[r0];
            for r in r0..r1 {
                let (s, e) = (row_ptr[r], row_ptr[r + 1]);
                let wr = &w[r * cols..(r + 1) * cols];
                for (v, &c) in vals[s - base..e - base].iter_mut().zip(&col_idx[s..e]) {
                    *v = wr[c as usize];
                }
            }
        };
        if self.values.len() < PARALLEL_NNZ {
            gather((0, rows, &mut self.values));
        } else {
            // Row blocks of about equal nnz, each reading its own rows of `w`.
            let bounds = super::kernels::split_rows(row_ptr, 4 * rayon::current_num_threads());
            let mut jobs = Vec::with_capacity(bounds.len());
            let mut rest = &mut self.values[..];
            for b in bounds.windows(2) {
                let (head, tail) = rest.split_at_mut(row_ptr[b[1]] - row_ptr[b[0]]);
                jobs.push((b[0], b[1], head));
                rest = tail;
            }
            jobs.into_par_iter().for_each(gather);
        }
        self.sync_transposed_values();
        Ok(())
    }

    /// Replaces the values with `values`, aligned with the CSR order of [`Self::values`]
    /// (for optimisers that keep only the active weights). `O(nnz)`.
    pub fn set_values(&mut self, values: &[f32]) -> Result<(), SparseError> {
        if values.len() != self.values.len() {
            return Err(SparseError::new(format!(
                "sparse set_values: got {} values, the pattern has nnz = {} (values follow the \
                 CSR order of SparseMatrix::values)",
                values.len(),
                self.values.len()
            )));
        }
        self.values.copy_from_slice(values);
        self.sync_transposed_values();
        Ok(())
    }

    fn sync_transposed_values(&mut self) {
        let values = &self.values;
        if values.len() < PARALLEL_NNZ {
            for (tv, &s) in self.t_values.iter_mut().zip(&self.t_src) {
                *tv = values[s as usize];
            }
        } else {
            self.t_values
                .par_iter_mut()
                .zip(self.t_src.par_iter())
                .for_each(|(tv, &s)| *tv = values[s as usize]);
        }
    }

    /// Writes `values` (aligned with the CSR order, e.g. the output of [`super::sddmm`]) into
    /// the dense row-major `[rows][cols]` buffer `dense`; inactive positions are set to 0.
    pub fn scatter_to_dense(&self, values: &[f32], dense: &mut [f32]) -> Result<(), SparseError> {
        if values.len() != self.nnz() {
            return Err(SparseError::new(format!(
                "sparse scatter_to_dense: got {} values, the pattern has nnz = {}",
                values.len(),
                self.nnz()
            )));
        }
        super::check_len(
            "scatter_to_dense",
            "dense",
            "[rows][cols]",
            dense.len(),
            self.rows,
            self.cols,
        )?;
        dense.fill(0.0);
        for r in 0..self.rows {
            let (s, e) = (self.row_ptr[r], self.row_ptr[r + 1]);
            let dr = &mut dense[r * self.cols..(r + 1) * self.cols];
            for (&v, &c) in values[s..e].iter().zip(&self.col_idx[s..e]) {
                dr[c as usize] = v;
            }
        }
        Ok(())
    }

    /// The dense row-major `[rows][cols]` matrix (zeros outside the pattern).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut d = vec![0.0; self.rows * self.cols];
        for r in 0..self.rows {
            for j in self.row_ptr[r]..self.row_ptr[r + 1] {
                d[r * self.cols + self.col_idx[j] as usize] = self.values[j];
            }
        }
        d
    }

    /// Number of rows (outputs: `OC` or `O`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (inputs: `IC·KH·KW` or `I`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of active weights.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// Fraction of active weights, `nnz / (rows * cols)` (0 for an empty shape).
    pub fn density(&self) -> f64 {
        let n = self.rows * self.cols;
        if n == 0 {
            0.0
        } else {
            self.nnz() as f64 / n as f64
        }
    }

    /// CSR row offsets (`rows + 1` entries).
    pub fn row_ptr(&self) -> &[usize] {
        &self.row_ptr
    }

    /// CSR column indices, sorted within each row.
    pub fn col_idx(&self) -> &[u32] {
        &self.col_idx
    }

    /// CSR values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    pub(crate) fn csr(&self) -> Csr<'_> {
        Csr {
            rows: self.rows,
            cols: self.cols,
            row_ptr: &self.row_ptr,
            col_idx: &self.col_idx,
            values: &self.values,
        }
    }

    /// For each entry of the transposed CSR, its index in the CSR order of [`Self::values`].
    pub(crate) fn t_src(&self) -> &[u32] {
        &self.t_src
    }

    pub(crate) fn csr_t(&self) -> Csr<'_> {
        Csr {
            rows: self.cols,
            cols: self.rows,
            row_ptr: &self.t_row_ptr,
            col_idx: &self.t_col_idx,
            values: &self.t_values,
        }
    }
}

/// Counting-sort transpose of a CSR pattern: returns `(row_ptr, col_idx, src)` of `Wᵀ`, where
/// `src[j]` is the CSR index of transposed entry `j`. Columns of `Wᵀ` come out sorted.
fn transpose_pattern(
    rows: usize,
    cols: usize,
    row_ptr: &[usize],
    col_idx: &[u32],
) -> (Vec<usize>, Vec<u32>, Vec<u32>) {
    let nnz = col_idx.len();
    let mut t_row_ptr = vec![0usize; cols + 1];
    for &c in col_idx {
        t_row_ptr[c as usize + 1] += 1;
    }
    for c in 0..cols {
        t_row_ptr[c + 1] += t_row_ptr[c];
    }
    let mut next = t_row_ptr[..cols].to_vec();
    let mut t_col_idx = vec![0u32; nnz];
    let mut t_src = vec![0u32; nnz];
    for r in 0..rows {
        let (s, e) = (row_ptr[r], row_ptr[r + 1]);
        for (j, &c) in (s..e).zip(&col_idx[s..e]) {
            let c = c as usize;
            let dst = next[c];
            next[c] += 1;
            t_col_idx[dst] = r as u32;
            t_src[dst] = j as u32;
        }
    }
    (t_row_ptr, t_col_idx, t_src)
}
