//! `experiment.yaml`: what the study's tables are, how each task is scored, the HPO section, and
//! the scale profiles (overrides every cell takes, e.g. `smoke`: the tiny models for CI).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{file_err, ExperimentError, Result};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Study {
    pub title: String,
    /// Keyed by the folder its cells live in.
    pub tables: BTreeMap<String, TableSpec>,
    pub eval: EvalSpec,
    #[serde(default)]
    pub hpo: Option<HpoSpec>,
    #[serde(default)]
    pub scales: BTreeMap<String, Scale>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawTable")]
pub struct TableSpec {
    pub title: String,
    pub kind: TableKind,
    /// Data the project may not ship (Fed-Dolly): when its file is missing the table's cells are
    /// reported as not run, with the path, instead of failing the experiment.
    pub optional: bool,
}

/// A table as written: `kind: main` with a `task`, or `kind: pfl`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    title: String,
    kind: RawKind,
    #[serde(default)]
    task: Option<Task>,
    #[serde(default)]
    optional: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawKind {
    Main,
    Pfl,
}

impl TryFrom<RawTable> for TableSpec {
    type Error = String;
    fn try_from(r: RawTable) -> std::result::Result<Self, String> {
        let kind = match (r.kind, r.task) {
            (RawKind::Main, Some(task)) => TableKind::Main { task },
            (RawKind::Main, None) => {
                return Err("kind `main` needs a task: gsm8k, humaneval or mmlu".into())
            }
            (RawKind::Pfl, None) => TableKind::Pfl,
            (RawKind::Pfl, Some(_)) => {
                return Err("kind `pfl` reports per-client losses: it takes no task".into())
            }
        };
        Ok(TableSpec {
            title: r.title,
            kind,
            optional: r.optional,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// Method × Global/Fed/Local, scored by the task, plus the base model's row.
    Main { task: Task },
    /// Personalised FL: per-client held-out losses with own and global parameters.
    Pfl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Gsm8k,
    Humaneval,
    Mmlu,
}

impl Task {
    pub fn metric(self) -> &'static str {
        match self {
            Task::Gsm8k => "GSM8K accuracy",
            Task::Humaneval => "HumanEval pass@1",
            Task::Mmlu => "MMLU accuracy",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    pub gsm8k: Gsm8kSpec,
    pub humaneval: HumanevalSpec,
    pub mmlu: MmluSpec,
}

/// FS-LLM: all 1,319 test questions, 256 new tokens.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Gsm8kSpec {
    pub limit: usize,
    pub max_new_tokens: usize,
    pub batch: usize,
}

/// FS-LLM: 164 problems, n = 5, 128 new tokens, temperature 0.1, top-k 40, top-p 0.75.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HumanevalSpec {
    pub limit: usize,
    pub n: usize,
    pub max_new_tokens: usize,
    #[serde(default)]
    pub seed: u64,
}

/// FS-LLM: 5-shot, 1,024-token prompts. Fed-MMLU cells are scored on their run's held-out test
/// questions only (the clients trained on the rest).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MmluSpec {
    pub limit: usize,
    pub shots: usize,
    pub max_len: usize,
}

/// `fedllm tune` over one cell's config.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HpoSpec {
    /// The base cell (a path relative to the study folder).
    pub config: PathBuf,
    /// The search space, as `fedllm tune --space` takes it.
    pub space: serde_yaml::Value,
    pub scheduler: fedllm_fl::tune::Scheduler,
    pub trials: usize,
    pub min_rounds: usize,
    pub max_rounds: usize,
    pub eta: usize,
    #[serde(default)]
    pub seed: u64,
    pub metric: String,
    #[serde(default)]
    pub maximize: bool,
    /// Overrides of the base cell for the trials (e.g. `eval.freq=1`: every round's metric, so
    /// early rounds' rankings can be compared with the last).
    #[serde(default)]
    pub overrides: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    /// `key.sub=value` overrides for every cell (and the HPO base), before the command line's.
    #[serde(default)]
    pub overrides: Vec<String>,
    /// Replaces the study's evaluation sizes.
    #[serde(default)]
    pub eval: Option<EvalSpec>,
    /// Replace the HPO section's trial count and round budgets.
    #[serde(default)]
    pub hpo_trials: Option<usize>,
    #[serde(default)]
    pub hpo_rounds: Option<[usize; 2]>,
}

impl Study {
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join("experiment.yaml");
        let text = std::fs::read_to_string(&p).map_err(|e| file_err(&p, e))?;
        serde_yaml::from_str(&text).map_err(|e| file_err(&p, e))
    }

    /// The study as one scale runs it: its overrides (paths in them relative to the study
    /// folder `dir`, as in the cells), evaluation sizes and HPO budgets.
    pub fn scaled(&self, dir: &Path, name: Option<&str>) -> Result<(Study, Vec<String>)> {
        let Some(name) = name else {
            return Ok((self.clone(), vec![]));
        };
        let s = self.scales.get(name).ok_or_else(|| {
            ExperimentError::Config(format!(
                "--scale {name}: experiment.yaml defines {}",
                if self.scales.is_empty() {
                    "no scales".to_string()
                } else {
                    self.scales.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            ))
        })?;
        let mut st = self.clone();
        if let Some(e) = &s.eval {
            st.eval = e.clone();
        }
        if let Some(h) = &mut st.hpo {
            if let Some(t) = s.hpo_trials {
                h.trials = t;
            }
            if let Some([lo, hi]) = s.hpo_rounds {
                h.min_rounds = lo;
                h.max_rounds = hi;
            }
        }
        let overrides = s.overrides.iter().map(|o| resolve(dir, o)).collect();
        Ok((st, overrides))
    }
}

/// Keys whose values are paths.
const PATH_KEYS: [&str; 5] = [
    "model.path",
    "data.root",
    "data.test_source",
    "offsite.align_data",
    "offsite.emulator",
];

fn resolve(dir: &Path, o: &str) -> String {
    match o.split_once('=') {
        Some((k, v)) if PATH_KEYS.contains(&k.trim()) && Path::new(v).is_relative() => {
            format!("{k}={}", dir.join(v).display())
        }
        _ => o.to_string(),
    }
}
