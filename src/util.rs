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
    write_atomic_with(path, |w| Ok(w.write_all(bytes)?))
}

/// [`write_atomic`] of what `write` writes (through a buffer), for files written in parts
/// rather than built in memory first.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&mut std::fs::File>) -> Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = temp_file_in(dir, ".tmp")?;
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        write(&mut w).with_context(|| format!("cannot write {}", path.display()))?;
        w.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
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

/// The defaults of a clap argument section `T`: what an empty command line gives. Option
/// sections (`DataOptions`, `SparseOptions`, ...) spell each default once, in their
/// `#[arg(default_value_t = ...)]`, and take `Default` from here, so `--help`, config files
/// and `T::default()` cannot disagree.
pub fn args_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults"));
    let parsed = cmd
        .try_get_matches_from(["defaults"])
        .and_then(|m| T::from_arg_matches(&m));
    match parsed {
        Ok(t) => t,
        // Only reachable by a section whose flags require a value (a programming error).
        Err(e) => panic!("the defaults of an option section do not parse: {e}"),
    }
}

/// The keys a serde-derived struct `T` reads: the field list its derived `Deserialize` hands
/// to `deserialize_struct` (after renames). Used to route config-file keys to their section
/// and to name unknown ones.
pub fn serde_fields<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor};
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Self::Error::custom("probed"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// Formats a number without trailing zeros (`0.5`, `5`, `0.05`), as run names and tables show
/// options.
pub fn fmt_num(x: f64) -> String {
    let s = format!("{x:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}
