//! The paper's qualitative findings, each checked against this run's numbers, so the report
//! says which hold at this scale from the measurements, not from prose written beforehand.

use crate::cell::{Method, Setting};
use crate::report::{score_value, Inputs};
use crate::runner::CellResult;
use crate::study::TableKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Holds,
    DoesNotHold,
    /// Measured, but the numbers cannot tell (e.g. every interval overlaps).
    Inconclusive,
    NotMeasured,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Holds => "holds here",
            Verdict::DoesNotHold => "does not hold here",
            Verdict::Inconclusive => "inconclusive here",
            Verdict::NotMeasured => "not measured",
        }
    }
}

pub struct Finding {
    pub claim: &'static str,
    pub verdict: Verdict,
    pub evidence: String,
}

fn main_rows<'a>(inp: &'a Inputs) -> Vec<(&'a str, &'a [CellResult])> {
    inp.study
        .tables
        .iter()
        .filter(|(_, t)| matches!(t.kind, TableKind::Main { .. }))
        .filter_map(|(k, _)| Some((k.as_str(), inp.results.get(k)?.as_slice())))
        .collect()
}

fn find<'a>(rows: &'a [CellResult], m: &Method, s: Setting) -> Option<&'a CellResult> {
    rows.iter().find(|r| &r.method == m && r.setting == s)
}

/// Majority vote over paired comparisons (`true` = the claim's direction).
fn tally(claim: &'static str, pairs: Vec<(String, bool)>, what: &str) -> Finding {
    let k = pairs.iter().filter(|p| p.1).count();
    let n = pairs.len();
    let verdict = match n {
        0 => Verdict::NotMeasured,
        _ if 2 * k > n => Verdict::Holds,
        _ if 2 * k == n => Verdict::Inconclusive,
        _ => Verdict::DoesNotHold,
    };
    let against: Vec<&str> = pairs
        .iter()
        .filter(|p| !p.1)
        .map(|p| p.0.as_str())
        .collect();
    Finding {
        claim,
        verdict,
        evidence: format!(
            "{k} of {n} {what}{}",
            if against.is_empty() {
                String::new()
            } else {
                format!(" (against: {})", against.join(", "))
            }
        ),
    }
}

/// For every trained method of every table with both rows: (label, claim direction) comparing
/// its Fed row's `value` with its `other` row's; `holds` None leaves the pair out (a tie).
fn paired(
    tables: &[(&str, &[CellResult])],
    other: Setting,
    value: impl Fn(&CellResult) -> Option<f64>,
    holds: impl Fn(f64, f64) -> Option<bool>,
) -> Vec<(String, bool)> {
    let mut pairs = Vec::new();
    for (t, rows) in tables {
        for m in trained_methods(rows) {
            let f = find(rows, &m, Setting::Fed).and_then(&value);
            let o = find(rows, &m, other).and_then(&value);
            if let Some((a, b)) = f.zip(o) {
                if let Some(h) = holds(a, b) {
                    pairs.push((format!("{t} {}: {a:.3} vs {b:.3}", m.label()), h));
                }
            }
        }
    }
    pairs
}

fn trained_methods(rows: &[CellResult]) -> Vec<Method> {
    let mut m: Vec<Method> = rows
        .iter()
        .map(|r| r.method.clone())
        .filter(|m| !matches!(m, Method::Base | Method::Personal(_)))
        .collect();
    m.sort();
    m.dedup();
    m
}

pub fn check(inp: &Inputs) -> Vec<Finding> {
    let tables = main_rows(inp);
    let mut out = Vec::new();
    let loss = |r: &CellResult| r.heldout;
    // FedOT's Local loss is the emulator's and its Fed loss the full model's: not comparable.
    let loss_no_fedot = |r: &CellResult| {
        r.heldout
            .filter(|_| !matches!(r.method, Method::Fedot { .. }))
    };
    let fed_vs_local = paired(&tables, Setting::Local, loss_no_fedot, |f, l| Some(f < l));
    out.push(tally(
        "Federated fine-tuning beats each client fine-tuning alone (Fed's held-out loss below Local's client mean; FedOT left out: its clients' losses are the emulator's)",
        fed_vs_local,
        "method × dataset pairs",
    ));
    let by_score = paired(&tables, Setting::Local, score_value, |f, l| {
        (f != l).then_some(f > l)
    });
    out.push(tally(
        "… and on the task score (Fed's score above Local's client mean; ties left out)",
        by_score,
        "method × dataset pairs",
    ));
    let near_global = paired(&tables, Setting::Global, loss, |f, g| {
        Some((f - g) / g.abs().max(1e-12) <= 0.05)
    });
    out.push(tally(
        "Federated fine-tuning comes close to pooling all data (Fed's held-out loss within 5% of Global's)",
        near_global,
        "method × dataset pairs",
    ));
    // LoRA the best PEFT method (Fed rows, held-out loss).
    let peft = [
        Method::Lora,
        Method::Ptuning,
        Method::Prompt,
        Method::Prefix,
    ];
    let mut pairs = Vec::new();
    for (t, rows) in &tables {
        let fed: Vec<(&Method, f64)> = peft
            .iter()
            .filter_map(|m| Some((m, find(rows, m, Setting::Fed)?.heldout?)))
            .collect();
        if fed.len() >= 2 {
            let best = fed
                .iter()
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .expect("non-empty");
            pairs.push((
                format!("{t}: best {}", best.0.label()),
                *best.0 == Method::Lora,
            ));
        }
    }
    out.push(tally(
        "LoRA is the strongest of the PEFT methods (lowest Fed held-out loss among LoRA, P-tuning, prompt and prefix tuning)",
        pairs,
        "datasets",
    ));
    // FedOT trails LoRA on the full model.
    let mut pairs = Vec::new();
    for (t, rows) in &tables {
        let lora = find(rows, &Method::Lora, Setting::Fed).and_then(|r| r.heldout);
        for r in rows
            .iter()
            .filter(|r| matches!(r.method, Method::Fedot { .. }) && r.setting == Setting::Fed)
        {
            if let (Some(o), Some(l)) = (r.heldout, lora) {
                pairs.push((format!("{t}: {o:.3} vs LoRA {l:.3}"), o > l));
            }
        }
    }
    out.push(tally(
        "Offsite tuning trails fine-tuning the full model (FedOT's plug-in held-out loss above Fed LoRA's)",
        pairs,
        "datasets",
    ));
    // Task scores separate fine-tuned rows from the base model.
    let mut moved = Vec::new();
    let mut measured = 0;
    for (t, rows) in &tables {
        let Some(base) = find(rows, &Method::Base, Setting::None).and_then(|r| r.scores.first())
        else {
            continue;
        };
        for r in rows
            .iter()
            .filter(|r| matches!(r.setting, Setting::Fed | Setting::Global))
        {
            if let Some((_, s)) = r.scores.first() {
                measured += 1;
                if base.1.value < s.ci95.0 || base.1.value > s.ci95.1 {
                    moved.push(format!("{t} {} {}", r.method.label(), r.setting.label()));
                }
            }
        }
    }
    out.push(Finding {
        claim: "Fine-tuning moves the task scores measurably (a Fed or Global row's 95% interval excludes the base model's score)",
        verdict: match (measured, moved.len()) {
            (0, _) => Verdict::NotMeasured,
            (_, 0) => Verdict::Inconclusive,
            _ => Verdict::Holds,
        },
        evidence: format!(
            "{} of {measured} rows{}",
            moved.len(),
            if moved.is_empty() { String::new() } else { format!(": {}", moved.join(", ")) }
        ),
    });
    // HPO: low-fidelity ranking.
    out.push(match inp.hpo.as_ref().and_then(|h| h.rho.first().map(|r| (h, *r))) {
        Some((h, (round, rho, k))) => Finding {
            claim: "Few-round validation loss is an unreliable guide for choosing hyper-parameters (rank correlation with the largest budget below 0.5)",
            verdict: if rho < 0.5 { Verdict::Holds } else { Verdict::DoesNotHold },
            evidence: format!("Spearman ρ = {rho:.3} between round {round} and round {} over {k} trials ({})", round + h.rho.len(), h.metric),
        },
        None => Finding {
            claim: "Few-round validation loss is an unreliable guide for choosing hyper-parameters",
            verdict: Verdict::NotMeasured,
            evidence: "no rank correlation (HPO not run, or too few trials reached the top budget)".into(),
        },
    });
    // pFL: a personalised method beats FedAvg on the clients' own test data.
    let mut pairs = Vec::new();
    for (k, t) in &inp.study.tables {
        if t.kind != TableKind::Pfl {
            continue;
        }
        let rows = inp.results.get(k).map(Vec::as_slice).unwrap_or(&[]);
        let fedavg =
            find(rows, &Method::Personal("none".into()), Setting::Fed).and_then(|r| r.own_test);
        for r in rows
            .iter()
            .filter(|r| matches!(&r.method, Method::Personal(m) if m != "none"))
        {
            if let (Some(o), Some(f)) = (r.own_test, fedavg) {
                pairs.push((
                    format!("{}: {:.3} vs FedAvg {:.3}", r.method.label(), o.0, f.0),
                    o.0 < f.0,
                ));
            }
        }
    }
    out.push(tally(
        "Personalisation helps heterogeneous clients (a personalised method's own-parameter test loss below FedAvg's)",
        pairs,
        "personalised methods",
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[bool]) -> Vec<(String, bool)> {
        v.iter()
            .enumerate()
            .map(|(i, b)| (format!("p{i}"), *b))
            .collect()
    }

    /// A finding holds when most of its paired comparisons go its way; a tie says nothing;
    /// the comparisons against it are named.
    #[test]
    fn majority_decides_and_names_the_exceptions() {
        let f = tally("c", pairs(&[true, true, false]), "pairs");
        assert_eq!(f.verdict, Verdict::Holds);
        assert_eq!(f.evidence, "2 of 3 pairs (against: p2)");
        assert_eq!(
            tally("c", pairs(&[true, false]), "x").verdict,
            Verdict::Inconclusive
        );
        assert_eq!(
            tally("c", pairs(&[false, false, true]), "x").verdict,
            Verdict::DoesNotHold
        );
        assert_eq!(tally("c", vec![], "x").verdict, Verdict::NotMeasured);
    }
}
