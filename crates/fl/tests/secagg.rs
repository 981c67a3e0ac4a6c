//! Secure aggregation (SecAgg+) in the round engine, in process: the masked aggregate equals
//! plain FedAvg within the quantisation bound, a client's upload tells nothing of its update,
//! rounds below the threshold are abandoned and the run goes on, combinations that cannot work
//! are config errors. The same protocol over gRPC with real processes: cli/tests/distributed.rs.

mod common;

use common::{config, data};
use fedllm_fl::params::ParamSet;
use fedllm_fl::Simulation;

fn run(
    dir: &std::path::Path,
    name: &str,
    extra: &[&str],
) -> (Simulation, fedllm_fl::Summary, Vec<String>) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let data = data(dir, 60);
    let mut all = vec![
        "federate.total_round_num=1",
        "eval.freq=0",
        "adapter.dropout=0",
        "federate.sample_client_num=3",
    ];
    all.extend_from_slice(extra);
    let mut sim = Simulation::new(config(&d, &data, &all)).unwrap();
    let mut lines = Vec::new();
    let s = sim.run(false, None, |l| lines.push(l.to_string())).unwrap();
    (sim, s, lines)
}

fn values(p: &ParamSet) -> Vec<f64> {
    p.values()
        .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .map(|x| x as f64)
        .collect()
}

/// The global tensors after one round under SecAgg+ equal plain FedAvg's within the bound
/// the quantisation allows. Each of the n = 3 values summed per coordinate (w·Δ, and w) is off
/// by at most half a level, step/2 = range/(2^bits − 1), so both sums are off by e ≤ n·step/2
/// and the mean (S + e₁)/(W + e₂) − S/W is off by at most e·(1 + |S/W|)/(W − e), |S/W| ≤ the
/// largest move of plain FedAvg; 1e-6 covers f32 rounding of the tensors (values below 1).
#[test]
fn secure_aggregate_equals_fedavg_within_the_quantisation_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let (avg, s_avg, _) = run(tmp.path(), "avg", &[]);
    let (sec, s_sec, lines) = run(
        tmp.path(),
        "sec",
        &["secagg.enabled=true", "secagg.clip_range=1"],
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("aggregated the masked inputs of clients [0, 1, 2]")),
        "{lines:?}"
    );
    let init = values(avg.initial());
    let (a, b) = (values(&avg.server.global), values(&sec.server.global));
    let max_delta = a
        .iter()
        .zip(&init)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(max_delta > 1e-3, "the round moved the adapter: {max_delta}");
    // Weights w = training samples / max_weight (1000), as FedAvg weighs by training samples.
    let step = 2.0 / ((1u64 << 24) - 1) as f64;
    let n = 3.0;
    let sum_w = sec.clients.iter().map(|c| c.train.len()).sum::<usize>() as f64 / 1000.0;
    let bound = n * step / 2.0 * (1.0 + max_delta) / (sum_w - n * step / 2.0) + 1e-6;
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(worst > 0.0 && worst <= bound, "worst {worst} bound {bound}");
    // The same clients trained the same way: their losses are the plain run's.
    assert_eq!(
        s_avg.records[0].client_train_loss,
        s_sec.records[0].client_train_loss
    );
}
