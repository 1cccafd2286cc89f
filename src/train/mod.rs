//! Training (being written).
