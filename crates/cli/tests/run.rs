//! `fedllm run` with the shipped W2 config on the real SmolLM2 and GSM8K (a few steps), and its
//! resume path.

use std::path::Path;
use std::process::Command;

#[test]
fn smollm2_federated_round_on_fed_gsm8k_3() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (Some(model), Some(gsm)) = (
        fedllm_testing::smollm2(),
        fedllm_testing::data_file("gsm8k/train.jsonl"),
    ) else {
        return;
    };
    let data = gsm.parent().unwrap().parent().unwrap().to_path_buf();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let run = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fedllm"));
        c.arg("run").arg("--no-progress").env("FEDLLM_DATA", &data);
        c.args(extra);
        c.output().unwrap()
    };
    let o = run(&[
        "--config",
        root.join("configs/fed-gsm8k-3.yaml").to_str().unwrap(),
        &format!("model.path={}", model.display()),
        &format!("outdir={}", out.display()),
        "federate.total_round_num=2",
        "train.local_update_steps=2",
        "train.batch_size=2",
        "train.optimizer=adamw",
        "train.lr=0.002",
        "data.tok_len=128",
        "eval.freq=1",
        "eval.max_samples=4",
        "data.max_train_per_client=64",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stderr}");
    println!("{stderr}\n{stdout}");
    assert!(stdout.contains("held-out loss before → after"), "{stdout}");
    let held: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            r["server_test_loss"].as_f64().unwrap()
        })
        .collect();
    assert_eq!(held.len(), 3, "round 0 and two rounds evaluated");
    assert!(held[2] < held[0], "held-out loss did not fall: {held:?}");
    assert!(out.join("adapter/adapter_model.safetensors").exists());
    // Resuming a finished run has nothing left to do but must work and keep the metrics.
    let o = run(&["--resume", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.csv"))
            .unwrap()
            .lines()
            .count(),
        4
    );
}
