//! Continuous batching: prompts joining and leaving a batch as others finish decode exactly as
//! each would alone, on both golden architectures and on SmolLM2 kept quantized (the decode
//! kernels' path), with and without a shared prefix cache.

use fedllm_model::{
    generate, generate_after, generate_continuous, prefix_cache, CausalLm, Finish, GenerateConfig,
    LoadOptions, Sampling,
};

/// Prompts of different lengths decoded 2 at a time; the end token is one the first prompt
/// produces early, so that rows leave at different steps and waiting prompts join mid-way.
fn check(model: &CausalLm, prompts: &[Vec<u32>], prefix: &[u32]) {
    let cache = prefix_cache(model, prefix).unwrap();
    let pre = (!prefix.is_empty()).then_some(&cache);
    let run_alone = |cfg: &GenerateConfig| -> Vec<Vec<u32>> {
        prompts
            .iter()
            .map(|p| {
                let g = match pre {
                    Some(c) => generate_after(model, None, Some(c), std::slice::from_ref(p), cfg),
                    None => generate(model, None, std::slice::from_ref(p), cfg),
                };
                g.unwrap().remove(0).tokens
            })
            .collect()
    };
    let mut cfg = GenerateConfig {
        max_new_tokens: 12,
        sampling: Sampling::greedy(),
        stop_token_ids: vec![],
        stop_strings: vec![],
    };
    cfg.stop_token_ids = vec![run_alone(&cfg)[0][3]];
    let alone = run_alone(&cfg);
    let mut order = Vec::new();
    let got = generate_continuous(model, None, pre, prompts, &cfg, 2, &mut |i, _| {
        order.push(i);
        Ok(())
    })
    .unwrap();
    let early = got.iter().filter(|g| g.finish == Finish::Eos).count();
    assert!(
        early > 0 && early < got.len(),
        "{early} of {} stopped early",
        got.len()
    );
    let got: Vec<Vec<u32>> = got.into_iter().map(|g| g.tokens).collect();
    assert_eq!(got, alone);
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..prompts.len()).collect::<Vec<_>>(),
        "each prompt reported once"
    );
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 9, 13],
        vec![7; 9],
        vec![40, 41],
        vec![3, 100, 101, 102, 103, 104],
        vec![250],
    ]
}

#[test]
fn continuous_batches_decode_as_alone_on_the_golden_models() {
    for name in ["llama-tiny", "gpt2-tiny"] {
        let dir = fedllm_testing::golden_dir().join(name);
        let m = CausalLm::load(&dir, LoadOptions::default()).unwrap().model;
        check(&m, &prompts(), &[]);
        check(&m, &prompts(), &[11, 12, 13, 14]);
    }
}

#[test]
fn continuous_batches_decode_as_alone_on_smollm2_kept_quantized() {
    let path = fedllm_testing::smollm2().expect("SmolLM2 GGUF");
    let m = CausalLm::load(&path, LoadOptions::default()).unwrap().model;
    let ps: Vec<Vec<u32>> = prompts()
        .into_iter()
        .map(|p| p.iter().map(|t| t + 1000).collect())
        .collect();
    for path in fedllm_model::qmatvec::available() {
        fedllm_model::qmatvec::with_path(path, || {
            check(&m, &ps, &[]);
            check(&m, &ps, &[504, 3458, 282]);
        });
    }
}

/// Sampling would make a row's draws depend on who shares its batch: refused.
#[test]
fn continuous_batching_refuses_sampling() {
    let dir = fedllm_testing::golden_dir().join("llama-tiny");
    let m = CausalLm::load(&dir, LoadOptions::default()).unwrap().model;
    let cfg = GenerateConfig {
        max_new_tokens: 4,
        sampling: Sampling {
            temperature: 0.7,
            top_k: None,
            top_p: None,
            seed: 1,
        },
        stop_token_ids: vec![],
        stop_strings: vec![],
    };
    let e =
        generate_continuous(&m, None, None, &prompts(), &cfg, 2, &mut |_, _| Ok(())).unwrap_err();
    assert!(e.to_string().contains("greedily"), "{e}");
}

/// On the VNNI path (when the CPU has it) a row's logits are bit for bit the same alone and
/// in a batch, for prompts longer than a decoding step's few tokens (read with the
/// inference attention, whatever their padding) and for the decode steps after them.
#[test]
fn vnni_rows_have_the_same_logits_alone_and_batched() {
    use fedllm_model::qmatvec::{self, Path};
    use fedllm_model::Running;
    if !Path::Vnni.supported() {
        eprintln!("note: no AVX-512 VNNI here, the batch-exact path is not exercised");
        return;
    }
    let path = fedllm_testing::smollm2().expect("SmolLM2 GGUF");
    let m = CausalLm::load(&path, LoadOptions::default()).unwrap().model;
    let ps: Vec<Vec<u32>> = vec![
        (0..40).map(|i| 1000 + 37 * i).collect(),
        vec![1250],
        (0..23).map(|i| 3000 + 11 * i).collect(),
    ];
    qmatvec::with_path(Path::Vnni, || {
        let mut all = Running::new(&m, None, 4);
        let first = all.join(&ps).unwrap();
        let next = all.step(vec![5, 6, 7]).unwrap();
        for (i, p) in ps.iter().enumerate() {
            let mut one = Running::new(&m, None, 4);
            assert_eq!(
                one.join(std::slice::from_ref(p)).unwrap()[0],
                first[i],
                "prompt {i}"
            );
            assert_eq!(
                one.step(vec![5 + i as u32]).unwrap()[0],
                next[i],
                "step {i}"
            );
        }
    });
}

/// Rows continuing a shared prefix (`KvCache::sharing`, as every few-shot evaluation prefills)
/// hold its keys and values once, yet give bit for bit the logits of rows that each hold a
/// copy: through a padded prompt read, decode steps, rows leaving and a row joining.
#[test]
fn a_shared_prefix_is_stored_once_with_the_copied_prefix_numbers() {
    use candle_core::Tensor;
    use fedllm_model::KvCache;
    for name in ["llama-tiny", "gpt2-tiny"] {
        let dir = fedllm_testing::golden_dir().join(name);
        let m = CausalLm::load(&dir, LoadOptions::default()).unwrap().model;
        let prefix: Vec<u32> = (0..21).map(|i| 3 + 7 * i).collect();
        let base = prefix_cache(&m, &prefix).unwrap();
        let mut shared = KvCache::sharing(&base, 3).unwrap();
        let mut copied = base.clone();
        copied.select_rows(&[0, 0, 0]).unwrap();
        let one_row = base.stored_bytes();
        assert_eq!(copied.stored_bytes(), 3 * one_row);
        assert_eq!(shared.stored_bytes(), one_row, "nothing but the prefix yet");
        // Three prompts of 5, 2 and 4 tokens, left-padded to 5 after the prefix.
        let ids = Tensor::from_vec(
            vec![5u32, 9, 13, 17, 21, 0, 0, 0, 40, 41, 0, 100, 101, 102, 103],
            (3, 5),
            &m.device,
        )
        .unwrap();
        let mask = vec![vec![1u8; 5], vec![0, 0, 0, 1, 1], vec![0, 1, 1, 1, 1]];
        let bits = |t: Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.into_iter().map(f32::to_bits).collect()
        };
        let both = |c: [&mut KvCache; 2], ids: &Tensor, mask: Option<&[Vec<u8>]>, what: &str| {
            let [s, c] = c;
            let a = m.forward_hidden(ids, mask, Some(s)).unwrap();
            let b = m.forward_hidden(ids, mask, Some(c)).unwrap();
            assert_eq!(bits(a), bits(b), "{name}: {what}");
        };
        both([&mut shared, &mut copied], &ids, Some(&mask), "prompt read");
        let step = |v: Vec<u32>| {
            let n = v.len();
            Tensor::from_vec(v, (n, 1), &m.device).unwrap()
        };
        both(
            [&mut shared, &mut copied],
            &step(vec![7, 8, 9]),
            None,
            "first step",
        );
        both(
            [&mut shared, &mut copied],
            &step(vec![10, 11, 12]),
            None,
            "second step",
        );
        // Each row stores only its own 7 positions beside the one prefix.
        let per_pos = one_row / prefix.len();
        assert_eq!(shared.stored_bytes(), one_row + 3 * 7 * per_pos);
        shared.select_rows(&[2, 0]).unwrap();
        copied.select_rows(&[2, 0]).unwrap();
        both(
            [&mut shared, &mut copied],
            &step(vec![13, 14]),
            None,
            "after a row left",
        );
        // A new prompt joins each batch, continuing the same prefix: 8 tokens, the running
        // rows' own length, so that neither layout pads it (a copied prefix is padded before
        // the prefix, a shared one after it, and the f32 softmax sums follow positions).
        let mut join_shared = KvCache::sharing(&base, 1).unwrap();
        let mut join_copied = base.clone();
        let p = Tensor::from_vec((60u32..68).collect(), (1, 8), &m.device).unwrap();
        both(
            [&mut join_shared, &mut join_copied],
            &p,
            None,
            "joining prompt",
        );
        shared.append_rows(&join_shared).unwrap();
        copied.append_rows(&join_copied).unwrap();
        both(
            [&mut shared, &mut copied],
            &step(vec![15, 16, 17]),
            None,
            "after a row joined",
        );
        assert_eq!((shared.len, &shared.mask), (copied.len, &copied.mask));
        assert_eq!(shared.stored_bytes(), one_row + 3 * 9 * per_pos);
        // A batch continuing another prefix cannot join.
        let other = prefix_cache(&m, &prefix).unwrap();
        let e = shared.append_rows(&KvCache::sharing(&other, 1).unwrap());
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("different shared prefixes"));
    }
}
