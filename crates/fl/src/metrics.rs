//! Per-round metrics: JSON lines and CSV next to each other, a loss-per-round SVG plot, and the
//! final summary table.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{FlError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// 0 = the initial model, before any training.
    pub round: usize,
    pub clients: Vec<usize>,
    pub failed: Vec<usize>,
    /// Token-weighted mean training loss of the round's clients.
    pub train_loss: Option<f64>,
    pub client_train_loss: BTreeMap<usize, f64>,
    pub server_test_loss: Option<f64>,
    /// Token-weighted over clients.
    pub client_val_loss: Option<f64>,
    pub client_test_loss: Option<f64>,
    pub bytes_down: usize,
    pub bytes_up: usize,
    pub bytes_down_per_client: BTreeMap<usize, usize>,
    pub bytes_up_per_client: BTreeMap<usize, usize>,
    pub seconds: f64,
    pub nan_skipped: usize,
    /// Distributed mode: bytes on the wire (encoded tensors plus framing) per client.
    #[serde(default)]
    pub wire_down_per_client: BTreeMap<usize, usize>,
    #[serde(default)]
    pub wire_up_per_client: BTreeMap<usize, usize>,
    /// Learning rate at each client's first and last local step of the round.
    #[serde(default)]
    pub client_lr: BTreeMap<usize, (f64, f64)>,
    /// Each evaluated client's losses by split: `val`/`test` with the parameters it uses (its
    /// personal ones where it has them), `global_val`/`global_test` with the global ones when
    /// those differ.
    #[serde(default)]
    pub client_losses: BTreeMap<usize, BTreeMap<String, f64>>,
    /// Token-weighted over clients, with the global parameters (personalised runs only).
    #[serde(default)]
    pub client_global_test_loss: Option<f64>,
    /// Over the evaluated clients' own test losses (`client_losses`): the mean (each client
    /// once), the worst and the best, as (client, loss).
    #[serde(default)]
    pub client_test_mean: Option<f64>,
    #[serde(default)]
    pub client_test_worst: Option<(usize, f64)>,
    #[serde(default)]
    pub client_test_best: Option<(usize, f64)>,
    /// What the strategy reports after aggregating (FedEx: `fedex_theta`).
    #[serde(default)]
    pub strategy: BTreeMap<String, Vec<f64>>,
    /// `eval.accuracy`: the global adapter's generation-based score (e.g. GSM8K accuracy) on
    /// the first `eval.accuracy_samples` records of `eval.accuracy_split`.
    #[serde(default)]
    pub server_accuracy: Option<f64>,
    /// Offsite tuning: the server test loss of the full model with the global edge layers
    /// plugged in (`server_test_loss` is then the emulator's).
    #[serde(default)]
    pub plugin_test_loss: Option<f64>,
}

/// Mean (each client counted once), worst and best of one split's per-client losses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub mean: f64,
    pub worst: (usize, f64),
    pub best: (usize, f64),
}

impl RoundRecord {
    /// The spread of `split` over the clients evaluated this round (None: none were).
    pub fn spread(&self, split: &str) -> Option<Spread> {
        let v: Vec<(usize, f64)> = self
            .client_losses
            .iter()
            .filter_map(|(c, l)| Some((*c, *l.get(split)?)))
            .collect();
        let first = *v.first()?;
        let worst = v
            .iter()
            .copied()
            .fold(first, |a, b| if b.1 > a.1 { b } else { a });
        let best = v
            .iter()
            .copied()
            .fold(first, |a, b| if b.1 < a.1 { b } else { a });
        let mean = v.iter().map(|x| x.1).sum::<f64>() / v.len() as f64;
        Some(Spread { mean, worst, best })
    }
}

fn io(path: &Path, e: impl std::fmt::Display) -> FlError {
    FlError::File {
        path: path.into(),
        msg: e.to_string(),
    }
}

fn opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.6}")).unwrap_or_default()
}

/// Rewrites metrics.jsonl, metrics.csv and loss.svg from all records so far.
pub fn write_all(dir: &Path, records: &[RoundRecord]) -> Result<()> {
    let jl: String = records
        .iter()
        .map(|r| serde_json::to_string(r).expect("json") + "\n")
        .collect();
    let p = dir.join("metrics.jsonl");
    std::fs::write(&p, jl).map_err(|e| io(&p, e))?;
    let mut csv = String::from("round,train_loss,server_test_loss,client_val_loss,client_test_loss,client_test_mean,client_test_worst,client_test_best,client_global_test_loss,bytes_down,bytes_up,seconds,server_accuracy,plugin_test_loss\n");
    for r in records {
        csv += &format!(
            "{},{},{},{},{},{},{},{},{},{},{},{:.3},{},{}\n",
            r.round,
            opt(r.train_loss),
            opt(r.server_test_loss),
            opt(r.client_val_loss),
            opt(r.client_test_loss),
            opt(r.client_test_mean),
            opt(r.client_test_worst.map(|w| w.1)),
            opt(r.client_test_best.map(|b| b.1)),
            opt(r.client_global_test_loss),
            r.bytes_down,
            r.bytes_up,
            r.seconds,
            opt(r.server_accuracy),
            opt(r.plugin_test_loss)
        );
    }
    let p = dir.join("metrics.csv");
    std::fs::write(&p, csv).map_err(|e| io(&p, e))?;
    crate::tensorboard::write(dir, records)?;
    plot(&dir.join("loss.svg"), records)
}

type Series = (&'static str, plotters::style::RGBColor, Vec<(f64, f64)>);

fn plot(path: &Path, records: &[RoundRecord]) -> Result<()> {
    use plotters::prelude::*;
    let series: Vec<Series> = vec![
        (
            "train",
            BLUE,
            records
                .iter()
                .filter_map(|r| r.train_loss.map(|l| (r.round as f64, l)))
                .collect(),
        ),
        (
            "server test",
            RED,
            records
                .iter()
                .filter_map(|r| r.server_test_loss.map(|l| (r.round as f64, l)))
                .collect(),
        ),
        (
            "plug-in test (full model)",
            CYAN,
            records
                .iter()
                .filter_map(|r| r.plugin_test_loss.map(|l| (r.round as f64, l)))
                .collect(),
        ),
        (
            "client val",
            GREEN,
            records
                .iter()
                .filter_map(|r| r.client_val_loss.map(|l| (r.round as f64, l)))
                .collect(),
        ),
        (
            "client test",
            MAGENTA,
            records
                .iter()
                .filter_map(|r| r.client_test_loss.map(|l| (r.round as f64, l)))
                .collect(),
        ),
        (
            "worst client test",
            BLACK,
            records
                .iter()
                .filter_map(|r| Some((r.round as f64, r.client_test_worst?.1)))
                .collect(),
        ),
        (
            "client test, global params",
            CYAN,
            records
                .iter()
                .filter_map(|r| r.client_global_test_loss.map(|l| (r.round as f64, l)))
                .collect(),
        ),
    ];
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.2.iter().copied()).collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (x1, y0, y1) = pts
        .iter()
        .fold((1.0f64, f64::INFINITY, f64::NEG_INFINITY), |a, p| {
            (a.0.max(p.0), a.1.min(p.1), a.2.max(p.1))
        });
    let pad = ((y1 - y0) * 0.1).max(1e-3);
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss per round", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..x1, (y0 - pad)..(y1 + pad))?;
        // Rounds are integers: one tick per round (at most ~20 labels, then every k-th).
        let rounds = x1 as usize;
        let step = rounds.div_ceil(20).max(1);
        chart
            .configure_mesh()
            .x_labels(rounds / step + 1)
            .x_label_formatter(&|x| {
                let r = x.round();
                if (x - r).abs() < 1e-9 && (r as usize).is_multiple_of(step) {
                    format!("{}", r as usize)
                } else {
                    String::new()
                }
            })
            .x_desc("round")
            .y_desc("loss")
            .draw()?;
        for (name, color, data) in series.into_iter().filter(|s| !s.2.is_empty()) {
            chart
                .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart.draw_series(data.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| io(path, e))
}

/// The end-of-run table.
pub fn summary_table(records: &[RoundRecord]) -> String {
    let mut s = format!(
        "{:>5} {:>10} {:>12} {:>10} {:>10} {:>9} {:>9} {:>7}\n",
        "round", "train", "server test", "client val", "client test", "MB down", "MB up", "s"
    );
    let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    for r in records {
        s += &format!(
            "{:>5} {:>10} {:>12} {:>10} {:>10} {:>9.3} {:>9.3} {:>7.1}\n",
            r.round,
            f(r.train_loss),
            f(r.server_test_loss),
            f(r.client_val_loss),
            f(r.client_test_loss),
            r.bytes_down as f64 / 1e6,
            r.bytes_up as f64 / 1e6,
            r.seconds
        );
    }
    let last = records.iter().rev().find_map(|r| {
        Some((
            r.round,
            r.client_test_mean?,
            r.client_test_worst?,
            r.client_test_best?,
        ))
    });
    if let Some((round, mean, worst, best)) = last {
        s += &format!(
            "per-client test loss (round {round}): mean {mean:.4}, worst {:.4} (client {}), best {:.4} (client {})\n",
            worst.1, worst.0, best.1, best.0
        );
    }
    let acc: Vec<String> = records
        .iter()
        .filter_map(|r| Some(format!("round {}: {:.4}", r.round, r.server_accuracy?)))
        .collect();
    if !acc.is_empty() {
        s += &format!("server accuracy: {}\n", acc.join(", "));
    }
    let plug: Vec<String> = records
        .iter()
        .filter_map(|r| Some(format!("round {}: {:.4}", r.round, r.plugin_test_loss?)))
        .collect();
    if !plug.is_empty() {
        s += &format!(
            "offsite: server test is the emulator's; plug-in (full model) test loss: {}\n",
            plug.join(", ")
        );
    }
    if let Some((round, eps)) = records
        .iter()
        .rev()
        .find_map(|r| Some((r.round, *r.strategy.get("dp_epsilon")?.first()?)))
    {
        s += &format!("differential privacy: ε = {eps:.4} after round {round}\n");
    }
    let down: usize = records.iter().map(|r| r.bytes_down).sum();
    let up: usize = records.iter().map(|r| r.bytes_up).sum();
    s += &format!(
        "total: {:.3} MB down, {:.3} MB up",
        down as f64 / 1e6,
        up as f64 / 1e6
    );
    s
}
