//! Errors of the core (`anyhow`) as Python exceptions, with the CLI's one-line message (the
//! chain joined by `: `, as `rest` prints it): a file that is missing is `FileNotFoundError`,
//! any other I/O failure `OSError`; bad options and arrays are `ValueError`; a training run
//! that fails for another reason (e.g. a NaN loss) is `RuntimeError`, one stopped by Ctrl-C
//! `KeyboardInterrupt`.

use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyRuntimeError, PyValueError,
};
use pyo3::PyErr;

/// The I/O error in `e`'s chain, if any, as its exception; `None` otherwise.
fn io_error(e: &anyhow::Error) -> Option<PyErr> {
    let msg = format!("{e:#}");
    e.chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .map(|io| match io.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            _ => PyOSError::new_err(msg),
        })
}

/// Option or array validation, and reading files: `ValueError` unless an I/O error caused it.
pub fn value_error(e: anyhow::Error) -> PyErr {
    io_error(&e).unwrap_or_else(|| PyValueError::new_err(format!("{e:#}")))
}

/// A training or inference run: `RuntimeError` unless an I/O error caused it, or
/// `KeyboardInterrupt` when Ctrl-C stopped the run (its checkpoint written).
pub fn run_error(e: anyhow::Error) -> PyErr {
    let msg = format!("{e:#}");
    if msg.starts_with("interrupted at epoch") {
        return PyKeyboardInterrupt::new_err(msg);
    }
    io_error(&e).unwrap_or_else(|| PyRuntimeError::new_err(msg))
}

/// A `ValueError` with `msg`.
pub fn value(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}
