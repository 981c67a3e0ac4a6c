//! Secure aggregation (SecAgg+) in the round engine, in process: the masked aggregate equals
//! plain FedAvg within the quantisation bound, a client's upload tells nothing of its update,
//! rounds below the threshold are abandoned and the run goes on, combinations that cannot work
//! are config errors. The same protocol over gRPC with real processes: cli/tests/distributed.rs.

mod common;

use common::{config, data};
use fedllm_fl::params::ParamSet;
use fedllm_fl::Simulation;

use common::one_round_logged as run;

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
    within_quantisation_bound(&avg, &sec);
    // The same clients trained the same way: their losses are the plain run's.
    assert_eq!(
        s_avg.records[0].client_train_loss,
        s_sec.records[0].client_train_loss
    );
}

/// The secure run's global tensors are the plain run's within the quantisation bound (see
/// the test above), and the round moved them (so the comparison is not vacuous).
fn within_quantisation_bound(avg: &Simulation, sec: &Simulation) {
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
}

/// Local DP composes with secure aggregation (distributed DP): clients clip and noise their
/// own updates (seeded, so the same noise in both runs), the masked mean equals the plain
/// local-DP mean within the quantisation bound, and ε is accounted.
#[test]
fn secure_aggregation_composes_with_local_dp() {
    let tmp = tempfile::tempdir().unwrap();
    let dp = ["dp.mode=local", "dp.clip=0.05", "dp.noise_multiplier=0.5"];
    let (plain, _, _) = run(tmp.path(), "plain", &dp);
    let mut with = dp.to_vec();
    with.extend(["secagg.enabled=true", "secagg.clip_range=1"]);
    let (sec, s, _) = run(tmp.path(), "sec", &with);
    within_quantisation_bound(&plain, &sec);
    assert!(s.records.last().unwrap().strategy["dp_epsilon"][0] > 0.0);
}

/// What the server receives of one client (its masked upload) is independent of that
/// client's update: client 0, driven through the stages as a distributed client, uploads y;
/// the same fit without secure aggregation gives its plaintext update, quantised as the
/// protocol does (x). Over the adapter's coordinates the sample correlation of independent
/// values is ~N(0, 1/N), so |r| < 4/√N; a masked vector leaking its input (e.g. masks that
/// are not added) would give r ≈ 1. The masked values also look uniform on [0, 2^32): their
/// mean is within 4 standard errors (2^32/√(12N)) of 2^31.
#[test]
fn a_masked_upload_is_independent_of_the_update() {
    use fedllm_fl::message::{ToClient, ToServer};
    use fedllm_fl::secagg::protocol::{Params, Stage};
    use fedllm_fl::secagg::server::ServerRound;
    use fedllm_fl::Role;
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path(), 60);
    let cfg = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        config(
            &d,
            &data,
            &["adapter.dropout=0", "federate.sample_client_num=3"],
        )
    };
    let p = Params {
        threshold: 1,
        clip_range: 1.0,
        bits: 24,
        max_weight: 1000.0,
    };
    let (mut sr, s1) = ServerRound::new(1, p.clone(), &[0, 1], None, 3);
    // Client 0 for real; client 1's side of the key exchange in memory.
    let mut sim = Simulation::with_role(cfg("c0"), Role::Client(0)).unwrap();
    let mut other = None;
    let mut answer = |c: usize, stage: Stage, sim: &mut Simulation| match c {
        0 => match sim.handle(ToClient::SecAgg { round: 1, stage }).unwrap() {
            Some(ToServer::SecAgg { reply, .. }) => (0, reply),
            m => panic!("{m:?}"),
        },
        _ => match stage {
            Stage::Setup { params, neighbours } => {
                let (st, r) =
                    fedllm_fl::secagg::client::ClientRound::setup(1, 1, params, neighbours)
                        .unwrap();
                other = Some(st);
                (1, r)
            }
            Stage::ShareKeys { keys } => (1, other.as_mut().unwrap().share_keys(keys).unwrap()),
            s => panic!("{s:?}"),
        },
    };
    let r1 = s1
        .into_iter()
        .map(|(c, s)| answer(c, s, &mut sim))
        .collect();
    let s2 = sr.on_keys(r1, &mut |_| {});
    let r2 = s2
        .into_iter()
        .map(|(c, s)| answer(c, s, &mut sim))
        .collect();
    let masks = sr.on_shares(r2, &mut |_| {});
    let params = sim.server.shared();
    let fit = |secagg| {
        let config = fedllm_fl::strategy::FitConfig {
            secagg,
            ..Default::default()
        };
        ToClient::Fit {
            round: 1,
            params: params.clone(),
            config,
            seed: 11,
        }
    };
    let masked = match sim.handle(fit(Some(masks[&0].clone()))).unwrap() {
        Some(ToServer::FitRes { result, .. }) => result,
        m => panic!("{m:?}"),
    };
    let lay = fedllm_fl::params::layout(&params);
    let y = fedllm_fl::secagg::masked_values(&masked.params, &lay).unwrap();
    let mut plain_sim = Simulation::with_role(cfg("plain"), Role::Client(0)).unwrap();
    let plain = match plain_sim.handle(fit(None)).unwrap() {
        Some(ToServer::FitRes { result, .. }) => result,
        m => panic!("{m:?}"),
    };
    let w = plain.num_samples as f64 / 1000.0;
    let mut x: Vec<f32> = values(&plain.params)
        .iter()
        .zip(values(&params))
        .map(|(a, b)| ((a - b) * w) as f32)
        .collect();
    assert!(x.iter().any(|v| *v != 0.0));
    x.push(w as f32);
    let q = fedllm_fl::secagg::quantize(&x, 1.0, 24);
    let n = q.len() as f64;
    let r = fedllm_testing::correlation(&q, &y);
    assert!(r.abs() < 4.0 / n.sqrt(), "correlation {r} over {n} values");
    let mean = y.iter().map(|&v| v as f64).sum::<f64>() / n;
    let se = 2f64.powi(32) / (12.0 * n).sqrt();
    assert!((mean - 2f64.powi(31)).abs() < 4.0 * se, "mean {mean}");
    assert_eq!(masked.num_samples, 0, "the weight travels masked only");
}

/// Secure aggregation refuses what cannot work with it, each problem named with its key.
#[test]
fn secagg_config_errors_name_the_problem() {
    let parse = |extra: &[&str]| {
        let mut all = vec![
            "secagg.enabled=true",
            "federate.client_num=3",
            "federate.sample_client_num=3",
        ];
        all.extend_from_slice(extra);
        let all: Vec<String> = all.iter().map(|s| s.to_string()).collect();
        fedllm_fl::RunConfig::from_yaml("", &all)
    };
    let cases: [(&[&str], &str); 7] = [
        (
            &["federate.strategy=median"],
            "median, Krum and trimmed means need individual updates",
        ),
        (
            &["federate.strategy=krum"],
            "federate.strategy must be fedavg or fedprox",
        ),
        (&["dp.mode=central"], "composes with dp.mode local only"),
        (&["secagg.neighbours=3"], "secagg.neighbours must be even"),
        (&["secagg.threshold=5"], "secagg.threshold must be in 1..=2"),
        (
            &["secagg.quant_bits=31"],
            "secagg.quant_bits must be in 8..=30",
        ),
        (
            &["secagg.clip_range=0"],
            "secagg.clip_range must be finite and above 0",
        ),
    ];
    for (extra, want) in cases {
        let e = parse(extra).err().unwrap().to_string();
        assert!(e.contains(want), "{extra:?}: {e}");
    }
    // Local DP composes (distributed DP): accepted.
    parse(&["dp.mode=local", "dp.clip=0.1"]).unwrap();
}
