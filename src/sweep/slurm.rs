//! The Slurm backend: one `sbatch` job array per sweep submission (task i trains run i with
//! `rest train --sweep-task <run>`, which claims the run, so a local sweep over the same
//! directory and the array never train a run twice, and resumes it from its checkpoint),
//! a dependent one-task job that writes the report, and the `squeue` reading behind
//! `rest sweep --status`.

use super::{Manifest, Prepared, Run, SlurmJob, EXIT_FILE, LOG_FILE, SUMMARY_FILE};
use crate::train::lock::EXIT_HELD;
use crate::util::write_atomic;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// sbatch options of a sweep.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    pub time: Option<String>,
    pub cpus_per_task: Option<usize>,
    pub gres: Option<String>,
    /// At most this many array tasks at once (`--array=...%N`).
    pub max_parallel: Option<usize>,
    pub job_name: String,
}

/// Quotes `s` for a POSIX shell (single quotes).
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Checks a value that goes into an `#SBATCH` line: one line, no spaces.
fn check_option(flag: &str, v: &str) -> Result<()> {
    if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("{flag} {v:?}: give a value without spaces, as sbatch takes it");
    }
    Ok(())
}

impl SlurmOptions {
    fn check(&self) -> Result<()> {
        for (flag, v) in [
            ("--partition", &self.partition),
            ("--time", &self.time),
            ("--gres", &self.gres),
        ] {
            if let Some(v) = v {
                check_option(flag, v)?;
            }
        }
        if self.cpus_per_task == Some(0) {
            bail!("--cpus-per-task must be at least 1");
        }
        Ok(())
    }

    /// `#SBATCH` lines of the resource options (shared by the array and the report job).
    fn resource_lines(&self) -> String {
        let mut s = String::new();
        if let Some(p) = &self.partition {
            let _ = writeln!(s, "#SBATCH --partition={p}");
        }
        if let Some(t) = &self.time {
            let _ = writeln!(s, "#SBATCH --time={t}");
        }
        s
    }
}

/// The job-array script: task `i` trains `run_dirs[i]` (skipped if already done), output
/// appended to `<run>/train.log`, exit status to `<run>/exit_code`.
pub fn sbatch_script(exe: &Path, out: &Path, run_dirs: &[PathBuf], o: &SlurmOptions) -> String {
    let mut s = String::from("#!/bin/bash\n");
    let _ = writeln!(s, "#SBATCH --job-name={}", o.job_name);
    let throttle = o.max_parallel.map(|n| format!("%{n}")).unwrap_or_default();
    let _ = writeln!(
        s,
        "#SBATCH --array=0-{}{throttle}",
        run_dirs.len().saturating_sub(1)
    );
    let _ = writeln!(
        s,
        "#SBATCH --output={}",
        out.join("slurm").join("%A_%a.out").display()
    );
    s.push_str(&o.resource_lines());
    if let Some(c) = o.cpus_per_task {
        let _ = writeln!(s, "#SBATCH --cpus-per-task={c}");
    }
    if let Some(g) = &o.gres {
        let _ = writeln!(s, "#SBATCH --gres={g}");
    }
    s.push_str("# Written by `rest sweep --backend slurm`: one array task per run.\nset -u\n");
    let _ = writeln!(s, "REST={}", sh_quote(&exe.to_string_lossy()));
    s.push_str("RUNS=(\n");
    for d in run_dirs {
        let _ = writeln!(s, "  {}", sh_quote(&d.to_string_lossy()));
    }
    s.push_str(")\n");
    let _ = write!(
        s,
        r#"run="${{RUNS[$SLURM_ARRAY_TASK_ID]}}"
if [ -f "$run/{SUMMARY_FILE}" ]; then
  echo "$run is done already"
  exit 0
fi
threads="${{SLURM_CPUS_PER_TASK:-1}}"
export NO_COLOR=1
# Claims the run (another process may hold it: a local sweep over the same directory),
# resumes it from its checkpoint if it has one, and writes its own header into the log.
"$REST" train --sweep-task "$run" --threads "$threads" >>"$run/{LOG_FILE}" 2>&1
rc=$?
if [ "$rc" = {EXIT_HELD} ]; then
  echo "$run is held by another process (see $run/run.lock); nothing to do"
  exit 0
fi
echo "$rc" >"$run/{EXIT_FILE}.tmp.$$" && mv -f "$run/{EXIT_FILE}.tmp.$$" "$run/{EXIT_FILE}"
exit "$rc"
"#
    );
    s
}

/// The job id in `sbatch --parsable` output (`ID` or `ID;CLUSTER`).
pub fn parse_job_id(stdout: &str) -> Result<String> {
    let id = stdout
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .and_then(|l| l.split(';').next())
        .unwrap_or("");
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!("sbatch printed no job id (got {stdout:?})");
    }
    Ok(id.to_string())
}

/// Runs `sbatch --parsable ARGS`; returns the job id.
fn sbatch(args: &[String]) -> Result<String> {
    let out = Command::new("sbatch")
        .arg("--parsable")
        .args(args)
        .output()
        .context(
            "cannot run sbatch: run this on a Slurm login node (sbatch on PATH), or use \
             --backend local",
        )?;
    if !out.status.success() {
        bail!(
            "sbatch failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_job_id(&String::from_utf8_lossy(&out.stdout))
}

/// squeue lines `ID STATE` (with `-r`: one per array task, `JOB_TASK`) -> state by id.
pub fn parse_squeue(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

/// The queue state of every task of `job_ids` still known to squeue (`JOB_TASK` -> state).
/// One query per job: a job that left the queue makes squeue fail for the whole list.
pub fn squeue_states(job_ids: &[String]) -> Result<HashMap<String, String>> {
    let mut states = HashMap::new();
    for id in job_ids {
        let out = Command::new("squeue")
            .args(["-h", "-r", "-o", "%i %T", "-j", id])
            .output()
            .context("cannot run squeue")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("Invalid job id") {
                continue; // left the queue: no state
            }
            bail!("squeue failed ({}): {}", out.status, err.trim());
        }
        states.extend(parse_squeue(&String::from_utf8_lossy(&out.stdout)));
    }
    Ok(states)
}

/// Writes the array script for the runs still to do and (if `submit`) submits it and the
/// report job; records the job in the manifest.
pub fn run_slurm(
    out: &Path,
    runs: &[Run],
    prepared: &[Prepared],
    o: &SlurmOptions,
    exe: &Path,
    submit: bool,
) -> Result<()> {
    o.check()?;
    let todo: Vec<&Run> = runs
        .iter()
        .zip(prepared)
        .filter(|(_, p)| !matches!(p, Prepared::Done))
        .map(|(r, _)| r)
        .collect();
    let done = runs.len() - todo.len();
    if todo.is_empty() {
        println!("all {} runs are done; writing the report", runs.len());
        return super::after_sweep(out);
    }
    for (r, p) in runs.iter().zip(prepared) {
        if let Prepared::Claimed(h) = p {
            println!(
                "note: run {} is being trained by {}; its array task will find it done or \
                 take it over if that process stops",
                r.name,
                h.short()
            );
        }
    }
    let dirs: Vec<PathBuf> = todo.iter().map(|r| out.join(&r.name)).collect();
    std::fs::create_dir_all(out.join("slurm"))
        .with_context(|| format!("cannot create {}", out.join("slurm").display()))?;
    let script = out.join("slurm").join("sweep.sbatch");
    write_atomic(&script, sbatch_script(exe, out, &dirs, o).as_bytes())?;
    println!(
        "{} runs ({done} done, {} to run); job array script: {}",
        runs.len(),
        todo.len(),
        script.display()
    );
    if !submit {
        println!(
            "not submitted (--no-submit): submit it with `sbatch {}`",
            script.display()
        );
        return Ok(());
    }
    let job = sbatch(&[script.to_string_lossy().into_owned()])?;
    // The report, once every task has ended (whatever their exit status).
    let mut report_args = vec![
        format!("--dependency=afterany:{job}"),
        format!("--job-name={}-report", o.job_name),
        format!(
            "--output={}",
            out.join("slurm").join("report-%j.out").display()
        ),
    ];
    if let Some(p) = &o.partition {
        report_args.push(format!("--partition={p}"));
    }
    report_args.push(format!(
        "--wrap={} sweep --report-only --out {}",
        sh_quote(&exe.to_string_lossy()),
        sh_quote(&out.to_string_lossy())
    ));
    let report_job = match sbatch(&report_args) {
        Ok(id) => Some(id),
        Err(e) => {
            eprintln!(
                "warning: the report job was not submitted ({e:#}); write it later with \
                 `rest sweep --report-only --out {}`",
                out.display()
            );
            None
        }
    };
    let job_entry = SlurmJob {
        job_id: job.clone(),
        runs: todo.iter().map(|r| r.name.clone()).collect(),
        report_job_id: report_job,
    };
    super::with_sweep_lock(out, || {
        let mut manifest = Manifest::load(out)?;
        manifest.slurm_jobs.push(job_entry);
        manifest.save(out)
    })?;
    println!(
        "submitted job array {job} ({} tasks); follow it with `rest sweep --status --out {}`",
        todo.len(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_has_one_task_per_run_and_the_options() {
        let o = SlurmOptions {
            partition: Some("gpu".into()),
            time: Some("2:00:00".into()),
            cpus_per_task: Some(4),
            gres: Some("gpu:1".into()),
            max_parallel: Some(3),
            job_name: "rest-small".into(),
        };
        let dirs = vec![
            PathBuf::from("/s/a-1"),
            PathBuf::from("/s/b'2"),
            PathBuf::from("/s/c 3"),
        ];
        let s = sbatch_script(Path::new("/bin/rest"), Path::new("/s"), &dirs, &o);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "#!/bin/bash");
        for l in [
            "#SBATCH --job-name=rest-small",
            "#SBATCH --array=0-2%3",
            "#SBATCH --output=/s/slurm/%A_%a.out",
            "#SBATCH --partition=gpu",
            "#SBATCH --time=2:00:00",
            "#SBATCH --cpus-per-task=4",
            "#SBATCH --gres=gpu:1",
            "REST='/bin/rest'",
            "  '/s/a-1'",
            r"  '/s/b'\''2'",
            "  '/s/c 3'",
        ] {
            assert!(lines.contains(&l), "missing {l:?} in\n{s}");
        }
        // Every #SBATCH line comes before the first command (sbatch stops reading there).
        let first_cmd = lines
            .iter()
            .position(|l| l.starts_with("set "))
            .unwrap_or(0);
        assert!(lines[first_cmd..].iter().all(|l| !l.starts_with("#SBATCH")));
        assert!(s.contains(r#""$REST" train --sweep-task "$run" --threads "$threads""#));
        assert!(s.contains(r#"if [ "$rc" = 75 ]"#));
        assert!(s.contains("exit_code"));
    }

    #[test]
    fn script_runs_under_bash_and_treats_held_runs_as_no_failure() -> Result<()> {
        // Run the script's logic with a fake `rest` that records its arguments, fails with 3,
        // or says (75) that another process holds run b.
        if Command::new("bash").arg("--version").output().is_err() {
            return Ok(());
        }
        let tmp = tempfile::tempdir()?;
        let t = tmp.path();
        let fake = t.join("fake-rest");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\n\
             case \"$3\" in */b) exit 75;; esac\nexit 3\n",
        )?;
        let chmod = Command::new("chmod").arg("+x").arg(&fake).status()?;
        assert!(chmod.success());
        let dirs: Vec<PathBuf> = ["a", "b", "c"].iter().map(|d| t.join(d)).collect();
        for d in &dirs {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(dirs[2].join(SUMMARY_FILE), "{}")?;
        let script = t.join("s.sbatch");
        std::fs::write(
            &script,
            sbatch_script(&fake, t, &dirs, &SlurmOptions::default()),
        )?;
        let mut codes = Vec::new();
        for task in 0..3 {
            let st = Command::new("bash")
                .arg(&script)
                .env("SLURM_ARRAY_TASK_ID", task.to_string())
                .env("SLURM_CPUS_PER_TASK", "2")
                .status()?;
            codes.push(st.code());
        }
        assert_eq!(codes, vec![Some(3), Some(0), Some(0)]);
        let calls = std::fs::read_to_string(t.join("calls"))?;
        let a = dirs[0].display();
        let b = dirs[1].display();
        assert_eq!(
            calls,
            format!("train --sweep-task {a} --threads 2\ntrain --sweep-task {b} --threads 2\n")
        );
        assert_eq!(std::fs::read_to_string(dirs[0].join(EXIT_FILE))?, "3\n");
        assert!(!dirs[1].join(EXIT_FILE).exists());
        assert!(!dirs[2].join(EXIT_FILE).exists());
        Ok(())
    }

    #[test]
    fn sbatch_and_squeue_output() -> Result<()> {
        assert_eq!(parse_job_id("1234\n")?, "1234");
        assert_eq!(parse_job_id("77;cluster2\n")?, "77");
        assert!(parse_job_id("Submitted batch job 5").is_err());
        assert!(parse_job_id("").is_err());
        let q = parse_squeue("12_0 RUNNING\n12_1 PENDING\n\n13 PENDING\n");
        assert_eq!(q.len(), 3);
        assert_eq!(q["12_1"], "PENDING");
        assert_eq!(q["13"], "PENDING");
        Ok(())
    }

    #[test]
    fn options_with_spaces_are_refused() {
        let o = SlurmOptions {
            partition: Some("a b".into()),
            ..Default::default()
        };
        assert!(o
            .check()
            .expect_err("space")
            .to_string()
            .contains("--partition"));
        let o = SlurmOptions {
            cpus_per_task: Some(0),
            ..Default::default()
        };
        assert!(o.check().is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
