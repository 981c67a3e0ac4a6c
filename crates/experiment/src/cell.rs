//! Cells: every `<table>/<name>.yaml` under the study folder is a run config; what row it is
//! (method × Global/Fed/Local, or a personalised method) is read from the config itself, so a
//! cell cannot say one thing in its name and run another.

use std::path::{Path, PathBuf};

use fedllm_fl::config::{AdapterKind, Baseline, PersonalMethod};
use fedllm_fl::RunConfig;
use serde::{Deserialize, Serialize};

use crate::error::{cell_err, file_err, ExperimentError, Result};
use crate::study::{Study, TableKind};

/// The paper's rows, in its order; `Personal` rows live in the pFL table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Method {
    Base,
    Lora,
    Ptuning,
    Prompt,
    Prefix,
    Full,
    /// Offsite tuning: the drop ratio in percent, and whether the emulator was aligned.
    Fedot {
        drop_pct: u32,
        aligned: bool,
    },
    Personal(String),
}

impl Method {
    pub fn label(&self) -> String {
        match self {
            Method::Base => "base model".into(),
            Method::Lora => "LoRA".into(),
            Method::Ptuning => "P-tuning".into(),
            Method::Prompt => "prompt tuning".into(),
            Method::Prefix => "prefix tuning".into(),
            Method::Full => "full".into(),
            Method::Fedot { drop_pct, aligned } => format!(
                "FedOT (drop {:.1}{})",
                *drop_pct as f64 / 100.0,
                if *aligned { ", aligned" } else { "" }
            ),
            Method::Personal(m) => match m.as_str() {
                "none" => "none (FedAvg; Local: alone)".into(),
                m => m.into(),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Setting {
    /// Nothing trained (the base model's row).
    None,
    Global,
    Fed,
    Local,
}

impl Setting {
    pub fn label(self) -> &'static str {
        match self {
            Setting::None => "–",
            Setting::Global => "Global",
            Setting::Fed => "Fed",
            Setting::Local => "Local",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Cell {
    /// `<table>/<file stem>`.
    pub id: String,
    pub table: String,
    pub path: PathBuf,
    /// The config as the cell runs it (scale and command-line overrides, its output folder).
    pub cfg: RunConfig,
    pub overrides: Vec<String>,
    pub method: Method,
    pub setting: Setting,
}

/// A cell's row from its config; in a pFL table every row is a personalised method (`none`:
/// plain FedAvg, or local training with the `local` baseline).
pub fn classify(cfg: &RunConfig, pfl: bool) -> (Method, Setting) {
    let setting = match cfg.federate.baseline {
        Baseline::Global => Setting::Global,
        Baseline::Local => Setting::Local,
        Baseline::Fl => Setting::Fed,
    };
    let method = if pfl || cfg.personal.method != PersonalMethod::None {
        Method::Personal(cfg.personal.method.as_str().into())
    } else if cfg.offsite.enabled {
        Method::Fedot {
            drop_pct: (cfg.offsite.drop_ratio * 100.0).round() as u32,
            aligned: cfg.offsite.align_steps > 0,
        }
    } else {
        match cfg.adapter.kind {
            AdapterKind::Lora => Method::Lora,
            AdapterKind::Ptuning => Method::Ptuning,
            AdapterKind::Prompt => Method::Prompt,
            AdapterKind::Prefix => Method::Prefix,
            AdapterKind::Full => Method::Full,
        }
    };
    (method, setting)
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| file_err(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    v.sort();
    Ok(v)
}

/// Every cell of the study, its config checked with `overrides` and its output folder under
/// `out`; all problems at once, each naming its cell.
pub fn discover(dir: &Path, study: &Study, overrides: &[String], out: &Path) -> Result<Vec<Cell>> {
    let mut cells = Vec::new();
    let mut problems = Vec::new();
    for f in yaml_files(dir)? {
        if f.file_name().is_some_and(|n| n != "experiment.yaml") {
            problems.push(format!(
                "{}: a cell belongs in a table's folder ({})",
                f.display(),
                study.tables.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    for table in study.tables.keys() {
        let tdir = dir.join(table);
        if !tdir.is_dir() {
            problems.push(format!(
                "{}: experiment.yaml lists table `{table}` but the folder is missing",
                tdir.display()
            ));
            continue;
        }
        for f in yaml_files(&tdir)? {
            let stem = f.file_stem().unwrap_or_default().to_string_lossy();
            let id = format!("{table}/{stem}");
            let mut o = overrides.to_vec();
            o.push(format!("outdir={}", run_dir(out, &id).display()));
            match RunConfig::from_file(&f, &o) {
                Ok(cfg) => {
                    let pfl = study.tables[table].kind == TableKind::Pfl;
                    let (method, setting) = classify(&cfg, pfl);
                    cells.push(Cell {
                        id,
                        table: table.clone(),
                        path: f,
                        cfg,
                        overrides: o,
                        method,
                        setting,
                    });
                }
                Err(e) => problems.push(format!("cell {id}: {e}")),
            }
        }
    }
    if !problems.is_empty() {
        return Err(ExperimentError::Config(problems.join("; ")));
    }
    let mut seen = std::collections::BTreeMap::new();
    for c in &cells {
        if let Some(other) = seen.insert((&c.table, &c.method, c.setting), &c.id) {
            return Err(cell_err(
                &c.id,
                format!(
                    "it runs the same row as {other} ({} {})",
                    c.method.label(),
                    c.setting.label()
                ),
            ));
        }
    }
    Ok(cells)
}

pub fn cell_dir(out: &Path, id: &str) -> PathBuf {
    out.join("cells").join(id)
}

pub fn run_dir(out: &Path, id: &str) -> PathBuf {
    cell_dir(out, id).join("run")
}

/// `--only`: a glob over cell ids (`*` any run of characters), else a substring.
pub fn selected(id: &str, only: Option<&str>) -> bool {
    match only {
        None => true,
        Some(p) if p.contains('*') => fedllm_peft::full::glob(p, id),
        Some(p) => id.contains(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> RunConfig {
        RunConfig::from_yaml(yaml, &[]).unwrap()
    }

    /// The row comes from what the config runs, whatever the file is called.
    #[test]
    fn rows_are_read_from_the_config() {
        let c = cfg("adapter: {type: ptuning}\nfederate: {baseline: global}\n");
        assert_eq!(classify(&c, false), (Method::Ptuning, Setting::Global));
        let c = cfg("adapter: {type: lora}\nfederate: {baseline: local}\n");
        assert_eq!(classify(&c, false), (Method::Lora, Setting::Local));
        let c = cfg(
            "adapter: {type: full}\noffsite: {enabled: true, drop_ratio: 0.2, align_steps: 3, align_data: x.json}\n",
        );
        let (m, s) = classify(&c, false);
        assert_eq!(
            (m.label(), s),
            ("FedOT (drop 0.2, aligned)".to_string(), Setting::Fed)
        );
        let c = cfg("personal: {method: ditto}\n");
        assert_eq!(classify(&c, false).0, Method::Personal("ditto".into()));
        // In a pFL table plain FedAvg is the `none` method.
        let c = cfg("adapter: {type: lora}\n");
        assert_eq!(classify(&c, true).0, Method::Personal("none".into()));
    }

    #[test]
    fn only_selects_by_glob_or_substring() {
        assert!(selected("fed-mmlu/lora-fed", Some("lora")));
        assert!(selected("fed-mmlu/lora-fed", Some("fed-mmlu/*-fed")));
        assert!(!selected("fed-mmlu/lora-local", Some("fed-mmlu/*-fed")));
        assert!(!selected("pfl/ditto", Some("lora")));
        assert!(selected("pfl/ditto", None));
    }
}
