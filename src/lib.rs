//! `rest`: reweighted sparse training (REST, Zhao et al., ECML-PKDD 2023) for group-robust,
//! sparse and fast image classifiers.
//!
//! The crate is organised by idea; see `ARCHITECTURE.md` for the map and the data flow of one
//! training step.

pub mod alloc;
pub mod bench;
pub mod cli;
pub mod data;
pub mod device;
pub mod infer;
pub mod kernels;
pub mod models;
pub mod nn;
pub mod report;
pub mod sparse;
pub mod sweep;
pub mod train;
pub mod util;
