//! Trainer behaviour on the tiny golden models: finite-difference gradients of every adapter on
//! both architectures, exact gradient accumulation, bf16 mixed precision, NaN skipping, and the
//! quantized frozen base.

use fedllm_testing::max_abs_diff;
use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use fedllm_model::{Batch, CausalLm, LoadOptions, QuantMode};
use fedllm_peft::full::FullConfig;
use fedllm_peft::lora::LoraConfig;
use fedllm_peft::prefix::PrefixConfig;
use fedllm_peft::prompt::PromptConfig;
use fedllm_peft::ptuning::PtuningConfig;
use fedllm_peft::{Adapter, AdapterConfig};
use fedllm_rng::Rng;
use fedllm_train::{OptimizerConfig, TrainConfig, Trainer};

fn golden(name: &str) -> PathBuf {
    fedllm_testing::golden_dir().join(name)
}

fn batch(seed: u64, b: usize, t: usize, vocab: u32, device: &Device) -> Batch {
    let mut rng = Rng::new(seed);
    let ids: Vec<u32> = (0..b * t)
        .map(|_| 4 + (rng.next_u64() % (vocab as u64 - 4)) as u32)
        .collect();
    // Right-padded rows of different lengths; loss on the second half of each row.
    let lens: Vec<usize> = (0..b).map(|i| t - (i % 3)).collect();
    let mut labels = Vec::new();
    let mut mask = Vec::new();
    for (i, &l) in lens.iter().enumerate() {
        for j in 0..t {
            labels.push(if j >= t / 2 && j < l {
                ids[i * t + j] as i64
            } else {
                -100
            });
        }
        mask.push((0..t).map(|j| (j < l) as u8).collect());
    }
    Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device).unwrap(),
        mask,
        labels: Tensor::from_vec(labels, (b, t), device).unwrap(),
    }
}

/// Non-zero LoRA B so every gradient is non-trivial.
fn randomize(a: &Adapter, seed: u64) {
    let mut rng = Rng::new(seed);
    let t: BTreeMap<String, Tensor> = a
        .params
        .iter()
        .map(|(n, v)| {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| (rng.normal() * 0.3) as f32)
                .collect();
            (
                n.clone(),
                Tensor::from_vec(vals, v.dims(), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    a.set_tensors(&t).unwrap();
}

fn configs() -> Vec<AdapterConfig> {
    vec![
        AdapterConfig::Lora(LoraConfig::new(
            2,
            4.0,
            &["c_attn", "q_proj", "v_proj", "mlp.c_fc", "down_proj"],
        )),
        AdapterConfig::Prefix(PrefixConfig {
            num_virtual_tokens: 3,
            prefix_projection: false,
            encoder_hidden_size: None,
        }),
        AdapterConfig::Prefix(PrefixConfig {
            num_virtual_tokens: 2,
            prefix_projection: true,
            encoder_hidden_size: Some(8),
        }),
        AdapterConfig::Prompt(PromptConfig {
            num_virtual_tokens: 3,
            init_text: None,
        }),
        AdapterConfig::Ptuning(PtuningConfig {
            num_virtual_tokens: 3,
            encoder_hidden_size: 8,
        }),
        AdapterConfig::Full(FullConfig {
            patterns: vec![
                "*ln_1*".into(),
                "*input_layernorm*".into(),
                "*c_proj.weight".into(),
                "*o_proj*".into(),
            ],
            layers: Some(vec![1]),
            non_layer: false,
        }),
    ]
}

/// Analytic gradients against central differences (f64 model, so the differences are exact enough).
#[test]
fn adapter_gradients_match_finite_differences() {
    for m in ["gpt2-tiny", "llama-tiny"] {
        let mut model = CausalLm::load(
            &golden(m),
            LoadOptions {
                dtype: DType::F64,
                ..Default::default()
            },
        )
        .unwrap()
        .model;
        let b = batch(1, 3, 10, 500, &Device::Cpu);
        for cfg in configs() {
            let a = Adapter::init(&model, cfg.clone(), 3, None).unwrap();
            if !matches!(cfg, AdapterConfig::Full(_)) {
                randomize(&a, 9);
            }
            a.attach(&mut model, true).unwrap();
            let tr = Trainer::new(TrainConfig::default()).unwrap();
            let (_, grads, _) = tr.gradients(&model, &a, std::slice::from_ref(&b)).unwrap();
            assert_eq!(grads.len(), a.params.len(), "{m} {cfg:?}");
            let mut rng = Rng::new(5);
            for (name, var) in &a.params {
                let g: Vec<f32> = grads[name].flatten_all().unwrap().to_vec1().unwrap();
                let orig: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                for _ in 0..2 {
                    let i = (rng.next_u64() % orig.len() as u64) as usize;
                    let h = 1e-3f32;
                    let mut loss_at = |d: f32| {
                        let mut v = orig.clone();
                        v[i] += d;
                        var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                            .unwrap();
                        if matches!(cfg, AdapterConfig::Full(_)) {
                            a.attach(&mut model, true).unwrap();
                        }
                        a.loss(&model, &b)
                            .unwrap()
                            .0
                            .to_dtype(DType::F64)
                            .unwrap()
                            .to_scalar::<f64>()
                            .unwrap()
                    };
                    let fd = (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
                    loss_at(0.0);
                    let an = g[i] as f64;
                    assert!(
                        (fd - an).abs() <= 2e-3 * (1.0 + fd.abs()),
                        "{m} {} {name}[{i}]: fd {fd} vs backward {an}",
                        cfg.name()
                    );
                }
            }
            Adapter::detach(&mut model);
            println!(
                "{m} {}: {} tensors, gradients match finite differences",
                cfg.name(),
                a.params.len()
            );
        }
    }
}

/// k micro-batches with accumulation give the big batch's gradient and the same update.
#[test]
fn gradient_accumulation_equals_big_batch() {
    let dir = golden("llama-tiny");
    let mut model = CausalLm::load(&dir, LoadOptions::default()).unwrap().model;
    let a = Adapter::init(
        &model,
        AdapterConfig::Lora(LoraConfig::new(4, 8.0, &["q_proj", "v_proj"])),
        1,
        None,
    )
    .unwrap();
    randomize(&a, 2);
    a.attach(&mut model, true).unwrap();
    let big = batch(7, 6, 12, 500, &Device::Cpu);
    let split = |lo: usize, n: usize| Batch {
        input_ids: big.input_ids.narrow(0, lo, n).unwrap(),
        mask: big.mask[lo..lo + n].to_vec(),
        labels: big.labels.narrow(0, lo, n).unwrap(),
    };
    // Uneven micro-batches: token weighting must still make them equal to the big batch.
    let micro = vec![split(0, 1), split(1, 3), split(4, 2)];
    let tr = Trainer::new(TrainConfig::default()).unwrap();
    let (l1, g1, _) = tr
        .gradients(&model, &a, std::slice::from_ref(&big))
        .unwrap();
    let (l2, g2, _) = tr.gradients(&model, &a, &micro).unwrap();
    assert!((l1 - l2).abs() < 1e-5, "{l1} vs {l2}");
    for (n, g) in &g1 {
        let d = max_abs_diff(g, &g2[n]).unwrap();
        assert!(d < 1e-6, "{n}: {d}");
    }
}

/// bf16 compute with fp32 master weights trains without NaN and lowers the loss.
#[test]
fn mixed_precision_trains() {
    let dir = golden("llama-tiny");
    let mut model = CausalLm::load(
        &dir,
        LoadOptions {
            dtype: DType::BF16,
            ..Default::default()
        },
    )
    .unwrap()
    .model;
    let a = Adapter::init(
        &model,
        AdapterConfig::Lora(LoraConfig::new(8, 16.0, &["q_proj", "v_proj", "up_proj"])),
        1,
        None,
    )
    .unwrap();
    a.attach(&mut model, true).unwrap();
    assert!(a.params.values().all(|v| v.dtype() == DType::F32));
    let cfg = TrainConfig {
        lr: 1e-2,
        optimizer: OptimizerConfig::adamw(0.0),
        max_grad_norm: Some(1.0),
        ..Default::default()
    };
    let mut tr = Trainer::new(cfg).unwrap();
    let b = batch(3, 4, 16, 500, &Device::Cpu);
    let first = tr.train_step(&model, &a, std::slice::from_ref(&b)).unwrap();
    let mut last = first.clone();
    for _ in 0..15 {
        last = tr.train_step(&model, &a, std::slice::from_ref(&b)).unwrap();
        assert!(last.loss.is_finite() && !last.skipped);
    }
    println!("bf16: loss {:.4} → {:.4}", first.loss, last.loss);
    assert!(
        last.loss < first.loss - 0.5,
        "{} → {}",
        first.loss,
        last.loss
    );
    assert_eq!(tr.nan_skipped, 0);
}

/// A non-finite loss skips the step, leaves the adapter unchanged and is counted. One tensor is
/// poisoned with a NaN (so the loss is NaN); every other tensor must keep its exact values — an
/// applied step would have moved them (AdamW with NaN gradients writes NaN everywhere).
#[test]
fn nan_loss_is_skipped_and_counted() {
    let dir = golden("llama-tiny");
    let mut model = CausalLm::load(&dir, LoadOptions::default()).unwrap().model;
    let a = Adapter::init(
        &model,
        AdapterConfig::Lora(LoraConfig::new(2, 4.0, &["q_proj"])),
        1,
        None,
    )
    .unwrap();
    // Copies: a Var cannot be set from a view of its own storage.
    let mut tensors: BTreeMap<String, Tensor> = a
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.copy().unwrap()))
        .collect();
    let poisoned = tensors
        .keys()
        .find(|n| n.contains("layers.0.") && n.contains("lora_B"))
        .unwrap()
        .clone();
    let t = &tensors[&poisoned];
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v[0] = f32::NAN;
    let nan = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
    tensors.insert(poisoned.clone(), nan);
    a.set_tensors(&tensors).unwrap();
    let before: BTreeMap<String, Vec<f32>> = a
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    a.attach(&mut model, true).unwrap();
    let mut tr = Trainer::new(TrainConfig::default()).unwrap();
    let s = tr
        .train_step(&model, &a, &[batch(1, 2, 8, 500, &Device::Cpu)])
        .unwrap();
    assert!(s.skipped && tr.nan_skipped == 1 && tr.step == 0);
    assert!(!s.loss.is_finite(), "the poisoned tensor reached the loss");
    for (n, t) in a.tensors() {
        let after: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let same = after
            .iter()
            .zip(&before[&n])
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{n} changed by a skipped step");
    }
}

/// LoRA on a base kept quantized in memory (Q8_0 / Q4_0 GGUF): gradients reach the adapter, the
/// base stays quantized, and they agree with the dequantized base.
#[test]
fn lora_on_quantized_base() {
    use candle_core::quantized::GgmlDType;
    use fedllm_model::gguf::{self, Value};
    let st = candle_core::safetensors::load(
        golden("llama-tiny").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), Value::U32(2)),
        ("llama.context_length".into(), Value::U32(128)),
        ("llama.embedding_length".into(), Value::U32(64)),
        ("llama.feed_forward_length".into(), Value::U32(160)),
        ("llama.attention.head_count".into(), Value::U32(4)),
        ("llama.attention.head_count_kv".into(), Value::U32(2)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
    ];
    for q in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
        let st: BTreeMap<String, Tensor> = st.clone().into_iter().collect();
        let tensors = fedllm_model::weights::llama_to_gguf(&st, 4, 2, q).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.gguf");
        gguf::write(&path, &meta, &tensors).unwrap();
        let b = batch(2, 2, 12, 500, &Device::Cpu);
        let mut grads = Vec::new();
        for mode in [QuantMode::Keep, QuantMode::Dequantize] {
            let mut model = CausalLm::load(
                &path,
                LoadOptions {
                    quant: mode,
                    ..Default::default()
                },
            )
            .unwrap()
            .model;
            let quantized = model
                .named_weights()
                .iter()
                .filter(|(_, w)| matches!(w, fedllm_model::Weight::Quant(_)))
                .count();
            assert_eq!(quantized > 0, mode == QuantMode::Keep);
            let a = Adapter::init(
                &model,
                AdapterConfig::Lora(LoraConfig::new(4, 8.0, &["q_proj", "v_proj"])),
                1,
                None,
            )
            .unwrap();
            randomize(&a, 4);
            a.attach(&mut model, true).unwrap();
            let tr = Trainer::new(TrainConfig::default()).unwrap();
            let (_, g, _) = tr.gradients(&model, &a, std::slice::from_ref(&b)).unwrap();
            assert_eq!(g.len(), 8);
            grads.push(g);
        }
        for (n, g) in &grads[0] {
            let d = max_abs_diff(g, &grads[1][n]).unwrap();
            let s = g
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                s > 0.0 && d <= 1e-4 * s.max(1.0),
                "{q:?} {n}: {d} vs scale {s}"
            );
        }
        println!("LoRA on {q:?}-quantized base: gradients reach all 8 adapter tensors, equal to the dequantized base");
    }
}

/// Training through the bf16 kernel path lowers the loss as the f32 path does: same batch,
/// same initialisation, 12 AdamW steps each.
#[test]
fn bf16_kernels_train_like_f32() {
    use fedllm_model::MatmulPrecision;
    let run = |p: MatmulPrecision| -> Vec<f64> {
        let mut model = CausalLm::load(&golden("llama-tiny"), LoadOptions::default())
            .unwrap()
            .model;
        model.set_matmul_precision(p);
        let cfg = AdapterConfig::Lora(LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]));
        let a = Adapter::init(&model, cfg, 1, None).unwrap();
        randomize(&a, 3);
        a.attach(&mut model, true).unwrap();
        let mut tr = Trainer::new(TrainConfig {
            lr: 1e-2,
            ..Default::default()
        })
        .unwrap();
        let b = batch(2, 2, 12, 500, &Device::Cpu);
        (0..12)
            .map(|_| {
                tr.train_step(&model, &a, std::slice::from_ref(&b))
                    .unwrap()
                    .loss
            })
            .collect()
    };
    let f32_losses = run(MatmulPrecision::F32);
    // Portable runs the bf16 arithmetic on any machine.
    let bf16_losses = run(MatmulPrecision::Kernel(fedllm_kernels::Isa::Portable));
    let (f0, f1) = (f32_losses[0], *f32_losses.last().unwrap());
    let (b0, b1) = (bf16_losses[0], *bf16_losses.last().unwrap());
    assert!(f1 < 0.9 * f0, "f32 path did not learn: {f32_losses:?}");
    assert!(b1 < 0.9 * b0, "bf16 path did not learn: {bf16_losses:?}");
    assert!(
        ((b1 - f1) / f1).abs() < 0.02,
        "bf16 {bf16_losses:?} vs f32 {f32_losses:?}"
    );
}
