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
    fedllm_testing::data_file(rel)
}

fn smollm2() -> Option<PathBuf> {
    fedllm_testing::smollm2()
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

/// Mean token NLL written out in f64 from the model's logits (whose values the golden suites
/// hold to transformers'), one sample at a time: no batching, padding or fused cross-entropy.
fn reference_loss(tiny: &Path, data: &Path, full_text: bool) -> (f64, usize) {
    let loaded = fedllm_model::CausalLm::load(tiny, Default::default()).unwrap();
    let tok = loaded.tokenizer.unwrap();
    let (recs, _) = fedllm_data::load(data, &fedllm_data::record::Format::Auto).unwrap();
    let (samples, _) =
        fedllm_data::tokenize_all(&recs, fedllm_data::Template::Alpaca, &tok, usize::MAX).unwrap();
    let (mut sum, mut n) = (0f64, 0usize);
    for s in &samples {
        let ids = candle_core::Tensor::new(s.ids.as_slice(), &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits: Vec<Vec<f32>> = loaded
            .model
            .forward(&ids, None, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        // Position t predicts token t + 1.
        for (t, row) in logits.iter().enumerate().take(s.ids.len() - 1) {
            let target = if full_text {
                s.ids[t + 1] as i64
            } else {
                s.labels[t + 1]
            };
            if target < 0 {
                continue;
            }
            let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            sum += lse - row[target as usize] as f64;
            n += 1;
        }
    }
    (sum / n as f64, n)
}

#[test]
fn loss_on_the_tiny_model_equals_the_reference_nll() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    // Different lengths, so the batched evaluation pads.
    std::fs::write(&data, "{\"instruction\":\"say hi\",\"input\":\"\",\"output\":\"hi there\"}\n{\"instruction\":\"count to five, slowly\",\"input\":\"\",\"output\":\"1 2 3 4 5\"}\n{\"instruction\":\"x\",\"input\":\"y\",\"output\":\"z\"}\n").unwrap();
    let out = tmp.path().join("loss.json");
    let tiny = root().join("fixtures/golden/llama-tiny");
    for full_text in [false, true] {
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
        if full_text {
            args.push("--full-text");
        }
        let o = fedllm(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r = json(&out);
        let (want, n) = reference_loss(&tiny, &data, full_text);
        let got = r["value"].as_f64().unwrap();
        // f32 logits over a 512-token vocabulary: the fused and the f64 paths differ by f32
        // rounding of the logsumexp (~1e-7 relative per token), far below 1e-5.
        assert!(
            (got - want).abs() < 1e-5 * want,
            "full_text={full_text}: {got} vs {want}"
        );
        assert_eq!(r["tokens"].as_u64().unwrap() as usize, n);
        assert!((r["perplexity"].as_f64().unwrap() - want.exp()).abs() < 1e-4 * want.exp());
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
