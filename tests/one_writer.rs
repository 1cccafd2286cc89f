//! One run, one writer, with the real binary: `--out` of a directory that holds a run is
//! refused (its files stay byte for byte) unless `--overwrite`; a run another process is
//! training cannot be resumed or overwritten; after `kill -9` the run resumes at once (the
//! lock died with its process).

mod common;

use anyhow::{Context, Result};
use common::{text, tree, BIN};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A tiny run's options (`--config`), with `extra` TOML lines.
fn tiny(dir: &Path, name: &str, extra: &str) -> Result<String> {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "train_size = 500\nvalid_size = 200\ntest_size = 200\nbatch_size = 100\n\
             threads = 1\n{extra}"
        ),
    )?;
    Ok(p.to_str().context("path")?.to_string())
}

fn rest(args: &[&str]) -> Result<Output> {
    Ok(Command::new(BIN).args(args).output()?)
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    tree(dir)
        .into_iter()
        .map(|(rel, bytes)| (rel.to_string_lossy().into_owned(), bytes))
        .collect()
}

#[test]
fn out_of_a_finished_run_is_refused_and_overwrite_replaces_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("a");
    let r = run.to_str().context("path")?;
    let c = tiny(tmp.path(), "tiny.toml", "")?;
    let args = vec!["train", "--config", &c, "--epochs", "2", "--out", r];
    let first = rest(&args)?;
    assert!(first.status.success(), "{}", text(&first));
    std::fs::write(run.join("notes.txt"), "mine")?;
    let before = snapshot(&run);
    assert!(before.contains_key("summary.json") && before.contains_key("run.lock"));

    // The same command again, and one with other options: refused, nothing touched.
    for epochs in ["2", "1"] {
        let o = rest(&["train", "--config", &c, "--epochs", epochs, "--out", r])?;
        let t = text(&o);
        assert!(!o.status.success(), "{t}");
        assert!(t.contains("already holds a finished run"), "{t}");
        assert!(
            t.contains("--overwrite") && t.contains("another --out"),
            "{t}"
        );
        assert_eq!(snapshot(&run), before, "the refused run changed {r}");
    }

    // --overwrite: a new run of 1 epoch replaces it; the user's file stays.
    let o = rest(&[
        "train",
        "--config",
        &c,
        "--epochs",
        "1",
        "--out",
        r,
        "--overwrite",
    ])?;
    assert!(o.status.success(), "{}", text(&o));
    let metrics = std::fs::read_to_string(run.join("metrics.csv"))?;
    assert!(
        !metrics.lines().any(|l| l.starts_with("2,")),
        "epoch 2 of the old run survived: {metrics}"
    );
    assert_eq!(std::fs::read_to_string(run.join("notes.txt"))?, "mine");

    // --overwrite and --resume contradict each other.
    let o = rest(&["train", "--resume", r, "--overwrite"])?;
    assert!(!o.status.success());
    assert!(text(&o).contains("--overwrite"), "{}", text(&o));
    Ok(())
}

#[test]
fn an_unfinished_run_is_refused_with_the_resume_command() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("a");
    let r = run.to_str().context("path")?;
    let c = tiny(tmp.path(), "tiny.toml", "")?;
    let args = ["train", "--config", &c, "--epochs", "1", "--out", r];
    assert!(rest(&args)?.status.success());
    // As if interrupted after its checkpoint.
    std::fs::remove_file(run.join("summary.json"))?;
    let o = rest(&args)?;
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("an unfinished run with a checkpoint"), "{t}");
    assert!(t.contains(&format!("rest train --resume {r}")), "{t}");
    Ok(())
}

#[test]
fn a_live_run_cannot_be_resumed_twice_and_kill_9_leaves_no_stale_lock() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("live");
    let r = run.to_str().context("path")?;
    let c = tmp.path().join("long.toml");
    std::fs::write(
        &c,
        "train_size = 3000\nvalid_size = 200\ntest_size = 200\nbatch_size = 50\n\
         density = 1.0\nepochs = 6\nthreads = 1\n",
    )?;
    let c = c.to_str().context("path")?;
    let mut child = Command::new(BIN)
        .args(["train", "--config", c, "--out", r])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // Once the first epoch's checkpoint is written, the run can be resumed.
    let t = Instant::now();
    while !run.join("checkpoint.json").exists() {
        if t.elapsed() > Duration::from_secs(300) || child.try_wait()?.is_some() {
            let _ = child.kill();
            anyhow::bail!("the run wrote no checkpoint");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = child.id();
    let held = [
        vec!["train", "--resume", r],
        vec!["train", "--out", r, "--overwrite"],
        vec!["train", "--out", r],
    ];
    for args in &held {
        let o = rest(args)?;
        let t = text(&o);
        assert!(!o.status.success(), "{args:?} ran beside the live run: {t}");
        assert!(t.contains("in use by another process"), "{t}");
        assert!(t.contains(&format!("pid {pid}")), "{t}");
        assert!(t.contains(" on host ") && t.contains(" since "), "{t}");
    }
    assert!(child.try_wait()?.is_none(), "the live run stopped");

    child.kill()?; // SIGKILL: no handler runs, the lock goes with the process
    child.wait()?;
    let o = Command::new(BIN)
        .args(["train", "--resume", r, "--threads", "1"])
        .env("REST_LOG", "info")
        .output()?;
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("resumed from"), "{t}");
    assert!(run.join("summary.json").exists());
    Ok(())
}

#[test]
fn the_library_refuses_a_second_run_into_one_directory() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut cfg = rest::train::TrainConfig::default();
    cfg.optim.epochs = 1;
    cfg.data.train_size = 300;
    cfg.data.valid_size = 100;
    cfg.data.test_size = 100;
    cfg.optim.batch_size = 100;
    cfg.run.out = Some(tmp.path().join("lib"));
    rest::train::train(&cfg)?;
    let err = rest::train::train(&cfg)
        .err()
        .context("a second run into the same directory was not refused")?;
    assert!(format!("{err:#}").contains("already holds a finished run"));
    rest::train::train_with(&cfg, true)?;
    Ok(())
}
