//! `lwi evaluate`: Dice and HD95 of predictions against references, as a table and as JSON.

use crate::Failure;
use crate::files::write_whole;
use crate::plugin::Plugin;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct EvaluateArgs {
    /// Predicted label map, or a folder of them.
    #[arg(long)]
    pred: PathBuf,
    /// Reference label map, or a folder (files matched by name).
    #[arg(long = "ref")]
    reference: PathBuf,
    /// Label values to score (default: every non-zero label present).
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<u32>>,
    /// Also write the full report as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

pub fn run(plugin: &Plugin, a: EvaluateArgs) -> Result<(), Failure> {
    let options = serde_json::json!({ "labels": a.labels });
    let text = plugin.evaluate(&a.pred, &a.reference, &options.to_string())?;
    let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    print_evaluation(&report);
    if let Some(path) = a.json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        write_whole(&path, text.as_bytes())?;
    }
    Ok(())
}

/// The evaluation as a table: one row per case and label, then the means.
fn print_evaluation(report: &serde_json::Value) {
    let fmt = |v: &serde_json::Value, digits: usize| {
        v.as_f64()
            .map_or("-".to_string(), |x| format!("{x:.digits$}"))
    };
    println!(
        "{:<32} {:>6} {:>8} {:>10}",
        "case", "label", "dice", "hd95 mm"
    );
    // Label keys are numbers written as JSON strings: order them as numbers.
    let by_label = |v: &serde_json::Value| {
        let mut rows: Vec<(u64, serde_json::Value)> = v
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, s)| (k.parse().unwrap_or(u64::MAX), s.clone()))
            .collect();
        rows.sort_by_key(|r| r.0);
        rows
    };
    for case in report["cases"].as_array().into_iter().flatten() {
        for (label, s) in by_label(&case["labels"]) {
            println!(
                "{:<32} {label:>6} {:>8} {:>10}",
                case["case"].as_str().unwrap_or(""),
                fmt(&s["dice"], 4),
                fmt(&s["hd95"], 2)
            );
        }
    }
    for (label, s) in by_label(&report["mean"]) {
        println!(
            "{:<32} {label:>6} {:>8} {:>10}",
            "mean",
            fmt(&s["dice"], 4),
            fmt(&s["hd95"], 2)
        );
    }
    if report["synapse_8_mean"].is_object() {
        let s = &report["synapse_8_mean"];
        println!(
            "{:<32} {:>6} {:>8} {:>10}",
            "Synapse 8-organ mean",
            "",
            fmt(&s["dice"], 4),
            fmt(&s["hd95"], 2)
        );
    }
}
