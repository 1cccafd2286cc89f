//! Dynamic sparse training: owns the weight masks (initial ERK densities, prune/grow updates,
//! the prune-rate schedule) and nothing else. Models and the training loop ask it for masks.
