//! Federated hyper-parameter optimisation (`fedllm tune`): trials are runs with a point of the
//! search space applied as config overrides; fidelity is rounds. Every trial is configured for
//! the largest budget (so its learning-rate schedule spans that) and checkpoints every round, so
//! promoting a trial continues it from its checkpoint and ends bit-identical to running it
//! straight. `trials.jsonl` records each finished (trial, rounds); a resumed tuning run never
//! reruns one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::error::{FlError, Result};
use crate::simulation::{load_model, Simulation};
use fedllm_model::{CausalLm, Tokenizer};

pub mod report;
pub mod schedule;
pub mod space;

pub use schedule::{hyperband, successive_halving, Bracket, Rung};
pub use space::{Point, Space};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// Random search: `trials` points, each to the largest budget.
    Rs,
    /// Every point of a finite space, each to the largest budget.
    Grid,
    /// Successive halving of `trials` points from the smallest budget.
    Sha,
    /// Hyperband's brackets of successive halving.
    Hyperband,
}

/// A tuning run, as written to `tune.json` (so `--resume` needs nothing else).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tune {
    /// The base run config (resolved YAML).
    pub base: String,
    /// The search space file's text.
    pub space: String,
    pub scheduler: Scheduler,
    pub trials: usize,
    pub min_rounds: usize,
    pub max_rounds: usize,
    pub eta: usize,
    pub seed: u64,
    /// A numeric field of the round records (`client_val_loss`: the token-weighted mean of the
    /// clients' validation losses, never a sum).
    pub metric: String,
    pub maximize: bool,
}

/// One finished (trial, budget): a line of `trials.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialResult {
    pub bracket: usize,
    pub rung: usize,
    pub trial: usize,
    pub point: Point,
    pub rounds: usize,
    pub metric: f64,
    pub seconds: f64,
}

fn io(path: &Path, e: impl std::fmt::Display) -> FlError {
    FlError::File {
        path: path.into(),
        msg: e.to_string(),
    }
}

impl Tune {
    /// The brackets this tuning run plays, with the points of their first rungs.
    pub fn plan(&self) -> Result<Vec<(Bracket, Vec<Point>)>> {
        let space = Space::parse(&self.space)?;
        if self.min_rounds == 0 || self.min_rounds > self.max_rounds || self.eta < 2 {
            return Err(FlError::Config(format!(
                "tune: need 1 <= min rounds ({}) <= max rounds ({}) and eta >= 2 ({})",
                self.min_rounds, self.max_rounds, self.eta
            )));
        }
        let full = |n: usize| {
            vec![Rung {
                trials: n,
                rounds: self.max_rounds,
            }]
        };
        let mut next = 0usize;
        let mut points = |n: usize| -> Vec<Point> {
            let p = (next..next + n)
                .map(|t| space.sample(self.seed, t))
                .collect();
            next += n;
            p
        };
        Ok(match self.scheduler {
            Scheduler::Rs => vec![(full(self.trials), points(self.trials))],
            Scheduler::Grid => {
                let g = space.grid()?;
                vec![(full(g.len()), g)]
            }
            Scheduler::Sha => {
                let b = successive_halving(self.trials, self.min_rounds, self.max_rounds, self.eta);
                vec![(b, points(self.trials))]
            }
            Scheduler::Hyperband => hyperband(self.min_rounds, self.max_rounds, self.eta)
                .into_iter()
                .map(|b| {
                    let n = b[0].trials;
                    (b, points(n))
                })
                .collect(),
        })
    }

    /// Trial `id`'s run config: the base, the point, the largest budget as its horizon, a
    /// checkpoint and an evaluation every round, its own folder.
    pub fn trial_config(&self, out: &Path, id: usize, point: &Point) -> Result<RunConfig> {
        let mut o = point.clone();
        o.extend([
            format!("federate.total_round_num={}", self.max_rounds),
            "federate.save_freq=1".into(),
            "eval.freq=1".into(),
            format!("outdir={}", trial_dir(out, id).display()),
        ]);
        RunConfig::from_yaml(&self.base, &o)
    }
}

pub fn trial_dir(out: &Path, id: usize) -> PathBuf {
    out.join(format!("trial-{id}"))
}

/// The base model loaded once for every trial of a tuning run, keyed by the `model` section it
/// was loaded for (a space over `model.*` keys reloads when the section changes).
#[derive(Default)]
pub struct Models(Option<(String, CausalLm, Tokenizer)>);

impl Models {
    fn get(&mut self, cfg: &RunConfig) -> Result<(&CausalLm, &Tokenizer)> {
        let key = serde_json::to_string(&cfg.model).expect("json");
        if self.0.as_ref().is_none_or(|(k, _, _)| *k != key) {
            let (m, t) = load_model(cfg)?;
            self.0 = Some((key, m, t));
        }
        let (_, m, t) = self.0.as_ref().expect("just loaded");
        Ok((m, t))
    }
}

/// Runs (or continues) trial `id` to `rounds` rounds; returns its metric at that round.
pub fn run_trial(
    tune: &Tune,
    out: &Path,
    models: &mut Models,
    (id, point): (usize, &Point),
    rounds: usize,
    log: &mut dyn FnMut(&str),
) -> Result<f64> {
    let dir = trial_dir(out, id);
    let cfg = tune.trial_config(out, id, point)?;
    let (model, tok) = models.get(&cfg)?;
    let mut sim = if crate::checkpoint::dir(&dir).join("state.json").exists() {
        Simulation::resume_with_model(&dir, model, tok)?
    } else {
        // Nothing to continue from (never started, or stopped before its first round ended).
        let _ = std::fs::remove_dir_all(&dir);
        cfg.validate()?;
        Simulation::with_model(cfg, model, tok)?
    };
    if sim.server.round < rounds {
        sim.run(false, Some(rounds), |l| log(&format!("trial {id}: {l}")))?;
    }
    let rec = sim
        .records
        .iter()
        .find(|r| r.round == rounds)
        .ok_or_else(|| FlError::Config(format!("trial {id}: no record of round {rounds}")))?;
    let v = serde_json::to_value(rec).expect("json");
    v.get(&tune.metric)
        .and_then(|x| x.as_f64())
        .ok_or_else(|| {
            FlError::Config(format!(
                "tune metric `{}` has no value at round {rounds} of trial {id} (a numeric round-record field such as client_val_loss or server_test_loss)",
                tune.metric
            ))
        })
}

/// What `trials.jsonl` already holds (a resumed run skips those).
pub fn finished(out: &Path) -> Result<Vec<TrialResult>> {
    let p = out.join("trials.jsonl");
    let Ok(text) = std::fs::read_to_string(&p) else {
        return Ok(Vec::new());
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| io(&p, e)))
        .collect()
}

fn append(out: &Path, r: &TrialResult) -> Result<()> {
    let p = out.join("trials.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .map_err(|e| io(&p, e))?;
    writeln!(f, "{}", serde_json::to_string(r).expect("json")).map_err(|e| io(&p, e))
}

/// Plays every bracket: runs each rung's trials, promotes the best 1/η. Returns all results.
pub fn run(tune: &Tune, out: &Path, mut log: impl FnMut(&str)) -> Result<Vec<TrialResult>> {
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let tj = out.join("tune.json");
    std::fs::write(&tj, serde_json::to_string_pretty(tune).expect("json"))
        .map_err(|e| io(&tj, e))?;
    let mut done = finished(out)?;
    let mut models = Models::default();
    let mut first_id = 0usize;
    for (b, (bracket, points)) in tune.plan()?.into_iter().enumerate() {
        let mut alive: Vec<(usize, Point)> = points
            .into_iter()
            .enumerate()
            .map(|(i, p)| (first_id + i, p))
            .collect();
        first_id += alive.len();
        for (ri, rung) in bracket.iter().enumerate() {
            alive.truncate(rung.trials);
            let mut scored = Vec::with_capacity(alive.len());
            for (id, point) in &alive {
                let prior = done
                    .iter()
                    .find(|r| r.trial == *id && r.rounds == rung.rounds);
                let m = match prior {
                    Some(r) => r.metric,
                    None => {
                        let t0 = std::time::Instant::now();
                        let m =
                            run_trial(tune, out, &mut models, (*id, point), rung.rounds, &mut log)?;
                        let r = TrialResult {
                            bracket: b,
                            rung: ri,
                            trial: *id,
                            point: point.clone(),
                            rounds: rung.rounds,
                            metric: m,
                            seconds: t0.elapsed().as_secs_f64(),
                        };
                        append(out, &r)?;
                        log(&format!(
                            "bracket {b} rung {ri}: trial {id} at {} rounds: {} = {m:.5}",
                            rung.rounds, tune.metric
                        ));
                        done.push(r);
                        m
                    }
                };
                scored.push((m, *id, point.clone()));
            }
            // Best first; a NaN metric ranks last.
            scored.sort_by(|a, b| {
                let (x, y) = if tune.maximize {
                    (b.0, a.0)
                } else {
                    (a.0, b.0)
                };
                x.partial_cmp(&y)
                    .unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
                    .then(a.1.cmp(&b.1))
            });
            alive = scored.into_iter().map(|(_, id, p)| (id, p)).collect();
        }
    }
    Ok(done)
}

/// The best result at the largest budget any trial reached, and its runnable config.
pub fn best(
    tune: &Tune,
    out: &Path,
    results: &[TrialResult],
) -> Result<Option<(TrialResult, String)>> {
    let top = results.iter().map(|r| r.rounds).max();
    let Some(top) = top else { return Ok(None) };
    let best = results
        .iter()
        .filter(|r| r.rounds == top && !r.metric.is_nan())
        .min_by(|a, b| {
            let (x, y) = if tune.maximize {
                (b.metric, a.metric)
            } else {
                (a.metric, b.metric)
            };
            x.partial_cmp(&y).expect("no NaN")
        });
    let Some(best) = best else { return Ok(None) };
    let mut cfg = tune.trial_config(out, best.trial, &best.point)?;
    cfg.outdir = out.join("best-run");
    cfg.federate.total_round_num = top;
    Ok(Some((best.clone(), cfg.to_yaml())))
}

/// What a finished tuning run concludes, also written beside its trials: `trials.csv`,
/// `best.yaml` (the best trial's runnable config), `trials.svg` and `correlations.json`.
#[derive(Debug, Clone)]
pub struct Conclusion {
    pub best: Option<TrialResult>,
    /// (round r, Spearman's ρ between the ranking at r and at the largest budget, trials).
    pub rho: Vec<(usize, f64, usize)>,
}

/// Writes a finished tuning run's outputs; `trials` = how many trials the plan started.
pub fn conclude(
    tune: &Tune,
    out: &Path,
    trials: usize,
    results: &[TrialResult],
) -> Result<Conclusion> {
    let mut csv = String::from("bracket,rung,trial,rounds,metric,seconds,point\n");
    for r in results {
        csv += &format!(
            "{},{},{},{},{},{:.2},\"{}\"\n",
            r.bracket,
            r.rung,
            r.trial,
            r.rounds,
            r.metric,
            r.seconds,
            r.point.join(" ")
        );
    }
    let p = out.join("trials.csv");
    std::fs::write(&p, csv).map_err(|e| io(&p, e))?;
    let best = match best(tune, out, results)? {
        Some((b, yaml)) => {
            let p = out.join("best.yaml");
            std::fs::write(&p, yaml).map_err(|e| io(&p, e))?;
            Some(b)
        }
        None => None,
    };
    let curves = report::curves(tune, out, trials)?;
    report::plot(&out.join("trials.svg"), &tune.metric, &curves)?;
    let rho = report::fidelity_correlations(&curves);
    let j: Vec<serde_json::Value> = rho
        .iter()
        .map(|(r, v, k)| serde_json::json!({"round": r, "spearman": v, "trials": k}))
        .collect();
    let p = out.join("correlations.json");
    std::fs::write(&p, serde_json::to_string_pretty(&j).expect("json")).map_err(|e| io(&p, e))?;
    Ok(Conclusion { best, rho })
}

/// How many trials `plan` starts (the first rung of every bracket).
pub fn planned_trials(plan: &[(Bracket, Vec<Point>)]) -> usize {
    plan.iter().map(|(b, _)| b[0].trials).sum()
}
