//! GSM8K (Cobbe et al. 2021) with FS-LLM's protocol: the 8-shot chain-of-thought prompt of Wei et
//! al. 2022 ("Q: … A: … The answer is N."), greedy decoding of up to 256 tokens, the answer taken
//! after the first "the answer is" (else the last number), exact match against `#### N`.

use std::path::Path;

use fedllm_model::{
    generate_continuous, prefix_cache_after, strip_prefix, CausalLm, GenerateConfig, KvCache,
    Sampling, Tokenizer,
};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::results::{append, done_keys};
use crate::stats::wilson95;

const SHOTS: [(&str, &str); 8] = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8."),
];

pub fn prompt(question: &str) -> String {
    few_shot() + &format!("Q: {question}\nA:")
}

/// The eight worked examples every prompt starts with.
pub fn few_shot() -> String {
    SHOTS
        .iter()
        .map(|(q, a)| format!("Q: {q}\nA: {a}\n\n"))
        .collect()
}

/// Numbers in order of appearance ("1,234.5" → "1234.5"; a trailing "." dropped).
fn numbers(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let c: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < c.len() {
        let starts =
            c[i].is_ascii_digit() || (c[i] == '-' && i + 1 < c.len() && c[i + 1].is_ascii_digit());
        if !starts {
            i += 1;
            continue;
        }
        let mut s = String::new();
        if c[i] == '-' {
            s.push('-');
            i += 1;
        }
        while i < c.len() && (c[i].is_ascii_digit() || c[i] == ',' || c[i] == '.') {
            // A comma or dot only continues the number when a digit follows.
            if (c[i] == ',' || c[i] == '.') && !(i + 1 < c.len() && c[i + 1].is_ascii_digit()) {
                break;
            }
            if c[i] != ',' {
                s.push(c[i]);
            }
            i += 1;
        }
        out.push(s);
    }
    out
}

/// FS-LLM's extraction: the first number after the first "the answer is", else the last number.
pub fn extract(completion: &str) -> Option<String> {
    if let Some(after) = after_ignoring_case(completion, "the answer is") {
        if let Some(n) = numbers(after).into_iter().next() {
            return Some(n);
        }
    }
    numbers(completion).pop()
}

/// What follows the first case-insensitive match of the ASCII `needle`. Matching char by char
/// on the original text keeps offsets valid: lower-casing a copy can change byte lengths
/// ("İ" is two bytes, its lower case three), so a copy's offsets do not slice the original.
fn after_ignoring_case<'a>(hay: &'a str, needle: &str) -> Option<&'a str> {
    hay.char_indices().find_map(|(start, _)| {
        let mut rest = hay[start..].char_indices();
        for want in needle.chars() {
            let (_, got) = rest.next()?;
            if !got.eq_ignore_ascii_case(&want) {
                return None;
            }
        }
        let end = rest.next().map_or(hay.len(), |(i, _)| start + i);
        Some(&hay[end..])
    })
}

/// The reference answer after `####`.
pub fn reference(answer: &str) -> Option<String> {
    let tail = answer.rsplit("####").next()?;
    numbers(tail).into_iter().next()
}

pub fn same(a: &str, b: &str) -> bool {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() < 1e-6,
        _ => a == b,
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Question {
    pub question: String,
    pub answer: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Score {
    pub accuracy: f64,
    pub ci95: (f64, f64),
    pub correct: usize,
    pub count: usize,
}

/// Greedy 8-shot evaluation; per-question rows appended to `out` (and skipped when present).
/// `start`: a prompt-type adapter's virtual tokens, which every prompt continues
/// (`Adapter::generation_prefix`; None for LoRA and full adapters, which live in the weights).
pub fn evaluate(
    model: &CausalLm,
    start: Option<&KvCache>,
    tok: &Tokenizer,
    qs: &[Question],
    max_new: usize,
    batch: usize,
    out: Option<&Path>,
) -> Result<Score> {
    let done = match out {
        Some(o) => done_keys(o)?,
        None => Default::default(),
    };
    let mut correct = 0;
    let mut count = 0;
    let todo: Vec<(usize, &Question)> = qs
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            if let Some(v) = done.get(&i.to_string()) {
                correct += v["correct"].as_bool().unwrap_or(false) as usize;
                count += 1;
                false
            } else {
                true
            }
        })
        .collect();
    let shot_ids = fedllm_model::generate::prefix_ids(tok, &few_shot())?;
    let shot_cache = prefix_cache_after(model, start, &shot_ids)?;
    let bar = fedllm_train::Progress::new("gsm8k", "questions", todo.len() as u64, true);
    let cfg = GenerateConfig {
        max_new_tokens: max_new,
        sampling: Sampling::greedy(),
        stop_token_ids: tok.eos_token_ids.clone(),
        stop_strings: vec!["\n\nQ:".into(), "\nQ:".into()],
    };
    let prompts: Vec<Vec<u32>> = todo
        .iter()
        .map(|(_, q)| tok.encode(&prompt(&q.question), true))
        .collect::<std::result::Result<_, _>>()?;
    // Questions continue the shots' cache (computed once); a prompt whose tokens do not start
    // with the shots' (a merge across the boundary) is read whole, in a second pass.
    let (after, whole): (Vec<usize>, Vec<usize>) =
        (0..todo.len()).partition(|&j| strip_prefix(&prompts[j], &shot_ids).is_some());
    let passes = [(after, Some(&shot_cache)), (whole, start)];
    // An error writing a result row stops decoding; it is reported as itself, not as a model
    // error.
    let mut write_err = None;
    for (rows, prefix) in passes {
        let ps: Vec<Vec<u32>> = rows
            .iter()
            .map(|&j| match prefix {
                Some(_) => strip_prefix(&prompts[j], &shot_ids)
                    .expect("partitioned")
                    .to_vec(),
                None => prompts[j].clone(),
            })
            .collect();
        let mut score = |r: usize, g: &fedllm_model::Generation| -> fedllm_model::Result<()> {
            let (i, q) = todo[rows[r]];
            let text = tok.decode(&g.tokens, true)?;
            let text = fedllm_model::generate::truncate_at_stop(&text, &cfg.stop_strings);
            let pred = extract(&text);
            let gold = reference(&q.answer);
            let ok = matches!((&pred, &gold), (Some(p), Some(g)) if same(p, g));
            correct += ok as usize;
            count += 1;
            if let Some(o) = out {
                let row = serde_json::json!({"key": i.to_string(), "prediction": pred, "reference": gold, "correct": ok, "completion": text});
                if let Err(e) = append(o, &row) {
                    let msg = e.to_string();
                    write_err = Some(e);
                    return Err(fedllm_model::ModelError::Config(msg));
                }
            }
            bar.inc(1);
            Ok(())
        };
        // Several questions decode together; a finished one's slot takes the next question.
        let r = generate_continuous(model, Some(tok), prefix, &ps, &cfg, batch, &mut score);
        if let Some(e) = write_err.take() {
            return Err(e);
        }
        r?;
    }
    bar.finish();
    Ok(Score {
        accuracy: correct as f64 / count.max(1) as f64,
        ci95: wilson95(correct, count),
        correct,
        count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lower-casing "İ" adds a byte, so offsets found in a lower-cased copy land one byte late in
    /// the original: here inside "ü", which panicked before extraction matched on the original.
    #[test]
    fn extraction_on_non_ascii_text() {
        assert_eq!(extract("İ the answer isü8").as_deref(), Some("8"));
        assert_eq!(extract("İİİ THE ANSWER IS 42 €").as_deref(), Some("42"));
        assert_eq!(
            extract("Ünïcödé 3 — the answer is ½ or 7").as_deref(),
            Some("7")
        );
        assert_eq!(extract("ſ the anſwer is 4, not 5").as_deref(), Some("5"));
        assert_eq!(extract("the answer is").as_deref(), None);
    }

    #[test]
    fn extraction_on_tricky_strings() {
        assert_eq!(
            extract("So 3 + 4 = 7. The answer is 7.").as_deref(),
            Some("7")
        );
        assert_eq!(extract("The answer is $1,234.").as_deref(), Some("1234"));
        assert_eq!(
            extract("the Answer is: -5 apples, not 6").as_deref(),
            Some("-5")
        );
        assert_eq!(
            extract("He has 12 then 15.5 left.").as_deref(),
            Some("15.5")
        );
        assert_eq!(
            extract("Total 2,000,000 dollars").as_deref(),
            Some("2000000")
        );
        assert_eq!(
            extract("The answer is unclear but 9 - 2 = 7").as_deref(),
            Some("9")
        );
        assert_eq!(extract("no numbers here"), None);
        assert_eq!(
            reference("blah <<2*3=6>>6\n#### 1,080").as_deref(),
            Some("1080")
        );
        assert!(same("18", "18.0") && !same("18", "81"));
        assert!(prompt("Why?").ends_with("The answer is 8.\n\nQ: Why?\nA:"));
        assert_eq!(prompt("x").matches("Q: ").count(), 9);
    }
}
