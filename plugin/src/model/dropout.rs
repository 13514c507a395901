//! Dropout that a training run can switch off without leaving training mode (normalisation keeps
//! its training behaviour): a per-thread scope, as autocast is one.

use std::cell::Cell;
use tch::Tensor;

thread_local! {
    static OFF: Cell<bool> = const { Cell::new(false) };
}

/// Whether dropout applies in training here: `train`, outside a [`without`] scope.
pub fn active(train: bool) -> bool {
    train && !OFF.with(Cell::get)
}

/// `x.dropout(p, train)`, off inside a [`without`] scope.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Tensor {
    x.dropout(p, active(train))
}

/// `x.feature_dropout(p, train)` (whole channels, `nn.Dropout3d`), off inside a [`without`] scope.
pub fn feature_dropout(x: &Tensor, p: f64, train: bool) -> Tensor {
    x.feature_dropout(p, active(train))
}

/// Runs `f` with dropout off on this thread when `off`.
pub fn without<T>(off: bool, f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            OFF.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(OFF.with(|c| c.replace(off || c.get())));
    f()
}
