//! The `rest._rest` extension module (imported as `rest`; `rest/__init__.py` re-exports it):
//! the Python face of the same core as the `rest` binary. It owns no training, data or
//! inference logic of its own: datasets (`dataset`), training (`run`: `rest.train`, through
//! `TrainConfig`'s option validation and `rest::train`'s entry points), loading and prediction
//! (`model`: `rest::infer`) and the mapping of errors to Python exceptions (`errors`).

mod dataset;
mod errors;
mod model;
mod run;

use pyo3::prelude::*;

// The `rest` binary's allocator (src/main.rs, `rest::alloc`): large blocks as cached page
// mappings (reused by the next training step without re-faulting, unmapped when unused),
// mimalloc for the rest. Rust's allocations only; NumPy keeps its own.
#[global_allocator]
static GLOBAL: rest::alloc::CachingAlloc = rest::alloc::CachingAlloc;

#[pymodule]
fn _rest(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // What `rest` does at start-up: candle's element-wise pool on the calling thread (before
    // any candle op runs); the rayon pool keeps its default size (all cores).
    rest::alloc::configure_mimalloc();
    rest::util::set_threads(None).map_err(errors::value_error)?;
    // The core's log on stderr, as the CLI's, at `REST_LOG` (default: warnings only, to keep
    // notebooks quiet; `REST_LOG=info` shows the CLI's run log). Another subscriber wins.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<dataset::Dataset>()?;
    m.add_class::<run::Run>()?;
    m.add_class::<model::Model>()?;
    m.add_function(wrap_pyfunction!(run::train, m)?)?;
    m.add_function(wrap_pyfunction!(run::option_names, m)?)?;
    m.add_function(wrap_pyfunction!(model::load, m)?)?;
    Ok(())
}
