//! Progress display: a bar with the epoch, loss and ETA on a terminal, plain lines when piped,
//! JSON lines with `--json`.

use crate::plugin::ProgressEvent;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub struct Bar {
    json: bool,
    label: String,
    bar: Option<ProgressBar>,
    /// The rank of a data-parallel job, once an event has told it: ranks other than 0 stay quiet
    /// (their JSON lines carry it).
    rank: std::cell::Cell<Option<u32>>,
}

/// One line for an event: `epoch 3/15 loss 0.8123 dice 0.7100`, `train 12/60 (epoch 3) loss …`,
/// `preprocess 2/6`, or the stage's message.
pub fn describe(e: &ProgressEvent) -> String {
    let mut text = match e.stage {
        "epoch" => format!("epoch {}/{}", e.done, e.total),
        _ if e.total > 0 => format!("{} {}/{}", e.stage, e.done, e.total),
        _ if e.done > 0 => format!("{} {}", e.stage, e.done),
        _ => e.stage.to_string(),
    };
    if let (Some(epoch), "train" | "validate") = (e.epoch, e.stage) {
        text += &format!(" (epoch {})", epoch + 1);
    }
    if let Some(l) = e.loss {
        text += &format!(" loss {l:.4}");
    }
    if let Some(m) = e.metric {
        text += &format!(" dice {m:.4}");
    }
    if !e.message.is_empty() {
        text += &format!(" {}", e.message);
    }
    text
}

impl Bar {
    pub fn new(json: bool, label: String) -> Bar {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30.cyan/blue}] {pos}/{len} {elapsed_precise} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(label.clone());
            b
        });
        if !json && bar.is_none() {
            eprintln!("{label}: started");
        }
        Bar {
            json,
            label,
            bar,
            rank: Default::default(),
        }
    }

    /// Shows an event; never cancels (Ctrl-C ends the process, and outputs are written atomically).
    pub fn update(&self, e: &ProgressEvent) -> bool {
        if e.rank.is_some() {
            self.rank.set(e.rank);
        }
        if self.json {
            let mut line = serde_json::json!({"event": "progress", "case": self.label, "stage": e.stage, "done": e.done, "total": e.total,
                                   "epoch": e.epoch, "loss": e.loss, "metric": e.metric, "message": e.message});
            if let Some(r) = e.rank {
                line["rank"] = r.into();
            }
            println!("{line}");
            return true;
        }
        if self.quiet() {
            return true;
        }
        let text = describe(e);
        // Lines worth keeping: each epoch's summary, validation results, warnings, stage ends.
        let keep = e.stage == "epoch"
            || e.message.starts_with("warning")
            || (e.stage == "validate" && e.metric.is_some())
            || (matches!(e.stage, "preprocess" | "resample" | "setup") && e.done == e.total);
        match &self.bar {
            Some(b) => {
                // The bar follows the longest-running count: training steps, else the stage's own.
                if e.total > 0 && (e.stage == "train" || b.length() == Some(0)) {
                    b.set_length(e.total);
                    b.set_position(e.done);
                }
                if keep {
                    b.println(format!("{} — {text}", self.label));
                }
                b.set_message(text);
            }
            None if keep => eprintln!("{} — {text}", self.label),
            None => {}
        }
        true
    }

    /// A rank other than 0 of a data-parallel job, without `--json`.
    fn quiet(&self) -> bool {
        !self.json && self.rank.get().is_some_and(|r| r > 0)
    }

    pub fn finish(&self, output: &std::path::Path) {
        if self.json {
            let mut line =
                serde_json::json!({"event": "done", "case": self.label, "output": output});
            if let Some(r) = self.rank.get() {
                line["rank"] = r.into();
            }
            println!("{line}");
        } else if self.quiet() {
            if let Some(b) = &self.bar {
                b.finish_and_clear();
            }
        } else if let Some(b) = &self.bar {
            b.finish_and_clear();
            eprintln!("{}: wrote {}", self.label, output.display());
        } else {
            eprintln!("{}: wrote {}", self.label, output.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(stage: &'a str, done: u64, total: u64, epoch: Option<i64>) -> ProgressEvent<'a> {
        ProgressEvent {
            stage,
            done,
            total,
            epoch,
            loss: Some(0.5),
            metric: None,
            message: "",
            rank: None,
        }
    }

    #[test]
    fn an_epoch_reads_as_one_count() {
        assert_eq!(
            describe(&event("epoch", 1, 15, Some(0))),
            "epoch 1/15 loss 0.5000"
        );
        assert_eq!(
            describe(&event("train", 7, 90, Some(1))),
            "train 7/90 (epoch 2) loss 0.5000"
        );
    }
}
