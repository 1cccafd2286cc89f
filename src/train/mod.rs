//! Training: the loop (`trainer`), the optimizer (`optim`), the learning-rate schedule
//! (`lr`), group metrics (`metrics`), model selection (`select`), run outputs (`output`), the
//! one-writer lock of a run directory (`lock`) and
//! the group-robustness methods (`methods`: ERM, JTT, GroupDRO, balanced sampling).

pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod lock;
pub mod lr;
pub mod masked;
pub mod methods;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod output;
mod resume;
pub mod run;
mod scores;
pub mod select;
mod snapshot;
pub mod summary;
pub mod trainer;

pub use trainer::{EpochCallback, EpochReport, Hooks};

pub use config::TrainConfig;
pub use methods::{GroupScheme, Method, MethodOptions, ReweightMode};
pub use optim::OptimOptions;
pub use output::RunOptions;
pub use run::{
    claim_sweep_task, resume, resume_config, run_sweep_task, train, train_on_dataset,
    train_on_dataset_with_hooks, train_with, train_with_hooks, SweepTask,
};
pub use select::SelectRule;
pub use summary::{Summary, TrainOutcome};
