//! Progress display: a bar on a terminal, plain lines when piped, JSON lines with `--json`.

use crate::plugin::ProgressEvent;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub struct Bar {
    json: bool,
    label: String,
    bar: Option<ProgressBar>,
}

impl Bar {
    pub fn new(json: bool, label: String) -> Bar {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_message(label.clone());
            b
        });
        if !json && bar.is_none() {
            eprintln!("{label}: started");
        }
        Bar { json, label, bar }
    }

    /// Shows an event; never cancels (Ctrl-C ends the process, and outputs are written atomically).
    pub fn update(&self, e: &ProgressEvent) -> bool {
        if self.json {
            println!(
                "{}",
                serde_json::json!({"event": "progress", "case": self.label, "stage": e.stage, "done": e.done, "total": e.total,
                                   "epoch": e.epoch, "loss": e.loss, "metric": e.metric, "message": e.message})
            );
            return true;
        }
        let mut text = format!(
            "{} — {} {}{}",
            self.label,
            e.stage,
            e.done,
            if e.total > 0 {
                format!("/{}", e.total)
            } else {
                String::new()
            }
        );
        if let Some(epoch) = e.epoch {
            text += &format!(" epoch {epoch}");
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
        if let Some(b) = &self.bar {
            b.set_message(text);
            b.tick();
        } else if matches!(
            e.stage,
            "epoch" | "preprocess" | "resample" | "validate" | "setup"
        ) {
            eprintln!("{text}");
        }
        true
    }

    pub fn finish(&self, output: &std::path::Path) {
        if self.json {
            println!(
                "{}",
                serde_json::json!({"event": "done", "case": self.label, "output": output})
            );
        } else if let Some(b) = &self.bar {
            b.finish_with_message(format!("{} → {}", self.label, output.display()));
        } else {
            eprintln!("{}: wrote {}", self.label, output.display());
        }
    }
}
