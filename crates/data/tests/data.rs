//! Templates byte-exact, label masking exact, and the Fed-GSM8K-3 preset on the real GSM8K.

use std::path::{Path, PathBuf};

use fedllm_data::federated::{build, preset};
use fedllm_data::record::Record;
use fedllm_data::template::{Template, ALPACA_NO_INPUT, ALPACA_WITH_INPUT};
use fedllm_data::tokenize::tokenize;
use fedllm_model::Tokenizer;

fn tiny_tokenizer() -> Tokenizer {
    let dir = std::env::var_os("FEDLLM_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden"))
        .join("llama-tiny");
    Tokenizer::from_hf_dir(&dir).unwrap().unwrap()
}

fn rec(instruction: &str, input: &str, output: &str) -> Record {
    Record {
        instruction: instruction.into(),
        input: input.into(),
        output: output.into(),
        category: None,
    }
}

#[test]
fn alpaca_templates_are_fs_llm_verbatim() {
    let tok = tiny_tokenizer();
    assert_eq!(
        Template::Alpaca.prompt(&rec("Add the numbers.", "2 and 3", "5"), &tok).unwrap(),
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:"
    );
    assert_eq!(
        Template::Alpaca.prompt(&rec("Say hi.", "", "hi"), &tok).unwrap(),
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:"
    );
    assert!(ALPACA_WITH_INPUT.contains("{input}") && !ALPACA_NO_INPUT.contains("{input}"));
}

#[test]
fn loss_covers_exactly_the_target() {
    let tok = tiny_tokenizer();
    let r = rec("Say hi.", "", "hello there");
    let prompt = tok
        .encode(&Template::Alpaca.prompt(&r, &tok).unwrap(), true)
        .unwrap();
    let target = tok.encode("hello there", false).unwrap();
    let (s, truncated) = tokenize(&r, Template::Alpaca, &tok, 1000).unwrap().unwrap();
    assert!(!truncated);
    assert_eq!(s.target_start, prompt.len());
    assert_eq!(s.ids.len(), prompt.len() + target.len() + 1);
    assert!(s.labels[..prompt.len()].iter().all(|&l| l == -100));
    assert_eq!(
        s.labels[prompt.len()],
        target[0] as i64,
        "first target token"
    );
    assert_eq!(
        *s.labels.last().unwrap(),
        tok.eos_token_ids[0] as i64,
        "target ends with EOS"
    );
    // Truncation keeps at least one target token, or drops the sample.
    let (t, truncated) = tokenize(&r, Template::Alpaca, &tok, prompt.len() + 1)
        .unwrap()
        .unwrap();
    assert!(truncated && t.labels.iter().filter(|&&l| l != -100).count() == 1);
    assert!(tokenize(&r, Template::Alpaca, &tok, prompt.len())
        .unwrap()
        .is_none());
}

#[test]
fn fed_gsm8k_3_splits_all_train_records() {
    let Some(train) = fedllm_testing::data_file("gsm8k/train.jsonl") else {
        return;
    };
    let root = train.parent().unwrap().parent().unwrap();
    let p = preset("fed-gsm8k-3").unwrap();
    let source = p.source(root).unwrap();
    let fed = build(&source, &p.split_config(0)).unwrap();
    let sizes: Vec<usize> = fed.manifest.parts["train"]
        .iter()
        .map(|c| c.records)
        .collect();
    println!(
        "Fed-GSM8K-3 train sizes: {sizes:?}; test {:?}",
        fed.manifest.parts["test"]
            .iter()
            .map(|c| c.records)
            .collect::<Vec<_>>()
    );
    assert_eq!(fed.train_records.len(), 7473);
    assert_eq!(sizes.len(), 3);
    assert_eq!(sizes.iter().sum::<usize>(), 7473);
    assert_eq!(fed.manifest.server_test.len(), 1319);
    assert!(fed.train_records[0].output.ends_with("The answer is 72"));
    // Same seed, same manifest; another seed, another split.
    assert_eq!(
        build(&source, &p.split_config(0)).unwrap().manifest,
        fed.manifest
    );
    assert_ne!(
        build(&source, &p.split_config(1)).unwrap().manifest.parts,
        fed.manifest.parts
    );
}
