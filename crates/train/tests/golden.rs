//! Gradient parity with transformers + PEFT. Every model folder in the golden directory is
//! checked against every training case found there (`full_grad`, `lora`, `prefix`, `prompt`,
//! `ptuning`); each case's settings come from its JSON and its `*_peft/adapter_config.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fedllm_model::{Batch, CausalLm, LoadOptions, MatmulPrecision};
use fedllm_peft::full::FullConfig;
use fedllm_peft::lora::LoraConfig;
use fedllm_peft::prefix::PrefixConfig;
use fedllm_peft::prompt::PromptConfig;
use fedllm_peft::ptuning::PtuningConfig;
use fedllm_peft::{Adapter, AdapterConfig};
use fedllm_train::{Optimizer, OptimizerConfig};
use serde_json::Value;

fn golden_dir() -> PathBuf {
    fedllm_testing::golden_dir()
}

fn model_dirs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").exists() && p.join("forward.json").exists())
        .collect();
    v.sort();
    v
}

fn json(p: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

fn u(v: &Value, k: &str) -> usize {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("missing {k} in {v}")) as usize
}

/// The adapter configuration a case describes, read from its files.
fn case_config(dir: &Path, case: &str, meta: &Value) -> AdapterConfig {
    let peft = |name: &str| json(&dir.join(format!("{name}_peft/adapter_config.json")));
    match case {
        "lora" => {
            let c = peft("lora");
            let targets: Vec<String> = c["target_modules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect();
            AdapterConfig::Lora(LoraConfig {
                r: u(&c, "r"),
                alpha: c["lora_alpha"].as_f64().unwrap(),
                dropout: c["lora_dropout"].as_f64().unwrap() as f32,
                target_modules: targets,
                use_rslora: c["use_rslora"].as_bool().unwrap_or(false),
                init: "kaiming".into(),
                layers_to_transform: None,
            })
        }
        "prefix" => {
            let c = peft("prefix");
            AdapterConfig::Prefix(PrefixConfig {
                num_virtual_tokens: u(&c, "num_virtual_tokens"),
                prefix_projection: c["prefix_projection"].as_bool().unwrap(),
                encoder_hidden_size: Some(u(&c, "encoder_hidden_size")),
            })
        }
        "prompt" => AdapterConfig::Prompt(PromptConfig {
            num_virtual_tokens: u(&peft("prompt"), "num_virtual_tokens"),
            init_text: None,
        }),
        "ptuning" => {
            let c = peft("ptuning");
            AdapterConfig::Ptuning(PtuningConfig {
                num_virtual_tokens: u(&c, "num_virtual_tokens"),
                encoder_hidden_size: u(&c, "encoder_hidden_size"),
            })
        }
        "full_grad" => {
            let _ = meta;
            AdapterConfig::Full(FullConfig::default())
        }
        other => panic!("unknown case {other}"),
    }
}

fn with_prefix(t: &HashMap<String, Tensor>, p: &str) -> BTreeMap<String, Tensor> {
    t.iter()
        .filter_map(|(k, v)| k.strip_prefix(p).map(|n| (n.to_string(), v.clone())))
        .collect()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn check_case(dir: &Path, case: &str) {
    check_case_at(dir, case, MatmulPrecision::F32)
}

/// bf16's unit roundoff: 8 significand bits, so rounding moves a value by at most 2^-8 of itself.
const BF16_U: f64 = 1.0 / 256.0;

/// What a comparison may differ by: loss (absolute), gradients (relative to the reference
/// tensor's largest magnitude), logits (absolute).
struct Tolerance {
    loss: f64,
    grad: f32,
    logits: f32,
}

/// f32 paths: the golden README's f32 parity (loss 1e-5 relative, gradients 1e-3, logits 1e-4).
///
/// bf16 paths round both operands of every product to bf16 (sums stay f32). A product with
/// rounded operands is off by at most 2u of each term, u = 2^-8; rounding errors are independent,
/// so a product stage adds about 2u of its activations' scale. The forward's longest chain has
/// S = 4·layers + 1 stages (q/k/v, o, gate/up or c_fc, down or c_proj per layer; the head), and to
/// first order their errors add: logits within S·2u·max|logit|. The loss (logsumexp minus the
/// target logit) moves by at most twice the largest logit change. The backward chains S more
/// stages: gradients within 2S·2u of their scale. The bounds grow with depth and logit scale,
/// as the errors do, so they hold for a bigger reference model without retuning.
fn tolerance(p: MatmulPrecision, layers: usize, logit_scale: f32, loss: f64) -> Tolerance {
    let bf16 = match p {
        MatmulPrecision::F32 => false,
        MatmulPrecision::Kernel(isa) => !fedllm_kernels::isa::usable(isa).f32_fma(),
        MatmulPrecision::Bf16 => !fedllm_kernels::isa::selected().f32_fma(),
    };
    if !bf16 {
        return Tolerance {
            loss: 1e-5 * loss.abs(),
            grad: 1e-3,
            logits: 1e-4,
        };
    }
    let stages = (4 * layers + 1) as f64;
    let logits = stages * 2.0 * BF16_U * logit_scale as f64;
    Tolerance {
        loss: 2.0 * logits,
        grad: (2.0 * stages * 2.0 * BF16_U) as f32,
        logits: logits as f32,
    }
}

fn layers(dir: &Path) -> usize {
    let c = json(&dir.join("config.json"));
    c["num_hidden_layers"]
        .as_u64()
        .or(c["n_layer"].as_u64())
        .expect("config.json names its layer count") as usize
}

fn check_case_at(dir: &Path, case: &str, precision: MatmulPrecision) {
    let meta = json(&dir.join(format!("{case}.json")));
    let data =
        candle_core::safetensors::load(dir.join(format!("{case}.safetensors")), &Device::Cpu)
            .unwrap();
    let mut model = CausalLm::load(dir, LoadOptions::default()).unwrap().model;
    model.set_matmul_precision(precision);
    let config = case_config(dir, case, &meta);
    let init = with_prefix(&data, "init.");
    let adapter = if init.is_empty() {
        Adapter::init(&model, config, 0, None).unwrap()
    } else {
        Adapter::from_tensors(&model, config, init, 0).unwrap()
    };
    adapter.attach(&mut model, true).unwrap();
    let mask: Vec<Vec<u8>> = data["attention_mask"]
        .to_dtype(DType::U8)
        .unwrap()
        .to_vec2()
        .unwrap();
    let batch = Batch {
        input_ids: data["input_ids"].clone(),
        mask: mask.clone(),
        labels: data["labels"].clone(),
    };
    let want_loss = data["loss"].to_vec1::<f32>().unwrap()[0] as f64;
    let scale = data.get("logits").map_or(1.0, max_abs);
    let tol = tolerance(precision, layers(dir), scale, want_loss);
    let mut logit_err = 0f32;

    // Logits (virtual positions first for prompt-type adapters, where the mask is implicitly 1).
    if let Some(want) = data.get("logits") {
        let got = adapter
            .logits(&model, &batch.input_ids, Some(&mask))
            .unwrap();
        let e = fedllm_testing::masked_max_abs_diff(&got, want, &mask).unwrap();
        logit_err = e;
        assert!(
            e <= tol.logits,
            "{}/{case}: logits differ by {e}",
            dir.display()
        );
    }

    let trainer = fedllm_train::Trainer::new(Default::default()).unwrap();
    let (loss, grads, _) = trainer
        .gradients(&model, &adapter, std::slice::from_ref(&batch))
        .unwrap();
    let rel = ((loss - want_loss) / want_loss).abs();
    assert!(
        (loss - want_loss).abs() <= tol.loss,
        "{}/{case}: loss {loss} vs {want_loss}",
        dir.display()
    );

    let want_grads = with_prefix(&data, "grad.");
    assert!(!want_grads.is_empty());
    let mut worst = 0f32;
    for (name, want) in &want_grads {
        let got = grads
            .get(name)
            .unwrap_or_else(|| panic!("{}/{case}: no gradient for {name}", dir.display()));
        let err = max_abs(&(got - want).unwrap()) / max_abs(want).max(1e-12);
        worst = worst.max(err);
        assert!(
            err <= tol.grad,
            "{}/{case}: gradient of {name} off by {err} (relative to its max)",
            dir.display()
        );
    }
    // A trainable tensor golden has no gradient for must be one it does not record (full: other layers).
    if case != "full_grad" {
        assert_eq!(
            grads.len(),
            want_grads.len(),
            "{}/{case}: gradient set differs",
            dir.display()
        );
    }

    // One AdamW step from `init.*` applied to the *reference* gradients: the optimizer is checked
    // on its own (the gradients were checked above). Applied to our gradients instead, a 1e-9
    // difference where |g| is near eps (1e-8) moves m/(sqrt(v)+eps) by O(1), i.e. lr·O(1) = 1e-2.
    let after = with_prefix(&data, "after_step.");
    let mut step_err = 0f32;
    if !after.is_empty() && precision == MatmulPrecision::F32 {
        adamw_step(&meta, &adapter, &want_grads);
        for (name, want) in &after {
            let got = adapter.var(name).unwrap().as_tensor();
            let e = max_abs(&(got - want).unwrap());
            step_err = step_err.max(e);
            assert!(
                e <= 1e-5,
                "{}/{case}: after_step {name} off by {e}",
                dir.display()
            );
        }
    }
    println!(
        "{}/{case} [{precision:?}]: logits ≤ {logit_err:.1e} (bound {:.1e}), loss {loss:.6} (rel {rel:.1e}), {} gradients ≤ {worst:.1e} rel (bound {:.1e}), after_step ≤ {step_err:.1e}",
        dir.file_name().unwrap().to_string_lossy(),
        tol.logits,
        want_grads.len(),
        tol.grad,
    );
}

fn adamw_step(meta: &Value, adapter: &Adapter, grads: &BTreeMap<String, Tensor>) {
    let o = &meta["optimizer"];
    assert_eq!(o["type"], "adamw");
    let betas = o["betas"].as_array().unwrap();
    let mut opt = Optimizer::new(OptimizerConfig::Adamw {
        beta1: betas[0].as_f64().unwrap(),
        beta2: betas[1].as_f64().unwrap(),
        eps: o["eps"].as_f64().unwrap(),
        weight_decay: o["weight_decay"].as_f64().unwrap(),
    });
    opt.step(&adapter.params, grads, o["lr"].as_f64().unwrap())
        .unwrap();
}

#[test]
fn golden_training_cases() {
    let mut n = 0;
    let mut failed = Vec::new();
    for dir in model_dirs() {
        for case in ["full_grad", "lora", "prefix", "prompt", "ptuning"] {
            if dir.join(format!("{case}.json")).exists() {
                if std::panic::catch_unwind(|| check_case(&dir, case)).is_err() {
                    failed.push(format!("{}/{case}", dir.display()));
                }
                n += 1;
            }
        }
    }
    assert!(failed.is_empty(), "failed cases: {failed:?}");
    assert!(
        n >= 10,
        "only {n} cases found in {}",
        golden_dir().display()
    );
}

/// LoRA through every kernel path this machine has (bf16 ones included), against the same
/// transformers + PEFT gradients at the tolerance of each path's arithmetic.
#[test]
fn golden_lora_on_every_kernel_path() {
    let mut n = 0;
    for dir in model_dirs() {
        if !dir.join("lora.json").exists() {
            continue;
        }
        for isa in fedllm_kernels::isa::available() {
            check_case_at(&dir, "lora", MatmulPrecision::Kernel(isa));
            n += 1;
        }
    }
    assert!(n > 0, "no LoRA case in {}", golden_dir().display());
}
