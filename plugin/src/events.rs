//! Progress events and cancellation: long calls report through a [`Progress`] sink, whose answer
//! decides whether to go on. The C callback and the CLI's progress bars both hang on this.

use crate::error::{Error, ErrorKind, Result};

/// One progress report.
#[derive(Debug, Clone, Default)]
pub struct Event {
    /// What is running: "preprocess", "infer", "resample", "train", "validate", ...
    pub stage: &'static str,
    pub done: u64,
    pub total: u64,
    /// Training epoch, when training.
    pub epoch: Option<u64>,
    pub loss: Option<f64>,
    pub metric: Option<f64>,
    pub message: String,
    /// This process's rank in a data-parallel job; None for a single process.
    pub rank: Option<u32>,
}

impl Event {
    /// A stage's count: `done` of `total` (0: unknown).
    pub fn progress(stage: &'static str, done: u64, total: u64) -> Event {
        Event {
            stage,
            done,
            total,
            ..Default::default()
        }
    }
}

/// Receives events; returns false to cancel the call.
pub trait Progress {
    fn report(&mut self, event: &Event) -> bool;
}

/// A sink that ignores events and never cancels.
pub struct Silent;

impl Progress for Silent {
    fn report(&mut self, _: &Event) -> bool {
        true
    }
}

impl<F: FnMut(&Event) -> bool> Progress for F {
    fn report(&mut self, event: &Event) -> bool {
        self(event)
    }
}

/// Reports `event` and turns a cancel answer into `ErrorKind::Cancelled`.
pub fn report(sink: &mut dyn Progress, event: Event) -> Result<()> {
    if sink.report(&event) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Cancelled,
            format!("cancelled by the caller during {}", event.stage),
        ))
    }
}
