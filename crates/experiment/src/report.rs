//! `REPORT.md` and its SVG plots, from the finished cells' `result.json` files: one table per
//! dataset (base model first), the pFL table, the HPO section, and the paper's qualitative
//! findings checked against these numbers.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use crate::cell::{Method, Setting};
use crate::error::{file_err, Result};
use crate::runner::{CellResult, HpoResult};
use crate::study::{Study, TableKind};
use crate::svg;

/// Facts about the run the report states in its header.
pub struct Header {
    pub command: String,
    pub scale: Option<String>,
    pub commit: String,
    pub machine: String,
    /// Seconds of this invocation.
    pub wall_seconds: f64,
}

/// Everything one report covers: the study, results by table, what was not run and why.
pub struct Inputs<'a> {
    pub study: &'a Study,
    pub results: BTreeMap<String, Vec<CellResult>>,
    pub not_run: Vec<(String, String)>,
    pub hpo: Option<HpoResult>,
}

fn f3(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "–".into())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The task score cell: the value and interval, or (Local) the clients' mean and the best.
fn score_text(r: &CellResult) -> String {
    match r.scores.as_slice() {
        [] => "–".into(),
        [(_, s)] => format!(
            "{:.3} [{:.3}, {:.3}] (n={})",
            s.value, s.ci95.0, s.ci95.1, s.count
        ),
        many => {
            let m = mean(&many.iter().map(|x| x.1.value).collect::<Vec<_>>());
            let best = many
                .iter()
                .max_by(|a, b| a.1.value.total_cmp(&b.1.value))
                .expect("non-empty");
            format!(
                "mean {m:.3}; best {} {:.3} [{:.3}, {:.3}]",
                best.0, best.1.value, best.1.ci95.0, best.1.ci95.1
            )
        }
    }
}

/// The score a row is compared by: its value (Local: the clients' mean).
pub fn score_value(r: &CellResult) -> Option<f64> {
    (!r.scores.is_empty()).then(|| mean(&r.scores.iter().map(|x| x.1.value).collect::<Vec<_>>()))
}

fn loss_text(r: &CellResult) -> String {
    match (r.heldout, r.heldout_best) {
        (Some(m), Some(b)) => format!("mean {m:.3}; best {b:.3}"),
        (Some(m), None) => format!("{m:.3}"),
        _ => "–".into(),
    }
}

fn main_table(
    s: &mut String,
    out: &Path,
    key: &str,
    title: &str,
    metric: &str,
    rows: &[CellResult],
) -> Result<()> {
    writeln!(s, "## {title}\n").ok();
    writeln!(
        s,
        "| method | setting | {metric} [95% CI] | held-out loss | trainable params | MB / client / round (up / down) | s / round | peak RSS (MB) |\n|---|---|---|---|---|---|---|---|"
    )
    .ok();
    for r in rows {
        let trained = r.method != Method::Base;
        writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.method.label(),
            r.setting.label(),
            score_text(r),
            loss_text(r),
            if trained {
                r.trainable_params.to_string()
            } else {
                "–".into()
            },
            if trained {
                format!(
                    "{:.3} / {:.3}",
                    r.mb_up_per_client_round, r.mb_down_per_client_round
                )
            } else {
                "–".into()
            },
            if trained {
                format!("{:.1}", r.seconds_per_round)
            } else {
                "–".into()
            },
            r.peak_rss_mb
                .map(|m| format!("{m:.0}"))
                .unwrap_or_else(|| "–".into()),
        )
        .ok();
    }
    let losses: std::collections::BTreeSet<&str> = rows
        .iter()
        .map(|r| r.loss_name.as_str())
        .filter(|n| !n.is_empty())
        .collect();
    writeln!(
        s,
        "\nHeld-out loss: {} (mean token NLL after the last round, on at most `eval.max_samples` records per split).\n",
        losses.into_iter().collect::<Vec<_>>().join("; ")
    )
    .ok();
    let series: Vec<(String, Vec<(f64, f64)>)> = rows
        .iter()
        .filter(|r| !r.loss_curve.is_empty())
        .map(|r| {
            (
                format!("{} {}", r.method.label(), r.setting.label()),
                r.loss_curve.iter().map(|p| (p.0 as f64, p.1)).collect(),
            )
        })
        .collect();
    let lp = format!("{}-loss.svg", key);
    write_file(
        &out.join(&lp),
        &svg::lines(&format!("{title}: training loss"), "round", "loss", &series),
    )?;
    let bars: Vec<(String, f64, (f64, f64))> = rows
        .iter()
        .flat_map(|r| {
            r.scores.iter().map(move |(who, sc)| {
                let name = match r.setting {
                    Setting::Local => format!("{} Local {who}", r.method.label()),
                    Setting::None => r.method.label(),
                    st => format!("{} {}", r.method.label(), st.label()),
                };
                (name, sc.value, sc.ci95)
            })
        })
        .collect();
    let bp = format!("{}-scores.svg", key);
    write_file(
        &out.join(&bp),
        &svg::bars(&format!("{title}: {metric}"), metric, &bars),
    )?;
    writeln!(
        s,
        "![training loss per round]({lp})\n\n![{metric} with 95% intervals]({bp})\n"
    )
    .ok();
    Ok(())
}

fn pfl_table(s: &mut String, title: &str, rows: &[CellResult]) {
    writeln!(s, "## {title}\n").ok();
    writeln!(
        s,
        "| method | setting | own parameters: test loss mean / worst / best | global parameters: mean | trainable params | MB / client / round (up / down) | s / round | peak RSS (MB) |\n|---|---|---|---|---|---|---|---|"
    )
    .ok();
    for r in rows {
        writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.3} / {:.3} | {:.1} | {} |",
            r.method.label(),
            r.setting.label(),
            r.own_test
                .map(|(m, w, b)| format!("{m:.3} / {w:.3} / {b:.3}"))
                .unwrap_or_else(|| "–".into()),
            if r.setting == Setting::Local {
                "–".into()
            } else {
                f3(r.global_test)
            },
            r.trainable_params,
            r.mb_up_per_client_round,
            r.mb_down_per_client_round,
            r.seconds_per_round,
            r.peak_rss_mb
                .map(|m| format!("{m:.0}"))
                .unwrap_or_else(|| "–".into()),
        )
        .ok();
    }
    writeln!(s).ok();
}

fn hpo_section(s: &mut String, h: &HpoResult) {
    writeln!(s, "## Federated HPO\n").ok();
    writeln!(
        s,
        "`fedllm tune` over `{}`: {:?}, {} trials ({} trial runs), ranked by `{}`, {:.0} s.\n",
        h.base.display(),
        h.scheduler,
        h.trials,
        h.trial_runs,
        h.metric,
        h.seconds
    )
    .ok();
    match &h.best {
        Some(b) => writeln!(
            s,
            "Best: trial {} (`{}`), {} = {:.4} at {} rounds.\n",
            b.trial,
            b.point.join(" "),
            h.metric,
            b.metric,
            b.rounds
        ),
        None => writeln!(
            s,
            "Best: none (no trial reached the top budget with a number).\n"
        ),
    }
    .ok();
    if h.rho.is_empty() {
        writeln!(s, "Low-fidelity rank correlation: not defined (fewer than two trials reached the top budget, or no spread).\n").ok();
    } else {
        writeln!(
            s,
            "| round | Spearman ρ vs the largest budget | trials |\n|---|---|---|"
        )
        .ok();
        for (r, v, k) in &h.rho {
            writeln!(s, "| {r} | {v:.3} | {k} |").ok();
        }
        writeln!(s).ok();
    }
}

fn write_file(p: &Path, text: &str) -> Result<()> {
    std::fs::write(p, text).map_err(|e| file_err(p, e))
}

/// The report; returns its text (also written to `out/REPORT.md`).
pub fn write(out: &Path, h: &Header, inp: &Inputs) -> Result<String> {
    let mut s = String::new();
    writeln!(s, "# {}\n", inp.study.title).ok();
    if h.scale.as_deref() == Some("smoke") {
        writeln!(s, "**Smoke profile: tiny models and a handful of samples. These numbers check that every cell runs; they are not results.**\n").ok();
    }
    let cells: usize = inp.results.values().map(|v| v.len()).sum();
    let compute: f64 = inp
        .results
        .values()
        .flatten()
        .map(|r| r.train_seconds + r.eval_seconds)
        .sum::<f64>()
        + inp.hpo.as_ref().map(|x| x.seconds).unwrap_or(0.0);
    writeln!(
        s,
        "- Command: `{}`\n- Scale: {}\n- Commit: {}\n- Machine: {}\n- Cells finished: {cells}; total compute {:.1} min (training + scoring of every finished cell, and the HPO section); this invocation {:.1} min\n",
        h.command,
        h.scale.as_deref().unwrap_or("default (the configs as written)"),
        h.commit,
        h.machine,
        compute / 60.0,
        h.wall_seconds / 60.0
    )
    .ok();
    writeln!(s, "Rows: Global = one client holding all clients' data; Fed = federated; Local = each client alone (mean over clients, and the best one). Intervals: Wilson 95% (HumanEval's counts tasks, not samples). MB and seconds per round are means over the training rounds; the last round's include its evaluation (the request to the clients counts as bytes down). Peak RSS is the training process's (scoring runs in the experiment's own process). Each cell's config (with FS-LLM's value beside every scaled setting) is `configs/paper/<cell>.yaml`.\n").ok();
    for (key, spec) in &inp.study.tables {
        let rows = inp.results.get(key).map(Vec::as_slice).unwrap_or(&[]);
        match spec.kind {
            TableKind::Main { task } => {
                main_table(&mut s, out, key, &spec.title, task.metric(), rows)?
            }
            TableKind::Pfl => pfl_table(&mut s, &spec.title, rows),
        }
        // One line per reason (a missing dataset stops every cell of its table).
        let mut why: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (id, w) in inp
            .not_run
            .iter()
            .filter(|(id, _)| id.split('/').next() == Some(key.as_str()))
        {
            why.entry(w.as_str()).or_default().push(id.as_str());
        }
        for (w, ids) in why {
            writeln!(
                s,
                "- not run ({} cells): {w}: {}",
                ids.len(),
                ids.join(", ")
            )
            .ok();
        }
        writeln!(s).ok();
    }
    if let Some(hp) = &inp.hpo {
        hpo_section(&mut s, hp);
    }
    writeln!(s, "## The paper's findings at this scale\n").ok();
    for f in crate::findings::check(inp) {
        writeln!(
            s,
            "- **{}** — {}: {}",
            f.claim,
            f.verdict.label(),
            f.evidence
        )
        .ok();
    }
    writeln!(s).ok();
    write_file(&out.join("REPORT.md"), &s)?;
    Ok(s)
}
