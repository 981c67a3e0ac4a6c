// Driving a federated run from Rust with a strategy of your own: each client gets its own
// learning rate and number of local steps, and the server averages as FedAvg does.
//
//     cargo run --release -p fedllm-fl --example per_client_lr -- fixtures/golden/llama-tiny DATA.jsonl OUTDIR
//
// DATA.jsonl holds Alpaca-style records ({"instruction", "input", "output"}).

use std::path::Path;

use fedllm_fl::params::ParamSet;
use fedllm_fl::strategy::{fedavg::FedAvg, Failure, FitConfig, FitResult, Strategy};
use fedllm_fl::{Result, RunConfig, Simulation, Summary};

/// Client c trains with lr = base / 2^c and c + 1 local steps.
pub struct PerClientLr {
    pub base_lr: f64,
}

impl Strategy for PerClientLr {
    fn name(&self) -> &'static str {
        "per_client_lr"
    }

    fn configure_fit(&self, _round: usize, client: usize) -> FitConfig {
        FitConfig {
            lr: Some(self.base_lr / (1u64 << client.min(30)) as f64),
            local_steps: Some(client + 1),
            ..Default::default()
        }
    }

    fn aggregate_fit(
        &mut self,
        round: usize,
        global: &ParamSet,
        results: &[FitResult],
        failures: &[Failure],
    ) -> Result<Option<ParamSet>> {
        FedAvg.aggregate_fit(round, global, results, failures)
    }
}

/// A 3-client, 2-round run of `model` on `data` with `PerClientLr`, written to `outdir`.
pub fn run(model: &Path, data: &Path, outdir: &Path) -> Result<Summary> {
    let overrides: Vec<String> = [
        format!("model.path={}", model.display()),
        format!("data.source={}", data.display()),
        "data.template=raw".into(),
        "data.tok_len=64".into(),
        "federate.client_num=3".into(),
        "federate.sample_client_num=3".into(),
        "federate.total_round_num=2".into(),
        "train.optimizer=adamw".into(),
        "train.lr=0.01".into(),
        "adapter.r=4".into(),
        format!("outdir={}", outdir.display()),
    ]
    .into();
    let cfg = RunConfig::from_yaml("", &overrides)?;
    let mut sim = Simulation::new(cfg)?;
    sim.server.strategy = Box::new(PerClientLr { base_lr: 0.02 });
    sim.run(false, None, |line| println!("{line}"))
}

#[allow(dead_code)]
fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, data, outdir] = args.as_slice() else {
        return Err("usage: per_client_lr MODEL DATA.jsonl OUTDIR".into());
    };
    let s = run(Path::new(model), Path::new(data), Path::new(outdir))?;
    println!("{}", s.table);
    Ok(())
}
