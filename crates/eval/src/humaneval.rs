//! HumanEval (Chen et al. 2021) with FS-LLM's protocol: raw prompt, n samples per task
//! (temperature 0.1, top-p 0.75, top-k 40, 128 new tokens), completions cut at the stop
//! sequences, each program executed in the sandbox, unbiased pass@k.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use fedllm_model::{generate_after, CausalLm, GenerateConfig, KvCache, Sampling, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::passk::pass_at_k;
use crate::results::{append, done_keys};
use crate::sandbox::{run_check, Limits, Outcome};

pub const STOPS: [&str; 6] = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "\nassert"];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Problem {
    pub task_id: String,
    pub prompt: String,
    #[serde(default)]
    pub canonical_solution: String,
    pub test: String,
    pub entry_point: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completion {
    pub task_id: String,
    pub completion: String,
}

fn read(path: &Path) -> Result<String> {
    let err = |e: std::io::Error| EvalError::File {
        path: path.into(),
        msg: e.to_string(),
    };
    let bytes = std::fs::read(path).map_err(err)?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut s)
            .map_err(err)?;
        Ok(s)
    } else {
        String::from_utf8(bytes).map_err(|_| EvalError::File {
            path: path.into(),
            msg: "not UTF-8".into(),
        })
    }
}

pub fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    read(path)?
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| EvalError::Line {
                path: path.into(),
                line: i + 1,
                msg: e.to_string(),
            })
        })
        .collect()
}

/// Cuts a completion at the first stop sequence.
pub fn truncate(completion: &str) -> String {
    let cut = STOPS
        .iter()
        .filter_map(|s| completion.find(s))
        .min()
        .unwrap_or(completion.len());
    completion[..cut].to_string()
}

/// The untrusted half of a program: the prompt and the completion (the sandbox adds the test).
pub fn solution(p: &Problem, completion: &str) -> String {
    format!("{}{}\n", p.prompt, completion)
}

#[derive(Debug, Clone, Serialize)]
pub struct Score {
    pub tasks: usize,
    pub samples: usize,
    pub pass_at: BTreeMap<usize, f64>,
    pub per_task: BTreeMap<String, (usize, usize)>,
    pub timed_out: usize,
}

#[derive(Serialize, Deserialize)]
struct SampleResult {
    key: String,
    task_id: String,
    passed: bool,
    outcome: Outcome,
    error: String,
}

/// Executes every completion (two at a time) and computes pass@k for each k ≤ samples per task.
/// With `out`, results are appended per sample and finished samples are skipped on a re-run.
pub fn score(
    problems: &[Problem],
    completions: &[Completion],
    limits: &Limits,
    ks: &[usize],
    out: Option<&Path>,
) -> Result<Score> {
    let by_id: BTreeMap<&str, &Problem> =
        problems.iter().map(|p| (p.task_id.as_str(), p)).collect();
    let mut idx_in_task: BTreeMap<&str, usize> = BTreeMap::new();
    let mut jobs = Vec::new();
    for c in completions {
        let p = by_id
            .get(c.task_id.as_str())
            .ok_or_else(|| EvalError::Config(format!("unknown task_id `{}`", c.task_id)))?;
        let i = idx_in_task.entry(&c.task_id).or_default();
        jobs.push((format!("{}#{}", c.task_id, i), *p, c.completion.clone()));
        *i += 1;
    }
    let done = match out {
        Some(o) => done_keys(o)?,
        None => BTreeMap::new(),
    };
    let todo: Vec<&(String, &Problem, String)> =
        jobs.iter().filter(|j| !done.contains_key(&j.0)).collect();
    let bar = fedllm_train::Progress::new("humaneval exec", "programs", todo.len() as u64, true);
    let mut results: BTreeMap<String, (String, bool, Outcome)> = done
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                (
                    v["task_id"].as_str().unwrap_or_default().to_string(),
                    v["passed"].as_bool().unwrap_or(false),
                    serde_json::from_value(v["outcome"].clone()).unwrap_or(Outcome::Failed),
                ),
            )
        })
        .collect();
    let lock = std::sync::Mutex::new((&mut results, out));
    std::thread::scope(|s| -> Result<()> {
        let chunks: Vec<Vec<&&(String, &Problem, String)>> = (0..2)
            .map(|w| todo.iter().skip(w).step_by(2).collect())
            .collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let (lock, bar) = (&lock, &bar);
                s.spawn(move || -> Result<()> {
                    for (key, p, completion) in chunk {
                        let (outcome, error) =
                            run_check(&solution(p, completion), &p.test, &p.entry_point, limits)
                                .map_err(|e| {
                                    EvalError::Config(format!("cannot run python3: {e}"))
                                })?;
                        let passed = outcome == Outcome::Passed;
                        let mut g = lock.lock().unwrap();
                        if let Some(o) = g.1 {
                            append(
                                o,
                                &SampleResult {
                                    key: key.clone(),
                                    task_id: p.task_id.clone(),
                                    passed,
                                    outcome: outcome.clone(),
                                    error,
                                },
                            )?;
                        }
                        g.0.insert(key.clone(), (p.task_id.clone(), passed, outcome));
                        bar.inc(1);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().expect("worker")?;
        }
        Ok(())
    })?;
    bar.finish();
    let mut per_task: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let keys: BTreeSet<&String> = jobs.iter().map(|j| &j.0).collect();
    let mut timed_out = 0;
    for (k, (task, passed, outcome)) in &results {
        if !keys.contains(k) {
            continue;
        }
        let e = per_task.entry(task.clone()).or_default();
        e.0 += 1;
        e.1 += *passed as usize;
        timed_out += (*outcome == Outcome::TimedOut) as usize;
    }
    let n_min = per_task.values().map(|x| x.0).min().unwrap_or(0);
    let mut pass_at = BTreeMap::new();
    for &k in ks.iter().filter(|&&k| k >= 1 && k <= n_min) {
        let v: f64 = per_task
            .values()
            .map(|&(n, c)| pass_at_k(n, c, k))
            .sum::<f64>()
            / per_task.len().max(1) as f64;
        pass_at.insert(k, v);
    }
    Ok(Score {
        tasks: per_task.len(),
        samples: results.len(),
        pass_at,
        per_task,
        timed_out,
    })
}

/// FS-LLM's sampling for HumanEval.
pub fn sampling(seed: u64) -> Sampling {
    Sampling {
        temperature: 0.1,
        top_k: Some(40),
        top_p: Some(0.75),
        seed,
    }
}

/// `n` completions per problem (raw prompt, stop sequences cut), decoded together after one
/// read of the prompt; prompts continue `start` (a prompt-type adapter's virtual tokens) when
/// given.
pub fn generate_completions(
    model: &CausalLm,
    start: Option<&KvCache>,
    tok: &Tokenizer,
    problems: &[Problem],
    n: usize,
    max_new: usize,
    seed: u64,
) -> Result<Vec<Completion>> {
    let mut out = Vec::new();
    let bar = fedllm_train::Progress::new(
        "humaneval generate",
        "problems",
        problems.len() as u64,
        true,
    );
    for (i, p) in problems.iter().enumerate() {
        let ids = tok.encode(&p.prompt, true)?;
        let cfg = GenerateConfig {
            max_new_tokens: max_new,
            sampling: sampling(seed.wrapping_add(i as u64)),
            stop_token_ids: tok.eos_token_ids.clone(),
            stop_strings: STOPS.iter().map(|s| s.to_string()).collect(),
        };
        // The prompt is read once; its n samples continue that one cache as one batch.
        let (head, last) = ids.split_at(ids.len().saturating_sub(1));
        let shared = fedllm_model::prefix_cache_after(model, start, head)?;
        let gens = generate_after(
            model,
            Some(tok),
            Some(&shared),
            &vec![last.to_vec(); n],
            &cfg,
        )?;
        for g in gens {
            out.push(Completion {
                task_id: p.task_id.clone(),
                completion: truncate(&tok.decode(&g.tokens, true)?),
            });
        }
        bar.inc(1);
    }
    bar.finish();
    Ok(out)
}
