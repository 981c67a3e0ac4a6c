//! Runs the cells that are not finished: each trains as a child `fedllm run` (its own process,
//! so its peak RSS is its own and a crash stays in it; killed with the experiment), is scored,
//! and leaves `result.json` last, so a `kill -9` anywhere leaves either a finished cell or one
//! that `--resume` continues (from the run's checkpoint, and the evaluation's per-sample rows).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use fedllm_fl::metrics::RoundRecord;
use fedllm_fl::tune::{self, Tune};
use fedllm_fl::RunConfig;
use serde::{Deserialize, Serialize};

use crate::cell::{cell_dir, run_dir, Cell, Method, Setting};
use crate::error::{cell_err, file_err, ExperimentError, Result};
use crate::evaluate::{self, Scored, Target};
use crate::study::{HpoSpec, Study, TableKind, Task};

/// What a finished cell measured (`cells/<id>/result.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellResult {
    pub id: String,
    pub table: String,
    pub method: Method,
    pub setting: Setting,
    pub clients: usize,
    pub rounds: usize,
    pub trainable_params: usize,
    pub mb_up_per_client_round: f64,
    pub mb_down_per_client_round: f64,
    pub seconds_per_round: f64,
    /// The training process's peak resident set (its last start, if it was resumed).
    pub peak_rss_mb: Option<f64>,
    /// Which held-out loss `heldout` is.
    pub loss_name: String,
    /// The training loss per round (token-weighted over the round's clients).
    pub loss_curve: Vec<(usize, f64)>,
    /// After the last round (Local: mean over clients; `heldout_best`: the best client).
    pub heldout: Option<f64>,
    pub heldout_best: Option<f64>,
    /// The task's score per adapter scored: "global", or "client i" (Local).
    pub scores: Vec<(String, Scored)>,
    /// Personalised FL: each client's test loss with its own parameters (mean, worst, best)
    /// and the global parameters' mean.
    pub own_test: Option<(f64, f64, f64)>,
    pub global_test: Option<f64>,
    pub train_seconds: f64,
    pub eval_seconds: f64,
}

/// `cells/<id>/train.json`: training finished (so a resumed experiment only evaluates).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Trained {
    peak_rss_mb: Option<f64>,
    seconds: f64,
}

/// `hpo/hpo.json`: the tuning section's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HpoResult {
    pub base: PathBuf,
    pub scheduler: tune::Scheduler,
    pub metric: String,
    pub trials: usize,
    pub trial_runs: usize,
    pub best: Option<tune::TrialResult>,
    pub rho: Vec<(usize, f64, usize)>,
    pub seconds: f64,
}

fn read_json<T: for<'de> Deserialize<'de>>(p: &Path) -> Result<Option<T>> {
    match std::fs::read_to_string(p) {
        Ok(t) => Ok(Some(serde_json::from_str(&t).map_err(|e| file_err(p, e))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_err(p, e)),
    }
}

/// Written whole or not at all (a kill mid-write leaves the old file or none).
pub fn write_json<T: Serialize>(p: &Path, v: &T) -> Result<()> {
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(v).expect("json"))
        .map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, p).map_err(|e| file_err(p, e))
}

pub fn load_result(out: &Path, id: &str) -> Result<Option<CellResult>> {
    read_json(&cell_dir(out, id).join("result.json"))
}

/// The data a table's cells need and that is missing (an optional table is then not run).
pub fn missing_data(cfg: &RunConfig) -> Option<PathBuf> {
    let preset = fedllm_data::federated::preset(&cfg.data.source)?;
    let p = cfg.data_root().join(preset.train);
    (!p.exists()).then_some(p)
}

fn last_line(p: &Path) -> String {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// Trains the cell as a child `fedllm run` (continuing its checkpoint when one exists); the
/// child dies with this process. Returns its peak RSS in MB.
fn train(exe: &Path, cell: &Cell, run: &Path, log: &Path) -> Result<Option<f64>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| file_err(log, e))?;
    let f2 = f.try_clone().map_err(|e| file_err(log, e))?;
    let mut cmd = Command::new(exe);
    if run.join("checkpoint").exists() || run.join("checkpoint.old").exists() {
        cmd.arg("run").arg("--resume").arg(run);
    } else {
        cmd.arg("run")
            .arg("--config")
            .arg(&cell.path)
            .arg("--overwrite");
        cmd.args(&cell.overrides);
    }
    cmd.arg("--no-progress")
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2);
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the child when this
    // process dies, so a killed experiment leaves no orphan training on.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| cell_err(&cell.id, format!("starting {}: {e}", exe.display())))?;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // wait4 (not Child::wait) for this child's own resource usage: its peak RSS.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    if r < 0 {
        return Err(cell_err(
            &cell.id,
            format!("waiting for training: {}", std::io::Error::last_os_error()),
        ));
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !ok {
        let how = if libc::WIFSIGNALED(status) {
            format!("killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("exit {}", libc::WEXITSTATUS(status))
        };
        return Err(cell_err(
            &cell.id,
            format!(
                "fedllm run failed ({how}): {} (log: {})",
                last_line(log),
                log.display()
            ),
        ));
    }
    // ru_maxrss is in KiB on Linux.
    Ok((usage.ru_maxrss > 0).then(|| usage.ru_maxrss as f64 * 1024.0 / 1e6))
}

fn records(run: &Path) -> Result<Vec<RoundRecord>> {
    let p = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&p).map_err(|e| file_err(&p, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| file_err(&p, e)))
        .collect()
}

/// Elements of the tensors a saved adapter folder holds (what one client trains and sends):
/// fedllm's own file, else PEFT's (both hold the same tensors; counting both doubled them).
pub fn adapter_params(dir: &Path) -> Result<usize> {
    let own = dir.join("fedllm_adapter.safetensors");
    let p = if own.exists() {
        own
    } else {
        dir.join("adapter_model.safetensors")
    };
    let t = candle_core::safetensors::load(&p, &candle_core::Device::Cpu)?;
    Ok(t.values().map(|x| x.elem_count()).sum())
}

fn mean_per_client(recs: &[RoundRecord], f: impl Fn(&RoundRecord) -> f64) -> f64 {
    let rs: Vec<f64> = recs.iter().filter(|r| r.round > 0).map(f).collect();
    rs.iter().sum::<f64>() / rs.len().max(1) as f64
}

fn per_client(m: &BTreeMap<usize, usize>) -> f64 {
    m.values().sum::<usize>() as f64 / m.len().max(1) as f64 / 1e6
}

/// The cell's measurements from its run folder (losses, bytes, time), before task scores.
fn measure(cell: &Cell, run: &Path, trained: &Trained) -> Result<CellResult> {
    let recs = records(run)?;
    let held = |f: fn(&RoundRecord) -> Option<f64>| recs.iter().rev().find_map(f);
    let (loss_name, heldout) = match (&cell.method, cell.setting) {
        // A FedOT client holds only the emulator: its own test loss is the emulator's.
        (Method::Fedot { .. }, Setting::Local) => (
            "clients' own test with the emulator, mean",
            held(|r| r.client_test_mean),
        ),
        (_, Setting::Local) => ("clients' own test, mean", held(|r| r.client_test_mean)),
        (Method::Fedot { .. }, _) => ("plug-in (full model) test", held(|r| r.plugin_test_loss)),
        _ => ("server test", held(|r| r.server_test_loss)),
    };
    // Every round has a training loss; held-out losses only where the config evaluates.
    let curve: Vec<(usize, f64)> = recs
        .iter()
        .filter_map(|r| Some((r.round, r.train_loss?)))
        .collect();
    let last = recs.last();
    let local = cell.setting == Setting::Local;
    let own = last.and_then(|r| r.spread("test"));
    Ok(CellResult {
        id: cell.id.clone(),
        table: cell.table.clone(),
        method: cell.method.clone(),
        setting: cell.setting,
        clients: cell.cfg.federate.client_num,
        rounds: last.map(|r| r.round).unwrap_or(0),
        trainable_params: adapter_params(&run.join("adapter"))?,
        mb_up_per_client_round: mean_per_client(&recs, |r| per_client(&r.bytes_up_per_client)),
        mb_down_per_client_round: mean_per_client(&recs, |r| per_client(&r.bytes_down_per_client)),
        seconds_per_round: mean_per_client(&recs, |r| r.seconds),
        peak_rss_mb: trained.peak_rss_mb,
        loss_name: loss_name.into(),
        heldout,
        heldout_best: if local {
            last.and_then(|r| r.client_test_best.map(|b| b.1))
        } else {
            None
        },
        loss_curve: curve,
        scores: vec![],
        own_test: own.map(|s| (s.mean, s.worst.1, s.best.1)),
        global_test: last.and_then(|r| r.client_global_test_loss.or(r.client_test_loss)),
        train_seconds: trained.seconds,
        eval_seconds: 0.0,
    })
}

/// A finished cell's measurements taken again from its run folder (scores, peak RSS and times
/// as stored), so a report states what the runs hold under the current reading of them.
pub fn remeasure(cell: &Cell, out: &Path, stored: CellResult) -> Result<CellResult> {
    let t = Trained {
        peak_rss_mb: stored.peak_rss_mb,
        seconds: stored.train_seconds,
    };
    let mut r = measure(cell, &run_dir(out, &cell.id), &t).map_err(|e| cell_err(&cell.id, e))?;
    r.scores = stored.scores;
    r.eval_seconds = stored.eval_seconds;
    Ok(r)
}

/// Trains (unless done), measures and scores one cell; writes `result.json` last.
pub fn run_cell(
    exe: &Path,
    study: &Study,
    cell: &Cell,
    out: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<CellResult> {
    let dir = cell_dir(out, &cell.id);
    std::fs::create_dir_all(dir.join("eval")).map_err(|e| file_err(&dir, e))?;
    let run = run_dir(out, &cell.id);
    let tj = dir.join("train.json");
    let trained = match read_json::<Trained>(&tj)? {
        Some(t) => t,
        None => {
            log(&format!("cell {}: training", cell.id));
            let t0 = Instant::now();
            let rss = train(exe, cell, &run, &dir.join("run.log"))?;
            let t = Trained {
                peak_rss_mb: rss,
                seconds: t0.elapsed().as_secs_f64(),
            };
            write_json(&tj, &t)?;
            t
        }
    };
    let mut r = measure(cell, &run, &trained).map_err(|e| cell_err(&cell.id, e))?;
    if let TableKind::Main { task } = study.tables[&cell.table].kind {
        log(&format!("cell {}: scoring ({})", cell.id, task.metric()));
        let t0 = Instant::now();
        let adapters: Vec<(String, PathBuf)> = match cell.setting {
            Setting::Local => (0..cell.cfg.federate.client_num)
                .map(|c| {
                    (
                        format!("client {c}"),
                        run.join(format!("adapter_client_{c}")),
                    )
                })
                .collect(),
            _ => vec![("global".into(), run.join("adapter"))],
        };
        let held = held_out_for(cell, &run)?;
        for (name, path) in adapters {
            let t = Target {
                model: &cell.cfg.model.path,
                adapter: Some(&path),
                data_root: &cell.cfg.data_root(),
                held_out: held.as_ref(),
                out: dir.join("eval").join(name.replace(' ', "_")),
            };
            let s = evaluate::score(task, &study.eval, &t).map_err(|e| cell_err(&cell.id, e))?;
            r.scores.push((name, s));
        }
        r.eval_seconds = t0.elapsed().as_secs_f64();
    }
    write_json(&dir.join("result.json"), &r)?;
    log(&format!("cell {}: done", cell.id));
    Ok(r)
}

/// Fed-MMLU trains on MMLU questions: its scores count only the run's held-out ones.
fn held_out_for(cell: &Cell, run: &Path) -> Result<Option<std::collections::BTreeSet<usize>>> {
    Ok(if cell.cfg.data.source == "fed-mmlu" {
        Some(evaluate::held_out(run)?)
    } else {
        None
    })
}

/// The base model's row of a main table: scored like the cells (on the first cell's held-out
/// questions where that matters), no training.
pub fn run_base(
    study: &Study,
    task: Task,
    first: &Cell,
    out: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<CellResult> {
    let id = format!("{}/base", first.table);
    let dir = cell_dir(out, &id);
    std::fs::create_dir_all(dir.join("eval")).map_err(|e| file_err(&dir, e))?;
    log(&format!(
        "cell {id}: scoring the base model ({})",
        task.metric()
    ));
    let t0 = Instant::now();
    let held = held_out_for(first, &run_dir(out, &first.id))?;
    let t = Target {
        model: &first.cfg.model.path,
        adapter: None,
        data_root: &first.cfg.data_root(),
        held_out: held.as_ref(),
        out: dir.join("eval").join("base"),
    };
    let s = evaluate::score(task, &study.eval, &t).map_err(|e| cell_err(&id, e))?;
    let r = CellResult {
        id: id.clone(),
        table: first.table.clone(),
        method: Method::Base,
        setting: Setting::None,
        clients: 0,
        rounds: 0,
        trainable_params: 0,
        mb_up_per_client_round: 0.0,
        mb_down_per_client_round: 0.0,
        seconds_per_round: 0.0,
        peak_rss_mb: None,
        loss_name: String::new(),
        loss_curve: vec![],
        heldout: None,
        heldout_best: None,
        scores: vec![("base".into(), s)],
        own_test: None,
        global_test: None,
        train_seconds: 0.0,
        eval_seconds: t0.elapsed().as_secs_f64(),
    };
    write_json(&dir.join("result.json"), &r)?;
    log(&format!("cell {id}: done"));
    Ok(r)
}

/// The HPO section: `fedllm tune` over the base cell, in this process (its trials resume from
/// `trials.jsonl`), concluded as `fedllm tune` concludes.
pub fn run_hpo(
    study_dir: &Path,
    spec: &HpoSpec,
    overrides: &[String],
    out: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<HpoResult> {
    let dir = out.join("hpo");
    let base_path = study_dir.join(&spec.config);
    let t = match read_json::<Tune>(&dir.join("tune.json"))? {
        Some(t) => t,
        None => {
            let mut o = overrides.to_vec();
            o.extend(spec.overrides.iter().cloned());
            let base = RunConfig::from_file(&base_path, &o)?;
            Tune {
                base: base.to_yaml(),
                space: serde_yaml::to_string(&spec.space)
                    .map_err(|e| ExperimentError::Config(format!("hpo.space: {e}")))?,
                scheduler: spec.scheduler,
                trials: spec.trials,
                min_rounds: spec.min_rounds,
                max_rounds: spec.max_rounds,
                eta: spec.eta,
                seed: spec.seed,
                metric: spec.metric.clone(),
                maximize: spec.maximize,
            }
        }
    };
    let n = tune::planned_trials(&t.plan()?);
    log(&format!("hpo: {:?} over {n} trials", t.scheduler));
    let t0 = Instant::now();
    let results = tune::run(&t, &dir, |l| {
        if l.starts_with("bracket") {
            log(&format!("hpo: {l}"))
        }
    })?;
    let c = tune::conclude(&t, &dir, n, &results)?;
    let prior: f64 = results.iter().map(|r| r.seconds).sum();
    let r = HpoResult {
        base: spec.config.clone(),
        scheduler: t.scheduler,
        metric: t.metric.clone(),
        trials: n,
        trial_runs: results.len(),
        best: c.best,
        rho: c.rho,
        seconds: prior.max(t0.elapsed().as_secs_f64()),
    };
    write_json(&dir.join("hpo.json"), &r)?;
    log("hpo: done");
    Ok(r)
}
