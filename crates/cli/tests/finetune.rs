//! `fedllm finetune` end to end: the tiny golden model for every adapter (seconds), and a real
//! LoRA fine-tuning of SmolLM2 on GSM8K that must lower the held-out loss.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fedllm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fedllm"))
        .args(args)
        .output()
        .expect("run fedllm")
}

fn golden(name: &str) -> PathBuf {
    fedllm_testing::golden_dir().join(name)
}

/// "before: X" / "after: Y" held-out losses from finetune's log.
fn losses(stderr: &str) -> (f64, f64) {
    let grab = |key: &str| -> f64 {
        let line = stderr
            .lines()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("no `{key}` in: {stderr}"));
        line.split(key)
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (grab("held-out loss before:"), grab("held-out loss after:"))
}

fn write_alpaca(path: &Path, n: usize, offset: usize) {
    // A learnable toy task for the tiny model's byte-level vocabulary.
    let words = [
        "alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta",
    ];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let w = words[(i + offset) % words.len()];
            serde_json::json!({"instruction": format!("Repeat: {w}\n"), "input": "", "output": format!("{w} {w}")}).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

#[test]
fn finetune_every_adapter_on_tiny_models() {
    let tmp = tempfile::tempdir().unwrap();
    let train = tmp.path().join("train.jsonl");
    let eval = tmp.path().join("eval.jsonl");
    write_alpaca(&train, 32, 0);
    write_alpaca(&eval, 8, 3);
    for model in ["llama-tiny", "gpt2-tiny"] {
        for adapter in ["lora", "prefix", "prompt", "ptuning", "full"] {
            let out = tmp.path().join(format!("{model}-{adapter}"));
            let o = fedllm(&[
                "finetune",
                "--model",
                golden(model).to_str().unwrap(),
                "--data",
                train.to_str().unwrap(),
                "--eval-data",
                eval.to_str().unwrap(),
                "--template",
                "raw",
                "--adapter",
                adapter,
                "--virtual-tokens",
                "4",
                "--encoder-hidden",
                "16",
                "--steps",
                "12",
                "--batch-size",
                "4",
                "--lr",
                "1e-2",
                "--grad-accum",
                "2",
                "--schedule",
                "cosine",
                "--warmup-steps",
                "2",
                "--max-grad-norm",
                "1.0",
                "--tok-len",
                "96",
                "--out",
                out.to_str().unwrap(),
            ]);
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{model} {adapter}: {stderr}");
            let (before, after) = losses(&stderr);
            println!("{model} {adapter}: held-out loss {before:.3} → {after:.3}");
            assert!(after < before, "{model} {adapter}: {before} → {after}");
            assert!(
                out.join("adapter_config.json").exists()
                    && out.join("adapter_model.safetensors").exists()
            );
            let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
            assert_eq!(metrics.lines().count(), 12);
            let first: serde_json::Value =
                serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
            for k in ["step", "loss", "lr", "tokens_per_s"] {
                assert!(first.get(k).is_some(), "metrics line lacks {k}: {first}");
            }
        }
    }
}

#[test]
fn merge_writes_a_loadable_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let o = fedllm(&[
        "merge",
        "--model",
        golden("llama-tiny").to_str().unwrap(),
        "--adapter",
        golden("llama-tiny").join("lora_peft").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Every LoRA target is W + (alpha / r)·B·A (computed here with candle's matmul from the PEFT
    // file), every other tensor is the base's, bit for bit.
    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let base = load(&golden("llama-tiny").join("model.safetensors"));
    let merged = load(&out.join("model.safetensors"));
    let peft_dir = golden("llama-tiny").join("lora_peft");
    let lora = load(&peft_dir.join("adapter_model.safetensors"));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(peft_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let scale = cfg["lora_alpha"].as_f64().unwrap() / cfg["r"].as_f64().unwrap();
    assert_eq!(merged.len(), base.len());
    let mut changed = 0;
    for (name, w) in &base {
        let module = name.trim_end_matches(".weight");
        let a_key = format!("base_model.model.{module}.lora_A.weight");
        let want = match lora.get(&a_key) {
            Some(a) => {
                let b = &lora[&a_key.replace("lora_A", "lora_B")];
                changed += 1;
                (w + (b.matmul(a).unwrap() * scale).unwrap()).unwrap()
            }
            None => w.clone(),
        };
        let d = fedllm_testing::max_abs_diff(&merged[name], &want).unwrap();
        // f32: W + s·BA summed in another order differs by a few ulps of |W| (≤ ~1).
        assert!(d < 1e-6, "{name}: merged differs by {d}");
    }
    assert!(changed > 0, "no LoRA target found in the merged model");
    let o = fedllm(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "3",
        "--print-ids",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn finetune_bad_data_line_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"instruction\":\"a\",\"output\":\"b\"}\n{oops\n").unwrap();
    let o = fedllm(&[
        "finetune",
        "--model",
        golden("llama-tiny").to_str().unwrap(),
        "--data",
        bad.to_str().unwrap(),
        "--steps",
        "1",
        "--out",
        tmp.path().join("o").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("bad.jsonl:2:") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// Real model, real data: 30 LoRA steps on GSM8K lower the held-out loss.
#[test]
fn smollm2_lora_on_gsm8k_lowers_heldout_loss() {
    let (Some(model), Some(train)) = (
        fedllm_testing::smollm2(),
        fedllm_testing::data_file("gsm8k/train.jsonl"),
    ) else {
        return;
    };
    let data = train.parent().unwrap().to_path_buf();
    let tmp = tempfile::tempdir().unwrap();
    let take = |src: &str, n: usize, dst: &Path| {
        let text = std::fs::read_to_string(data.join(src)).unwrap();
        std::fs::write(dst, text.lines().take(n).collect::<Vec<_>>().join("\n")).unwrap();
    };
    let (train, eval) = (
        tmp.path().join("train.jsonl"),
        tmp.path().join("test.jsonl"),
    );
    take("train.jsonl", 120, &train);
    take("test.jsonl", 16, &eval);
    let out = tmp.path().join("out");
    let o = fedllm(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        train.to_str().unwrap(),
        "--eval-data",
        eval.to_str().unwrap(),
        "--adapter",
        "lora",
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--steps",
        "30",
        "--batch-size",
        "2",
        "--lr",
        "2e-3",
        "--tok-len",
        "128",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let (before, after) = losses(&stderr);
    println!("SmolLM2 LoRA on GSM8K (30 steps): held-out loss {before:.4} → {after:.4}");
    assert!(after < before - 0.05, "{before} → {after}");
}
