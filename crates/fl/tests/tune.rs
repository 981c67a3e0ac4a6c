//! Federated HPO on the tiny golden LLaMA: promotion continues a trial bit for bit, successive
//! halving promotes the best, and a resumed tuning run reruns nothing.

use std::path::Path;

use fedllm_fl::strategy::fedex::FedEx;
use fedllm_fl::tune::{self, Scheduler, Tune};

mod common;
use common::{config, data};

fn tune_spec(root: &Path, scheduler: Scheduler) -> Tune {
    let d = data(root, 60);
    // A cosine schedule: continuing must keep one curve over the largest budget.
    let base = config(root, &d, &["train.schedule=cosine", "adapter.dropout=0.0"]).to_yaml();
    Tune {
        base,
        space: "train.lr: {log_uniform: [0.001, 0.05]}\nadapter.r: {choice: [2, 4]}\n".into(),
        scheduler,
        trials: 3,
        min_rounds: 1,
        max_rounds: 3,
        eta: 3,
        seed: 5,
        metric: "client_val_loss".into(),
        maximize: false,
    }
}

/// A trial run 1 round and then promoted to 3 ends where the same trial run 3 rounds straight
/// ends: same metric, same checkpoint bytes (global adapter, server state, round).
#[test]
fn promotion_continues_a_trial_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tune_spec(tmp.path(), Scheduler::Sha);
    let point = fedllm_fl::tune::Space::parse(&t.space)
        .unwrap()
        .sample(t.seed, 0);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut quiet = |_: &str| {};
    // Separate model caches: the promoted trial also reloads nothing it should not share.
    let (mut ma, mut mb) = (tune::Models::default(), tune::Models::default());
    tune::run_trial(&t, &a, &mut ma, (0, &point), 1, &mut quiet).unwrap();
    let promoted = tune::run_trial(&t, &a, &mut ma, (0, &point), 3, &mut quiet).unwrap();
    let straight = tune::run_trial(&t, &b, &mut mb, (0, &point), 3, &mut quiet).unwrap();
    assert_eq!(promoted.to_bits(), straight.to_bits());
    for f in ["global.safetensors", "server.safetensors"] {
        let read = |d: &Path| std::fs::read(d.join("trial-0/checkpoint").join(f)).unwrap();
        assert_eq!(read(&a), read(&b), "{f}");
    }
}

/// Successive halving with 3 trials, η = 3, 1 → 3 rounds: all three run 1 round, the one with
/// the lowest validation loss (the mean over clients' tokens) goes on to 3; `best` names it
/// with a runnable config. Run again in the same folder, nothing reruns.
#[test]
fn halving_promotes_the_best_and_a_resumed_run_reruns_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tune_spec(tmp.path(), Scheduler::Sha);
    let out = tmp.path().join("tune");
    let res = tune::run(&t, &out, |_| {}).unwrap();
    assert_eq!(res.len(), 4);
    let first: Vec<_> = res.iter().filter(|r| r.rounds == 1).collect();
    assert_eq!(first.len(), 3);
    let winner = first
        .iter()
        .min_by(|a, b| a.metric.partial_cmp(&b.metric).unwrap())
        .unwrap();
    let last: Vec<_> = res.iter().filter(|r| r.rounds == 3).collect();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].trial, winner.trial);
    let (best, yaml) = tune::best(&t, &out, &res).unwrap().unwrap();
    assert_eq!(best.trial, winner.trial);
    let cfg = fedllm_fl::RunConfig::from_yaml(&yaml, &[]).unwrap();
    assert_eq!(cfg.federate.total_round_num, 3);
    for o in &best.point {
        let (k, v) = o.split_once('=').unwrap();
        assert!(
            yaml.contains(&format!("{}: {v}", k.rsplit('.').next().unwrap())),
            "{o}"
        );
    }
    let lines = || std::fs::read_to_string(out.join("trials.jsonl")).unwrap();
    let before = lines();
    let again = tune::run(&t, &out, |l| panic!("reran: {l}")).unwrap();
    assert_eq!(lines(), before);
    assert_eq!(again.len(), 4);
}

/// FedEx inside a run: each client trains with the arm it drew (its lr is in the record), θ is
/// in every round's record, moves away from uniform, stays a distribution, and a run resumed
/// after round 1 ends with the same θ and global adapter as one run straight.
#[test]
fn fedex_tunes_client_hyperparameters_within_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 90);
    let extra = [
        "federate.strategy=fedex",
        "federate.fedex_lrs=[0.001, 0.05]",
        "federate.fedex_steps=[1, 3]",
        "federate.fedex_eta=5.0",
        "adapter.dropout=0.0",
    ];
    let dir = tmp.path().join("straight");
    let mut sim = fedllm_fl::Simulation::new(config(&dir, &d, &extra)).unwrap();
    let s = sim.run(false, None, |_| {}).unwrap();
    let mut prev = vec![0.25; 4];
    for r in s.records.iter().filter(|r| r.round > 0) {
        let theta = &r.strategy["fedex_theta"];
        assert_eq!(theta.len(), 4);
        assert!((theta.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // The lr each client trained with is the arm it drew from the previous round's θ.
        let mut f = FedEx::new(&[0.001, 0.05], &[1, 3], 5.0, sim.cfg.federate.seed);
        f.theta = prev.clone();
        for (c, (first, _)) in &r.client_lr {
            assert_eq!(
                *first,
                f.arms[f.arm(r.round, *c)].0,
                "round {} client {c}",
                r.round
            );
        }
        prev = theta.clone();
    }
    let last = &s.records.last().unwrap().strategy["fedex_theta"];
    assert!(
        last.iter().any(|p| (p - 0.25).abs() > 1e-6),
        "θ never moved: {last:?}"
    );
    let part = tmp.path().join("part");
    let mut a = fedllm_fl::Simulation::new(config(&part, &d, &extra)).unwrap();
    a.run(false, Some(1), |_| {}).unwrap();
    let mut b = fedllm_fl::Simulation::resume(&part.join("run"), &[]).unwrap();
    let sb = b.run(false, None, |_| {}).unwrap();
    assert_eq!(&sb.records.last().unwrap().strategy["fedex_theta"], last);
    assert_eq!(
        common::bits(&b.server.global),
        common::bits(&sim.server.global)
    );
}
