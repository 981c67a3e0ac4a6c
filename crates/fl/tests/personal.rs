//! Personalised FL end to end on the tiny golden LLaMA: each method's degenerate case against
//! the method it reduces to, what travels (bytes), what stays, and bit-identical resume.

use fedllm_fl::params::ParamSet;
use fedllm_fl::Simulation;

mod common;
use common::{bits, config, data};

/// A 3-round run in `root/name` with SGD (the proximal algebra below assumes plain steps).
fn run(root: &std::path::Path, name: &str, extra: &[&str]) -> (Simulation, fedllm_fl::Summary) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let d = data(root, 60);
    let mut all = vec![
        "adapter.dropout=0.0",
        "train.optimizer=sgd",
        "train.lr=0.05",
    ];
    all.extend_from_slice(extra);
    let mut sim = Simulation::new(config(&dir, &d, &all)).unwrap();
    let s = sim.run(false, None, |_| {}).unwrap();
    (sim, s)
}

fn select(p: &ParamSet, f: impl Fn(&str) -> bool) -> ParamSet {
    p.iter()
        .filter(|(k, _)| f(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn max_abs_diff(a: &ParamSet, b: &ParamSet) -> f32 {
    a.iter()
        .map(|(k, t)| {
            let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = b[k].flatten_all().unwrap().to_vec1().unwrap();
            x.iter()
                .zip(&y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max)
        })
        .fold(0.0, f32::max)
}

fn is_a(k: &str) -> bool {
    k.contains("lora_A")
}

fn is_b(k: &str) -> bool {
    k.contains("lora_B")
}

/// FedRep with an empty head trains and shares everything: FedAvg, bit for bit (global and
/// metrics); so do empty `federate.local_tensors`.
#[test]
fn fedrep_without_a_head_is_fedavg_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (avg, sa) = run(tmp.path(), "fedavg", &[]);
    let (rep, sr) = run(tmp.path(), "fedrep", &["personal.method=fedrep"]);
    assert_eq!(bits(&rep.server.global), bits(&avg.server.global));
    let losses = |s: &fedllm_fl::Summary| {
        s.records
            .iter()
            .map(|r| (r.train_loss, r.client_test_loss))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&sr), losses(&sa));
    assert!(rep.local.is_empty());
}

/// FedRep with the last layer's adapters as head: the head never travels (bytes), each
/// client's head is its own and trained, the body is aggregated.
#[test]
fn fedrep_keeps_and_trains_the_head() {
    let tmp = tempfile::tempdir().unwrap();
    let head = "personal.head=[\"*layers.1.*\"]";
    let (rep, s) = run(tmp.path(), "fedrep", &["personal.method=fedrep", head]);
    let init = rep.initial().clone();
    let in_head = |k: &str| k.contains("layers.1.");
    let body_bytes: usize = select(&init, |k| !in_head(k))
        .values()
        .map(|t| t.elem_count() * 4)
        .sum();
    for c in 0..3 {
        assert_eq!(s.records[1].bytes_up_per_client[&c], body_bytes);
        let own = rep.local.get(c).unwrap();
        assert!(!own.is_empty() && own.keys().all(|k| in_head(k)));
        // B starts at zero: a trained head has moved it.
        assert!(
            max_abs_diff(
                &select(&own, is_b),
                &select(&init, |k| in_head(k) && is_b(k))
            ) > 0.0
        );
    }
    assert_ne!(
        bits(&rep.local.get(0).unwrap()),
        bits(&rep.local.get(1).unwrap())
    );
    // The global: its body was aggregated (B moved off zero), its head never (as initialised).
    let g = &rep.server.global;
    assert!(
        max_abs_diff(
            &select(g, |k| !in_head(k) && is_b(k)),
            &select(&init, |k| !in_head(k) && is_b(k))
        ) > 0.0
    );
    assert_eq!(bits(&select(g, in_head)), bits(&select(&init, in_head)));
}

/// FFA-LoRA: A never changes (global, and it never travels), B alone is trained, sent and
/// averaged; clients keep nothing. Half of LoRA's bytes per direction.
#[test]
fn ffa_lora_freezes_a_and_sends_only_b() {
    let tmp = tempfile::tempdir().unwrap();
    let (ffa, s) = run(tmp.path(), "ffa", &["personal.method=ffa_lora"]);
    let init = ffa.initial().clone();
    assert_eq!(
        bits(&select(&ffa.server.global, is_a)),
        bits(&select(&init, is_a))
    );
    assert!(max_abs_diff(&select(&ffa.server.global, is_b), &select(&init, is_b)) > 0.0);
    let b_bytes: usize = select(&init, is_b)
        .values()
        .map(|t| t.elem_count() * 4)
        .sum();
    let all_bytes: usize = init.values().map(|t| t.elem_count() * 4).sum();
    for c in 0..3 {
        assert_eq!(s.records[1].bytes_up_per_client[&c], b_bytes);
        // The fit request and the evaluation request: B each.
        assert_eq!(s.records[1].bytes_down_per_client[&c], 2 * b_bytes);
    }
    assert!(2 * b_bytes <= all_bytes);
    assert!(ffa.local.is_empty(), "frozen A is not kept per client");
    // Inside a client's training A does not move either: one more fit by client 0, then the
    // adapter holds exactly what it trained.
    let shared = fedllm_fl::client::Shared {
        model: &ffa.model,
        adapter: &ffa.adapter,
        train: &fedllm_train::TrainConfig {
            lr: 0.05,
            optimizer: fedllm_train::OptimizerConfig::Sgd {
                momentum: 0.0,
                weight_decay: 0.0,
                nesterov: false,
            },
            ..Default::default()
        },
        budget: fedllm_train::finetune::Budget::Steps(3),
        batch_size: 4,
        eval_batch_size: 4,
        pad_id: 0,
        initial: &init,
        personal: &ffa.cfg.personal,
    };
    let msg = fedllm_fl::message::ToClient::Fit {
        round: 4,
        params: select(&ffa.server.global, is_b),
        config: Default::default(),
        seed: 11,
    };
    ffa.clients[0]
        .handle(msg, &shared, &mut ParamSet::new())
        .unwrap();
    let trained = fedllm_fl::client::snapshot(&ffa.adapter).unwrap();
    assert_eq!(bits(&select(&trained, is_a)), bits(&select(&init, is_a)));
    assert!(max_abs_diff(&select(&trained, is_b), &select(&ffa.server.global, is_b)) > 0.0);
}

/// FedSA-LoRA is the `*lora_B*` local-tensors policy: the same run bit for bit, and B never
/// appears in an upload.
#[test]
fn fedsa_lora_keeps_b_on_the_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let (sa, s) = run(tmp.path(), "fedsa", &["personal.method=fedsa_lora"]);
    let (lt, _) = run(
        tmp.path(),
        "local_b",
        &["federate.local_tensors=[\"*lora_B*\"]"],
    );
    assert_eq!(bits(&sa.server.global), bits(&lt.server.global));
    for c in 0..3 {
        assert_eq!(
            bits(&sa.local.get(c).unwrap()),
            bits(&lt.local.get(c).unwrap())
        );
    }
    let a_bytes: usize = select(sa.initial(), is_a)
        .values()
        .map(|t| t.elem_count() * 4)
        .sum();
    for r in &s.records[1..] {
        assert!(r.bytes_up_per_client.values().all(|&b| b == a_bytes));
    }
    // Personalised runs report each client with its own and with the global parameters.
    let last = s.records.last().unwrap();
    for c in 0..3 {
        let l = &last.client_losses[&c];
        assert!(
            l.contains_key("test") && l.contains_key("global_test"),
            "{l:?}"
        );
    }
    assert!(last.client_global_test_loss.is_some());
    // The `local` baseline shares nothing: there is no global model to compare with.
    let (_, l) = run(
        tmp.path(),
        "local",
        &["federate.baseline=local", "federate.total_round_num=1"],
    );
    let ll = l.records.last().unwrap();
    assert!(ll.client_losses[&0].contains_key("test"));
    assert!(!ll.client_losses[&0].contains_key("global_test"));
    assert_eq!(ll.client_global_test_loss, None);
    // Mean, worst and best of the clients' own test losses, from the per-client values.
    let own: Vec<(usize, f64)> = (0..3)
        .map(|c| (c, last.client_losses[&c]["test"]))
        .collect();
    let mean = own.iter().map(|x| x.1).sum::<f64>() / 3.0;
    let worst = own
        .iter()
        .copied()
        .fold(own[0], |a, b| if b.1 > a.1 { b } else { a });
    let best = own
        .iter()
        .copied()
        .fold(own[0], |a, b| if b.1 < a.1 { b } else { a });
    assert!((last.client_test_mean.unwrap() - mean).abs() <= 1e-12 * mean.abs());
    assert_eq!(
        (last.client_test_worst, last.client_test_best),
        (Some(worst), Some(best))
    );
}

/// Ditto: the global adapter is trained exactly as FedAvg trains it (bit for bit, any λ);
/// the personal adapters approach the global one as λ grows. With SGD at lr η and ηλ = 1 the
/// personal step is p ← g − η∇f(p): p stays one gradient step from g however long it trains,
/// while with λ ≈ 0 it walks away step after step (30 here). Asked: the distance shrinks
/// monotonically with λ, and the ηλ = 1 adapter is at least 3 times closer than the free one.
#[test]
fn ditto_trains_fedavg_globally_and_large_lambda_tracks_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ditto = |name: &str, lambda: &str| {
        run(
            tmp.path(),
            name,
            &[
                "personal.method=ditto",
                "personal.personal_steps=30",
                "federate.total_round_num=1",
                lambda,
            ],
        )
    };
    let (small, s) = ditto("ditto_small", "personal.lambda=0.01");
    let (mid, _) = ditto("ditto_mid", "personal.lambda=2");
    let (large, _) = ditto("ditto_large", "personal.lambda=20");
    let (avg1, _) = run(tmp.path(), "fedavg1", &["federate.total_round_num=1"]);
    assert_eq!(bits(&small.server.global), bits(&avg1.server.global));
    assert_eq!(bits(&large.server.global), bits(&avg1.server.global));
    // Round 1 started from the initial adapter: that is the g each personal adapter saw.
    let g = small.initial().clone();
    let personal = |sim: &Simulation, c: usize| -> ParamSet {
        sim.local
            .get(c)
            .unwrap()
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("personal/")?.to_string(), v)))
            .collect()
    };
    for c in 0..3 {
        let (ps, pm, pl) = (personal(&small, c), personal(&mid, c), personal(&large, c));
        assert_eq!(ps.len(), g.len());
        let d = |p: &ParamSet| max_abs_diff(p, &g);
        let (ds, dm, dl) = (d(&ps), d(&pm), d(&pl));
        eprintln!("ditto client {c}: max abs p - g = {dl} (ηλ=1), {dm} (λ=2), {ds} (λ=0.01)");
        assert!(dl < dm && dm < ds, "client {c}: {dl} {dm} {ds}");
        assert!(
            dl * 3.0 < ds,
            "client {c}: ηλ = 1 distance {dl} vs λ ≈ 0 {ds}"
        );
    }
    // Each client is evaluated with its personal adapter and with the global one.
    let last = s.records.last().unwrap();
    assert_eq!(last.client_losses.len(), 3);
    assert!(last.client_losses[&0].contains_key("global_test"));
    // The per-client adapters written are the personal ones.
    assert!(tmp
        .path()
        .join("ditto_small/run/adapter_client_2/adapter_model.safetensors")
        .exists());
}

/// Ditto and pFedMe keep personal adapters in the client state: a run resumed after round 1
/// ends bit-identical to an uninterrupted one, personal adapters included.
#[test]
fn personal_adapters_survive_resume_bit_for_bit() {
    for method in ["ditto", "pfedme"] {
        let tmp = tempfile::tempdir().unwrap();
        let m = format!("personal.method={method}");
        let (full, _) = run(tmp.path(), "full", &[&m, "personal.beta=0.7"]);
        let d = data(tmp.path(), 60);
        let dir = tmp.path().join("part");
        let extra = [
            "adapter.dropout=0.0",
            "train.optimizer=sgd",
            "train.lr=0.05",
            &m,
            "personal.beta=0.7",
        ];
        let mut part = Simulation::new(config(&dir, &d, &extra)).unwrap();
        part.run(false, Some(1), |_| {}).unwrap();
        let mut rest = Simulation::resume(&dir.join("run"), &[]).unwrap();
        rest.run(false, None, |_| {}).unwrap();
        assert_eq!(
            bits(&rest.server.global),
            bits(&full.server.global),
            "{method}"
        );
        for c in 0..3 {
            let own = full.local.get(c).unwrap();
            assert!(own.keys().all(|k| k.starts_with("personal/")) && !own.is_empty());
            assert_eq!(
                bits(&rest.local.get(c).unwrap()),
                bits(&own),
                "{method} client {c}"
            );
        }
    }
}

/// pFedMe: the server moves the global by β towards the clients' mean; β = 1 with one inner
/// step of a zero personal lr leaves θ = w at every step, so w ← w − ηλ·0: the clients send
/// back what they got and the global never moves.
#[test]
fn pfedme_with_a_still_personal_model_leaves_the_global_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, s) = run(
        tmp.path(),
        "pfedme",
        &[
            "personal.method=pfedme",
            "personal.inner_steps=1",
            "personal.personal_lr=1e-30",
            "federate.total_round_num=1",
        ],
    );
    // lr 1e-30 moves θ (and so w) by ~1e-30·|gradient|; what remains is the f32 rounding of
    // the sample-weighted mean of three equal values: a couple of ulps of the largest value.
    let moved = max_abs_diff(&p.server.global, p.initial());
    let zero = ParamSet::from_iter(
        p.initial()
            .iter()
            .map(|(k, t)| (k.clone(), t.zeros_like().unwrap())),
    );
    let ulp = max_abs_diff(p.initial(), &zero) * f32::EPSILON;
    assert!(moved <= 4.0 * ulp, "{moved} vs ulp {ulp}");
    assert!(s.records[1].train_loss.unwrap().is_finite());
    // With a real personal lr the global moves.
    let (q, _) = run(
        tmp.path(),
        "pfedme2",
        &[
            "personal.method=pfedme",
            "personal.lambda=15",
            "federate.total_round_num=1",
        ],
    );
    assert!(max_abs_diff(&q.server.global, q.initial()) > 1e-6);
}

/// Mistakes in the personal section are named before any model loads.
#[test]
fn personal_config_mistakes_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 60);
    let err = |extra: &[&str]| {
        let mut o = vec![
            format!("data.source={}", d.display()),
            format!("outdir={}", tmp.path().join("x").display()),
        ];
        o.extend(extra.iter().map(|s| s.to_string()));
        fedllm_fl::RunConfig::from_yaml("", &o)
            .and_then(|c| c.validate())
            .expect_err("refused")
            .to_string()
    };
    let e = err(&["personal.method=fedsa_lora", "adapter.type=prefix"]);
    assert!(e.contains("adapter.type lora"), "{e}");
    let e = err(&["personal.method=pfedme", "federate.strategy=fedadam"]);
    assert!(e.contains("federate.strategy fedavg"), "{e}");
    let e = err(&["personal.method=ditto", "personal.lambda=0"]);
    assert!(e.contains("personal.lambda"), "{e}");
    let e = err(&["personal.method=bogus"]);
    assert!(
        e.contains("personal.method") && e.contains("ffa_lora"),
        "{e}"
    );
    // A head that matches no tensor is a mistake too (found once the adapter exists).
    let head = "personal.head=[\"*nothing*\"]";
    let e = Simulation::new(config(tmp.path(), &d, &["personal.method=fedrep", head]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("matches no adapter tensor"), "{e}");
}
