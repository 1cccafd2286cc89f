//! Training: the loop (`trainer`), the optimizer (`optim`), the learning-rate schedule
//! (`lr`), group metrics (`metrics`), model selection (`select`), run outputs (`output`), the
//! one-writer lock of a run directory (`lock`) and
//! the group-robustness methods (`methods`: ERM, JTT, GroupDRO, balanced sampling).

pub mod checkpoint;
pub mod lock;
pub mod lr;
pub mod methods;
pub mod metrics;
pub mod optim;
pub mod output;
pub mod select;
pub mod trainer;

pub use trainer::{train, TrainOutcome};
