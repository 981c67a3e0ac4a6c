//! `fedllm experiment`: the paper's empirical study as one resumable command. A study folder
//! holds `experiment.yaml` (tables, scoring, HPO, scale profiles) and one run config per cell
//! under its table's folder; each cell trains as a child `fedllm run`, is scored, and the
//! report (`REPORT.md`, SVG plots) is written from the finished cells' `result.json` files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub mod cell;
pub mod error;
pub mod evaluate;
pub mod findings;
pub mod report;
pub mod runner;
pub mod study;
pub mod svg;

pub use error::{ExperimentError, Result};
pub use study::Study;

use cell::{run_dir, selected, Cell};
use error::file_err;
use runner::{load_result, missing_data, write_json, CellResult};
use study::TableKind;

pub struct Options {
    pub study_dir: PathBuf,
    pub out: PathBuf,
    /// A glob (with `*`) or substring over cell ids; `hpo` selects the HPO section.
    pub only: Option<String>,
    pub resume: bool,
    pub scale: Option<String>,
    pub overrides: Vec<String>,
    /// The `fedllm` binary each cell trains under.
    pub exe: PathBuf,
    /// How the report states the command.
    pub command: String,
}

/// `out/experiment.json`: what the experiment was started with (a resume must match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Started {
    study: PathBuf,
    scale: Option<String>,
    overrides: Vec<String>,
}

pub struct Outcome {
    /// Cells (and base rows) finished by this invocation.
    pub ran: Vec<String>,
    /// Cells that are not finished, and why (data missing, or not selected).
    pub not_run: Vec<(String, String)>,
    pub report: PathBuf,
}

fn check_start(o: &Options) -> Result<()> {
    let p = o.out.join("experiment.json");
    let now = Started {
        study: std::fs::canonicalize(&o.study_dir).map_err(|e| file_err(&o.study_dir, e))?,
        scale: o.scale.clone(),
        overrides: o.overrides.clone(),
    };
    let prior: Option<Started> = match std::fs::read_to_string(&p) {
        Ok(t) => Some(serde_json::from_str(&t).map_err(|e| file_err(&p, e))?),
        Err(_) => None,
    };
    match (prior, o.resume) {
        (Some(_), false) => Err(ExperimentError::Config(format!(
            "{} already holds an experiment: continue it with --resume",
            o.out.display()
        ))),
        (None, true) => Err(ExperimentError::Config(format!(
            "--resume: {} holds no experiment (no experiment.json)",
            o.out.display()
        ))),
        (Some(s), true) if s != now => Err(ExperimentError::Config(format!(
            "--resume: {} was started from {} with scale {:?} and overrides {:?}; resume it with the same",
            o.out.display(),
            s.study.display(),
            s.scale,
            s.overrides
        ))),
        (Some(_), true) => Ok(()),
        (None, false) => {
            std::fs::create_dir_all(&o.out).map_err(|e| file_err(&o.out, e))?;
            write_json(&p, &now)
        }
    }
}

fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|x| x.1.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!(
        "{model}, {cores} cores; AVX2 {}, AVX-512 {}, AVX512-BF16 {}, AMX {}; no GPU used",
        if has("avx2") { "yes" } else { "no" },
        if has("avx512f") { "yes" } else { "no" },
        if has("avx512_bf16") { "yes" } else { "no" },
        if has("amx_bf16") { "yes" } else { "no" }
    )
}

fn commit(dir: &Path) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(o) => {
            let sha = String::from_utf8_lossy(&o.stdout).trim().to_string();
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|o| !o.stdout.is_empty());
            if dirty {
                format!("{sha} (with uncommitted changes)")
            } else {
                sha
            }
        }
        None => "unknown (not a git checkout)".into(),
    }
}

/// Runs every selected cell that is not finished, then writes the report over all finished ones.
pub fn run(o: &Options, log: &mut dyn FnMut(&str)) -> Result<Outcome> {
    let t0 = Instant::now();
    let study = Study::load(&o.study_dir)?;
    let (study, mut overrides) = study.scaled(&o.study_dir, o.scale.as_deref())?;
    overrides.extend(o.overrides.iter().cloned());
    // Every config problem of every cell before anything runs.
    let cells = cell::discover(&o.study_dir, &study, &overrides, &o.out)?;
    check_start(o)?;
    let only = o.only.as_deref();
    let mut ran = Vec::new();
    let mut not_run = Vec::new();
    for (key, spec) in &study.tables {
        let tc: Vec<&Cell> = cells.iter().filter(|c| &c.table == key).collect();
        if let (true, Some(p)) = (spec.optional, tc.first().and_then(|c| missing_data(&c.cfg))) {
            for c in &tc {
                not_run.push((
                    c.id.clone(),
                    // Relative to the working directory where it lies under it: no machine
                    // paths in a committed report.
                    format!(
                        "its data is missing ({})",
                        p.strip_prefix(std::env::current_dir().unwrap_or_default())
                            .unwrap_or(&p)
                            .display()
                    ),
                ));
            }
            continue;
        }
        for c in &tc {
            if load_result(&o.out, &c.id)?.is_some() {
                continue;
            }
            if !selected(&c.id, only) {
                not_run.push((c.id.clone(), "not selected by --only".into()));
                continue;
            }
            runner::run_cell(&o.exe, &study, c, &o.out, log)?;
            ran.push(c.id.clone());
        }
        if let (TableKind::Main { task }, Some(first)) = (spec.kind, tc.first()) {
            let id = format!("{key}/base");
            let has_run = run_dir(&o.out, &first.id)
                .join("data_manifest.json")
                .exists();
            if load_result(&o.out, &id)?.is_none() {
                if !selected(&id, only) {
                    not_run.push((id, "not selected by --only".into()));
                } else if has_run {
                    runner::run_base(&study, task, first, &o.out, log)?;
                    ran.push(id);
                } else {
                    not_run.push((id, format!("scored after `{}` has run", first.id)));
                }
            }
        }
    }
    let hpo = match &study.hpo {
        Some(h) => {
            let p = o.out.join("hpo").join("hpo.json");
            match std::fs::read_to_string(&p) {
                Ok(t) => Some(serde_json::from_str(&t).map_err(|e| file_err(&p, e))?),
                Err(_) if selected("hpo", only) => {
                    let r = runner::run_hpo(&o.study_dir, h, &overrides, &o.out, log)?;
                    ran.push("hpo".into());
                    Some(r)
                }
                Err(_) => {
                    not_run.push(("hpo".into(), "not selected by --only".into()));
                    None
                }
            }
        }
        None => None,
    };
    let mut results: BTreeMap<String, Vec<CellResult>> = BTreeMap::new();
    for key in study.tables.keys() {
        let mut rows = Vec::new();
        if let Some(r) = load_result(&o.out, &format!("{key}/base"))? {
            rows.push(r);
        }
        for c in cells.iter().filter(|c| &c.table == key) {
            if let Some(r) = load_result(&o.out, &c.id)? {
                rows.push(runner::remeasure(c, &o.out, r)?);
            }
        }
        rows.sort_by(|a, b| (&a.method, a.setting).cmp(&(&b.method, b.setting)));
        results.insert(key.clone(), rows);
    }
    let header = report::Header {
        command: o.command.clone(),
        scale: o.scale.clone(),
        commit: commit(&o.study_dir),
        machine: machine(),
        wall_seconds: t0.elapsed().as_secs_f64(),
    };
    let inputs = report::Inputs {
        study: &study,
        results,
        not_run: not_run.clone(),
        hpo,
    };
    report::write(&o.out, &header, &inputs)?;
    Ok(Outcome {
        ran,
        not_run,
        report: o.out.join("REPORT.md"),
    })
}
