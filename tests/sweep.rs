//! `rest sweep` end to end with the real binary on tiny runs: run directories named by the
//! config hash, skip on rerun, restart or resume of unfinished runs, Ctrl-C and `kill -9`.

mod common;

use anyhow::{Context, Result};
use common::{sigint, text, wait_until, BIN};
use rest::train::checkpoint::config_hash;
use rest::train::TrainConfig;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// Tiny runs: one epoch on 500 training images.
const TINY: &str = "[base]\nepochs = 1\ntrain_size = 500\nvalid_size = 200\ntest_size = 200\n\
                    batch_size = 100\ndensity = 0.1\n";

fn write_sweep(dir: &Path, text: &str) -> Result<PathBuf> {
    let p = dir.join("sweep.toml");
    std::fs::write(&p, text)?;
    Ok(p)
}

fn sweep(args: &[&str]) -> Result<Output> {
    Ok(Command::new(BIN).arg("sweep").args(args).output()?)
}

/// The run directory names, computed from the configs independently of the sweep code.
fn expected_dirs(base: &TrainConfig, seeds: &[u64]) -> Result<Vec<String>> {
    seeds
        .iter()
        .map(|&seed| {
            let mut c = base.clone();
            c.optim.seed = seed;
            Ok(format!("{}-{}", c.short_name(), &config_hash(&c)?[..8]))
        })
        .collect()
}

fn tiny_base() -> TrainConfig {
    let mut c = TrainConfig::default();
    c.optim.epochs = 1;
    c.data.train_size = 500;
    c.data.valid_size = 200;
    c.data.test_size = 200;
    c.optim.batch_size = 100;
    c.sparse.density = 0.1;
    c
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn wait_for(what: &str, timeout: Duration, f: impl FnMut() -> bool) -> Result<()> {
    let done = wait_until(timeout, Duration::from_millis(100), f);
    anyhow::ensure!(done, "timed out waiting for {what}");
    Ok(())
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) has an empty command line.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

#[test]
fn local_sweep_runs_skips_finished_runs_and_restarts_unfinished_ones() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let file = write_sweep(tmp.path(), &format!("{TINY}[grid]\nseed = [1, 2]\n"))?;
    let out = tmp.path().join("out");
    let (f, o) = (
        file.to_str().context("path")?,
        out.to_str().context("path")?,
    );

    // --dry-run lists both runs and writes nothing.
    let dry = sweep(&[f, "--dry-run", "--out", o])?;
    assert!(dry.status.success(), "{}", text(&dry));
    let dirs = expected_dirs(&tiny_base(), &[1, 2])?;
    let listing = text(&dry);
    for (d, seed) in dirs.iter().zip([1, 2]) {
        assert!(listing.contains(&format!("{d}  seed={seed}")), "{listing}");
    }
    assert!(!out.exists());

    let first = sweep(&[f, "--jobs", "2", "--out", o])?;
    assert!(first.status.success(), "{}", text(&first));
    let runs: Vec<PathBuf> = dirs.iter().map(|d| out.join(d)).collect();
    for r in &runs {
        assert!(r.join("summary.json").exists(), "{}", r.display());
        let cfg = TrainConfig::from_toml_file(&r.join("config.toml"))?;
        assert_eq!(cfg.run.out.as_deref(), Some(r.as_path()));
        // The cores split between the 2 jobs.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(cfg.run.threads, Some((cores / 2).max(1)));
    }
    assert!(text(&first).contains("[2/2] done"), "{}", text(&first));
    let logs: Vec<String> = runs.iter().map(|r| read(&r.join("train.log"))).collect();

    // Rerun: nothing starts.
    let again = sweep(&[f, "--jobs", "2", "--out", o])?;
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("2 runs: 2 done, 0 to run"),
        "{}",
        text(&again)
    );
    for (r, l) in runs.iter().zip(&logs) {
        assert_eq!(
            &read(&r.join("train.log")),
            l,
            "{} was started again",
            r.display()
        );
    }

    // A run that died before its first checkpoint (config, no summary) starts again; the
    // other one is left alone.
    for f in ["summary.json", "checkpoint.json", "checkpoint.safetensors"] {
        std::fs::remove_file(runs[0].join(f))?;
    }
    let third = sweep(&[f, "--out", o])?;
    assert!(third.status.success(), "{}", text(&third));
    assert!(
        text(&third).contains("1 done, 1 to run"),
        "{}",
        text(&third)
    );
    assert!(runs[0].join("summary.json").exists());
    let log0 = read(&runs[0].join("train.log"));
    assert_eq!(
        log0.matches("=== rest sweep: starting").count(),
        2,
        "{log0}"
    );
    assert_eq!(read(&runs[1].join("train.log")), logs[1]);

    // A run with a checkpoint but no summary resumes from it.
    std::fs::remove_file(runs[1].join("summary.json"))?;
    let fourth = sweep(&[f, "--out", o])?;
    assert!(fourth.status.success(), "{}", text(&fourth));
    let log1 = read(&runs[1].join("train.log"));
    assert!(
        log1.contains("=== rest sweep: resuming from the checkpoint"),
        "{log1}"
    );
    assert!(log1.contains("resumed from"), "{log1}");
    assert!(runs[1].join("summary.json").exists());

    let st = sweep(&["--status", "--out", o])?;
    assert!(st.status.success(), "{}", text(&st));
    assert!(
        text(&st).starts_with("2 runs: 2 done, 0 running"),
        "{}",
        text(&st)
    );
    Ok(())
}

#[test]
fn a_failing_run_is_reported_with_its_error_and_the_sweep_fails() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // An empty data folder passes the config check but fails when the run loads it.
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data)?;
    let file = write_sweep(
        tmp.path(),
        &format!("[base]\nepochs = 1\ndata = {:?}\n", data.to_string_lossy()),
    )?;
    let out = tmp.path().join("out");
    let o = out.to_str().context("path")?;
    let f = file.to_str().context("path")?;
    let r = sweep(&[f, "--out", o])?;
    let t = text(&r);
    assert!(!r.status.success(), "{t}");
    assert!(t.contains("FAILED (exit 1)"), "{t}");
    assert!(t.contains("1 of 1 runs failed"), "{t}");
    let st = text(&sweep(&["--status", "--out", o])?);
    assert!(
        st.starts_with("1 runs: 0 done, 0 running, 0 queued, 1 failed"),
        "{st}"
    );
    assert!(st.contains("exit 1: error:"), "{st}");
    Ok(())
}

/// Starts a sweep of two runs long enough to be interrupted; returns it once both runs
/// have logged `marker` (and their processes hold the runs' locks).
fn start_long_sweep(tmp: &Path, marker: &str) -> Result<(Child, Vec<PathBuf>)> {
    let file = write_sweep(
        tmp,
        "[base]\nepochs = 3\ntrain_size = 3000\nvalid_size = 200\ntest_size = 200\n\
         density = 1.0\nbatch_size = 50\n[grid]\nseed = [1, 2]\n",
    )?;
    let mut base = TrainConfig::default();
    base.optim.epochs = 3;
    base.data.train_size = 3000;
    base.data.valid_size = 200;
    base.data.test_size = 200;
    base.sparse.density = 1.0;
    base.optim.batch_size = 50;
    let out = tmp.join("out");
    let child = Command::new(BIN)
        .args(["sweep", file.to_str().context("path")?, "--jobs", "2"])
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let runs: Vec<PathBuf> = expected_dirs(&base, &[1, 2])?
        .into_iter()
        .map(|d| out.join(d))
        .collect();
    wait_for(marker, Duration::from_secs(300), || {
        runs.iter().all(|r| {
            read(&r.join("run.lock")).contains("pid=")
                && read(&r.join("train.log")).contains(marker)
        })
    })?;
    Ok((child, runs))
}

/// The pid of the process holding the run (from its lock file).
fn pid_of(run: &Path) -> Result<u32> {
    let text = read(&run.join("run.lock"));
    let pid = text
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .with_context(|| format!("no pid in {}/run.lock: {text}", run.display()))?;
    Ok(pid.trim().parse()?)
}

/// Runs the sweep of [`start_long_sweep`] again, to the end.
fn rerun_long_sweep(tmp: &Path) -> Result<Output> {
    Ok(Command::new(BIN)
        .args([
            "sweep",
            tmp.join("sweep.toml").to_str().context("p")?,
            "--jobs",
            "2",
        ])
        .arg("--out")
        .arg(tmp.join("out"))
        .output()?)
}

#[test]
fn ctrl_c_stops_every_run_with_a_checkpoint_and_the_rerun_resumes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // Interrupted in epoch 2 of 3 (the trainer's signal handler is surely installed).
    let (child, runs) = start_long_sweep(tmp.path(), "epoch 1/3")?;
    let pids: Vec<u32> = runs.iter().map(|r| pid_of(r)).collect::<Result<_>>()?;
    let k = sigint(child.id())?;
    assert!(k.success());
    let o = child.wait_with_output()?;
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("sweep interrupted"), "{t}");
    assert!(t.contains("rerun the same command"), "{t}");
    for (r, pid) in runs.iter().zip(pids) {
        assert!(!alive(pid), "run process {pid} still alive");
        assert!(!r.join("summary.json").exists());
        assert!(
            read(&r.join("train.log")).contains("checkpoint written"),
            "{}",
            read(&r.join("train.log"))
        );
    }
    let st = text(&sweep(&[
        "--status",
        "--out",
        tmp.path().join("out").to_str().context("p")?,
    ])?);
    assert!(
        st.starts_with("2 runs: 0 done, 0 running, 0 queued, 0 failed, 2 stopped"),
        "{st}"
    );

    let again = rerun_long_sweep(tmp.path())?;
    assert!(again.status.success(), "{}", text(&again));
    for r in &runs {
        assert!(r.join("summary.json").exists());
        assert!(read(&r.join("train.log")).contains("resuming from the checkpoint"));
    }
    Ok(())
}

#[test]
fn after_kill_9_the_rerun_waits_for_runs_in_flight_instead_of_restarting_them() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (mut child, runs) = start_long_sweep(tmp.path(), "model selection")?;
    let pids: Vec<u32> = runs.iter().map(|r| pid_of(r)).collect::<Result<_>>()?;
    child.kill()?; // SIGKILL
    child.wait()?;
    assert!(pids.iter().all(|&p| alive(p)), "the runs outlive the sweep");
    let again = rerun_long_sweep(tmp.path())?;
    let t = text(&again);
    assert!(again.status.success(), "{t}");
    assert!(t.contains("2 held by other processes (waited for)"), "{t}");
    for r in &runs {
        assert!(r.join("summary.json").exists());
        let log = read(&r.join("train.log"));
        assert_eq!(
            log.matches("=== rest sweep:").count(),
            1,
            "restarted: {log}"
        );
    }
    Ok(())
}

/// Two sweeps over one directory, the second started `delay` after the first: each run is
/// trained once (one header in its log), both sweeps succeed, and the report is there.
fn two_sweeps_over_one_directory(delay: Duration) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let file = write_sweep(tmp.path(), &format!("{TINY}[grid]\nseed = [1, 2, 3, 4]\n"))?;
    let out = tmp.path().join("out");
    let start = || {
        Command::new(BIN)
            .arg("sweep")
            .arg(&file)
            .arg("--out")
            .arg(&out)
            .args(["--jobs", "1", "--threads", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let a = start()?;
    std::thread::sleep(delay);
    let b = start()?;
    let (a, b) = (a.wait_with_output()?, b.wait_with_output()?);
    assert!(a.status.success(), "first sweep: {}", text(&a));
    assert!(b.status.success(), "second sweep: {}", text(&b));
    for d in expected_dirs(&tiny_base(), &[1, 2, 3, 4])? {
        let run = out.join(&d);
        assert!(run.join("summary.json").exists(), "{d} not done");
        let log = read(&run.join("train.log"));
        assert_eq!(
            log.matches("=== rest sweep:").count(),
            1,
            "{d} trained more than once:\n{log}\n--- first sweep:\n{}\n--- second sweep:\n{}",
            text(&a),
            text(&b)
        );
        assert_eq!(log.matches("run directory:").count(), 1, "{log}");
    }
    let results = read(&out.join("results.csv"));
    assert_eq!(results.lines().count(), 5, "{results}");
    assert!(out.join("report.md").exists());
    // Both count every run done; the report was written by one and found current by the other.
    for o in [&a, &b] {
        assert!(text(o).contains("[4/4] done"), "{}", text(o));
    }
    let written = [&a, &b]
        .iter()
        .filter(|o| text(o).contains("report: 4 runs ->"))
        .count();
    assert!(written >= 1, "{}\n{}", text(&a), text(&b));
    Ok(())
}

#[test]
fn two_sweeps_started_together_train_each_run_once() -> Result<()> {
    two_sweeps_over_one_directory(Duration::ZERO)
}

#[test]
fn a_second_sweep_started_later_trains_only_what_is_left() -> Result<()> {
    two_sweeps_over_one_directory(Duration::from_millis(2500))
}

/// The paper's experiments (`examples/paper/*.toml`) expand into the runs their README
/// states, every run valid, wherever the user keeps the data folders they name.
#[test]
fn the_paper_sweep_files_expand_into_valid_runs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for d in ["data/cmnist", "data/cfmnist", "data/cifar10c", "data/bffhq"] {
        std::fs::create_dir_all(tmp.path().join(d))?;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/paper");
    let expected = [
        ("cmnist-rest.toml", 108),
        ("cmnist-baselines.toml", 24),
        ("cifar10c-rest.toml", 84),
        ("bffhq-rest.toml", 21),
        ("cmnist-reduced-baselines.toml", 24),
        ("cmnist-reduced-rest.toml", 36),
        ("cmnist-reduced-jtt.toml", 12),
        ("cfmnist-reduced-1pct.toml", 18),
    ];
    let mut seen = 0;
    for e in std::fs::read_dir(&dir)? {
        if e?.path().extension().is_some_and(|x| x == "toml") {
            seen += 1;
        }
    }
    assert_eq!(
        seen,
        expected.len(),
        "a paper sweep file without an expected run count"
    );
    for (file, runs) in expected {
        let o = Command::new(BIN)
            .current_dir(tmp.path())
            .arg("sweep")
            .arg(dir.join(file))
            .args(["--dry-run", "--out", "out"])
            .output()?;
        let t = text(&o);
        assert!(o.status.success(), "{file}: {t}");
        assert!(
            t.contains(&format!("{runs} runs (0 done, {runs} to run)")),
            "{file}: {t}"
        );
    }
    Ok(())
}
