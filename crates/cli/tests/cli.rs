//! The binary end to end: real commands on the golden models, and bad input answered with one
//! line naming the file at fault, a non-zero exit code and no panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fedllm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedllm"))
        .args(args)
        .output()
        .expect("run fedllm")
}

fn golden(name: &str) -> PathBuf {
    fedllm_testing::golden_dir().join(name)
}

/// Fails with exactly one `error:` line on stderr that contains every `needle`.
fn assert_clean_failure(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert_ne!(
        out.status.code(),
        Some(101),
        "exit code 101 means a panic: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` missing from: {stderr}");
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn generate_prints_ids_matching_golden_greedy() {
    let dir = golden("llama-tiny");
    let case =
        candle_core::safetensors::load(dir.join("greedy.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let prompt: Vec<i64> = case["prompt_ids"].flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<i64> = case["output_ids"].flatten_all().unwrap().to_vec1().unwrap();
    let ids: Vec<String> = prompt.iter().map(|i| i.to_string()).collect();
    let n = (want.len() - prompt.len()).to_string();
    let out = fedllm(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &ids.join(","),
        "--max-new-tokens",
        &n,
        "--greedy",
        "--ignore-eos",
        "--print-ids",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Vec<String> = want.iter().map(|i| i.to_string()).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want.join(","));
}

#[test]
fn sampling_is_seeded() {
    let dir = golden("gpt2-tiny");
    let run = |seed: &str| {
        let out = fedllm(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "In the beginning",
            "--temperature",
            "0.9",
            "--top-p",
            "0.95",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--print-ids",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run("1"), run("1"));
    assert_ne!(run("1"), run("2"));
}

#[test]
fn info_describes_the_model() {
    let out = fedllm(&["info", "--model", golden("llama-tiny").to_str().unwrap()]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("architecture: llama")
            && s.contains("vocab:        512")
            && s.contains("context:      128"),
        "{s}"
    );
}

#[test]
fn missing_model_file() {
    let out = fedllm(&[
        "generate",
        "--model",
        "/nonexistent/dir/model.gguf",
        "--prompt",
        "hi",
    ]);
    assert_clean_failure(&out, &["/nonexistent/dir/model.gguf", "no such file"]);
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&golden("llama-tiny"), &dir);
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    for cut in [5, 100, bytes.len() / 2] {
        std::fs::write(&f, &bytes[..cut]).unwrap();
        let out = fedllm(&["info", "--model", dir.to_str().unwrap()]);
        assert_clean_failure(&out, &["model.safetensors"]);
    }
}

#[test]
fn unknown_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&golden("llama-tiny"), &dir);
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"llama\"", "\"mamba\"");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let out = fedllm(&["info", "--model", dir.to_str().unwrap()]);
    assert_clean_failure(&out, &["config.json", "mamba", "unsupported architecture"]);
}

#[test]
fn missing_weight_and_corrupt_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let g = tmp.path().join("junk.gguf");
    std::fs::write(&g, b"GGUF\x03\x00\x00\x00\xff\xff").unwrap();
    assert_clean_failure(
        &fedllm(&["info", "--model", g.to_str().unwrap()]),
        &["junk.gguf", "truncated GGUF"],
    );
    let notgguf = tmp.path().join("x.bin");
    std::fs::write(&notgguf, b"hello").unwrap();
    assert_clean_failure(
        &fedllm(&["info", "--model", notgguf.to_str().unwrap()]),
        &["x.bin", "not a model"],
    );
    // A folder whose safetensors lacks a weight the config asks for.
    let dir = tmp.path().join("m");
    copy_dir(&golden("llama-tiny"), &dir);
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    assert_clean_failure(
        &fedllm(&["info", "--model", dir.to_str().unwrap()]),
        &["model.layers.2"],
    );
}

#[test]
fn bad_arguments() {
    let dir = golden("llama-tiny");
    let out = fedllm(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "1,99999",
    ]);
    assert_clean_failure(&out, &["99999", "vocabulary"]);
    let out = fedllm(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--chat",
    ]);
    assert_clean_failure(&out, &["chat template"]);
}

/// A wrong `FEDLLM_DECODE` stops the binary before any work with one line naming the value
/// (never a silent fall-back to another kernel path).
#[test]
fn an_unknown_decode_path_is_refused() {
    let dir = golden("llama-tiny");
    let out = Command::new(env!("CARGO_BIN_EXE_fedllm"))
        .args(["info", "--model", dir.to_str().unwrap()])
        .env("FEDLLM_DECODE", "sse2")
        .output()
        .unwrap();
    assert_clean_failure(&out, &["FEDLLM_DECODE", "sse2", "vnni"]);
}

/// `bench blocks` measures every decode path the binary reports for this CPU on each of its
/// four shapes at 1 and 8 rows, each a finite positive time, then two prompt products (what
/// it prints, not how fast: speed lives in the benchmark's output, never in a test).
#[test]
fn bench_blocks_measures_every_path() {
    let out = fedllm(&["bench", "blocks", "--reps", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = text.lines().next().unwrap_or_default();
    let list = head.split('[').nth(1).and_then(|s| s.split(']').next());
    let paths: Vec<&str> = list
        .unwrap_or_default()
        .split(',')
        .map(|p| p.trim().trim_matches('"'))
        .filter(|p| !p.is_empty())
        .collect();
    assert!(paths.contains(&"portable"), "{head}");
    let rows: Vec<&str> = text.lines().filter(|l| l.contains("ns/block:")).collect();
    assert_eq!(rows.len(), 8, "{text}");
    for row in rows {
        let cols = row.split("ns/block:").nth(1).unwrap();
        for p in &paths {
            let ns: f64 = cols
                .split(", ")
                .find_map(|c| c.trim().strip_prefix(&format!("{p} ")))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{p} missing from: {row}"));
            assert!(ns.is_finite() && ns > 0.0, "{row}");
        }
    }
    // Then the two prompt products: the Int16 (Int8) path's int16 (int8) GEMM wherever that
    // path runs.
    let prompts: Vec<&str> = text.lines().filter(|l| l.contains("GFLOP/s:")).collect();
    assert_eq!(prompts.len(), 2, "{text}");
    for row in prompts {
        let cols: Vec<(&str, f64)> = row
            .split("GFLOP/s:")
            .nth(1)
            .unwrap()
            .split(", ")
            .filter_map(|c| c.trim().split_once(' '))
            .map(|(p, v)| (p, v.parse().unwrap_or(f64::NAN)))
            .collect();
        assert!(cols.iter().all(|(_, g)| g.is_finite() && *g > 0.0), "{row}");
        for gemm in ["int16", "int8"] {
            let listed = cols.iter().any(|(p, _)| *p == gemm);
            assert_eq!(listed, paths.contains(&gemm), "{gemm}: {row}");
        }
    }
}

/// `generate --adapter` with each adapter type of the golden PEFT folders: the printed ids are
/// the prompt followed by the adapter's own greedy choice at every step (recomputed here from
/// the adapter's full forward); a missing adapter folder is one error line naming it.
#[test]
fn generate_with_every_adapter_type() {
    use candle_core::{Device, Tensor};
    let dir = golden("llama-tiny");
    let prompt = [5u32, 17, 3, 42, 8];
    let ids: Vec<String> = prompt.iter().map(|i| i.to_string()).collect();
    for kind in ["lora_peft", "prefix_peft", "prompt_peft", "ptuning_peft"] {
        let ad_dir = dir.join(kind);
        let out = fedllm(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--adapter",
            ad_dir.to_str().unwrap(),
            "--prompt-ids",
            &ids.join(","),
            "--max-new-tokens",
            "4",
            "--greedy",
            "--ignore-eos",
            "--print-ids",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut model = fedllm_model::CausalLm::load(&dir, Default::default())
            .unwrap()
            .model;
        let ad = fedllm_peft::io::load(&ad_dir, &model).unwrap();
        ad.attach(&mut model, false).unwrap();
        let mut want = prompt.to_vec();
        for _ in 0..4 {
            let x = Tensor::new(want.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let l = ad.logits(&model, &x, None).unwrap();
            let last: Vec<f32> = l
                .get(0)
                .unwrap()
                .get(l.dim(1).unwrap() - 1)
                .unwrap()
                .to_vec1()
                .unwrap();
            let best = (0..last.len())
                .max_by(|&a, &b| last[a].total_cmp(&last[b]))
                .unwrap();
            want.push(best as u32);
        }
        let want: Vec<String> = want.iter().map(|i| i.to_string()).collect();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want.join(","),
            "{kind}"
        );
    }
    let missing = dir.join("no_such_adapter");
    let out = fedllm(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--adapter",
        missing.to_str().unwrap(),
        "--prompt-ids",
        "5,17",
    ]);
    assert_clean_failure(&out, &["no_such_adapter"]);
}

/// `--model ORG/NAME` reads the local Hugging Face cache (`$HF_HOME/hub`, the snapshot that
/// refs/main names, offline) and generates exactly what the folder's path does; an id not in
/// the cache is one error line saying where it looked.
#[test]
fn model_ids_resolve_from_the_hugging_face_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("hub/models--org--tiny-llama");
    copy_dir(&golden("llama-tiny"), &repo.join("snapshots/abc123"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
    let run = |model: &str| {
        Command::new(env!("CARGO_BIN_EXE_fedllm"))
            .env("HF_HOME", tmp.path())
            .env_remove("HF_HUB_CACHE")
            .args([
                "generate",
                "--model",
                model,
                "--prompt-ids",
                "5,17,3",
                "--max-new-tokens",
                "5",
                "--greedy",
                "--ignore-eos",
                "--print-ids",
            ])
            .output()
            .unwrap()
    };
    let by_id = run("org/tiny-llama");
    assert!(
        by_id.status.success(),
        "{}",
        String::from_utf8_lossy(&by_id.stderr)
    );
    let by_path = run(golden("llama-tiny").to_str().unwrap());
    assert_eq!(by_id.stdout, by_path.stdout);
    let missing = run("org/absent");
    assert_clean_failure(
        &missing,
        &["org/absent", "looked in", "models--org--absent"],
    );
}

/// `fedllm chat` with stdin not a terminal: one turn per line in the model's chat template;
/// an answer is what `generate --chat` prints for the same conversation; `/system`, `/save`
/// and `/reset` do what they say; a long conversation keeps its newest turns within the
/// context (128 tokens here), dropping the oldest first.
#[test]
fn chat_session_from_stdin() {
    use std::io::Write as _;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny-chat");
    copy_dir(&golden("llama-tiny"), &model);
    let tpl = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
    std::fs::write(
        model.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": tpl}).to_string(),
    )
    .unwrap();
    let chat = |input: &str, new_tokens: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fedllm"))
            .args([
                "chat",
                "--model",
                model.to_str().unwrap(),
                "--max-new-tokens",
                new_tokens,
            ])
            .current_dir(tmp.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let read = |f: &str| -> Vec<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join(f)).unwrap()).unwrap()
    };
    chat("/system Be brief.\nhello there\n/save s1.json\nagain\n/save s2.json\n/reset\n/save s3.json\n/quit\nnever read\n", "8");
    let s1 = read("s1.json");
    assert_eq!(s1.len(), 3);
    assert_eq!(
        (s1[0]["role"].as_str(), s1[1]["content"].as_str()),
        (Some("system"), Some("hello there"))
    );
    let gen = fedllm(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--system",
        "Be brief.",
        "--prompt",
        "hello there",
        "--max-new-tokens",
        "8",
    ]);
    let want = String::from_utf8_lossy(&gen.stdout).trim().to_string();
    assert_eq!(s1[2]["content"].as_str().unwrap(), want);
    assert_eq!(read("s2.json").len(), 5);
    assert_eq!(
        read("s3.json").len(),
        1,
        "reset keeps the system message only"
    );
    // 100 new tokens leave 28 of the 128-token context for the prompt: old turns must go.
    let turns: String = (0..6).map(|i| format!("turn number {i}\n")).collect();
    chat(&format!("{turns}/save long.json\n"), "100");
    let long = read("long.json");
    let users: Vec<&str> = long
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert!(users.len() < 6, "{users:?}");
    assert_eq!(users.last(), Some(&"turn number 5"));
}

/// `merge --out X.gguf`: a GGUF base (the tiny golden LLaMA written as llama.cpp lays it out)
/// merged with the golden LoRA adapter. In f32 the GGUF loads back with the logits of the
/// merged Hugging Face folder (identical f32 weights: 1e-5 covers summation order); in Q8_0
/// each weight is stored to within 1/254 of its 32-value block's largest, so logits stay within
/// 2% of their largest magnitude; the base's metadata is carried over.
#[test]
fn merge_to_gguf_loads_back_with_the_merged_logits() {
    use candle_core::{Device, Tensor};
    use fedllm_model::gguf::{self, Value};
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden("llama-tiny");
    let st = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let st: std::collections::BTreeMap<String, Tensor> = st.into_iter().collect();
    let tensors =
        fedllm_model::weights::llama_to_gguf(&st, 4, 2, candle_core::quantized::GgmlDType::F32)
            .unwrap();
    let u = |v: u32| Value::U32(v);
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("general.name".to_string(), Value::String("tiny".into())),
        ("llama.block_count".into(), u(2)),
        ("llama.context_length".into(), u(128)),
        ("llama.embedding_length".into(), u(64)),
        ("llama.feed_forward_length".into(), u(160)),
        ("llama.attention.head_count".into(), u(4)),
        ("llama.attention.head_count_kv".into(), u(2)),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.vocab_size".into(), u(512)),
    ];
    let base = tmp.path().join("tiny.gguf");
    gguf::write(&base, &meta, &tensors).unwrap();
    let adapter = dir.join("lora_peft");
    let merge = |out: &std::path::Path, quant: &str| {
        let o = fedllm(&[
            "merge",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quant",
            quant,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let folder = tmp.path().join("merged");
    merge(&folder, "f32");
    let f32_file = tmp.path().join("merged-f32.gguf");
    merge(&f32_file, "f32");
    let q8_file = tmp.path().join("merged-q8.gguf");
    merge(&q8_file, "q8_0");
    let ids = Tensor::new(&[[1u32, 7, 99, 3, 250, 12]], &Device::Cpu).unwrap();
    let logits = |p: &std::path::Path| {
        let opts = fedllm_model::LoadOptions {
            quant: fedllm_model::QuantMode::Dequantize,
            ..Default::default()
        };
        let m = fedllm_model::CausalLm::load(p, opts).unwrap().model;
        m.forward(&ids, None, None).unwrap()
    };
    let want = logits(&folder);
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d32 = fedllm_testing::max_abs_diff(&logits(&f32_file), &want).unwrap();
    assert!(d32 <= 1e-5 * scale.max(1.0), "f32: {d32}");
    let d8 = fedllm_testing::max_abs_diff(&logits(&q8_file), &want).unwrap();
    assert!(d8 > 0.0 && d8 <= 0.02 * scale, "q8_0: {d8} of {scale}");
    let f = gguf::GgufFile::open(&q8_file).unwrap();
    assert_eq!(f.meta_str("general.name"), Some("tiny"));
    assert_eq!(f.meta_u64("general.file_type"), Some(7));
    assert_eq!(f.info("blk.0.attn_q.weight").unwrap().ggml_type, 8);
}

/// `merge --out X.gguf` from a Hugging Face base: config.json and tokenizer.json become
/// llama.cpp's metadata. The f32 file loads back with the merged folder's logits (same f32
/// weights: 1e-5 covers summation order) and a tokenizer that encodes like the folder's; a base
/// folder without tokenizer.json, or a GPT-2 base, is refused in one line.
#[test]
fn merge_hf_base_to_gguf_loads_back_with_the_merged_logits_and_tokenizer() {
    use candle_core::{Device, Tensor};
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden("llama-tiny");
    let merge = |base: &std::path::Path, adapter: &std::path::Path, out: &std::path::Path| {
        fedllm(&[
            "merge",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quant",
            "f32",
        ])
    };
    let adapter = dir.join("lora_peft");
    let (folder, file) = (tmp.path().join("merged"), tmp.path().join("merged.gguf"));
    for out in [&folder, &file] {
        let o = merge(&dir, &adapter, out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let load = |p: &std::path::Path| fedllm_model::CausalLm::load(p, Default::default()).unwrap();
    let (want, got) = (load(&folder), load(&file));
    let ids = Tensor::new(&[[1u32, 7, 99, 3, 250, 12]], &Device::Cpu).unwrap();
    let want_logits = want.model.forward(&ids, None, None).unwrap();
    let scale = want_logits
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d =
        fedllm_testing::max_abs_diff(&got.model.forward(&ids, None, None).unwrap(), &want_logits)
            .unwrap();
    assert!(d <= 1e-5 * scale.max(1.0), "{d}");
    let (wt, gt) = (want.tokenizer.unwrap(), got.tokenizer.unwrap());
    for text in [
        "Hello world",
        "def add(a, b):\n    return a + b\n",
        "<|im_start|>user 12345",
    ] {
        assert_eq!(
            gt.encode(text, true).unwrap(),
            wt.encode(text, true).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(gt.chat_template, wt.chat_template);
    assert_eq!(
        (gt.bos_token_id, gt.pad_token_id),
        (wt.bos_token_id, wt.pad_token_id)
    );
    // Without tokenizer.json llama.cpp would have no tokenizer: refused, naming the base.
    let bare = tmp.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join(f), bare.join(f)).unwrap();
    }
    let o = merge(&bare, &adapter, &tmp.path().join("x.gguf"));
    assert_clean_failure(&o, &["bare", "tokenizer.json"]);
    let gpt2 = golden("gpt2-tiny");
    let o = merge(&gpt2, &gpt2.join("lora_peft"), &tmp.path().join("y.gguf"));
    assert_clean_failure(&o, &["LLaMA-family"]);
    assert!(!tmp.path().join("x.gguf").exists() && !tmp.path().join("y.gguf").exists());
}

/// A minimal study: one main table whose cells are the given (name, YAML) pairs.
fn tiny_study(dir: &Path, cells: &[(&str, &str)]) -> PathBuf {
    let s = dir.join("study");
    std::fs::create_dir_all(s.join("t")).unwrap();
    std::fs::write(
        s.join("experiment.yaml"),
        "title: t\ntables:\n  t: {title: T, kind: main, task: gsm8k}\neval:\n  gsm8k: {limit: 1, max_new_tokens: 4, batch: 1}\n  humaneval: {limit: 1, n: 1, max_new_tokens: 4}\n  mmlu: {limit: 1, shots: 0, max_len: 64}\nscales:\n  small: {overrides: [federate.total_round_num=1]}\n",
    )
    .unwrap();
    for (name, yaml) in cells {
        std::fs::write(s.join("t").join(format!("{name}.yaml")), yaml).unwrap();
    }
    s
}

/// Malformed studies are refused in one line naming the cell or key at fault, before anything
/// runs (no experiment folder is started); a finished or missing experiment is not restarted
/// or resumed by mistake.
#[test]
fn experiment_refuses_bad_studies_and_wrong_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let model = golden("llama-tiny");
    let good = format!(
        "model: {{path: {}}}\nfederate: {{client_num: 2, sample_client_num: 2}}\ndata: {{source: fed-gsm8k-3}}\n",
        model.display()
    );
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    let s = tiny_study(tmp.path(), &[("a", &good), ("bad", "train: {lrr: 1}\n")]);
    assert_clean_failure(
        &fedllm(&["experiment", s.to_str().unwrap(), "--out", o]),
        &["cell t/bad", "lrr"],
    );
    assert!(!out.join("experiment.json").exists());
    std::fs::remove_file(s.join("t/bad.yaml")).unwrap();
    // The same row twice.
    std::fs::write(s.join("t/b.yaml"), &good).unwrap();
    assert_clean_failure(
        &fedllm(&["experiment", s.to_str().unwrap(), "--out", o]),
        &["cell t/b", "same row as t/a"],
    );
    std::fs::remove_file(s.join("t/b.yaml")).unwrap();
    assert_clean_failure(
        &fedllm(&[
            "experiment",
            s.to_str().unwrap(),
            "--out",
            o,
            "--scale",
            "huge",
        ]),
        &["--scale huge", "small"],
    );
    assert_clean_failure(
        &fedllm(&["experiment", s.to_str().unwrap(), "--out", o, "--resume"]),
        &["--resume", "holds no experiment"],
    );
    // A cell outside any table's folder, and a table without a task.
    std::fs::write(s.join("stray.yaml"), &good).unwrap();
    assert_clean_failure(
        &fedllm(&["experiment", s.to_str().unwrap(), "--out", o]),
        &["stray.yaml", "table's folder"],
    );
    std::fs::remove_file(s.join("stray.yaml")).unwrap();
    let e = std::fs::read_to_string(s.join("experiment.yaml")).unwrap();
    std::fs::write(
        s.join("experiment.yaml"),
        e.replace("kind: main, task: gsm8k", "kind: main"),
    )
    .unwrap();
    assert_clean_failure(
        &fedllm(&["experiment", s.to_str().unwrap(), "--out", o]),
        &["experiment.yaml", "needs a task"],
    );
    std::fs::write(s.join("experiment.yaml"), e).unwrap();
    // An experiment already started is continued only with --resume, and with its settings.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("experiment.json"),
        format!(
            "{{\"study\": {:?}, \"scale\": null, \"overrides\": []}}",
            std::fs::canonicalize(&s).unwrap()
        ),
    )
    .unwrap();
    assert_clean_failure(
        &fedllm(&["experiment", s.to_str().unwrap(), "--out", o]),
        &["already holds an experiment", "--resume"],
    );
    assert_clean_failure(
        &fedllm(&[
            "experiment",
            s.to_str().unwrap(),
            "--out",
            o,
            "--resume",
            "--scale",
            "small",
        ]),
        &["--resume", "resume it with the same"],
    );
}

fn bench_logits(model: &Path, data: &Path, extra: &[&str]) -> Output {
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    let args = ["bench", "logits", "--model", model, "--data", data];
    fedllm(&[&args[..], extra].concat())
}

/// `bench logits` on SmolLM2: one line per path the CPU runs (bar the f32 reference), each
/// over every position of the token ids it wrote (`--ids-out`, at most `--max-tokens` per
/// text; the first 5 of each prefilled, the rest decoded), with a finite error and at most
/// that many moved top choices.
#[test]
fn bench_logits_measures_every_path_on_every_position() {
    let Some(model) = fedllm_testing::smollm2() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("texts.jsonl");
    std::fs::write(
        &data,
        "{\"question\": \"How many legs do 3 cats have?\", \"answer\": \"Each cat has 4 legs, so 3 * 4 = 12.\"}\n\
         \n\
         {\"question\": \"What is 7 + 5?\", \"answer\": \"7 + 5 = 12. The answer is 12.\"}\n",
    )
    .unwrap();
    let ids = dir.path().join("ids.json");
    let out = bench_logits(
        &model,
        &data,
        &[
            "--max-tokens",
            "12",
            "--prefill-tokens",
            "5",
            "--ids-out",
            ids.to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prompts: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(&ids).unwrap()).unwrap();
    assert_eq!(prompts.len(), 2, "{prompts:?}");
    assert!(
        prompts.iter().all(|p| (1..=12).contains(&p.len())),
        "{prompts:?}"
    );
    let positions: usize = prompts.iter().map(Vec::len).sum();
    let decoded: usize = prompts.iter().map(|p| p.len().saturating_sub(5)).sum();
    let head = format!(
        "({positions} positions: {} prefilled, {decoded} decoded one by one)",
        positions - decoded
    );
    assert!(decoded > 0 && text.contains(&head), "{head}: {text}");
    let head = text.lines().find(|l| l.starts_with("paths: ")).unwrap();
    let (list, reference) = head["paths: ".len()..].split_once(" against ").unwrap();
    let paths: Vec<&str> = list.split(", ").collect();
    let reference = reference.split_whitespace().next().unwrap();
    assert!(!paths.contains(&reference), "{head}");
    for p in paths {
        let row = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(p))
            .unwrap_or_else(|| panic!("{p} missing from: {text}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        let (rms, max): (f64, f64) = (cols[1].parse().unwrap(), cols[2].parse().unwrap());
        assert!(
            rms.is_finite() && rms >= 0.0 && max.is_finite() && max >= rms,
            "{row}"
        );
        let moved: usize = cols[3].parse().unwrap();
        assert_eq!(cols[5], positions.to_string(), "{row}");
        assert!(moved <= positions, "{row}");
    }
}

/// A data line that is not JSON, lacks a field or holds a non-string, an empty file or an
/// unknown `--format` stops `bench logits` with one line naming the file (and the line and
/// field where there is one) — before any model is read: the model path given does not exist,
/// and the error is still the data's.
#[test]
fn bench_logits_names_the_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("texts.jsonl");
    let model = dir.path().join("no-model");
    let good = "{\"question\": \"a\", \"answer\": \"b\"}\n";
    for (body, extra, needles) in [
        (
            format!("{good}{{\"question\": \"c\"}}\n"),
            &[][..],
            vec!["texts.jsonl:2", "`answer`"],
        ),
        (
            format!("{good}not json\n"),
            &[],
            vec!["texts.jsonl:2", "invalid JSON"],
        ),
        (
            "{\"question\": \"a\", \"answer\": [3]}\n".to_string(),
            &[],
            vec!["texts.jsonl:1", "`answer`", "not a string"],
        ),
        ("\n".to_string(), &[], vec!["texts.jsonl", "no records"]),
        (
            good.to_string(),
            &["--format", "nope"],
            vec!["nope", "format"],
        ),
    ] {
        std::fs::write(&data, body).unwrap();
        let out = bench_logits(&model, &data, extra);
        assert_clean_failure(&out, &needles);
    }
}
