//! `eval.accuracy`: a generation-based score of the global adapter in every evaluated round.

mod common;

use fedllm_fl::RunConfig;
use fedllm_fl::Simulation;
use fedllm_model::generate::{generate, truncate_at_stop, GenerateConfig, Sampling};
use fedllm_model::{CausalLm, LoadOptions};

/// Easy word problems in GSM8K's file layout (`#### N` closes the answer).
fn gsm8k_file(dir: &std::path::Path) -> std::path::PathBuf {
    let qa = [
        (
            "Tom has 2 apples and buys 3 more. How many apples does Tom have?",
            5,
        ),
        ("A box holds 4 pens. How many pens are in 2 boxes?", 8),
        (
            "Sara had 10 dollars and spent 4. How many dollars are left?",
            6,
        ),
        (
            "There are 7 birds and 2 fly away. How many birds remain?",
            5,
        ),
        ("Each of 3 kids has 3 cards. How many cards in total?", 9),
        (
            "A train has 6 cars and 1 more is added. How many cars now?",
            7,
        ),
    ];
    let lines: Vec<String> = qa
        .iter()
        .map(|(q, a)| {
            serde_json::json!({"question": q, "answer": format!("We compute it.\n#### {a}")})
                .to_string()
        })
        .collect();
    let p = dir.join("gsm.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

/// The round record's `server_accuracy` is the final global adapter's 8-shot greedy GSM8K
/// accuracy on the first `eval.accuracy_samples` test records: recomputed here from the PEFT
/// files the run wrote, loaded into a fresh model, with plain greedy generation.
#[test]
fn server_accuracy_is_the_global_adapters_gsm8k_accuracy() {
    let Some(model) = fedllm_testing::smollm2() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = gsm8k_file(dir.path());
    let out = dir.path().join("run");
    let o: Vec<String> = vec![
        format!("data.source={}", data.display()),
        format!("data.test_source={}", data.display()),
        "data.format=gsm8k".into(),
        "data.tok_len=96".into(),
        format!("model.path={}", model.display()),
        "federate.client_num=2".into(),
        "federate.sample_client_num=2".into(),
        "federate.total_round_num=1".into(),
        "train.local_update_steps=1".into(),
        "train.batch_size=1".into(),
        "train.lr=0.001".into(),
        "eval.max_samples=2".into(),
        "eval.accuracy=gsm8k".into(),
        "eval.accuracy_split=test".into(),
        "eval.accuracy_samples=4".into(),
        "eval.accuracy_max_new_tokens=24".into(),
        format!("outdir={}", out.display()),
    ];
    let cfg = RunConfig::from_yaml("", &o).unwrap();
    let s = Simulation::new(cfg)
        .unwrap()
        .run(false, None, |_| {})
        .unwrap();
    let got = s.records.last().unwrap().server_accuracy.unwrap();

    let mut m = CausalLm::load(&model, LoadOptions::default()).unwrap();
    let tok = m.tokenizer.take().unwrap();
    let mut lm = m.model;
    let ad = fedllm_peft::io::load(&s.adapter_dir, &lm).unwrap();
    ad.attach(&mut lm, false).unwrap();
    let text = std::fs::read_to_string(&data).unwrap();
    let mut correct = 0;
    for line in text.lines().take(4) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let prompt = fedllm_eval::gsm8k::prompt(v["question"].as_str().unwrap());
        let ids = tok.encode(&prompt, true).unwrap();
        let cfg = GenerateConfig {
            max_new_tokens: 24,
            sampling: Sampling::greedy(),
            stop_token_ids: tok.eos_token_ids.clone(),
            stop_strings: vec!["\n\nQ:".into(), "\nQ:".into()],
        };
        let g = generate(&lm, Some(&tok), &[ids], &cfg).unwrap();
        let t = tok.decode(&g[0].tokens, true).unwrap();
        let t = truncate_at_stop(&t, &cfg.stop_strings);
        let gold = v["answer"]
            .as_str()
            .unwrap()
            .rsplit("####")
            .next()
            .unwrap()
            .trim()
            .to_string();
        let pred = fedllm_eval::gsm8k::extract(&t);
        eprintln!("{t:?} → {pred:?} (gold {gold})");
        correct += pred.is_some_and(|p| fedllm_eval::gsm8k::same(&p, &gold)) as usize;
    }
    assert_eq!(got, correct as f64 / 4.0);
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    let col = rows[0]
        .iter()
        .position(|c| *c == "server_accuracy")
        .unwrap();
    let last: f64 = rows.last().unwrap()[col].parse().unwrap();
    assert_eq!(last, got, "the CSV's server_accuracy column");
}

/// A data set without GSM8K's final answers cannot be scored: one config error naming it.
#[test]
fn accuracy_on_data_without_answers_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::data(dir.path(), 40);
    let cfg = common::config(
        dir.path(),
        &data,
        &["eval.accuracy=gsm8k", "data.splits=[0.8,0.1,0.1]"],
    );
    let e = Simulation::new(cfg).err().unwrap().to_string();
    assert!(
        e.contains("eval.accuracy gsm8k") && e.contains("no final answer"),
        "{e}"
    );
}

/// Generation runs with LoRA and full adapters only; the local baseline has no global adapter.
#[test]
fn accuracy_with_a_prompt_adapter_or_local_baseline_is_refused() {
    let o = |extra: &str| -> String {
        RunConfig::from_yaml("", &["eval.accuracy=gsm8k".into(), extra.to_string()])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(o("adapter.type=prompt").contains("adapter.type is prompt"));
    assert!(o("federate.baseline=local").contains("federate.baseline local has none"));
}
