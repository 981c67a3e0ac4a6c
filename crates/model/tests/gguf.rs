//! GGUF loading end to end and hermetically: the tiny golden LLaMA is written as a GGUF the way
//! llama.cpp's converter writes it (q/k rows permuted, llama.cpp tensor names), loaded back, and
//! compared with transformers' logits. Broken files must fail with errors naming the problem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use fedllm_model::gguf::{self, Value};
use fedllm_model::{CausalLm, LoadOptions, ModelError, QuantMode};

fn golden() -> PathBuf {
    fedllm_testing::golden_dir().join("llama-tiny")
}

fn metadata(arch: &str) -> Vec<(String, Value)> {
    let u = |v: u32| Value::U32(v);
    vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), u(2)),
        (format!("{arch}.context_length"), u(128)),
        (format!("{arch}.embedding_length"), u(64)),
        (format!("{arch}.feed_forward_length"), u(160)),
        (format!("{arch}.attention.head_count"), u(4)),
        (format!("{arch}.attention.head_count_kv"), u(2)),
        (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        (format!("{arch}.vocab_size"), u(512)),
    ]
}

/// The tiny golden LLaMA as GGUF tensors; 2-D weights in `quant` (F32 keeps everything dense).
fn tiny_tensors(quant: GgmlDType) -> Vec<fedllm_model::gguf::GgufTensor> {
    let st =
        candle_core::safetensors::load(golden().join("model.safetensors"), &Device::Cpu).unwrap();
    let st: std::collections::BTreeMap<String, Tensor> = st.into_iter().collect();
    fedllm_model::weights::llama_to_gguf(&st, 4, 2, quant).unwrap()
}

fn golden_forward() -> (HashMap<String, Tensor>, Vec<Vec<u8>>) {
    let case =
        candle_core::safetensors::load(golden().join("forward.safetensors"), &Device::Cpu).unwrap();
    let mask = case["attention_mask"]
        .to_dtype(DType::U8)
        .unwrap()
        .to_vec2::<u8>()
        .unwrap();
    (case, mask)
}

fn max_err_where_masked(got: &Tensor, want: &Tensor, mask: &[Vec<u8>]) -> f32 {
    fedllm_testing::masked_max_abs_diff(got, want, mask).unwrap()
}

#[test]
fn tiny_llama_gguf_f32_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    gguf::write(&path, &metadata("llama"), &tiny_tensors(GgmlDType::F32)).unwrap();
    let model = CausalLm::load(&path, LoadOptions::default()).unwrap().model;
    let (case, mask) = golden_forward();
    let logits = model
        .forward(&case["input_ids"], Some(&mask), None)
        .unwrap();
    let e = max_err_where_masked(&logits, &case["logits"], &mask);
    println!("tiny llama from GGUF (F32, q/k un-permuted): max|Δlogits| = {e:.2e}");
    assert!(e <= 1e-4, "{e}");
}

/// Quantized files: dequantized they stay near transformers' fp32 logits (bounded by the
/// quantization error), and the kept-quantized kernels (used for single-row decode) agree with
/// the dequantized weights.
#[test]
fn tiny_llama_gguf_quantized_kept_and_dequantized() {
    let (case, mask) = golden_forward();
    let ids = &case["input_ids"];
    for (q, bound, decode_bound) in [
        (GgmlDType::F16, 1e-2, 1e-3),
        (GgmlDType::Q8_0, 0.3, 0.12),
        (GgmlDType::Q4_0, 2.0, 0.12),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        gguf::write(&path, &metadata("llama"), &tiny_tensors(q)).unwrap();
        let load = |mode| {
            CausalLm::load(
                &path,
                LoadOptions {
                    quant: mode,
                    ..Default::default()
                },
            )
            .unwrap()
            .model
        };
        let (keep, deq) = (load(QuantMode::Keep), load(QuantMode::Dequantize));
        let e = max_err_where_masked(
            &deq.forward(ids, Some(&mask), None).unwrap(),
            &case["logits"],
            &mask,
        );
        // One decode step (a single activation row) through each path.
        let prompt = ids.narrow(0, 0, 1).unwrap().narrow(1, 0, 6).unwrap();
        let step = |m: &CausalLm| {
            let mut cache = fedllm_model::KvCache::new();
            m.forward(&prompt, None, Some(&mut cache)).unwrap();
            let next = Tensor::new(&[[7u32]], &Device::Cpu).unwrap();
            m.forward(&next, None, Some(&mut cache))
                .unwrap()
                .flatten_all()
                .unwrap()
        };
        let d = (step(&keep) - step(&deq))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("tiny llama {q:?}: dequantized vs transformers fp32 max|Δ| = {e:.3e}; kept vs dequantized decode step max|Δ| = {d:.3e}");
        assert!(e < bound, "{q:?}: {e}");
        assert!(
            d < decode_bound,
            "{q:?}: kept-quantized decode differs by {d}"
        );
    }
}

/// `QuantMode::Packed` keeps the blocks in memory (what `fedllm eval` loads) and gives
/// `QuantMode::Dequantize`'s numbers bit for bit: prompts of 40 tokens (the GEMM path, past
/// the decode kernels' 32 rows) and then decode steps of 1 and 3 rows (the streaming kernel)
/// on every decode path, with the f32 cache the dequantized model keeps.
#[test]
fn packed_weights_give_the_dequantized_numbers_bit_for_bit() {
    use fedllm_model::{qmatvec, KvCache};
    for q in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        gguf::write(&path, &metadata("llama"), &tiny_tensors(q)).unwrap();
        let load = |mode| {
            let opts = LoadOptions {
                quant: mode,
                ..Default::default()
            };
            CausalLm::load(&path, opts).unwrap().model
        };
        let (packed, deq) = (load(QuantMode::Packed), load(QuantMode::Dequantize));
        // 8.5 bits a value at most against 32: the blocks stayed packed.
        assert!(packed.weight_bytes() * 3 < deq.weight_bytes(), "{q:?}");
        assert_eq!(packed.kv_dtype(), DType::F32);
        let ids: Vec<u32> = (0..3 * 40).map(|i| (i * 37 + 11) % 512).collect();
        let logits = |m: &CausalLm, rows: usize| -> Vec<Vec<f32>> {
            let prompt = Tensor::from_vec(ids[..rows * 40].to_vec(), (rows, 40), &Device::Cpu);
            let mut cache = KvCache::new();
            let mut out = vec![m.forward(&prompt.unwrap(), None, Some(&mut cache)).unwrap()];
            for step in 0..2u32 {
                let next: Vec<u32> = (0..rows as u32).map(|r| 5 + 7 * r + step).collect();
                let next = Tensor::from_vec(next, (rows, 1), &Device::Cpu).unwrap();
                out.push(m.forward(&next, None, Some(&mut cache)).unwrap());
            }
            out.iter()
                .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
                .collect()
        };
        for p in qmatvec::available() {
            for rows in [1, 3] {
                let (got, want) =
                    qmatvec::with_path(p, || (logits(&packed, rows), logits(&deq, rows)));
                assert_eq!(got, want, "{q:?} {p:?} batch {rows}");
            }
        }
    }
}

fn load_err(path: &Path) -> ModelError {
    CausalLm::load(path, LoadOptions::default())
        .err()
        .expect("load must fail")
}

#[test]
fn truncated_gguf_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    gguf::write(&path, &metadata("llama"), &tiny_tensors(GgmlDType::F32)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for cut in [3, 20, 200, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let e = load_err(&path).to_string();
        assert!(
            e.contains("tiny.gguf") && (e.contains("truncated") || e.contains("not a GGUF")),
            "cut {cut}: {e}"
        );
    }
}

#[test]
fn unsupported_quant_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iq.gguf");
    let mut tensors = tiny_tensors(GgmlDType::F32);
    let t = tensors
        .iter_mut()
        .find(|t| t.0 == "blk.0.attn_q.weight")
        .unwrap();
    t.1 = 16; // IQ2_XXS
    gguf::write(&path, &metadata("llama"), &tensors).unwrap();
    let e = load_err(&path).to_string();
    assert!(
        e.contains("IQ2_XXS") && e.contains("blk.0.attn_q.weight") && e.contains("iq.gguf"),
        "{e}"
    );
}

#[test]
fn unknown_gguf_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    gguf::write(&path, &metadata("mamba"), &tiny_tensors(GgmlDType::F32)).unwrap();
    let e = load_err(&path).to_string();
    assert!(e.contains("mamba") && e.contains("m.gguf"), "{e}");
}

/// The tokenizer metadata we write is what llama.cpp's own converter wrote: SmolLM2's GGUF
/// tokenizer read and written back gives the file's `tokenizer.ggml.*` keys value for value
/// (tokens, types, merges, pre-tokenizer name, special ids, chat template).
#[test]
fn smollm2_tokenizer_metadata_round_trips() {
    let path = fedllm_testing::smollm2().expect("SmolLM2 GGUF");
    let f = gguf::GgufFile::open(&path).unwrap();
    let tok = fedllm_model::Tokenizer::from_gguf(&f).unwrap();
    let written = tok.gguf_metadata().unwrap();
    for (k, v) in &written {
        // add_bos_token absent in the file means false, which is what we write.
        match f.meta(k) {
            Some(want) => assert!(want == v || equal_ints(want, v), "{k} differs"),
            None => assert_eq!(
                (k.as_str(), v),
                ("tokenizer.ggml.add_bos_token", &Value::Bool(false))
            ),
        }
    }
    let keys: Vec<&str> = written.iter().map(|(k, _)| k.as_str()).collect();
    for k in [
        "tokens",
        "token_type",
        "merges",
        "pre",
        "bos_token_id",
        "eos_token_id",
    ] {
        assert!(
            keys.contains(&format!("tokenizer.ggml.{k}").as_str()),
            "{k} not written"
        );
    }
}

/// The same integers stored in different widths (the converter writes i32 token types, u32 ids).
fn equal_ints(a: &Value, b: &Value) -> bool {
    match (a.as_array(), b.as_array()) {
        (Some(x), Some(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| equal_ints(p, q)),
        _ => a.as_u64().is_some() && a.as_u64() == b.as_u64(),
    }
}

/// A Hugging Face LLaMA written as GGUF with our config and tokenizer metadata loads back as the
/// same model: the config read from the keys equals config.json's (rms eps through f32), the
/// logits equal transformers' (as the f32 GGUF test above), and the tokenizer rebuilt from the
/// GGUF encodes the golden texts to transformers' ids.
#[test]
fn hf_config_and_tokenizer_written_to_gguf_load_back() {
    let loaded = CausalLm::load(&golden(), LoadOptions::default()).unwrap();
    let c = loaded.model.config.as_llama().unwrap().clone();
    let mut meta = fedllm_model::model::llama_gguf_metadata(&c).unwrap();
    meta.extend(loaded.tokenizer.as_ref().unwrap().gguf_metadata().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    gguf::write(&path, &meta, &tiny_tensors(GgmlDType::F32)).unwrap();
    let opts = LoadOptions {
        quant: QuantMode::Dequantize,
        ..Default::default()
    };
    let back = CausalLm::load(&path, opts).unwrap();
    let b = back.model.config.as_llama().unwrap();
    assert!((b.rms_norm_eps - c.rms_norm_eps).abs() <= c.rms_norm_eps * f32::EPSILON as f64);
    let same = fedllm_model::config::LlamaConfig {
        rms_norm_eps: c.rms_norm_eps,
        ..b.clone()
    };
    assert_eq!(same, c);
    let (case, mask) = golden_forward();
    let got = back
        .model
        .forward(&case["input_ids"], Some(&mask), None)
        .unwrap();
    let err = max_err_where_masked(&got, &case["logits"], &mask);
    assert!(err < 1e-4, "logits differ by {err}");
    let tok = back.tokenizer.unwrap();
    let enc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fedllm_testing::golden_dir().join("tokenizer/encodings.json"))
            .unwrap(),
    )
    .unwrap();
    for case in enc.as_array().unwrap() {
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
    }
}
