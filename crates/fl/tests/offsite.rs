//! Offsite tuning (FedOT): FS-LLM's layer split and drop, the KD loss, alignment, plug-in
//! evaluation, the privacy property, resume; on deeper copies of the tiny golden models.

mod common;

use std::collections::BTreeSet;

use candle_core::{Device, Tensor, Var};
use fedllm_fl::config::OffsiteCfg;
use fedllm_fl::offsite::{self, align::kd_loss, kept, Layout};
use fedllm_fl::Simulation;
use fedllm_model::{CausalLm, LoadOptions};
use fedllm_train::finetune::eval_batches;

/// FS-LLM's kept middle layers, from its formula run in Python 3 (`round` is half-to-even):
/// l = max(emu_l, 1), r = min(emu_r, L − 1), n = r − l, k = round(n·(1 − drop)),
/// kept = [l + int(i·(n − 1)/(k − 1)) for i in range(k)].
#[test]
fn kept_layers_equal_fs_llms_formula() {
    type Case = ((usize, usize, usize, f64), Vec<usize>);
    let cases: [Case; 7] = [
        (
            (32, 2, 30, 0.2),
            vec![
                2, 3, 4, 5, 7, 8, 9, 11, 12, 13, 14, 16, 17, 18, 20, 21, 22, 23, 25, 26, 27, 29,
            ],
        ),
        (
            (30, 2, 28, 0.2),
            vec![
                2, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14, 15, 17, 18, 19, 20, 22, 23, 24, 25, 27,
            ],
        ),
        (
            (30, 2, 28, 0.5),
            vec![2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 27],
        ),
        ((12, 1, 10, 0.5), vec![1, 3, 6, 9]),
        ((6, 1, 5, 0.5), vec![1, 4]),
        ((24, 3, 21, 0.75), vec![3, 8, 14, 20]),
        ((10, 1, 9, 0.3), vec![1, 2, 3, 5, 6, 8]),
    ];
    for ((layers, l, r, drop), want) in cases {
        let cfg = OffsiteCfg {
            emu_l: l,
            emu_r: r,
            drop_ratio: drop,
            ..Default::default()
        };
        let lay = Layout::new(layers, &cfg).unwrap();
        assert_eq!(
            lay.kept, want,
            "{layers} layers, emu_l {l}, emu_r {r}, drop {drop}"
        );
        let (l, r) = (l.max(1), r.min(layers - 1));
        assert_eq!(lay.edges, (0..l).chain(r..layers).collect::<Vec<_>>());
        assert_eq!(lay.middle, (l..r).collect::<Vec<_>>());
    }
    // Clamping: emu_l 0 becomes 1, emu_r past the end becomes L − 1.
    let cfg = OffsiteCfg {
        emu_l: 0,
        emu_r: 99,
        drop_ratio: 0.0,
        ..Default::default()
    };
    assert_eq!(Layout::new(6, &cfg).unwrap().edges, vec![0, 5]);
    assert_eq!(kept(4, 0.0), vec![0, 1, 2, 3]);
    assert!(
        Layout::new(2, &cfg).is_err(),
        "a 2-layer model has no middle"
    );
}

/// The KD loss equals its formula computed by hand, and its gradient with respect to the
/// student equals central finite differences (f64, step 1e-5: truncation O(h²) ≈ 1e-10 and
/// rounding ≈ 1e-16/h ≈ 1e-11, so 1e-7 relative leaves a wide margin).
#[test]
fn kd_loss_value_and_gradient() {
    let dev = Device::Cpu;
    let t = fedllm_testing::randn(1, 0.0, 1.0, (2, 3, 4), &dev)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let s0 = fedllm_testing::randn(2, 0.0, 1.0, (2, 3, 4), &dev)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let mask = Tensor::new(&[[1f64, 1., 0.], [1., 1., 1.]], &dev).unwrap();
    let tv: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
    let m: Vec<f64> = mask.flatten_all().unwrap().to_vec1().unwrap();
    let hand = |sv: &[f64]| -> f64 {
        let (mut tt, mut dd, mut n) = (0.0, 0.0, 0.0);
        for i in 0..tv.len() {
            let w = m[i / 4];
            tt += w * tv[i] * tv[i];
            dd += w * (tv[i] - sv[i]).powi(2);
            n += w;
        }
        (dd / n) / (tt / n)
    };
    let sv: Vec<f64> = s0.flatten_all().unwrap().to_vec1().unwrap();
    let s = Var::from_tensor(&s0).unwrap();
    let loss = kd_loss(&t, s.as_tensor(), &mask).unwrap();
    let got = loss.to_scalar::<f64>().unwrap();
    assert!(
        (got - hand(&sv)).abs() <= 1e-12 * hand(&sv),
        "{got} vs {}",
        hand(&sv)
    );
    let g = loss.backward().unwrap();
    let grad: Vec<f64> = g
        .get(s.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let h = 1e-5;
    for i in 0..sv.len() {
        let mut p = sv.clone();
        p[i] += h;
        let mut q = sv.clone();
        q[i] -= h;
        let fd = (hand(&p) - hand(&q)) / (2.0 * h);
        assert!(
            (grad[i] - fd).abs() <= 1e-7 * (1.0 + fd.abs()),
            "coordinate {i}: {} vs {fd}",
            grad[i]
        );
    }
    // Padding positions carry no gradient.
    assert!(grad[8..12].iter().all(|&x| x == 0.0));
}

fn offsite_run(
    dir: &std::path::Path,
    model: &std::path::Path,
    data: &std::path::Path,
    extra: &[&str],
) -> fedllm_fl::RunConfig {
    let mut o: Vec<String> = vec![
        format!("model.path={}", model.display()),
        "adapter.type=full".into(),
        "adapter.dropout=0".into(),
        "offsite.enabled=true".into(),
        "offsite.emu_l=1".into(),
        "offsite.emu_r=5".into(),
        "offsite.drop_ratio=0.5".into(),
        "train.lr=0.001".into(),
        "federate.total_round_num=1".into(),
        "eval.freq=1".into(),
        "data.splits=[0.8,0.1,0.1]".into(),
    ];
    o.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = o.iter().map(String::as_str).collect();
    common::config(dir, data, &refs)
}

/// Plug-in evaluation is the full model with the global edge tensors put in by hand: the same
/// loss up to f32 summation order (identical tensors and kernels; 1e-5 relative is generous).
#[test]
fn plugin_loss_equals_a_full_model_assembled_by_hand() {
    for golden in ["llama-tiny", "gpt2-tiny"] {
        let dir = tempfile::tempdir().unwrap();
        let model = common::deep_model(dir.path(), golden, 6);
        let data = common::data(dir.path(), 60);
        let cfg = offsite_run(dir.path(), &model, &data, &[]);
        let mut sim = Simulation::new(cfg).unwrap();
        assert_eq!(
            sim.model.layer_ids(),
            vec![0, 1, 4, 5],
            "{golden}: emulator layers"
        );
        let s = sim.run(false, None, |_| {}).unwrap();
        let rec = s.records.last().unwrap();
        let plug = rec.plugin_test_loss.unwrap();

        let mut full = CausalLm::load(&model, LoadOptions::default())
            .unwrap()
            .model;
        let new = sim
            .server
            .global
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        full.replace_weights(&new).unwrap();
        let b = eval_batches(&sim.server_test, sim.cfg.eval.batch_size, 3, &full.device).unwrap();
        let (mut sum, mut n) = (0.0, 0usize);
        for batch in &b {
            let h = full
                .forward_hidden(&batch.input_ids, Some(&batch.mask), None)
                .unwrap();
            let (l, c) = full.loss_from_hidden(&h, &batch.labels).unwrap();
            sum += l.to_scalar::<f32>().unwrap() as f64 * c as f64;
            n += c;
        }
        let hand = sum / n as f64;
        assert!(
            (plug - hand).abs() <= 1e-5 * hand,
            "{golden}: plug-in {plug} vs by hand {hand}"
        );
        // The emulator is a different model: its loss is not the plug-in's.
        assert!(
            (rec.server_test_loss.unwrap() - plug).abs() > 1e-6,
            "{golden}"
        );
        // Only edge layers (and embeddings, final norm, head) were trained and sent.
        let lay = Layout::new(6, &sim.cfg.offsite).unwrap();
        for name in sim.server.global.keys() {
            let l = fedllm_peft::full::layer_of(name);
            assert!(
                l.is_none_or(|l| lay.edges.contains(&l)),
                "{golden}: {name} travels"
            );
        }
    }
}

/// Every tensor a client holds or receives (the emulator it trains on and every parameter set
/// the server sends) is hashed and compared with the full model's middle layers: the dropped
/// layers never reach a client, and after alignment no middle tensor does.
#[test]
fn no_client_receives_the_full_models_middle() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::deep_model(dir.path(), "llama-tiny", 6);
    let data = common::data(dir.path(), 60);
    let full = CausalLm::load(&model, LoadOptions::default())
        .unwrap()
        .model;
    let lay = Layout::new(6, &offsite_run(dir.path(), &model, &data, &[]).offsite).unwrap();
    let middle = offsite::middle_hashes(&full, &lay).unwrap();
    let dropped: BTreeSet<&String> = middle
        .keys()
        .filter(|n| !lay.kept.contains(&fedllm_peft::full::layer_of(n).unwrap()))
        .collect();
    assert!(!dropped.is_empty());
    for (name, aligned) in [("plain", false), ("aligned", true)] {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let align_data = format!("offsite.align_data={}", data.display());
        let mut extra = vec!["federate.total_round_num=2"];
        if aligned {
            extra.extend([
                "offsite.align_steps=3",
                "offsite.align_lr=0.01",
                &align_data,
            ]);
        }
        let mut sim = Simulation::new(offsite_run(&sub, &model, &data, &extra)).unwrap();
        let mut received: Vec<(String, String)> = Vec::new();
        let hash_all = |sim: &Simulation, received: &mut Vec<(String, String)>| {
            for (n, w) in sim.model.named_weights() {
                let t = w.dequantize(candle_core::DType::F32).unwrap();
                received.push((n, offsite::tensor_hash(&t).unwrap()));
            }
            for (n, t) in sim.server.shared().iter() {
                received.push((n.clone(), offsite::tensor_hash(t).unwrap()));
            }
        };
        hash_all(&sim, &mut received);
        sim.run(false, Some(1), |_| {}).unwrap();
        hash_all(&sim, &mut received);
        sim.run(false, None, |_| {}).unwrap();
        let leaked: Vec<&String> = middle
            .iter()
            .filter(|(_, h)| received.iter().any(|(_, r)| r == *h))
            .map(|(n, _)| n)
            .collect();
        assert!(
            leaked.iter().all(|n| !dropped.contains(n)),
            "{name}: dropped layers reached a client: {leaked:?}"
        );
        if aligned {
            assert!(
                leaked.is_empty(),
                "{name}: middle tensors reached a client: {leaked:?}"
            );
        } else {
            // Without alignment the kept layers are the full model's own (FS-LLM's emulator).
            assert!(!leaked.is_empty());
        }
    }
}

/// Alignment lowers the KD loss on held-out data; the saved emulator restores exactly and a
/// run told to stop after alignment runs no round.
#[test]
fn alignment_lowers_held_out_kd_and_the_emulator_restores() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::deep_model(dir.path(), "llama-tiny", 6);
    let data = common::data(dir.path(), 80);
    let align_data = format!("offsite.align_data={}", data.display());
    let cfg = offsite_run(
        dir.path(),
        &model,
        &data,
        &[
            "offsite.align_steps=30",
            "offsite.align_lr=0.003",
            "offsite.align_held_out=0.25",
            "offsite.stop_after_align=true",
            &align_data,
        ],
    );
    let out = cfg.outdir.clone();
    let mut sim = Simulation::new(cfg).unwrap();
    let s = sim.run(false, None, |_| {}).unwrap();
    assert!(s.records.is_empty(), "no round after alignment");
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("align.json")).unwrap()).unwrap();
    let (before, after) = (
        rep["kd_before"].as_f64().unwrap(),
        rep["kd_after"].as_f64().unwrap(),
    );
    assert!(after < 0.9 * before, "held-out KD {before} → {after}");

    let bits = |m: &CausalLm| -> Vec<(String, String)> {
        m.named_weights()
            .into_iter()
            .map(|(n, w)| {
                let h =
                    offsite::tensor_hash(&w.dequantize(candle_core::DType::F32).unwrap()).unwrap();
                (n, h)
            })
            .collect()
    };
    let emu = format!(
        "offsite.emulator={}",
        out.join("emulator.safetensors").display()
    );
    let dir2 = dir.path().join("again");
    std::fs::create_dir_all(&dir2).unwrap();
    let again = Simulation::new(offsite_run(&dir2, &model, &data, &[&emu])).unwrap();
    assert_eq!(bits(&again.model), bits(&sim.model));
    // A saved emulator of another layout is refused with a message naming the file.
    let dir3 = dir.path().join("other");
    std::fs::create_dir_all(&dir3).unwrap();
    let e = Simulation::new(offsite_run(
        &dir3,
        &model,
        &data,
        &[&emu, "offsite.drop_ratio=0.0"],
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("emulator.safetensors") && e.contains("layout"),
        "{e}"
    );
}

/// A run stopped after round 1 and resumed ends bit-identical to one run straight (the aligned
/// emulator is reloaded from the run folder, not aligned again).
#[test]
fn offsite_resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::deep_model(dir.path(), "gpt2-tiny", 6);
    let data = common::data(dir.path(), 60);
    let copy = dir.path().join("align.jsonl");
    std::fs::copy(&data, &copy).unwrap();
    let align_data = format!("offsite.align_data={}", copy.display());
    let extra = [
        "federate.total_round_num=2",
        "eval.freq=0",
        "offsite.align_steps=2",
        &align_data,
    ];
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let mut straight = Simulation::new(offsite_run(&a, &model, &data, &extra)).unwrap();
    straight.run(false, None, |_| {}).unwrap();
    let cfg = offsite_run(&b, &model, &data, &extra);
    let out = cfg.outdir.clone();
    Simulation::new(cfg)
        .unwrap()
        .run(false, Some(1), |_| {})
        .unwrap();
    // Aligning again would need this file.
    std::fs::remove_file(&copy).unwrap();
    let mut resumed = Simulation::resume(&out, &[]).unwrap();
    resumed.run(false, None, |_| {}).unwrap();
    assert_eq!(
        common::bits(&straight.server.global),
        common::bits(&resumed.server.global)
    );
}

/// Bad offsite settings are config errors naming the key.
#[test]
fn offsite_config_errors() {
    let e = |o: &[&str]| -> String {
        let mut v: Vec<String> = vec!["offsite.enabled=true".into()];
        v.extend(o.iter().map(|s| s.to_string()));
        fedllm_fl::RunConfig::from_yaml("", &v)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(e(&["adapter.type=prompt"]).contains("adapter.type must be full or lora"));
    assert!(e(&["offsite.drop_ratio=1.0"]).contains("offsite.drop_ratio"));
    assert!(e(&["offsite.emu_l=5", "offsite.emu_r=3"]).contains("offsite.emu_l"));
    assert!(e(&["offsite.align_steps=5"]).contains("offsite.align_data"));
    assert!(e(&["personal.method=ditto"]).contains("personal.method"));
}

/// With `offsite.emulator_quant` a standalone run writes the emulator file clients would get
/// and trains on it: a Hugging Face folder listing its layers, the middle in f16, the edges
/// exact; the plug-in model is still the full one.
#[test]
fn a_compressed_emulator_folder_is_what_clients_train_on() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::deep_model(dir.path(), "llama-tiny", 6);
    let data = common::data(dir.path(), 60);
    let cfg = offsite_run(dir.path(), &model, &data, &["offsite.emulator_quant=f16"]);
    let out = cfg.outdir.clone();
    let mut sim = Simulation::new(cfg).unwrap();
    let emu = out.join("emulator");
    let loaded = CausalLm::load(&emu, LoadOptions::default()).unwrap().model;
    assert_eq!(loaded.layer_ids(), vec![0, 1, 4, 5]);
    let full = CausalLm::load(&model, LoadOptions::default())
        .unwrap()
        .model;
    let weights = |m: &CausalLm| -> std::collections::BTreeMap<String, Tensor> {
        m.named_weights()
            .into_iter()
            .map(|(n, w)| (n, w.dequantize(candle_core::DType::F32).unwrap()))
            .collect()
    };
    let (f, e, s) = (weights(&full), weights(&loaded), weights(&sim.model));
    for (n, t) in &e {
        let want = &f[n];
        let d = fedllm_testing::max_abs_diff(t, want).unwrap();
        match fedllm_peft::full::layer_of(n) {
            // f16 keeps 11 significant bits: relative error at most 2^-11 of the largest value.
            Some(1 | 4) => {
                let m = want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(d <= m * 2f32.powi(-11), "{n}: {d}");
            }
            _ => assert_eq!(d, 0.0, "{n}: edges and embeddings travel exact"),
        }
        assert_eq!(
            fedllm_testing::max_abs_diff(t, &s[n]).unwrap(),
            0.0,
            "{n}: trained on the file"
        );
    }
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("offsite.json")).unwrap()).unwrap();
    assert!(rep["emulator_bytes"].as_u64().unwrap() > 0);
    let s = sim.run(false, None, |_| {}).unwrap();
    assert!(s.records.last().unwrap().plugin_test_loss.is_some());
}

/// On the real SmolLM2 GGUF (30 layers; FS-LLM-style emu_l 2, emu_r 28, drop 0.5) the emulator
/// file keeps the tokenizer and the edges in f32, stores the kept middle as Q8_0 blocks, lists
/// its 17 layers, and loads back into a model of exactly those layers.
#[test]
fn smollm2_emulator_gguf_in_q8_0() {
    let Some(model) = fedllm_testing::smollm2() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = common::data(dir.path(), 30);
    let cfg = offsite_run(
        dir.path(),
        &model,
        &data,
        &[
            "offsite.emu_l=2",
            "offsite.emu_r=28",
            "offsite.emulator_quant=q8_0",
            "adapter.type=lora",
            "model.quant=dequantize",
            "federate.total_round_num=1",
            "train.local_update_steps=1",
            "train.batch_size=1",
            "eval.max_samples=2",
        ],
    );
    let out = cfg.outdir.clone();
    let sim = Simulation::new(cfg).unwrap();
    let lay = Layout::new(30, &sim.cfg.offsite).unwrap();
    assert_eq!(
        lay.kept,
        vec![2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 27]
    );
    let f = fedllm_model::gguf::GgufFile::open(&out.join("emulator.gguf")).unwrap();
    assert!(f.meta("tokenizer.ggml.model").is_some());
    let layers: Vec<u64> = f
        .meta("fedllm.emulator.layers")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        layers,
        lay.emulator_layers()
            .iter()
            .map(|&l| l as u64)
            .collect::<Vec<_>>()
    );
    assert_eq!(f.info("blk.4.ffn_up.weight").unwrap().ggml_type, 8, "Q8_0");
    assert_eq!(
        f.info("blk.0.ffn_up.weight").unwrap().ggml_type,
        0,
        "F32 edge"
    );
    assert!(
        f.info("blk.5.ffn_up.weight").is_err(),
        "dropped layer absent"
    );
    assert_eq!(sim.model.layer_ids(), lay.emulator_layers());
    // LoRA sits on the edge layers only.
    assert!(sim
        .server
        .global
        .keys()
        .all(|n| { fedllm_peft::full::layer_of(n).is_some_and(|l| lay.edges.contains(&l)) }));
}
