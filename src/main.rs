//! The `rest` binary: parses the command line and dispatches to the library. Errors are
//! printed as one line (`error: ...`) with a non-zero exit code.

use clap::Parser;
use rest::cli::{Cli, Command, DataCommand, MakeCommand};
use std::process::ExitCode;

// mimalloc v2 rather than v3: v3 places each allocation above 512 KiB in its own page within
// 32 MiB arena chunks, and our activations are exactly 2^k MiB (16 MiB for a ResNet18 layer1
// tensor at 128 px, batch 64), so with the page header two never share a chunk and the holes
// fragment: the ResNet18 benchmark at 128 px peaked at 743-806 MiB with v3 (varying from run
// to run with the threads' allocation order), 703 MiB with v2 every run, at the same speed.
// Large blocks bypass it (`rest::alloc`: page mappings in an exact-size cache).
#[global_allocator]
static GLOBAL: rest::alloc::CachingAlloc = rest::alloc::CachingAlloc;

fn main() -> ExitCode {
    // `REST_ALLOC=mimalloc`: every block mimalloc's with its defaults (for comparisons).
    if std::env::var_os("REST_ALLOC").is_some_and(|v| v == "mimalloc") {
        rest::alloc::set_enabled(false);
    }
    rest::alloc::configure_mimalloc();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(log_colour())
        .with_writer(std::io::stderr)
        .init();
    for w in rest::kernels::env_warnings() {
        tracing::warn!("{w}");
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Colour in the log only on a terminal, and never with `NO_COLOR` set (https://no-color.org):
/// a log written to a file or a pipe carries no escape codes.
fn log_colour() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Train(args) => {
            let out = if let Some(dir) = &args.sweep_task {
                match sweep_task(dir, args.cfg.run.threads)? {
                    Task::Trained(out) => *out,
                    Task::Done => return Ok(ExitCode::SUCCESS),
                    Task::Held => return Ok(ExitCode::from(rest::train::lock::EXIT_HELD)),
                }
            } else if let Some(dir) = &args.resume {
                let cfg = rest::train::resume_config(dir)?;
                // Same thread count as the original run, for bit-identical results.
                rest::util::set_threads(args.cfg.run.threads.or(cfg.run.threads))?;
                rest::util::in_pool(|| rest::train::resume(&cfg))?
            } else {
                let cfg = args.resolve()?;
                rest::util::set_threads(cfg.run.threads)?;
                rest::util::in_pool(|| rest::train::train_with(&cfg, args.overwrite))?
            };
            println!("{}", rest::report::results_table(&out.summary));
            println!("run directory: {}", out.run_dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Flops(args) => {
            let t = rest::report::flops_for(
                args.model,
                args.density,
                args.erk_power_scale,
                args.input,
                args.classes,
            )?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!(
                    "{} at density {} (ERK), input {}x{}x{}:",
                    args.model.as_str(),
                    args.density,
                    args.input.0,
                    args.input.1,
                    args.input.2
                );
                println!("{}", t.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => rest::bench::main(&args).map(|()| ExitCode::SUCCESS),
        Command::Sweep(args) => rest::sweep::main(&args).map(|()| ExitCode::SUCCESS),
        Command::Eval(a) => {
            let m = rest::infer::load(&a.checkpoint)?;
            if !m.exported {
                let dir = a
                    .checkpoint
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                rest::train::output::refuse_in_memory(dir, "rest eval")?;
            }
            let mut cfg = m.config.clone();
            cfg.data.conflict_pct = a.conflict_pct.unwrap_or(cfg.data.conflict_pct);
            cfg.data.color_std = a.color_std.unwrap_or(cfg.data.color_std);
            cfg.data.data_seed = a.data_seed.unwrap_or(cfg.data.data_seed);
            cfg.validate()?;
            let rest::infer::DataSource::Builtin = a.data;
            let report = rest::infer::evaluate(&m, &rest::data::load(&cfg.data.plan().source)?)?;
            let out = a
                .out
                .unwrap_or_else(|| a.checkpoint.with_file_name("eval.json"));
            rest::train::output::write_json(&out, &report)?;
            println!(
                "{}\nwritten: {}",
                rest::infer::eval_table(&report),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Predict(a) => {
            let m = rest::infer::load(&a.checkpoint)?;
            for p in rest::infer::predict::predict(&m, &a.images, a.top_k)? {
                println!("{}", serde_json::to_string(&p)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export(a) => {
            let s = rest::infer::export::export(&a.checkpoint, &a.out, a.f16)?;
            println!(
                "{}: {} bytes; dense safetensors of the same weights: {} bytes ({:.1}x smaller)",
                a.out.display(),
                s.export_bytes,
                s.dense_bytes,
                s.ratio
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Report(a) => {
            let r = rest::report::write_report(&a.dir)?;
            if r.kind == rest::report::ReportKind::Collection {
                println!(
                    "{} runs read, {} unreadable summary.json skipped, {} runs without summary.json",
                    r.runs,
                    r.skipped.len(),
                    r.unfinished.len()
                );
            }
            for f in &r.files {
                println!("{}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Data(DataCommand::Export(args)) => {
            let cfg = args.resolve()?;
            let ds = rest::data::load(&cfg.data.plan().source)?;
            let files = rest::data::export::export_npy(&ds, &args.out)?;
            for f in files {
                println!("{}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Data(DataCommand::Make(MakeCommand::ColoredMnist(args)))
            if args.format != rest::data::make::MakeFormat::Dfa =>
        {
            let r = rest::data::make::make_colored_mnist_table(
                &args.spec(),
                args.format,
                args.conflict_pct,
            )?;
            for (s, (n, c)) in ["train", "valid", "test"].iter().zip(r.counts) {
                println!("{s:<6} {n:>6} ({c} conflicting)");
            }
            println!("table: {}", r.table.display());
            if args.format == rest::data::make::MakeFormat::Waterbirds {
                println!(
                    "the waterbirds layout trains at 224 px (group_DRO's pipeline): pass \
                     --image-size 28 for these digits"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Data(DataCommand::Make(MakeCommand::ColoredMnist(args))) => {
            let r = rest::data::make::make_colored_mnist(&args.spec())?;
            println!("ratio     align  conflict  valid (conflict)");
            for c in &r.ratios {
                println!(
                    "{:<8} {:>6} {:>9} {:>6} ({})",
                    c.token, c.align, c.conflict, c.valid, c.valid_conflict
                );
            }
            println!("test: {} (colour-balanced)", r.test);
            println!("dataset: {}", args.out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Data(DataCommand::Make(MakeCommand::CorruptedCifar10(args))) => {
            let r = rest::data::make_cifar::make_corrupted_cifar10(&args.spec())?;
            println!("ratio     align  conflict  valid (conflict)");
            for c in &r.ratios {
                println!(
                    "{:<8} {:>6} {:>9} {:>6} ({})",
                    c.token, c.align, c.conflict, c.valid, c.valid_conflict
                );
            }
            println!("test: {} (corruption-balanced)", r.test);
            println!("dataset: {}", args.out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Data(DataCommand::Preview(args)) => {
            let l = rest::data::dfa::load(&rest::data::dfa::DfaOptions {
                root: args.path.clone(),
                kind: args.dataset,
                conflict_pct: args.conflict_pct,
                skip_bad: args.skip_bad,
                cache_dir: args.cache_dir.clone(),
            })?;
            let ds = &l.dataset;
            let split = match args.split.as_str() {
                "valid" => &ds.valid,
                "test" => &ds.test,
                _ => &ds.train,
            };
            rest::data::preview::write_preview(split, ds.num_classes, args.per_class, &args.out)?;
            println!("{}", args.out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What `rest train --sweep-task` did.
enum Task {
    Trained(Box<rest::train::TrainOutcome>),
    /// Done already (by another process): nothing written, exit code 0.
    Done,
    /// Another process holds the run: nothing written, exit code 75.
    Held,
}

/// `rest train --sweep-task DIR`: trains one prepared run of a sweep unless another process
/// holds it or it is done. The header line goes to the run's log (this process's stderr)
/// only once the run is ours, so a run's `train.log` holds exactly the attempts that trained
/// it.
fn sweep_task(dir: &std::path::Path, threads: Option<usize>) -> anyhow::Result<Task> {
    use rest::train::{self as trainer, SweepTask};
    let (lock, cfg, resume) = match trainer::claim_sweep_task(dir)? {
        SweepTask::Held(_) => return Ok(Task::Held),
        SweepTask::Done => return Ok(Task::Done),
        SweepTask::Ready {
            lock,
            mut cfg,
            resume,
        } => {
            // A new run records its thread count in its config.toml (a resumed one keeps its
            // own), as `rest train --config ... --threads N` does.
            if !resume && threads.is_some() {
                cfg.run.threads = threads;
            }
            (lock, cfg, resume)
        }
    };
    let slurm = match (
        std::env::var("SLURM_ARRAY_JOB_ID"),
        std::env::var("SLURM_ARRAY_TASK_ID"),
    ) {
        (Ok(j), Ok(t)) => format!(", slurm task {j}_{t}"),
        _ => String::new(),
    };
    eprintln!(
        "=== rest sweep: {} at {} on {} (pid {}{slurm}) ===",
        if resume {
            "resuming from the checkpoint"
        } else {
            "starting"
        },
        chrono::Local::now().format("%Y-%m-%d %H:%M:%S"),
        gethostname::gethostname().to_string_lossy(),
        std::process::id(),
    );
    rest::util::set_threads(threads.or(cfg.run.threads))?;
    let out = rest::util::in_pool(|| trainer::run_sweep_task(lock, &cfg, resume))?;
    Ok(Task::Trained(Box::new(out)))
}
