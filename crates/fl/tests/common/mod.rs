//! Helpers the federated end-to-end tests share: the tiny golden model, a learnable toy data
//! set, a 3-client config, bit patterns of parameter sets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use fedllm_fl::params::ParamSet;
use fedllm_fl::{RunConfig, Simulation};
use fedllm_rng::Rng;

pub fn tiny() -> PathBuf {
    std::env::var_os("FEDLLM_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden"))
        .join("llama-tiny")
}

/// A learnable toy instruction set with categories.
pub fn data(dir: &Path, n: usize) -> PathBuf {
    let words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"];
    let mut rng = Rng::new(1);
    let mut lines = Vec::new();
    for i in 0..n {
        let w = words[(rng.next_u64() % words.len() as u64) as usize];
        let cat = ["a", "b", "c", "d"][i % 4];
        lines.push(serde_json::json!({"instruction": format!("Repeat: {w}\n"), "input": "", "output": format!("{w} {w}"), "category": cat}).to_string());
    }
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

pub fn config(dir: &Path, data: &Path, extra: &[&str]) -> RunConfig {
    let mut o: Vec<String> = vec![
        format!("data.source={}", data.display()),
        "data.template=raw".into(),
        "data.tok_len=64".into(),
        format!("model.path={}", tiny().display()),
        "federate.client_num=3".into(),
        "federate.sample_client_num=3".into(),
        "federate.total_round_num=3".into(),
        "train.local_update_steps=3".into(),
        "train.batch_size=4".into(),
        "train.optimizer=adamw".into(),
        "train.lr=0.01".into(),
        "adapter.r=4".into(),
        "adapter.dropout=0.1".into(),
        "eval.max_samples=8".into(),
        format!("outdir={}", dir.join("run").display()),
    ];
    o.extend(extra.iter().map(|s| s.to_string()));
    RunConfig::from_yaml("", &o).unwrap()
}

pub fn bits(p: &ParamSet) -> Vec<(String, Vec<u32>)> {
    p.iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )
        })
        .collect()
}

/// One round without evaluation in `root/name`: the global before, and the finished simulation.
pub fn one_round(
    root: &Path,
    name: &str,
    data: &Path,
    extra: &[&str],
) -> (Vec<(String, Vec<u32>)>, Simulation) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut all = vec!["federate.total_round_num=1", "eval.freq=0"];
    all.extend_from_slice(extra);
    let mut sim = Simulation::new(config(&dir, data, &all)).unwrap();
    let before = bits(&sim.server.global);
    sim.run(false, None, |_| {}).unwrap();
    (before, sim)
}

/// A deeper copy of a tiny golden model (see `fedllm_testing::deep_model`).
pub fn deep_model(dir: &Path, golden: &str, layers: usize) -> PathBuf {
    fedllm_testing::deep_model(dir, golden, layers)
}

/// One round (no evaluation, no dropout, 3 clients sampled) of the toy config in `dir/name`
/// with `extra` overrides: the simulation, its summary and its log lines.
pub fn one_round_logged(
    dir: &Path,
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
