//! ReduceLROnPlateau (PyTorch semantics, mode "min", relative threshold 1e-4): when the
//! monitored value has not improved for more than `patience` epochs, multiply the learning
//! rate by `factor`.

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReduceLrOnPlateau {
    pub factor: f64,
    pub patience: usize,
    pub threshold: f64,
    pub min_lr: f64,
    best: f64,
    bad_epochs: usize,
}

impl ReduceLrOnPlateau {
    pub fn new(factor: f64, patience: usize) -> Self {
        Self {
            factor,
            patience,
            threshold: 1e-4,
            min_lr: 0.0,
            best: f64::MAX,
            bad_epochs: 0,
        }
    }

    /// Feeds one epoch's value; returns the new learning rate.
    pub fn step(&mut self, value: f64, lr: f64) -> f64 {
        if value < self.best * (1.0 - self.threshold) {
            self.best = value;
            self.bad_epochs = 0;
            lr
        } else {
            self.bad_epochs += 1;
            if self.bad_epochs > self.patience {
                self.bad_epochs = 0;
                (lr * self.factor).max(self.min_lr)
            } else {
                lr
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduces_after_patience_epochs_without_improvement() {
        let mut s = ReduceLrOnPlateau::new(0.1, 2);
        let mut lr = 1.0;
        lr = s.step(1.0, lr); // best 1.0
        assert_eq!(lr, 1.0);
        lr = s.step(1.0, lr); // bad 1
        lr = s.step(0.99995, lr); // within threshold: bad 2
        assert_eq!(lr, 1.0);
        lr = s.step(1.2, lr); // bad 3 > patience 2 -> reduce
        assert!((lr - 0.1).abs() < 1e-12);
        lr = s.step(0.5, lr); // improvement
        assert!((lr - 0.1).abs() < 1e-12);
    }
}
