//! The local backend: runs a sweep's runs as child processes (`rest train --sweep-task
//! <run>`, which claims the run, then starts or resumes it), `--jobs` at a time with the
//! cores split between them, output to `<run>/train.log`; runs other processes hold are
//! waited for; a progress bar over the runs, one line per finished run; Ctrl-C asks every
//! child to checkpoint and stop.

use super::status::last_log_line;
use super::{fmt_duration, Prepared, Run, EXIT_FILE, LOG_FILE, SUMMARY_FILE};
use crate::train::lock::{self, EXIT_HELD};
use crate::util::write_atomic;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Options of the local runner.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Runs at a time.
    pub jobs: usize,
    /// Threads per run (default: cores / jobs, at least 1).
    pub threads: Option<usize>,
    /// The `rest` binary the runs are started with.
    pub exe: PathBuf,
}

/// Threads per run when `jobs` runs share `cores` cores: an even split, at least 1.
pub fn threads_per_run(cores: usize, jobs: usize) -> usize {
    (cores / jobs.max(1)).max(1)
}

/// The arguments of `rest` that train the run in `dir` as a sweep task: it claims the run
/// (exit code 75 if another process holds it), skips it if done, and resumes it if it has a
/// checkpoint.
pub fn train_args(dir: &Path, threads: usize) -> Vec<String> {
    vec![
        "train".to_string(),
        "--sweep-task".into(),
        dir.to_string_lossy().into_owned(),
        "--threads".into(),
        threads.to_string(),
    ]
}

/// Seconds until the sweep ends if every run takes `mean` seconds: the runs in flight (each
/// `elapsed[i]` seconds in) finish, then the `queued` ones fill whichever of the `jobs`
/// slots frees first.
pub fn eta_seconds(mean: f64, elapsed: &[f64], queued: usize, jobs: usize) -> f64 {
    let mut free: Vec<f64> = elapsed.iter().map(|e| (mean - e).max(0.0)).collect();
    free.resize(jobs.max(elapsed.len()).max(1), 0.0);
    for _ in 0..queued {
        let i = (0..free.len())
            .min_by(|&a, &b| free[a].total_cmp(&free[b]))
            .unwrap_or(0);
        free[i] += mean;
    }
    free.into_iter().fold(0.0, f64::max)
}

/// A run in flight in a child of this sweep.
struct Slot {
    idx: usize,
    child: Child,
    started: Instant,
    started_at: SystemTime,
}

/// Whether the run's `summary.json` was written before `t`.
fn finished_before(dir: &Path, t: SystemTime) -> bool {
    std::fs::metadata(dir.join(SUMMARY_FILE))
        .and_then(|m| m.modified())
        .is_ok_and(|m| m < t)
}

/// Sends `sig` (`TERM` or `KILL`) to a process.
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Starts the sweep task of `dir`, its output appended to the run's log. The child writes
/// the log's header itself once it holds the run, so a child that finds the run taken leaves
/// the log untouched.
fn start(dir: &Path, threads: usize, exe: &Path) -> Result<Child> {
    let log_path = dir.join(LOG_FILE);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(train_args(dir, threads))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Own process group: a Ctrl-C in the terminal reaches only the sweep, which then stops
    // each run once, cleanly.
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {} for {}", exe.display(), dir.display()))
}

/// The one-line result of a finished run: test worst-group and unbiased accuracy.
fn result_text(dir: &Path) -> String {
    let v: Option<serde_json::Value> = std::fs::read_to_string(dir.join(SUMMARY_FILE))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let get = |k: &str| {
        v.as_ref()
            .and_then(|v| v["test"][k].as_f64())
            .map(|x| format!("{:.1} %", 100.0 * x))
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "test worst-group {}, unbiased {}",
        get("worst_group"),
        get("unbiased")
    )
}

/// Runs the runs that are not done; after the last, writes the report. Runs that another
/// process holds (another sweep over this directory, one left running by a killed sweep, a
/// Slurm task) are not started again: the sweep moves on and waits for them, and takes over
/// any whose holder stops before finishing. Ctrl-C stops every run of this sweep (they
/// checkpoint) and returns an error saying how to continue.
pub fn run_local(out: &Path, runs: &[Run], prepared: &[Prepared], o: &LocalOptions) -> Result<()> {
    let total = runs.len();
    let mut done = prepared
        .iter()
        .filter(|p| matches!(p, Prepared::Done))
        .count();
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut slots: Vec<Slot> = Vec::new();
    // Runs held by other processes, waited for.
    let mut elsewhere: Vec<usize> = Vec::new();
    for (i, p) in prepared.iter().enumerate() {
        match p {
            Prepared::Done => {}
            Prepared::ToRun { .. } => queue.push_back(i),
            Prepared::Claimed(_) => elsewhere.push(i),
        }
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let jobs = o.jobs.min(queue.len() + elsewhere.len()).max(1);
    let threads = o.threads.unwrap_or_else(|| threads_per_run(cores, jobs));
    println!(
        "{total} runs: {done} done, {} to run{}; {jobs} at a time x {threads} thread{} \
         ({cores} cores), into {}",
        queue.len(),
        if elsewhere.is_empty() {
            String::new()
        } else {
            format!(", {} held by other processes (waited for)", elsewhere.len())
        },
        if threads == 1 { "" } else { "s" },
        out.display()
    );
    if jobs * threads > cores {
        eprintln!(
            "warning: {jobs} runs x {threads} threads on {cores} cores: the runs compete for \
             cores; lower --jobs or --threads"
        );
    }

    let interrupts = Arc::new(AtomicUsize::new(0));
    {
        let n = interrupts.clone();
        if let Err(e) = ctrlc::set_handler(move || {
            n.fetch_add(1, Ordering::SeqCst);
        }) {
            tracing::warn!("no Ctrl-C handler: {e}");
        }
    }

    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} runs {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(done as u64);
    let say = |line: String| {
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
    };

    let t0 = Instant::now();
    let mut finished_times: Vec<f64> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let mut stopped = 0usize;
    let mut stopping: Option<Instant> = None;
    let mut killed = false;
    let mut last_poll = Instant::now();
    loop {
        let n_int = interrupts.load(Ordering::SeqCst);
        if n_int >= 1 && stopping.is_none() {
            stopping = Some(Instant::now());
            say(format!(
                "interrupted: asking {} running runs to checkpoint and stop (Ctrl-C again to kill \
                 them)",
                slots.len()
            ));
            for s in &slots {
                signal(s.child.id(), "TERM");
            }
        }
        let too_slow = stopping.is_some_and(|t| t.elapsed() > Duration::from_secs(120));
        if (n_int >= 2 || too_slow) && !killed {
            killed = true;
            for s in &slots {
                signal(s.child.id(), "KILL");
            }
        }
        while stopping.is_none() && slots.len() < jobs {
            let Some(i) = queue.pop_front() else {
                break;
            };
            let dir = out.join(&runs[i].name);
            match start(&dir, threads, &o.exe) {
                Ok(child) => slots.push(Slot {
                    idx: i,
                    child,
                    started: Instant::now(),
                    started_at: SystemTime::now(),
                }),
                Err(e) => {
                    failed.push(runs[i].name.clone());
                    say(format!("FAILED to start  {}: {e:#}", runs[i].name));
                }
            }
        }
        // Reap finished runs.
        let mut k = 0;
        while k < slots.len() {
            let dir = out.join(&runs[slots[k].idx].name);
            let Some(status) = slots[k]
                .child
                .try_wait()
                .with_context(|| format!("cannot wait for the run {}", dir.display()))?
            else {
                k += 1;
                continue;
            };
            let slot = slots.swap_remove(k);
            let code = status.code();
            let name = &runs[slot.idx].name;
            if code == Some(i32::from(EXIT_HELD)) {
                // Another process claimed the run between our look and the child's claim.
                elsewhere.push(slot.idx);
                continue;
            }
            // A run stopped by the sweep is "stopped", not "failed": no exit code.
            if let (Some(c), None) = (code, stopping) {
                write_atomic(&dir.join(EXIT_FILE), format!("{c}\n").as_bytes())?;
            }
            let took = slot.started.elapsed().as_secs_f64();
            if dir.join(SUMMARY_FILE).exists() {
                done += 1;
                bar.set_position(done as u64);
                // The child finds a run that another process finished meanwhile done, and
                // exits at once.
                if finished_before(&dir, slot.started_at) {
                    say(format!(
                        "[{done}/{total}] done    {name}  (by another process)  {}",
                        result_text(&dir)
                    ));
                    continue;
                }
                finished_times.push(took);
                say(format!(
                    "[{done}/{total}] done    {name}  {}  {}",
                    fmt_duration(took),
                    result_text(&dir)
                ));
            } else if stopping.is_some() {
                stopped += 1;
                say(format!(
                    "stopped        {name} (resumes on the next `rest sweep`)"
                ));
            } else {
                let why = match code {
                    Some(c) => format!("exit {c}"),
                    None => "killed".into(),
                };
                failed.push(name.clone());
                say(format!(
                    "FAILED ({why})  {name}: {}  (log: {})",
                    last_log_line(&dir),
                    dir.join(LOG_FILE).display()
                ));
            }
        }
        // Runs held elsewhere: done when their holder finished them; taken over when it
        // stopped without finishing (resumed from its checkpoint).
        if stopping.is_none() && last_poll.elapsed() >= Duration::from_secs(1) {
            last_poll = Instant::now();
            let mut k = 0;
            while k < elsewhere.len() {
                let i = elsewhere[k];
                let dir = out.join(&runs[i].name);
                if lock::holder(&dir).is_some() {
                    k += 1;
                    continue;
                }
                elsewhere.swap_remove(k);
                if dir.join(SUMMARY_FILE).exists() {
                    done += 1;
                    bar.set_position(done as u64);
                    say(format!(
                        "[{done}/{total}] done    {}  (by another process)  {}",
                        runs[i].name,
                        result_text(&dir)
                    ));
                } else {
                    say(format!(
                        "taking over    {} (the process that held it stopped before finishing)",
                        runs[i].name
                    ));
                    queue.push_back(i);
                }
            }
        }
        let idle = slots.is_empty() && queue.is_empty();
        if (idle && elsewhere.is_empty()) || (stopping.is_some() && slots.is_empty()) {
            break;
        }
        // ETA from the mean time of the runs finished so far.
        let left = queue.len() + slots.len() + elsewhere.len();
        let eta = if finished_times.is_empty() {
            "ETA ?".to_string()
        } else {
            let mean = finished_times.iter().sum::<f64>() / finished_times.len() as f64;
            let elapsed: Vec<f64> = slots
                .iter()
                .map(|s| s.started.elapsed().as_secs_f64())
                .collect();
            format!(
                "ETA {}",
                fmt_duration(eta_seconds(mean, &elapsed, queue.len(), jobs))
            )
        };
        let others = if elsewhere.is_empty() {
            String::new()
        } else {
            format!(", {} in other processes", elsewhere.len())
        };
        bar.set_message(format!(
            "{} running{others}, {left} left, {eta}",
            slots.len()
        ));
        bar.tick();
        std::thread::sleep(Duration::from_millis(200));
    }
    bar.finish_and_clear();
    let wall = fmt_duration(t0.elapsed().as_secs_f64());
    if stopping.is_some() {
        bail!(
            "sweep interrupted after {wall}: {done} of {total} runs done, {stopped} stopped{}; \
             rerun the same command to continue (finished runs are skipped, stopped ones \
             resume from their checkpoint)",
            if killed { " (killed)" } else { "" }
        );
    }
    if done > 0 {
        super::after_sweep(out)?;
    }
    if !failed.is_empty() {
        bail!(
            "{} of {total} runs failed ({}); see train.log in their directories under {}; rerun \
             the same command to retry them",
            failed.len(),
            failed.join(", "),
            out.display()
        );
    }
    println!("{total} runs done in {wall}: {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_are_split_between_jobs() {
        assert_eq!(threads_per_run(2, 2), 1);
        assert_eq!(threads_per_run(2, 1), 2);
        assert_eq!(threads_per_run(16, 3), 5);
        assert_eq!(threads_per_run(2, 4), 1);
        assert_eq!(threads_per_run(8, 0), 8);
    }

    #[test]
    fn eta_schedules_queued_runs_on_the_free_slots() {
        // One run 4 s into a 10 s mean, nothing queued: 6 s, whatever the slot count.
        assert_eq!(eta_seconds(10.0, &[4.0], 0, 2), 6.0);
        // Slots free at 6 s and now; 3 queued runs: 0->10, 6->16, 10->20.
        assert_eq!(eta_seconds(10.0, &[4.0], 3, 2), 20.0);
        // A run over the mean counts as finishing now.
        assert_eq!(eta_seconds(10.0, &[12.0], 1, 1), 10.0);
        assert_eq!(eta_seconds(10.0, &[], 4, 2), 20.0);
    }

    #[test]
    fn child_arguments() {
        let d = Path::new("/s/run-1");
        assert_eq!(
            train_args(d, 2),
            vec!["train", "--sweep-task", "/s/run-1", "--threads", "2"]
        );
    }
}
