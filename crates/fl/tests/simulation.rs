//! The federated runtime end to end on the tiny golden LLaMA (seconds): a 3-client run, every
//! strategy and baseline, determinism, bit-identical resume, FedAvg with one client equal to
//! plain local training, and 1,000 clients with 10 per round.

use fedllm_fl::params::ParamSet;

mod common;
use common::{bits, config, data, one_round, tiny};
use fedllm_fl::{RunConfig, Simulation};
use fedllm_model::{CausalLm, LoadOptions};
use fedllm_rng::Rng;
use fedllm_train::finetune::{train_loop, Budget, LoopOptions};
use fedllm_train::Trainer;

#[test]
fn three_clients_fedavg_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 120);
    let mut sim = Simulation::new(config(tmp.path(), &d, &[])).unwrap();
    let s = sim.run(false, None, |l| println!("{l}")).unwrap();
    assert_eq!(s.records.len(), 4, "round 0 evaluation + 3 rounds");
    let first = s.records[0].server_test_loss.unwrap();
    let last = s.records[3].server_test_loss.unwrap();
    assert!(last < first, "held-out loss {first} → {last}");
    let out = tmp.path().join("run");
    for f in [
        "metrics.jsonl",
        "metrics.csv",
        "loss.svg",
        "config.yaml",
        "data_manifest.json",
        "checkpoint/state.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(out.join(f).exists(), "missing {f}");
    }
    // Byte accounting: each client downloads the global adapter for training and evaluation,
    // and uploads one update per round.
    let per = sim.adapter.num_trainable() * 4;
    assert_eq!(s.records[1].bytes_up, 3 * per);
    assert_eq!(s.records[1].bytes_down, 3 * per + 3 * per);
    assert!(
        std::fs::read_to_string(out.join("metrics.csv"))
            .unwrap()
            .lines()
            .count()
            == 5
    );
}

#[test]
fn same_seed_same_adapter_and_resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 90);
    let run = |name: &str, stop: Option<usize>| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut sim = Simulation::new(config(
            &dir,
            &d,
            &["federate.strategy=fedadam", "federate.server_lr=0.05"],
        ))
        .unwrap();
        sim.run(false, stop, |_| {}).unwrap();
        (dir.join("run"), sim.server.global.clone())
    };
    let (_, a) = run("a", None);
    let (_, b) = run("b", None);
    assert_eq!(bits(&a), bits(&b), "same seed must give identical adapters");
    // Interrupted after round 2, then resumed: identical to the uninterrupted run.
    let (dir_c, _) = run("c", Some(2));
    let mut sim = Simulation::resume(&dir_c, &[]).unwrap();
    assert_eq!(sim.server.round, 2);
    let s = sim.run(false, None, |_| {}).unwrap();
    assert_eq!(
        bits(&sim.server.global),
        bits(&a),
        "resumed run differs from the uninterrupted one"
    );
    assert_eq!(s.records.len(), 4);
    let (_, other) = {
        let dir = tmp.path().join("d");
        std::fs::create_dir_all(&dir).unwrap();
        let mut sim = Simulation::new(config(
            &dir,
            &d,
            &[
                "federate.strategy=fedadam",
                "federate.server_lr=0.05",
                "federate.seed=9",
            ],
        ))
        .unwrap();
        sim.run(false, None, |_| {}).unwrap();
        ((), sim.server.global.clone())
    };
    assert_ne!(bits(&other), bits(&a), "another seed, another run");
}

#[test]
fn fedavg_one_client_equals_local_training() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 40);
    let cfg = config(
        tmp.path(),
        &d,
        &[
            "federate.client_num=1",
            "federate.sample_client_num=1",
            "federate.total_round_num=1",
            "adapter.dropout=0.0",
            "eval.freq=0",
            "train.local_update_steps=5",
        ],
    );
    let mut sim = Simulation::new(cfg.clone()).unwrap();
    let initial = fedllm_fl::client::snapshot(&sim.adapter).unwrap();
    let samples = sim.clients[0].train.clone();
    sim.run(false, None, |_| {}).unwrap();

    // The same training without any federation code.
    let mut model = CausalLm::load(&tiny(), LoadOptions::default())
        .unwrap()
        .model;
    let adapter =
        fedllm_peft::Adapter::from_tensors(&model, sim.adapter.config.clone(), initial, 0).unwrap();
    adapter.attach(&mut model, true).unwrap();
    let tc = fedllm_train::TrainConfig {
        lr: 0.01,
        optimizer: fedllm_train::OptimizerConfig::adamw(0.0),
        ..Default::default()
    };
    let mut trainer = Trainer::new(tc).unwrap();
    let seed = Rng::derive(&[cfg.federate.seed, 1, 0]);
    let o = LoopOptions {
        budget: Budget::Steps(5),
        batch_size: 4,
        pad_id: sim.tokenizer.pad_token_id.unwrap_or(2),
        seed,
        group_by_length: false,
        metrics: None,
    };
    train_loop(&model, &adapter, &mut trainer, &samples, &o, |_| {}).unwrap();
    assert_eq!(bits(&adapter.tensors()), bits(&sim.server.global));
}

#[test]
fn every_strategy_and_baseline_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 90);
    for (i, extra) in [
        vec!["federate.strategy=fedprox", "federate.proximal_mu=0.1"],
        vec![
            "federate.strategy=fedavgm",
            "federate.server_lr=1.0",
            "federate.server_momentum=0.5",
        ],
        vec!["federate.strategy=fedyogi", "federate.server_lr=0.05"],
        vec!["federate.sample_client_rate=0.34", "data.splitter=meta"],
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tmp.path().join(format!("s{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut all = extra.clone();
        all.push("federate.total_round_num=2");
        let mut sim = Simulation::new(config(&dir, &d, &all)).unwrap();
        let initial = bits(&sim.server.global);
        let s = sim.run(false, None, |_| {}).unwrap();
        let (first, last) = (&s.records[0], s.records.last().unwrap());
        let held =
            |r: &fedllm_fl::metrics::RoundRecord| r.server_test_loss.or(r.client_val_loss).unwrap();
        println!(
            "{extra:?}: clients {:?}, held-out {:.4} → {:.4}",
            last.clients,
            held(first),
            held(last)
        );
        assert!(held(last).is_finite() && held(last) != held(first));
        assert_ne!(
            bits(&sim.server.global),
            initial,
            "{extra:?}: the global never moved"
        );
    }
}

/// One round from the same initial adapter and seed: the `local` baseline keeps each client's own
/// trained parameters, and each aggregating strategy's global is what its formula makes of
/// exactly those parameters (FedAvg: the sample-weighted mean; median: the coordinate median;
/// trimmed mean with 3 clients and ratio 0.34: the median; norm bounding: the mean of the
/// clipped updates; Krum: one client's update, unchanged).
#[test]
fn strategies_aggregate_what_local_clients_train() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 90);
    let run = |name: &str, extra: &[&str]| one_round(tmp.path(), name, &d, extra).1;
    let local = run("local", &["federate.baseline=local"]);
    assert_eq!(local.local.ids(), [0, 1, 2], "one parameter set per client");
    let per: Vec<Vec<f32>> = (0..3)
        .map(|c| fedllm_fl::params::flatten(&local.local.get(c).unwrap()).unwrap())
        .collect();
    let last = local.records.last().unwrap();
    assert_eq!((last.bytes_down, last.bytes_up), (0, 0), "nothing travels");
    assert!(
        per[0] != per[1] && per[1] != per[2] && per[0] != per[2],
        "clients differ"
    );
    assert_eq!(
        bits(&local.server.global),
        bits(local.initial()),
        "no aggregation"
    );
    for c in 0..3 {
        assert!(tmp
            .path()
            .join(format!("local/run/adapter_client_{c}"))
            .exists());
    }
    let refs: Vec<&[f32]> = per.iter().map(|v| v.as_slice()).collect();
    let samples: Vec<f64> = local.clients.iter().map(|c| c.train.len() as f64).collect();
    let flat = |sim: &Simulation| fedllm_fl::params::flatten(&sim.server.global).unwrap();

    let avg = flat(&run("fedavg", &[]));
    let want = fedllm_fl::aggregate::weighted_mean(&refs, &samples);
    // Same inputs, same f32 arithmetic up to summation order: a few ulps of the largest value.
    let worst = avg
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-6,
        "fedavg differs from the weighted mean by {worst}"
    );
    let med = flat(&run("median", &["federate.strategy=median"]));
    assert_eq!(med, fedllm_fl::aggregate::median(&refs));
    let tm = flat(&run(
        "trimmed",
        &["federate.strategy=trimmed_mean", "federate.trim_ratio=0.34"],
    ));
    assert_eq!(tm, med);
    let nb = flat(&run(
        "norm",
        &[
            "federate.strategy=norm_bounding",
            "federate.norm_bound=0.05",
        ],
    ));
    let init = fedllm_fl::params::flatten(local.initial()).unwrap();
    let want = fedllm_fl::aggregate::norm_bounded_mean(&init, &refs, &samples, 0.05);
    let worst = nb
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "norm bounding differs by {worst}");
    assert_ne!(nb, avg, "the bound must bite");
    let krum = flat(&run(
        "krum",
        &["federate.strategy=krum", "federate.krum_byzantine=0"],
    ));
    assert!(per.contains(&krum), "krum's global is one client's update");
    assert_ne!(med, avg);
}

/// The `global` baseline pools every client's data into one client.
#[test]
fn global_baseline_pools_all_clients_data() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 90);
    let fed = Simulation::new(config(tmp.path(), &d, &[])).unwrap();
    let other = format!("outdir={}", tmp.path().join("global").display());
    let global = Simulation::new(config(
        tmp.path(),
        &d,
        &["federate.baseline=global", &other],
    ))
    .unwrap();
    assert_eq!(fed.clients.len(), 3);
    assert_eq!(global.clients.len(), 1);
    let mut pooled: Vec<Vec<u32>> = fed
        .clients
        .iter()
        .flat_map(|c| c.train.iter().map(|s| s.ids.clone()))
        .collect();
    let mut one: Vec<Vec<u32>> = global.clients[0]
        .train
        .iter()
        .map(|s| s.ids.clone())
        .collect();
    pooled.sort();
    one.sort();
    assert_eq!(one, pooled);
}

#[test]
fn thousand_clients_ten_per_round() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 2000);
    let cfg = config(
        tmp.path(),
        &d,
        &[
            "federate.client_num=1000",
            "federate.sample_client_num=10",
            "federate.total_round_num=2",
            "train.local_update_steps=1",
            "eval.freq=0",
            "data.splits=[1.0, 0.0, 0.0]",
        ],
    );
    let mut sim = Simulation::new(cfg).unwrap();
    assert_eq!(sim.clients.len(), 1000);
    let s = sim.run(false, None, |_| {}).unwrap();
    assert_eq!(s.records.len(), 2);
    assert_eq!(s.records[1].clients.len(), 10);
    assert_ne!(
        s.records[0].clients, s.records[1].clients,
        "clients are sampled per round"
    );
}

#[test]
fn config_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("c.yaml");
    std::fs::write(&p, "federate:\n  client_nun: 3\n").unwrap();
    let e = RunConfig::from_file(&p, &[]).unwrap_err().to_string();
    assert!(
        e.contains("c.yaml")
            && e.contains("federate.client_nun")
            && e.contains("federate.client_num"),
        "{e}"
    );
    let e = RunConfig::from_yaml("", &["train.optimizer=adam".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("train.optimizer"), "{e}");
    let e = RunConfig::from_yaml("federate:\n  client_num: x\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("federate.client_num"), "{e}");
    let e = RunConfig::from_yaml("", &["novalue".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("key.sub=value"), "{e}");
}

/// Every enum field refuses an unknown value naming the key and the allowed values, and every
/// range check names its key; all problems come at once; an override's mistake is not blamed on
/// the file.
#[test]
fn config_values_are_checked_before_anything_loads() {
    for (item, allowed) in [
        ("federate.mode=cluster", "standalone"),
        ("data.format=csv", "gsm8k"),
        ("data.template=llama", "chat"),
        ("data.splitter=random", "dirichlet"),
        ("model.dtype=f16", "bf16"),
        ("model.quant=q4", "dequantize"),
        ("adapter.type=dora", "ptuning"),
        ("train.batch_or_epoch=steps", "epoch"),
        ("train.optimizer=adam", "adamw"),
        (
            "federate.mode=distributed distributed.compression=int4",
            "int8",
        ),
        ("federate.strategy=fedsgd", "fedavg"),
    ] {
        let overrides: Vec<String> = item.split(' ').map(String::from).collect();
        let e = RunConfig::from_yaml("", &overrides)
            .unwrap_err()
            .to_string();
        let key = overrides.last().unwrap().split('=').next().unwrap();
        assert!(e.contains(key) && e.contains(allowed), "{item}: {e}");
    }
    for (item, key) in [
        ("train.lr=-0.001", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("train.momentum=1.5", "train.momentum"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("adapter.r=0", "adapter.r"),
        ("adapter.alpha=-2", "adapter.alpha"),
        ("adapter.dropout=1", "adapter.dropout"),
        ("data.tok_len=1", "data.tok_len"),
        ("train.batch_size=0", "train.batch_size"),
        (
            "federate.sample_client_rate=1.5",
            "federate.sample_client_rate",
        ),
        ("federate.trim_ratio=0.5", "federate.trim_ratio"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("data.splits=[0.5,0.5,0.5]", "data.splits"),
    ] {
        let e = RunConfig::from_yaml("", &[item.to_string()])
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{item}: {e}");
    }
    let e = RunConfig::from_yaml("", &["train.lr=-1".into(), "adapter.r=0".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.lr") && e.contains("adapter.r"),
        "all at once: {e}"
    );
    let e = RunConfig::from_yaml(
        "federate:\n  mode: distributed\n",
        &["distributed.round_timeout_s=0".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("distributed.round_timeout_s"), "{e}");
    // A typo on the command line is the command line's, not the file's.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("c.yaml");
    std::fs::write(&p, "train:\n  lr: 0.01\n").unwrap();
    let e = RunConfig::from_file(&p, &["train.lrr=0.1".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("override `train.lrr=0.1`") && !e.contains("c.yaml"),
        "{e}"
    );
    let e = RunConfig::from_file(&p, &["train.lr=-3".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("train.lr") && !e.contains("c.yaml"), "{e}");
}

/// Relative paths written in a config file resolve against the file's folder.
#[test]
fn config_file_paths_resolve_against_its_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sub");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("c.yaml");
    std::fs::write(
        &p,
        "model:\n  path: ../m.gguf\ndata:\n  source: d.jsonl\n  root: ../data\noutdir: runs/x\n",
    )
    .unwrap();
    let c = RunConfig::from_file(&p, &[]).unwrap();
    let base = std::fs::canonicalize(&dir).unwrap();
    assert_eq!(c.model.path, base.parent().unwrap().join("m.gguf"));
    assert_eq!(c.data.source, base.join("d.jsonl").display().to_string());
    assert_eq!(c.data.root, Some(base.parent().unwrap().join("data")));
    assert_eq!(c.outdir, base.join("runs/x"));
    // A preset name is not a path.
    std::fs::write(&p, "data:\n  source: fed-gsm8k-3\n").unwrap();
    assert_eq!(
        RunConfig::from_file(&p, &[]).unwrap().data.source,
        "fed-gsm8k-3"
    );
}

/// Token ids outside the vocabulary in every client's data: training fails for all of them.
fn corrupt(sim: &mut Simulation) {
    for c in &mut sim.clients {
        for s in &mut c.train {
            s.ids[0] = 1 << 30;
        }
    }
}

/// A round in which every client fails stops a standalone run (default: after one such round)
/// with an error naming each client and its reason; the metrics of the rounds before and of the
/// failed round are on disk, and run.json says the run failed.
#[test]
fn a_round_without_any_successful_client_fails_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 60);
    let mut sim = Simulation::new(config(tmp.path(), &d, &[])).unwrap();
    corrupt(&mut sim);
    let e = sim.run(false, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("round 1: no client succeeded"), "{e}");
    for c in 0..3 {
        assert!(e.contains(&format!("client {c}: ")), "{e}");
    }
    let out = tmp.path().join("run");
    let rows = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        rows.lines().count(),
        2,
        "round 0 evaluation and the failed round"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(m["status"], "failed");
    assert!(
        !out.join("adapter").exists(),
        "no adapter from a failed run"
    );

    // With max_failed_rounds = 0 the run goes on through failures (nothing is trained).
    let tmp2 = tempfile::tempdir().unwrap();
    let mut sim =
        Simulation::new(config(tmp2.path(), &d, &["federate.max_failed_rounds=0"])).unwrap();
    corrupt(&mut sim);
    let s = sim.run(false, None, |_| {}).unwrap();
    assert_eq!(s.records.len(), 4);
}

/// A fresh run refuses a folder holding another run and leaves that run's files as they were.
#[test]
fn a_used_outdir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 40);
    let cfg = config(tmp.path(), &d, &["federate.total_round_num=1"]);
    Simulation::new(cfg.clone())
        .unwrap()
        .run(false, None, |_| {})
        .unwrap();
    let out = tmp.path().join("run");
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(
        (m["status"].as_str(), m["adapter_round"].as_u64()),
        (Some("finished"), Some(1))
    );
    let e = Simulation::new(cfg).err().expect("refused").to_string();
    assert!(
        e.contains("holds another run") && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before);
}

/// The learning-rate schedule is one curve over the run: 3 rounds × 4 local steps of a cosine
/// schedule with 2 warm-up steps sit exactly where a 12-step local run's schedule puts them
/// (round r's first step is step 4(r−1), its last 4r−1).
#[test]
fn schedule_spans_the_whole_run() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 40);
    let cfg = config(
        tmp.path(),
        &d,
        &[
            "federate.client_num=1",
            "federate.sample_client_num=1",
            "train.local_update_steps=4",
            "train.schedule=cosine",
            "train.warmup_steps=2",
            "eval.freq=0",
        ],
    );
    let mut sim = Simulation::new(cfg).unwrap();
    let s = sim.run(false, None, |_| {}).unwrap();
    let local = fedllm_train::Schedule {
        kind: fedllm_train::ScheduleKind::Cosine,
        warmup_steps: 2,
        total_steps: 12,
    };
    let rounds: Vec<_> = s.records.iter().filter(|r| r.round > 0).collect();
    assert_eq!(rounds.len(), 3);
    for r in rounds {
        let (first, last) = r.client_lr[&0];
        let k = 4 * (r.round - 1);
        assert_eq!(
            first,
            0.01 * local.factor(k),
            "round {} first step",
            r.round
        );
        assert_eq!(
            last,
            0.01 * local.factor(k + 3),
            "round {} last step",
            r.round
        );
    }
    // A constant schedule stays constant (and the epoch budget cannot take a run-long curve).
    let e = RunConfig::from_yaml(
        "",
        &[
            "train.schedule=linear".into(),
            "train.batch_or_epoch=epoch".into(),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("train.schedule"), "{e}");
}

/// `fedllm run` takes the adapter settings `finetune` takes, built by the same code: prefix
/// tuning with its projection MLP, prompt tuning initialised from text, and full fine-tuning of
/// chosen layers.
#[test]
fn run_accepts_every_adapter_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 40);
    let go = |name: &str, extra: &[&str]| {
        let (before, sim) = one_round(tmp.path(), name, &d, extra);
        assert_ne!(bits(&sim.server.global), before, "{name}: nothing trained");
        sim
    };
    let p = go(
        "prefix",
        &[
            "adapter.type=prefix",
            "adapter.virtual_tokens=4",
            "adapter.prefix_projection=true",
            "adapter.encoder_hidden=16",
        ],
    );
    let names: Vec<&String> = p.server.global.keys().collect();
    assert!(
        names.iter().any(|n| n.contains("transform")),
        "no projection MLP: {names:?}"
    );
    let f = go("full", &["adapter.type=full", "adapter.full_layers=[1]"]);
    assert!(
        f.server.global.keys().all(|n| n.contains("layers.1.")),
        "{:?}",
        f.server.global.keys()
    );
    // Prompt tuning from text: the initial virtual tokens are the text's token embeddings.
    let dir = tmp.path().join("prompt");
    std::fs::create_dir_all(&dir).unwrap();
    let sim = Simulation::new(config(
        &dir,
        &d,
        &[
            "adapter.type=prompt",
            "adapter.virtual_tokens=3",
            "adapter.init_text=alpha beta gamma",
        ],
    ))
    .unwrap();
    let ids = sim.tokenizer.encode("alpha beta gamma", false).unwrap();
    let st =
        candle_core::safetensors::load(tiny().join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let emb = &st["model.embed_tokens.weight"];
    let init = sim
        .initial()
        .values()
        .next()
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(init.len(), 3);
    for (row, &id) in init.iter().zip(ids.iter().cycle()) {
        let want: Vec<f32> = emb.get(id as usize).unwrap().to_vec1().unwrap();
        assert_eq!(row, &want, "virtual token from text token {id}");
    }
}

#[allow(dead_code)]
mod example {
    include!("../examples/per_client_lr.rs");
}

/// The library example runs on the tiny model: its strategy's per-client instructions reach the
/// clients (each client's learning rate and step count are those it was told).
#[test]
fn library_example_with_per_client_instructions() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 60);
    let s = example::run(&tiny(), &d, &tmp.path().join("run")).unwrap();
    for r in s.records.iter().filter(|r| r.round > 0) {
        for c in 0..3usize {
            let (first, last) = r.client_lr[&c];
            let want = 0.02 / (1u64 << c) as f64;
            assert_eq!((first, last), (want, want), "round {} client {c}", r.round);
        }
    }
}

/// `federate.local_tensors: ["*lora_B*"]` (FedSA-LoRA's split): only A matrices travel and are
/// averaged; each client keeps and trains its own B; bytes count only what travels; the
/// clients' own tensors are checkpointed, so a resumed run ends bit-identical.
#[test]
fn local_tensors_stay_on_their_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 60);
    let extra = [
        "federate.local_tensors=[\"*lora_B*\"]",
        "adapter.dropout=0.0",
    ];
    let mut sim = Simulation::new(config(tmp.path(), &d, &extra)).unwrap();
    let initial = sim.initial().clone();
    let s = sim.run(false, None, |_| {}).unwrap();
    let is_b = |k: &str| k.contains("lora_B");
    // Bytes: only the A matrices go down and up.
    let a_bytes: usize = initial
        .iter()
        .filter(|(k, _)| !is_b(k))
        .map(|(_, t)| t.elem_count() * 4)
        .sum();
    for c in 0..3 {
        assert_eq!(s.records[1].bytes_up_per_client[&c], a_bytes);
    }
    // Each client holds exactly the B matrices, trained (B starts at 0) and its own.
    let bs: Vec<Vec<(String, Vec<u32>)>> =
        (0..3).map(|c| bits(&sim.local.get(c).unwrap())).collect();
    for b in &bs {
        assert!(b.iter().all(|(k, _)| is_b(k)) && b.len() * 2 == initial.len());
        assert!(
            b.iter().any(|(_, v)| v.iter().any(|&x| x != 0)),
            "B never trained"
        );
    }
    assert!(bs[0] != bs[1] && bs[1] != bs[2]);
    // The global's B matrices were never aggregated; its A matrices were.
    for (k, t) in &sim.server.global {
        let same = bits(&ParamSet::from([(k.clone(), t.clone())]))
            == bits(&ParamSet::from([(k.clone(), initial[k].clone())]));
        assert_eq!(same, is_b(k), "{k}");
    }
    assert!(tmp
        .path()
        .join("run/adapter_client_2/adapter_model.safetensors")
        .exists());

    // Resume: 1 round, stop, resume to 3 = 3 straight (clients' own tensors included).
    let t2 = tempfile::tempdir().unwrap();
    let mut part = Simulation::new(config(t2.path(), &d, &extra)).unwrap();
    part.run(false, Some(1), |_| {}).unwrap();
    let mut rest = Simulation::resume(&t2.path().join("run"), &[]).unwrap();
    rest.run(false, None, |_| {}).unwrap();
    assert_eq!(bits(&rest.server.global), bits(&sim.server.global));
    for (c, b) in bs.iter().enumerate() {
        assert_eq!(
            &bits(&rest.local.get(c).unwrap()),
            b,
            "client {c}'s own tensors after resume"
        );
    }
    // No memory for client state: every client's tensors wait on disk between rounds, and
    // the run ends bit-identical.
    let t4 = tempfile::tempdir().unwrap();
    let mut spill = extra.to_vec();
    spill.push("federate.client_state_memory_mb=0");
    let mut disk = Simulation::new(config(t4.path(), &d, &spill)).unwrap();
    disk.run(false, None, |_| {}).unwrap();
    assert_eq!(disk.local.held_bytes(), 0);
    assert!(t4
        .path()
        .join("run/client_state/client-0.safetensors")
        .exists());
    assert_eq!(bits(&disk.server.global), bits(&sim.server.global));
    for (c, b) in bs.iter().enumerate() {
        assert_eq!(
            &bits(&disk.local.get(c).unwrap()),
            b,
            "client {c} from disk"
        );
    }
    // The checkpoint copies the states on disk; resumed from it, the run still ends the same.
    let t5 = tempfile::tempdir().unwrap();
    let mut first = Simulation::new(config(t5.path(), &d, &spill)).unwrap();
    first.run(false, Some(1), |_| {}).unwrap();
    let mut rest = Simulation::resume(&t5.path().join("run"), &[]).unwrap();
    rest.run(false, None, |_| {}).unwrap();
    assert_eq!(bits(&rest.server.global), bits(&sim.server.global));
    for (c, b) in bs.iter().enumerate() {
        assert_eq!(
            &bits(&rest.local.get(c).unwrap()),
            b,
            "client {c} resumed from disk"
        );
    }
    // A pattern that matches nothing is a mistake, named.
    let t3 = tempfile::tempdir().unwrap();
    let e = Simulation::new(config(
        t3.path(),
        &d,
        &["federate.local_tensors=[\"*lora_C*\"]"],
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("matches no adapter tensor"), "{e}");
}

/// A strategy decides who evaluates what: here only client 0, only its val split; the round's
/// client val loss is then exactly client 0's, and no test loss is reported.
#[test]
fn strategy_configures_evaluation() {
    use fedllm_fl::strategy::{fedavg::FedAvg, Failure, FitResult, Strategy};
    struct OnlyFirst;
    impl Strategy for OnlyFirst {
        fn name(&self) -> &'static str {
            "only_first"
        }
        fn configure_evaluate(&self, _round: usize, client: usize) -> Vec<String> {
            if client == 0 {
                vec!["val".into()]
            } else {
                vec![]
            }
        }
        fn aggregate_fit(
            &mut self,
            round: usize,
            global: &ParamSet,
            results: &[FitResult],
            failures: &[Failure],
        ) -> fedllm_fl::Result<Option<ParamSet>> {
            FedAvg.aggregate_fit(round, global, results, failures)
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 60);
    let mut sim = Simulation::new(config(
        tmp.path(),
        &d,
        &["federate.total_round_num=1", "adapter.dropout=0.0"],
    ))
    .unwrap();
    sim.server.strategy = Box::new(OnlyFirst);
    let s = sim.run(false, None, |_| {}).unwrap();
    let last = s.records.last().unwrap();
    assert_eq!(last.client_test_loss, None);
    // Client 0's val loss on the final global, asked directly.
    let msg = fedllm_fl::message::ToClient::Evaluate {
        round: 1,
        params: sim.server.global.clone(),
        splits: vec!["val".into()],
    };
    sim.adapter.attach(&mut sim.model, false).unwrap();
    let shared = fedllm_fl::client::Shared {
        model: &sim.model,
        adapter: &sim.adapter,
        train: &fedllm_train::TrainConfig::default(),
        budget: fedllm_train::finetune::Budget::Steps(1),
        batch_size: 4,
        eval_batch_size: sim.cfg.eval.batch_size,
        pad_id: sim
            .tokenizer
            .pad_token_id
            .or(sim.tokenizer.eos_token_ids.first().copied())
            .unwrap_or(0),
        initial: sim.initial(),
        personal: &sim.cfg.personal,
    };
    let reply = sim.clients[0]
        .handle(msg, &shared, &mut ParamSet::new())
        .unwrap()
        .unwrap();
    let fedllm_fl::message::ToServer::EvalRes { losses, .. } = reply else {
        panic!()
    };
    assert_eq!(last.client_val_loss, Some(losses[0].1));
}

/// Per-client instructions choose which tensors travel: client 0 keeps its B matrices this
/// round, the others share everything. The server aggregates by name: A over all three
/// clients, B over clients 1 and 2 only (their sample-weighted mean, by hand here); client 0
/// uploads only A and keeps its trained B. The strategy's server-side `evaluate` decides what
/// the server test loss measures: here the initial adapter, so it equals round 0's.
#[test]
fn strategy_chooses_each_clients_tensors_and_server_evaluation() {
    use fedllm_fl::strategy::{fedavg::FedAvg, Failure, FitConfig, FitResult, Strategy};
    use std::sync::{Arc, Mutex};
    type Calls = Arc<Mutex<Vec<(Vec<String>, Vec<FitResult>)>>>;
    struct Split {
        calls: Calls,
        initial: ParamSet,
    }
    impl Strategy for Split {
        fn name(&self) -> &'static str {
            "split"
        }
        fn configure_fit(&self, _round: usize, client: usize) -> FitConfig {
            FitConfig {
                local_tensors: (client == 0).then(|| vec!["*lora_B*".to_string()]),
                ..FitConfig::default()
            }
        }
        fn aggregate_fit(
            &mut self,
            round: usize,
            global: &ParamSet,
            results: &[FitResult],
            failures: &[Failure],
        ) -> fedllm_fl::Result<Option<ParamSet>> {
            let names = global.keys().cloned().collect();
            self.calls.lock().unwrap().push((names, results.to_vec()));
            FedAvg.aggregate_fit(round, global, results, failures)
        }
        fn evaluate(
            &mut self,
            _round: usize,
            _global: &ParamSet,
            loss: &mut dyn FnMut(&ParamSet) -> fedllm_fl::Result<f64>,
        ) -> fedllm_fl::Result<Option<f64>> {
            loss(&self.initial).map(Some)
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), 60);
    let cfg = config(
        tmp.path(),
        &d,
        &["federate.total_round_num=1", "adapter.dropout=0.0"],
    );
    let mut sim = Simulation::new(cfg).unwrap();
    let calls: Calls = Arc::default();
    let initial = sim.initial().clone();
    sim.server.strategy = Box::new(Split {
        calls: calls.clone(),
        initial: initial.clone(),
    });
    let s = sim.run(false, None, |_| {}).unwrap();
    let is_b = |k: &str| k.contains("lora_B");
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 2, "one aggregation per group of senders");
    let (a_names, a_res) = &calls[0];
    let (b_names, b_res) = &calls[1];
    assert!(a_names.iter().all(|k| !is_b(k)) && b_names.iter().all(|k| is_b(k)));
    assert_eq!(a_names.len() + b_names.len(), initial.len());
    let who = |r: &[FitResult]| r.iter().map(|x| x.client).collect::<Vec<_>>();
    assert_eq!((who(a_res), who(b_res)), (vec![0, 1, 2], vec![1, 2]));
    // B of the new global: Σ nᵢBᵢ / Σ nᵢ over clients 1 and 2. f32 sums of two terms and one
    // division: a few ulps of the largest term, so 1e-6 relative to it.
    let n: Vec<f64> = b_res.iter().map(|r| r.num_samples as f64).collect();
    for k in b_names {
        let v: Vec<Vec<f32>> = b_res
            .iter()
            .map(|r| r.params[k].flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let got: Vec<f32> = sim.server.global[k]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for i in 0..got.len() {
            let want = (n[0] * v[0][i] as f64 + n[1] * v[1][i] as f64) / (n[0] + n[1]);
            let scale = v[0][i].abs().max(v[1][i].abs()) as f64;
            assert!(
                (got[i] as f64 - want).abs() <= 1e-6 * scale + 1e-12,
                "{k}[{i}]"
            );
        }
    }
    // Client 0 sent only A and kept its own trained B.
    let a_bytes: usize = a_names.iter().map(|k| initial[k].elem_count() * 4).sum();
    assert_eq!(s.records[1].bytes_up_per_client[&0], a_bytes);
    let own = sim.local.get(0).unwrap();
    assert_eq!(
        own.keys().collect::<Vec<_>>(),
        b_names.iter().collect::<Vec<_>>()
    );
    assert!(sim.local.get(1).unwrap().is_empty());
    // The server test loss measured the initial adapter, as round 0 did.
    assert_eq!(s.records[1].server_test_loss, s.records[0].server_test_loss);
    assert!(s.records[0].server_test_loss.is_some());
}
