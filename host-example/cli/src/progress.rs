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
            b.set_style(ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
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
            println!("{}", serde_json::json!({"event": "progress", "case": self.label, "stage": e.stage, "done": e.done, "total": e.total, "message": e.message}));
        } else if let Some(b) = &self.bar {
            b.set_message(format!("{} — {} {}{}", self.label, e.stage, e.done, if e.total > 0 { format!("/{}", e.total) } else { String::new() }));
            b.tick();
        } else if e.stage != "infer" {
            eprintln!("{}: {} {}/{}", self.label, e.stage, e.done, e.total);
        }
        true
    }

    pub fn finish(&self, output: &std::path::Path) {
        if self.json {
            println!("{}", serde_json::json!({"event": "done", "case": self.label, "output": output}));
        } else if let Some(b) = &self.bar {
            b.finish_with_message(format!("{} → {}", self.label, output.display()));
        } else {
            eprintln!("{}: wrote {}", self.label, output.display());
        }
    }
}
