//! `fedllm tune`: federated hyper-parameter search over a run config.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use fedllm_fl::tune::{self, Scheduler, Tune};
use fedllm_fl::RunConfig;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SchedulerArg {
    Rs,
    Grid,
    Sha,
    Hyperband,
}

#[derive(Args)]
pub struct TuneArgs {
    /// Base run config (YAML); required unless --resume
    #[arg(long, required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Search space (YAML): dotted config keys to {uniform|log_uniform|int: [lo, hi]} or {choice: [...]}
    #[arg(long, required_unless_present = "resume")]
    space: Option<PathBuf>,
    /// Random search, grid, successive halving or Hyperband
    #[arg(long, value_enum, default_value = "rs")]
    scheduler: SchedulerArg,
    /// Trials for rs and sha
    #[arg(long, default_value_t = 8)]
    trials: usize,
    /// Smallest budget in rounds (sha, hyperband)
    #[arg(long, default_value_t = 1)]
    min_rounds: usize,
    /// Largest budget in rounds (every trial's schedule spans it)
    #[arg(long, default_value_t = 3)]
    max_rounds: usize,
    /// Keep the best 1/eta of each rung
    #[arg(long, default_value_t = 3)]
    eta: usize,
    /// Seed of the sampled points
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The round-record field ranked (a mean over clients' tokens by default)
    #[arg(long, default_value = "client_val_loss")]
    metric: String,
    /// Higher is better (accuracies)
    #[arg(long)]
    maximize: bool,
    /// Output folder: trials, trials.jsonl/.csv, best.yaml
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the tuning run in this folder (finished trials are not rerun)
    #[arg(long, conflicts_with_all = ["config", "space", "out"])]
    resume: Option<PathBuf>,
    /// Overrides of the base config, key.sub=value
    overrides: Vec<String>,
}

pub fn cmd_tune(a: TuneArgs) -> Result<()> {
    let (t, out) = match &a.resume {
        Some(dir) => {
            let p = dir.join("tune.json");
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("{}: no tuning run to resume", p.display()))?;
            let t: Tune =
                serde_json::from_str(&text).with_context(|| format!("{}", p.display()))?;
            (t, dir.clone())
        }
        None => {
            let (Some(c), Some(s), Some(out)) = (&a.config, &a.space, &a.out) else {
                bail!("give --config, --space and --out (or --resume)");
            };
            let base = RunConfig::from_file(c, &a.overrides)?;
            let space = std::fs::read_to_string(s)
                .with_context(|| format!("reading the search space {}", s.display()))?;
            if out.join("tune.json").exists() {
                bail!(
                    "{} already holds a tuning run: continue it with --resume {0}",
                    out.display()
                );
            }
            let t = Tune {
                base: base.to_yaml(),
                space,
                scheduler: match a.scheduler {
                    SchedulerArg::Rs => Scheduler::Rs,
                    SchedulerArg::Grid => Scheduler::Grid,
                    SchedulerArg::Sha => Scheduler::Sha,
                    SchedulerArg::Hyperband => Scheduler::Hyperband,
                },
                trials: a.trials,
                min_rounds: a.min_rounds,
                max_rounds: a.max_rounds,
                eta: a.eta,
                seed: a.seed,
                metric: a.metric.clone(),
                maximize: a.maximize,
            };
            (t, out.clone())
        }
    };
    // Every mistake in the plan (space, budgets) before the first model load.
    let plan = t.plan()?;
    let n = tune::planned_trials(&plan);
    eprintln!(
        "tune: {:?}, {} bracket(s), {n} trials, {}..={} rounds, metric {} ({}) → {}",
        t.scheduler,
        plan.len(),
        t.min_rounds,
        t.max_rounds,
        t.metric,
        if t.maximize { "max" } else { "min" },
        out.display()
    );
    let t0 = std::time::Instant::now();
    let results = tune::run(&t, &out, |l| {
        if l.starts_with("bracket") {
            println!("{l}");
        }
    })?;
    let c = tune::conclude(&t, &out, n, &results)?;
    if let Some(best) = &c.best {
        println!(
            "best: trial {} ({}) {} = {:.5} at {} rounds → {}",
            best.trial,
            best.point.join(" "),
            t.metric,
            best.metric,
            best.rounds,
            out.join("best.yaml").display()
        );
    }
    for (r, v, k) in &c.rho {
        println!("rank correlation, round {r} vs the largest budget: {v:.3} ({k} trials)");
    }
    println!(
        "{} trial runs in {:.1}s",
        results.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
