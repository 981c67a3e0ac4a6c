//! PEFT files against the golden `*_peft` folders: exports have exactly PEFT's key names and
//! shapes, imports read PEFT's configuration so that it reproduces transformers' logits, and
//! merging LoRA equals `merge_and_unload`.

use fedllm_testing::max_abs_diff;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fedllm_model::{CausalLm, LoadOptions};
use fedllm_peft::{io, merge, Adapter};
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

fn load(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn shapes(p: &Path) -> BTreeMap<String, Vec<usize>> {
    load(p)
        .into_iter()
        .map(|(k, v)| (k, v.dims().to_vec()))
        .collect()
}

fn masked_max_err(got: &Tensor, want: &Tensor, mask: &[Vec<u8>]) -> f32 {
    fedllm_testing::masked_max_abs_diff(got, want, mask).unwrap()
}

fn with_prefix(t: &HashMap<String, Tensor>, p: &str) -> BTreeMap<String, Tensor> {
    t.iter()
        .filter_map(|(k, v)| k.strip_prefix(p).map(|n| (n.to_string(), v.clone())))
        .collect()
}

/// The trained form of a case's adapter (P-tuning with its MLP), from `after_step.*` — what PEFT
/// saved into the `*_peft` folder after the reference's AdamW step.
fn after_step_adapter(
    model: &CausalLm,
    imported: &Adapter,
    data: &HashMap<String, Tensor>,
) -> Adapter {
    let t = with_prefix(data, "after_step.");
    let cfg = match t.get("prompt_encoder.mlp_head.0.bias") {
        Some(b) => fedllm_peft::AdapterConfig::Ptuning(fedllm_peft::ptuning::PtuningConfig {
            num_virtual_tokens: imported.config.virtual_tokens(),
            encoder_hidden_size: b.dim(0).unwrap(),
        }),
        None => imported.config.clone(),
    };
    Adapter::from_tensors(model, cfg, t, 0).unwrap()
}

#[test]
fn import_golden_peft_and_export_same_keys() {
    let mut n = 0;
    for dir in model_dirs() {
        for case in ["lora", "prefix", "prompt", "ptuning"] {
            let peft_dir = dir.join(format!("{case}_peft"));
            if !peft_dir.exists() {
                continue;
            }
            n += 1;
            let mut model = CausalLm::load(&dir, LoadOptions::default()).unwrap().model;
            let data = load(&dir.join(format!("{case}.safetensors")));
            let mask: Vec<Vec<u8>> = data["attention_mask"]
                .to_dtype(DType::U8)
                .unwrap()
                .to_vec2()
                .unwrap();
            let ids = &data["input_ids"];

            // Import, checked against transformers: the configuration read from the PEFT folder
            // (rank, alpha, targets, fan-in/fan-out, virtual tokens), given the reference's
            // initial tensors, reproduces the reference's logits (README: fp32 ≤ 1e-4).
            let imported = io::load(&peft_dir, &model).unwrap();
            let reference = after_step_adapter(&model, &imported, &data);
            let init = with_prefix(&data, "init.");
            let at_init = if case == "ptuning" {
                // PEFT saves P-tuning as its MLP's output; the MLP itself comes from the case.
                Adapter::from_tensors(&model, reference.config.clone(), init, 0).unwrap()
            } else {
                Adapter::from_tensors(&model, imported.config.clone(), init, 0).unwrap()
            };
            at_init.attach(&mut model, false).unwrap();
            let got = at_init.logits(&model, ids, Some(&mask)).unwrap();
            let e = masked_max_err(&got, &data["logits"], &mask);
            println!(
                "{}/{case}_peft: imported config at the initial tensors, max|Δlogits| vs transformers = {e:.2e}",
                dir.display()
            );
            assert!(e <= 1e-4, "{}/{case}: {e}", dir.display());
            // The imported tensors are the reference's trained ones; for P-tuning, the saved
            // prompt behaves as the trained MLP does (that MLP forward is the one checked above).
            if case == "ptuning" {
                reference.attach(&mut model, false).unwrap();
                let want = reference.logits(&model, ids, Some(&mask)).unwrap();
                imported.attach(&mut model, false).unwrap();
                let got = imported.logits(&model, ids, Some(&mask)).unwrap();
                let e = masked_max_err(&got, &want, &mask);
                assert!(
                    e <= 1e-4,
                    "{}/{case}: saved prompt vs MLP: {e}",
                    dir.display()
                );
            } else {
                for (k, want) in with_prefix(&data, "after_step.") {
                    let got = imported.var(&k).unwrap().as_tensor().clone();
                    assert_eq!(
                        max_abs_diff(&got, &want).unwrap(),
                        0.0,
                        "{}/{case}: imported {k}",
                        dir.display()
                    );
                }
            }

            // Export: exactly PEFT's key names, shapes, values and config fields.
            let tmp = tempfile::tempdir().unwrap();
            io::save(&reference, &model, tmp.path(), "base").unwrap();
            let (ours, theirs) = (
                load(&tmp.path().join("adapter_model.safetensors")),
                load(&peft_dir.join("adapter_model.safetensors")),
            );
            let keys = |m: &HashMap<String, Tensor>| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.dims().to_vec()))
                    .collect::<BTreeMap<_, _>>()
            };
            assert_eq!(
                keys(&ours),
                keys(&theirs),
                "{}/{case}: exported keys/shapes",
                dir.display()
            );
            for (k, v) in &theirs {
                let d = max_abs_diff(&ours[k], v).unwrap();
                assert!(
                    d <= 1e-5,
                    "{}/{case}: exported {k} differs by {d}",
                    dir.display()
                );
            }
            let ours: Value = serde_json::from_str(
                &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            let theirs: Value = serde_json::from_str(
                &std::fs::read_to_string(peft_dir.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            for (k, v) in theirs.as_object().unwrap() {
                if k != "base_model_name_or_path"
                    && !(k == "init_lora_weights" && v == &Value::Bool(false))
                {
                    assert_eq!(
                        &ours[k],
                        v,
                        "{}/{case}: adapter_config.json `{k}`",
                        dir.display()
                    );
                }
            }
            // fedllm's own state round-trips losslessly (P-tuning keeps its MLP).
            let back = io::load(tmp.path(), &model).unwrap();
            assert_eq!(back.config, reference.config);
            assert_eq!(back.params.len(), reference.params.len());
        }
    }
    assert!(n >= 8);
}

#[test]
fn lora_merge_equals_golden_and_loads_back() {
    for dir in model_dirs() {
        if !dir.join("lora_merged.safetensors").exists() {
            continue;
        }
        let loaded = CausalLm::load(&dir, LoadOptions::default()).unwrap();
        let model = loaded.model;
        // lora_merged merges the case's initial adapter.
        let data0 = load(&dir.join("lora.safetensors"));
        let peft = io::load(&dir.join("lora_peft"), &model).unwrap();
        let a = Adapter::from_tensors(&model, peft.config.clone(), with_prefix(&data0, "init."), 0)
            .unwrap();
        let weights = merge::merged_weights(&model, &a).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        merge::write_hf_folder(&model, &weights, loaded.tokenizer.as_ref(), tmp.path()).unwrap();
        let merged = CausalLm::load(tmp.path(), LoadOptions::default())
            .unwrap()
            .model;
        let data = load(&dir.join("lora_merged.safetensors"));
        let mask: Vec<Vec<u8>> = data["attention_mask"]
            .to_dtype(DType::U8)
            .unwrap()
            .to_vec2()
            .unwrap();
        let got = merged
            .forward(&data["input_ids"], Some(&mask), None)
            .unwrap();
        let e = masked_max_err(&got, &data["logits"], &mask);
        println!(
            "{}: merged folder logits vs golden lora_merged: {e:.2e}",
            dir.display()
        );
        assert!(e <= 1e-4, "{e}");
        // Every key of the base checkpoint is written, nothing else.
        let base: Vec<String> = shapes(&dir.join("model.safetensors")).into_keys().collect();
        let out: Vec<String> = shapes(&tmp.path().join("model.safetensors"))
            .into_keys()
            .collect();
        assert_eq!(base, out);
    }
}

/// Prompt tuning initialised from text: the virtual tokens start as the embeddings of the text's
/// tokens, repeated to fill them (PEFT's TEXT init).
#[test]
fn prompt_init_from_text() {
    let dir = model_dirs()
        .into_iter()
        .find(|d| d.ends_with("llama-tiny"))
        .unwrap();
    let loaded = CausalLm::load(&dir, LoadOptions::default()).unwrap();
    let tok = loaded.tokenizer.unwrap();
    let cfg = fedllm_peft::AdapterConfig::Prompt(fedllm_peft::prompt::PromptConfig {
        num_virtual_tokens: 7,
        init_text: Some("Hello world".into()),
    });
    let a = Adapter::init(&loaded.model, cfg, 0, Some(&tok)).unwrap();
    let ids = tok.encode("Hello world", false).unwrap();
    let want: Vec<u32> = ids.iter().cycle().take(7).copied().collect();
    let emb = loaded
        .model
        .embed(
            &Tensor::new(want.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let got = a.virtual_embeddings().unwrap();
    let d = max_abs_diff(&got, &emb).unwrap();
    assert_eq!(d, 0.0);
}

/// An adapter attached for inference records no autograd graph (a KV cache built from outputs
/// that track the Vars kept every decode step's activations alive: 24 GB on GSM8K), while the
/// same adapter attached for training does, and both see values set after attaching.
#[test]
fn inference_attachment_records_no_graph_and_follows_updates() {
    use fedllm_peft::{full::FullConfig, lora::LoraConfig, AdapterConfig};
    let dir = golden_dir().join("llama-tiny");
    let model = CausalLm::load(&dir, LoadOptions::default()).unwrap().model;
    let ids = Tensor::new(&[[1u32, 5, 9, 2]], &Device::Cpu).unwrap();
    for config in [
        AdapterConfig::Lora(LoraConfig::new(4, 8.0, &["q_proj", "v_proj"])),
        AdapterConfig::Full(FullConfig {
            patterns: vec![],
            layers: Some(vec![1]),
            non_layer: false,
        }),
    ] {
        let ad = Adapter::init(&model, config, 3, None).unwrap();
        let mut m = model.clone();
        ad.attach(&mut m, true).unwrap();
        assert!(m.forward(&ids, None, None).unwrap().track_op());
        ad.attach(&mut m, false).unwrap();
        let before = m.forward(&ids, None, None).unwrap();
        assert!(!before.track_op());
        // Values set after attaching reach the detached tensors (shared storage).
        let bumped: BTreeMap<String, Tensor> = ad
            .params
            .iter()
            .map(|(n, v)| (n.clone(), (v.as_tensor() + 0.05).unwrap()))
            .collect();
        ad.set_tensors(&bumped).unwrap();
        let after = m.forward(&ids, None, None).unwrap();
        assert!(max_abs_diff(&before, &after).unwrap() > 1e-4);
    }
}

/// Greedy generation with every adapter type of the golden PEFT folders (LoRA attached; prefix,
/// prompt and P-tuning continued from their virtual-token cache) picks the same tokens as
/// recomputing the adapter's full forward over the whole sequence at every step.
#[test]
fn generation_with_every_adapter_type_matches_full_recomputation() {
    use fedllm_model::generate::{generate_after, GenerateConfig, Sampling};
    for dir in model_dirs() {
        for kind in ["lora_peft", "prefix_peft", "prompt_peft", "ptuning_peft"] {
            let mut model = CausalLm::load(&dir, LoadOptions::default()).unwrap().model;
            let ad = io::load(&dir.join(kind), &model).unwrap();
            ad.attach(&mut model, false).unwrap();
            let prompt = vec![5u32, 17, 3, 42, 8];
            let cfg = GenerateConfig {
                max_new_tokens: 6,
                sampling: Sampling::greedy(),
                stop_token_ids: vec![],
                stop_strings: vec![],
            };
            let prefix = ad.generation_prefix(&model).unwrap();
            let got = generate_after(
                &model,
                None,
                prefix.as_ref(),
                std::slice::from_ref(&prompt),
                &cfg,
            )
            .unwrap()
            .remove(0)
            .tokens;
            let mut ids = prompt.clone();
            for _ in 0..6 {
                let x = Tensor::new(ids.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let logits = ad.logits(&model, &x, None).unwrap();
                let last: Vec<f32> = logits
                    .get(0)
                    .unwrap()
                    .get(logits.dim(1).unwrap() - 1)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let best = last
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .unwrap()
                    .0 as u32;
                ids.push(best);
            }
            assert_eq!(got, ids[prompt.len()..], "{} {kind}", dir.display());
        }
    }
}
