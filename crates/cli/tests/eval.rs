//! `fedllm eval`: HumanEval scoring of a completions file without a model, loss on the tiny
//! model, and short MMLU / GSM8K / HumanEval runs on the real SmolLM2.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fedllm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fedllm"))
        .args(args)
        .output()
        .expect("run fedllm")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn find_data(rel: &str) -> Option<PathBuf> {
    fedllm_model::testing::data_file(rel)
}

fn smollm2() -> Option<PathBuf> {
    fedllm_model::testing::smollm2()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn humaneval_completions_file_without_model() {
    let tmp = tempfile::tempdir().unwrap();
    let problems = tmp.path().join("problems.jsonl");
    std::fs::write(&problems, serde_json::json!({"task_id": "T/0", "prompt": "def inc(x):\n", "canonical_solution": "    return x + 1\n",
        "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "inc"}).to_string()).unwrap();
    for (completion, want) in [
        ("    return x + 1\n", 1.0),
        ("    while True:\n        pass\n", 0.0),
    ] {
        let comps = tmp.path().join("c.jsonl");
        std::fs::write(
            &comps,
            serde_json::json!({"task_id": "T/0", "completion": completion}).to_string(),
        )
        .unwrap();
        let out = tmp.path().join(format!("r{want}.json"));
        let o = fedllm(&[
            "eval",
            "humaneval",
            "--data",
            problems.to_str().unwrap(),
            "--completions",
            comps.to_str().unwrap(),
            "--n",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(json(&out)["pass_at"]["1"].as_f64().unwrap(), want);
    }
}

#[test]
fn loss_and_perplexity_on_the_tiny_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, "{\"instruction\":\"say hi\",\"input\":\"\",\"output\":\"hi there\"}\n{\"instruction\":\"count\",\"input\":\"\",\"output\":\"1 2 3\"}\n").unwrap();
    let out = tmp.path().join("loss.json");
    let tiny = root().join("fixtures/golden/llama-tiny");
    for extra in [None, Some("--full-text")] {
        let mut args = vec![
            "eval",
            "loss",
            "--model",
            tiny.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = fedllm(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r = json(&out);
        let (l, p) = (
            r["value"].as_f64().unwrap(),
            r["perplexity"].as_f64().unwrap(),
        );
        assert!(l.is_finite() && (p - l.exp()).abs() < 1e-9 && r["tokens"].as_u64().unwrap() > 0);
    }
}

#[test]
fn smollm2_short_runs() {
    let Some(model) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let m = model.to_str().unwrap();
    if let Some(mmlu) = find_data("mmlu/mmlu.jsonl") {
        let out = tmp.path().join("mmlu.json");
        let o = fedllm(&[
            "eval",
            "mmlu",
            "--model",
            m,
            "--data",
            mmlu.to_str().unwrap(),
            "--limit",
            "3",
            "--shots",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(json(&out)["count"], 3);
        println!("{}", String::from_utf8_lossy(&o.stdout));
    }
    if let Some(gsm) = find_data("gsm8k/test.jsonl") {
        let out = tmp.path().join("gsm.json");
        let o = fedllm(&[
            "eval",
            "gsm8k",
            "--model",
            m,
            "--data",
            gsm.to_str().unwrap(),
            "--limit",
            "2",
            "--max-new-tokens",
            "48",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(json(&out)["count"], 2);
        let rows = std::fs::read_to_string(tmp.path().join("gsm.json.samples.jsonl")).unwrap();
        assert_eq!(rows.lines().count(), 2);
        println!("{}", String::from_utf8_lossy(&o.stdout));
    }
    if let Some(he) = find_data("humaneval/HumanEval.jsonl.gz") {
        let out = tmp.path().join("he.json");
        let o = fedllm(&[
            "eval",
            "humaneval",
            "--model",
            m,
            "--data",
            he.to_str().unwrap(),
            "--limit",
            "1",
            "--n",
            "2",
            "--max-new-tokens",
            "48",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(json(&out)["samples"], 2);
        println!("{}", String::from_utf8_lossy(&o.stdout));
    }
}
