//! Small shared helpers: atomic file writes and deterministic random number generators.

use anyhow::{Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::io::Write;
use std::path::Path;

/// The project's random number generator: portable and reproducible across platforms and
/// crate versions, unlike `StdRng`.
pub type Rng = ChaCha8Rng;

/// A generator for `seed`, independent per `stream` (data generation, init, sampling, ...).
pub fn rng(seed: u64, stream: u64) -> Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
/// A reader never sees a half-written file, also when the process is killed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = temp_file_in(dir, ".tmp")?;
    tmp.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot move the finished file to {}", path.display()))?;
    Ok(())
}

/// A temporary file in `dir` for an atomic write (then `persist`ed over the target), created
/// with mode 0644 (less the umask) so results are readable like any file the user writes.
pub fn temp_file_in(dir: &Path, suffix: &str) -> Result<tempfile::NamedTempFile> {
    let mut b = tempfile::Builder::new();
    b.prefix(".tmp-").suffix(suffix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(0o644));
    }
    b.tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))
}

/// Runs `f` on one of rayon's worker threads and waits for it. Compute-heavy loops (a training
/// run, `rest bench`) go through here: their kernels then start parallel work from inside the
/// pool, where the calling worker takes a share at once, instead of handing each call over
/// from an outside thread and sleeping until it is done (measured on 2 cores: 10-14 % off
/// the CNN's sparse training step, 20 % off the MLP's at density 0.05).
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Sets the number of worker threads for rayon and the GEMM kernels (default: all cores).
/// Must run before any parallel work starts.
///
/// candle's element-wise ops (what is left of candle's CPU work next to our kernels: gradient
/// accumulation, masks, the loss) run on candle's own thread pool, whose workers spin-wait
/// after every op and so take cores from rayon's workers. They run on the calling thread
/// instead (`CANDLE_NUM_THREADS=1`, unless the environment sets it): measured on 2 cores, the
/// same wall time or better for the CNN, MLP and ResNet18 steps, with 5-12 % less CPU time.
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    // The pool is sized from this variable when it first starts, which has not happened yet
    // when this runs at start-up.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot configure the thread pool (--threads)")?;
    }
    Ok(())
}
