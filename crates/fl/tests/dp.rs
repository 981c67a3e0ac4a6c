//! Client-level differential privacy end to end on the tiny model: DP with no noise and no
//! clip is FedAvg bit for bit, clipping bounds the aggregate's move, the central noise has the
//! calibrated spread, the budget stops a run cleanly, a target ε picks the noise, resume is
//! bit-identical.

mod common;

use common::{bits, config, data};
use fedllm_fl::params::ParamSet;
use fedllm_fl::Simulation;

fn run(dir: &std::path::Path, name: &str, extra: &[&str]) -> (Simulation, fedllm_fl::Summary) {
    let (sim, s, _) = common::one_round_logged(dir, name, extra);
    (sim, s)
}

fn diff(a: &ParamSet, b: &ParamSet) -> Vec<f64> {
    a.iter()
        .flat_map(|(k, t)| {
            let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = b[k].flatten_all().unwrap().to_vec1().unwrap();
            x.into_iter()
                .zip(y)
                .map(|(p, q)| p as f64 - q as f64)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// z = 0 and C = ∞ change nothing: the same global bits as plain FedAvg.
#[test]
fn dp_without_noise_or_clip_is_fedavg_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (avg, _) = run(tmp.path(), "avg", &[]);
    let (dp, _) = run(
        tmp.path(),
        "dp",
        &["dp.mode=central", "dp.noise_multiplier=0", "dp.clip=.inf"],
    );
    assert_eq!(bits(&avg.server.global), bits(&dp.server.global));
}

/// With every update clipped to C = 0.01 (far below the unclipped move) the weighted mean of
/// the clipped updates, hence the global's move, has norm at most C (plus f32 rounding).
#[test]
fn clipping_bounds_the_aggregate_move() {
    let tmp = tempfile::tempdir().unwrap();
    let (free, _) = run(tmp.path(), "free", &[]);
    let init = free.initial().clone();
    let norm = |v: Vec<f64>| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let unclipped = norm(diff(&free.server.global, &init));
    assert!(unclipped > 0.05, "{unclipped}");
    let (dp, s) = run(
        tmp.path(),
        "dp",
        &["dp.mode=central", "dp.noise_multiplier=0", "dp.clip=0.01"],
    );
    let moved = norm(diff(&dp.server.global, &init));
    assert!(moved > 0.0 && moved <= 0.01 * (1.0 + 1e-4), "{moved}");
    assert_eq!(s.records.last().unwrap().strategy["dp_clip"], vec![0.01]);
}

/// Central noise: the same round with z = 1 and z = 0 (identical clipped updates) differ by
/// the noise alone; its spread is z·C·(largest weight / total weight). Over the adapter's 7,168
/// coordinates the sample standard deviation's standard error is 1/√(2·7168) ≈ 0.84%, so 4% is
/// beyond four of them.
#[test]
fn central_noise_has_the_calibrated_spread() {
    let tmp = tempfile::tempdir().unwrap();
    let base = ["dp.mode=central", "dp.clip=0.05", "adapter.r=16"];
    let (quiet, _) = run(
        tmp.path(),
        "z0",
        &[base[0], base[1], base[2], "dp.noise_multiplier=0"],
    );
    let (noisy, s) = run(
        tmp.path(),
        "z1",
        &[base[0], base[1], base[2], "dp.noise_multiplier=1"],
    );
    let d = diff(&noisy.server.global, &quiet.server.global);
    assert_eq!(d.len(), 7168);
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    let std = (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    let w: Vec<f64> = noisy.clients.iter().map(|c| c.train.len() as f64).collect();
    let want = 0.05 * w.iter().cloned().fold(0.0, f64::max) / w.iter().sum::<f64>();
    assert!((std - want).abs() <= 0.04 * want, "std {std} vs {want}");
    let rec = s.records.last().unwrap();
    assert!((rec.strategy["dp_noise_std"][0] - want).abs() < 1e-12);
    // ε after one round of 3 of 3 clients at z = 1: the Gaussian mechanism at multiplier 1/2
    // under replace-one, RDP α/(2·0.5²) = 2α, converted by Balle et al.'s bound
    // ε = min_α 2α + ln(1 − 1/α) − ln(δα)/(α − 1), over the accountant's orders, by hand here.
    let orders: Vec<f64> = (2..=64)
        .chain([128, 256, 512, 1024])
        .map(|a| a as f64)
        .collect();
    let delta = 1e-5f64;
    let hand = orders
        .iter()
        .map(|&a| 2.0 * a + (1.0 - 1.0 / a).ln() - (delta * a).ln() / (a - 1.0))
        .fold(f64::INFINITY, f64::min);
    let eps = rec.strategy["dp_epsilon"][0];
    assert!((eps - hand).abs() <= 1e-9 * hand, "{eps} vs {hand}");
}

/// `dp.max_epsilon` between ε(1) and ε(2): the run ends cleanly after round 1 with a message,
/// its adapter written and the run marked finished.
#[test]
fn the_privacy_budget_stops_a_run_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let c = fedllm_fl::config::DpCfg {
        mode: fedllm_fl::config::DpMode::Central,
        noise_multiplier: 4.0,
        ..Default::default()
    };
    let (e1, e2) = (
        fedllm_fl::dp::epsilon_of(&c, 3, 3, 1),
        fedllm_fl::dp::epsilon_of(&c, 3, 3, 2),
    );
    assert!(e1 < e2);
    let max = format!("dp.max_epsilon={}", (e1 + e2) / 2.0);
    let d = tmp.path().join("budget");
    std::fs::create_dir_all(&d).unwrap();
    let data = data(tmp.path(), 60);
    let cfg = config(
        &d,
        &data,
        &[
            "federate.total_round_num=3",
            "eval.freq=0",
            "dp.mode=central",
            "dp.noise_multiplier=4",
            &max,
        ],
    );
    let out = cfg.outdir.clone();
    let mut sim = Simulation::new(cfg).unwrap();
    let mut lines = Vec::new();
    let s = sim.run(false, None, |l| lines.push(l.to_string())).unwrap();
    assert_eq!(sim.server.round, 1);
    assert!(
        lines.iter().any(|l| l.contains("stopping before round 2")),
        "{lines:?}"
    );
    assert!(s.adapter_dir.join("adapter_model.safetensors").exists());
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["status"], "finished", "{run}");
    assert!((s.records.last().unwrap().strategy["dp_epsilon"][0] - e1).abs() < 1e-12);
}

/// `dp.target_epsilon` picks z so that the last round's ε is the target (to the search's 0.1%
/// in z, which moves ε by well under 1%).
#[test]
fn a_target_epsilon_sets_the_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let (sim, s) = run(
        tmp.path(),
        "target",
        &[
            "federate.total_round_num=2",
            "federate.sample_client_num=2",
            "dp.mode=central",
            "dp.target_epsilon=8",
        ],
    );
    let eps = s.records.last().unwrap().strategy["dp_epsilon"][0];
    assert!(eps <= 8.0 && eps > 8.0 * 0.99, "{eps}");
    assert!(sim.cfg.dp.noise_multiplier > 0.0);
}

/// Adaptive clipping (central noise): stopped after round 1 and resumed, the run ends
/// bit-identical to one run straight (clip and noise streams restored), and C has moved.
#[test]
fn adaptive_dp_resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path(), 60);
    let extra = [
        "federate.total_round_num=2",
        "eval.freq=0",
        "dp.mode=central",
        "dp.noise_multiplier=0.5",
        "dp.clip=5",
        "dp.adaptive=true",
        "dp.count_std=1",
    ];
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let mut straight = Simulation::new(config(&a, &data, &extra)).unwrap();
    let s = straight.run(false, None, |_| {}).unwrap();
    let cfg = config(&b, &data, &extra);
    let out = cfg.outdir.clone();
    Simulation::new(cfg)
        .unwrap()
        .run(false, Some(1), |_| {})
        .unwrap();
    let mut resumed = Simulation::resume(&out, &[]).unwrap();
    let r = resumed.run(false, None, |_| {}).unwrap();
    assert_eq!(bits(&straight.server.global), bits(&resumed.server.global));
    let clip = |s: &fedllm_fl::Summary| s.records.last().unwrap().strategy["dp_clip"][0];
    assert_eq!(clip(&s), clip(&r));
    assert!(
        clip(&s) < 5.0,
        "all updates are far inside C = 5: it shrinks"
    );
}

/// Local noise: each client's update carries z·C noise, so two runs differing only in z differ;
/// ε counts every round at full participation.
#[test]
fn local_noise_moves_every_client_update() {
    let tmp = tempfile::tempdir().unwrap();
    // r = 16: 7,168 coordinates, as in the central test (the same 4% bound).
    let (quiet, _) = run(
        tmp.path(),
        "l0",
        &[
            "dp.mode=local",
            "dp.noise_multiplier=0",
            "dp.clip=0.05",
            "adapter.r=16",
        ],
    );
    let (noisy, s) = run(
        tmp.path(),
        "l1",
        &[
            "dp.mode=local",
            "dp.noise_multiplier=1",
            "dp.clip=0.05",
            "adapter.r=16",
        ],
    );
    let d = diff(&noisy.server.global, &quiet.server.global);
    let n = d.len() as f64;
    let std = (d.iter().map(|x| x * x).sum::<f64>() / n).sqrt();
    // The weighted mean of three independent N(0, (zC)²) draws: zC·√Σw²/Σw.
    let w: Vec<f64> = noisy.clients.iter().map(|c| c.train.len() as f64).collect();
    let want = 0.05 * w.iter().map(|x| x * x).sum::<f64>().sqrt() / w.iter().sum::<f64>();
    assert!((std - want).abs() <= 0.04 * want, "std {std} vs {want}");
    let c = fedllm_fl::config::DpCfg {
        mode: fedllm_fl::config::DpMode::Local,
        noise_multiplier: 1.0,
        clip: 0.05,
        ..Default::default()
    };
    assert_eq!(
        s.records.last().unwrap().strategy["dp_epsilon"][0],
        fedllm_fl::dp::epsilon_of(&c, 3, 3, 1)
    );
}

/// Strategies without a bounded sensitivity are refused.
#[test]
fn dp_with_a_robust_aggregator_is_a_config_error() {
    let e = fedllm_fl::RunConfig::from_yaml(
        "",
        &["dp.mode=central".into(), "federate.strategy=median".into()],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("dp.mode central") && e.contains("median"), "{e}");
}
