//! One run, one writer: a run directory belongs to the one live process that holds its
//! `run.lock`.
//!
//! The lock is an advisory `flock(2)` (std's `File::try_lock`) on `<run>/run.lock`, so the
//! operating system releases it when the holder exits for any reason, `kill -9` included:
//! there is never a stale lock to clean up. The file itself stays (it is never deleted or
//! replaced: a process that opened the old file would lock a different inode) and holds the
//! holder's pid, host, start time and command line, for the messages of whoever finds it
//! taken.
//!
//! Shared file systems: Linux's NFS client (v3 through NLM, v4 natively) implements `flock`
//! as a whole-file byte-range lock on the server, so it excludes processes on other nodes,
//! and the server drops the lock of a client that died when its lease runs out. GPFS and
//! CephFS lock cluster-wide; Lustre does when mounted with `-o flock` (the usual setting; with
//! `-o localflock` it is per node). A file system without `flock` support gets a warning and
//! the run goes on unlocked rather than not at all. Under NFS's emulation a process loses its
//! lock when it closes *any* descriptor of the file, so the holder never opens it twice: only
//! other processes read it.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The lock file inside a run directory.
pub const LOCK_FILE: &str = "run.lock";

/// The exit code of `rest train` when the run directory is held by another process
/// (`EX_TEMPFAIL`); sweeps read it as "claimed elsewhere".
pub const EXIT_HELD: u8 = 75;

/// Who holds a run: what the holder wrote into the lock file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Holder {
    pub pid: Option<u32>,
    pub host: Option<String>,
    pub since: Option<String>,
    pub command: Option<String>,
}

impl Holder {
    /// This process.
    fn me() -> Self {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        Holder {
            pid: Some(std::process::id()),
            host: Some(host),
            since: Some(
                chrono::Local::now()
                    .format("%Y-%m-%d %H:%M:%S %z")
                    .to_string(),
            ),
            command: Some(command),
        }
    }

    fn to_text(&self) -> String {
        let mut s = String::new();
        let mut line = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                s.push_str(&format!("{k}={}\n", v.replace('\n', " ")));
            }
        };
        line("pid", self.pid.map(|p| p.to_string()));
        line("host", self.host.clone());
        line("since", self.since.clone());
        line("command", self.command.clone());
        s
    }

    /// Parses the lock file's `key=value` lines (unknown keys and bad lines are ignored: the
    /// text is only for messages).
    pub fn parse(text: &str) -> Self {
        let mut h = Holder::default();
        for l in text.lines() {
            let Some((k, v)) = l.split_once('=') else {
                continue;
            };
            let v = v.trim().to_string();
            match k.trim() {
                "pid" => h.pid = v.parse().ok(),
                "host" => h.host = Some(v),
                "since" => h.since = Some(v),
                "command" => h.command = Some(v),
                _ => {}
            }
        }
        h
    }

    /// `pid 123 on host h since 2026-12-07 09:00:00 +0000 (rest train ...)`.
    pub fn describe(&self) -> String {
        let mut s = match self.pid {
            Some(p) => format!("pid {p}"),
            None => "a process that has not said who it is yet".to_string(),
        };
        if let Some(h) = &self.host {
            s.push_str(&format!(" on host {h}"));
        }
        if let Some(t) = &self.since {
            s.push_str(&format!(" since {t}"));
        }
        if let Some(c) = &self.command {
            s.push_str(&format!(" ({c})"));
        }
        s
    }

    /// Short form for tables: `pid 123 on h since ...`.
    pub fn short(&self) -> String {
        let mut s = self
            .pid
            .map(|p| format!("pid {p}"))
            .unwrap_or_else(|| "pid ?".into());
        if let Some(h) = &self.host {
            s.push_str(&format!(" on {h}"));
        }
        if let Some(t) = &self.since {
            s.push_str(&format!(" since {t}"));
        }
        s
    }
}

/// A held run directory: released when dropped or when the process exits.
#[derive(Debug)]
pub struct RunLock {
    /// `None` where the file system does not support locks (the run goes on unlocked).
    file: Option<File>,
    dir: PathBuf,
}

impl RunLock {
    /// Writes this process's pid, host, time and command into the lock file, for the messages
    /// of whoever finds the run taken. Called once the holder has decided to write the run
    /// (a claim that ends in a refusal leaves the file as it was). Written through the
    /// locked descriptor (see the module doc).
    pub fn announce(&self) -> Result<()> {
        let Some(mut f) = self.file.as_ref() else {
            return Ok(());
        };
        let text = Holder::me().to_text();
        f.set_len(0)
            .and_then(|_| f.rewind())
            .and_then(|_| f.write_all(text.as_bytes()))
            .and_then(|_| f.flush())
            .with_context(|| format!("cannot write {}", self.dir.join(LOCK_FILE).display()))
    }
}

/// The outcome of trying to claim a run directory.
#[derive(Debug)]
pub enum Claim {
    Acquired(RunLock),
    /// Another live process holds it.
    Held(Holder),
}

fn open_lock_file(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| {
            format!(
                "cannot open the run's lock file {}: check the directory's permissions",
                path.display()
            )
        })
}

/// Whether `e` says the file system cannot lock at all (rather than "taken").
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == 38 /* ENOSYS */ || code == 95 /* EOPNOTSUPP */ || code == 22 /* EINVAL */ || code == 37 /* ENOLCK */
    ) || e.kind() == std::io::ErrorKind::Unsupported
}

/// Reads the holder's text from an open lock file (another process's).
fn read_holder(f: &mut File) -> Holder {
    let mut text = String::new();
    let _ = f.rewind();
    let _ = f.read_to_string(&mut text);
    Holder::parse(&text)
}

/// Claims `dir` (created if missing) for this process, without waiting: `Held` names the
/// process that has it. The lock file's text is left alone until `RunLock::announce`. A
/// probe of another process (`holder`) can hold the lock for a moment, so a taken lock is
/// retried briefly before it counts as held.
pub fn try_claim(dir: &Path) -> Result<Claim> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the run directory {}: check the path and its permissions",
            dir.display()
        )
    })?;
    let mut f = open_lock_file(dir)?;
    let mut tries = 0;
    loop {
        match f.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {
                tries += 1;
                if tries >= 4 {
                    return Ok(Claim::Held(read_holder(&mut f)));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::Error(e)) if unsupported(&e) => {
                tracing::warn!(
                    "cannot lock {} ({e}): this file system does not support flock (Lustre \
                     mounted without -o flock?); nothing stops a second process from writing \
                     this run",
                    dir.join(LOCK_FILE).display()
                );
                return Ok(Claim::Acquired(RunLock {
                    file: None,
                    dir: dir.to_path_buf(),
                }));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e)
                    .with_context(|| format!("cannot lock {}", dir.join(LOCK_FILE).display()))
            }
        }
    }
    Ok(Claim::Acquired(RunLock {
        file: Some(f),
        dir: dir.to_path_buf(),
    }))
}

/// Claims `dir` or fails with a message naming the holder and what to do; `what` is the
/// command's view of the directory (`--out` or `--resume`). Does not `announce`.
pub fn claim(dir: &Path, what: &str) -> Result<RunLock> {
    match try_claim(dir)? {
        Claim::Acquired(l) => Ok(l),
        Claim::Held(h) => Err(held_error(dir, what, &h)),
    }
}

/// The error for a run directory held by `h`.
pub fn held_error(dir: &Path, what: &str, h: &Holder) -> anyhow::Error {
    let stop = h
        .pid
        .map(|p| format!(" (or stop it: kill {p}, on its host)"))
        .unwrap_or_default();
    let other = if what == "--out" {
        ", or choose another --out"
    } else {
        ""
    };
    anyhow::anyhow!(
        "{what} {}: the run is in use by another process, {}; wait until it has \
         finished{stop}{other}",
        dir.display(),
        h.describe()
    )
}

/// Who holds `dir`, without claiming it: `None` if nobody does (or it has no lock file).
/// Takes a shared lock for a moment, which a claimer retries past.
pub fn holder(dir: &Path) -> Option<Holder> {
    let mut f = File::open(dir.join(LOCK_FILE)).ok()?;
    match f.try_lock_shared() {
        Ok(()) => {
            let _ = f.unlock();
            None
        }
        Err(std::fs::TryLockError::WouldBlock) => Some(read_holder(&mut f)),
        Err(std::fs::TryLockError::Error(_)) => None,
    }
}

/// Takes the lock of a file that is not a run (a sweep's `sweep.lock`, for its manifest and
/// report), waiting for it; released when the returned file is dropped.
pub fn lock_file_blocking(path: &Path) -> Result<Option<File>> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match f.lock() {
        Ok(()) => Ok(Some(f)),
        Err(e) if unsupported(&e) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_directory_is_held_until_released() -> Result<()> {
        let t = tempfile::tempdir()?;
        let dir = t.path().join("run");
        let Claim::Acquired(lock) = try_claim(&dir)? else {
            panic!("a new directory must be free");
        };
        lock.announce()?;
        // flock locks belong to the open file: a second open in this process conflicts.
        let Claim::Held(h) = try_claim(&dir)? else {
            panic!("a held directory was claimed twice");
        };
        assert_eq!(h.pid, Some(std::process::id()));
        assert!(h.host.is_some() && h.since.is_some());
        assert_eq!(holder(&dir), Some(h.clone()));
        let err = claim(&dir, "--resume").expect_err("held");
        let msg = format!("{err:#}");
        assert!(msg.contains("--resume") && msg.contains(&format!("pid {}", std::process::id())));
        drop(lock);
        assert_eq!(holder(&dir), None);
        assert!(matches!(try_claim(&dir)?, Claim::Acquired(_)));
        Ok(())
    }

    #[test]
    fn holder_text_round_trips_and_tolerates_junk() {
        let h = Holder {
            pid: Some(12),
            host: Some("node-3".into()),
            since: Some("2026-12-07 09:00:00 +0000".into()),
            command: Some("rest train --out a=b".into()),
        };
        assert_eq!(Holder::parse(&h.to_text()), h);
        let j = Holder::parse("garbage\npid=notanumber\nhost=x\n");
        assert_eq!(j.pid, None);
        assert_eq!(j.host.as_deref(), Some("x"));
        assert!(Holder::default().describe().contains("not said"));
    }

    #[test]
    fn a_directory_without_lock_file_has_no_holder() -> Result<()> {
        let t = tempfile::tempdir()?;
        assert_eq!(holder(t.path()), None);
        assert_eq!(holder(&t.path().join("missing")), None);
        Ok(())
    }
}
