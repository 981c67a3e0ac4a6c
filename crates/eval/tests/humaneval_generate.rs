//! HumanEval generation: a problem's n samples read its prompt once and decode as one batch.

use fedllm_eval::humaneval::{generate_completions, sampling, truncate, Problem, STOPS};
use fedllm_model::{generate_after, CausalLm, GenerateConfig, LoadOptions};

/// The completions equal those of decoding n copies of the whole prompt together with the same
/// seed (the behaviour before the prompt was shared): same rows, same draws, same stops.
/// Exact: sampling at temperature 0.1 could only change at a near-tie of the logits, which
/// the per-row numbers of the two paths (equal up to summation order) do not reach here.
#[test]
fn one_read_of_the_prompt_gives_the_samples_of_whole_prompts() {
    let dir = fedllm_testing::golden_dir().join("llama-tiny");
    let loaded = CausalLm::load(&dir, LoadOptions::default()).unwrap();
    let (model, tok) = (loaded.model, loaded.tokenizer.unwrap());
    let problem = Problem {
        task_id: "t/0".into(),
        prompt: "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n".into(),
        canonical_solution: String::new(),
        test: String::new(),
        entry_point: "add".into(),
    };
    let (n, max_new, seed) = (4, 24, 11);
    let got: Vec<String> = generate_completions(
        &model,
        None,
        &tok,
        std::slice::from_ref(&problem),
        n,
        max_new,
        seed,
    )
    .unwrap()
    .into_iter()
    .map(|c| c.completion)
    .collect();
    let cfg = GenerateConfig {
        max_new_tokens: max_new,
        sampling: sampling(seed),
        stop_token_ids: tok.eos_token_ids.clone(),
        stop_strings: STOPS.iter().map(|s| s.to_string()).collect(),
    };
    let ids = tok.encode(&problem.prompt, true).unwrap();
    let want: Vec<String> = generate_after(&model, Some(&tok), None, &vec![ids; n], &cfg)
        .unwrap()
        .iter()
        .map(|g| truncate(&tok.decode(&g.tokens, true).unwrap()))
        .collect();
    assert_eq!(got.len(), n);
    assert_eq!(got, want);
    // Sampling makes the rows differ (else this would not tell rows apart).
    assert!(got.iter().any(|c| c != &got[0]), "{got:?}");
}
