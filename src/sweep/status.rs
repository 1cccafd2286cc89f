//! What each run of a sweep is doing, from its directory alone (summary, exit code, who
//! holds its `run.lock`) and, for Slurm sweeps, `squeue`: done, running (and where), queued,
//! failed, stopped or not started. `rest sweep --status` prints it.

use super::{Manifest, EXIT_FILE, LOG_FILE, SUMMARY_FILE};
use anyhow::Result;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

/// The state of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    Done,
    /// Running (where: `pid N` or `slurm JOB_TASK`).
    Running(String),
    /// Waiting in the Slurm queue.
    Queued(String),
    /// The last attempt exited with an error: exit code and the log's last line.
    Failed(i32, String),
    /// Started, then stopped without finishing (interrupted or killed); rerunning the sweep
    /// resumes it (from its checkpoint if there is one).
    Stopped,
    NotStarted,
}

impl RunState {
    pub fn label(&self) -> &'static str {
        match self {
            RunState::Done => "done",
            RunState::Running(_) => "running",
            RunState::Queued(_) => "queued",
            RunState::Failed(..) => "failed",
            RunState::Stopped => "stopped",
            RunState::NotStarted => "not started",
        }
    }
}

/// The last non-empty line of the run's log (the error of a failed run), shortened.
pub fn last_log_line(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join(LOG_FILE)).unwrap_or_default();
    let line = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no output)");
    let mut s: String = line.chars().take(160).collect();
    if s.len() < line.len() {
        s.push_str("...");
    }
    s
}

/// The state of the run in `dir`; `slurm` is its task's squeue state and id, if listed.
pub fn run_state(dir: &Path, slurm: Option<(&str, &str)>) -> RunState {
    if dir.join(SUMMARY_FILE).exists() {
        return RunState::Done;
    }
    if let Some((state, id)) = slurm {
        match state {
            "RUNNING" | "COMPLETING" | "CONFIGURING" | "STAGE_OUT" => {
                return RunState::Running(format!("slurm {id}"))
            }
            "PENDING" | "REQUEUED" | "RESIZING" | "SUSPENDED" | "REQUEUE_HOLD" => {
                return RunState::Queued(format!("slurm {id} {}", state.to_lowercase()))
            }
            _ => {}
        }
    }
    if let Some(h) = crate::train::lock::holder(dir) {
        return RunState::Running(h.short());
    }
    if let Some(code) = std::fs::read_to_string(dir.join(EXIT_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        if code != 0 {
            return RunState::Failed(code, last_log_line(dir));
        }
    }
    if dir.join(LOG_FILE).exists() || super::has_checkpoint(dir) {
        RunState::Stopped
    } else {
        RunState::NotStarted
    }
}

/// Counts per state, in display order.
pub fn counts(states: &[RunState]) -> String {
    let mut c: HashMap<&str, usize> = HashMap::new();
    for s in states {
        *c.entry(s.label()).or_default() += 1;
    }
    let parts: Vec<String> = [
        "done",
        "running",
        "queued",
        "failed",
        "stopped",
        "not started",
    ]
    .iter()
    .map(|l| format!("{} {l}", c.get(l).copied().unwrap_or(0)))
    .collect();
    format!("{} runs: {}", states.len(), parts.join(", "))
}

/// The `rest sweep --status` text: a first line with the counts, then one line per run.
pub fn status_report(out: &Path) -> Result<String> {
    let m = Manifest::load(out)?;
    if m.runs.is_empty() {
        anyhow::bail!(
            "{} has no {}: it is not the directory of a sweep (give the --out of `rest sweep`)",
            out.display(),
            super::MANIFEST_FILE
        );
    }
    // Slurm task of each run: the latest job that lists it.
    let mut task_of: HashMap<&str, String> = HashMap::new();
    for job in &m.slurm_jobs {
        for (i, r) in job.runs.iter().enumerate() {
            task_of.insert(r.as_str(), format!("{}_{i}", job.job_id));
        }
    }
    let mut note = String::new();
    let queue: HashMap<String, String> = if m.slurm_jobs.is_empty() {
        HashMap::new()
    } else {
        let ids: Vec<String> = m.slurm_jobs.iter().map(|j| j.job_id.clone()).collect();
        match super::slurm::squeue_states(&ids) {
            Ok(q) => q,
            Err(e) => {
                note = format!("(squeue not available: {e:#}; states from the run directories)\n");
                HashMap::new()
            }
        }
    };
    let states: Vec<RunState> = m
        .runs
        .iter()
        .map(|r| {
            let slurm = task_of
                .get(r.dir.as_str())
                .and_then(|id| queue.get(id).map(|state| (state.as_str(), id.as_str())));
            run_state(&out.join(&r.dir), slurm)
        })
        .collect();
    let mut s = counts(&states);
    s.push('\n');
    s.push_str(&note);
    let width = m.runs.iter().map(|r| r.dir.len()).max().unwrap_or(0);
    for (r, st) in m.runs.iter().zip(&states) {
        let keys = r
            .varying
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        let detail = match st {
            RunState::Running(w) | RunState::Queued(w) => format!("  ({w})"),
            RunState::Failed(code, line) => format!(
                "  (exit {code}: {line}; see {})",
                out.join(&r.dir).join(LOG_FILE).display()
            ),
            _ => String::new(),
        };
        let _ = writeln!(s, "{:<width$}  {:<11}  {keys}{detail}", r.dir, st.label());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_from_the_run_directory() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let d = tmp.path();
        assert_eq!(run_state(d, None), RunState::NotStarted);
        std::fs::write(d.join(LOG_FILE), "start\nerror: boom\n\n")?;
        assert_eq!(run_state(d, None), RunState::Stopped);
        std::fs::write(d.join(EXIT_FILE), "1\n")?;
        assert_eq!(
            run_state(d, None),
            RunState::Failed(1, "error: boom".into())
        );
        assert_eq!(
            run_state(d, Some(("PENDING", "7_1"))),
            RunState::Queued("slurm 7_1 pending".into())
        );
        assert_eq!(
            run_state(d, Some(("RUNNING", "7_1"))),
            RunState::Running("slurm 7_1".into())
        );
        // A finished squeue state falls back to the files.
        assert_eq!(run_state(d, Some(("FAILED", "7_1"))).label(), "failed");
        // A run whose lock is held is running, wherever its holder is.
        let crate::train::lock::Claim::Acquired(lock) = crate::train::lock::try_claim(d)? else {
            panic!("the run directory must be free");
        };
        lock.announce()?;
        let RunState::Running(w) = run_state(d, None) else {
            panic!("a held run must be running");
        };
        assert!(w.starts_with(&format!("pid {}", std::process::id())), "{w}");
        drop(lock);
        // A lock file nobody holds (its holder exited, or was killed) is not "running".
        assert_eq!(run_state(d, None).label(), "failed");
        std::fs::write(d.join(SUMMARY_FILE), "{}")?;
        assert_eq!(run_state(d, Some(("RUNNING", "7_1"))), RunState::Done);
        Ok(())
    }

    #[test]
    fn counts_line() {
        let s = counts(&[
            RunState::Done,
            RunState::Done,
            RunState::Failed(2, String::new()),
            RunState::NotStarted,
        ]);
        assert_eq!(
            s,
            "4 runs: 2 done, 0 running, 0 queued, 1 failed, 0 stopped, 1 not started"
        );
    }
}
