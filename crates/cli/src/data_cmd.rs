//! `fedllm data split` and `fedllm data show`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use fedllm_data::federated::{build, data_root, preset, presets, Source, SplitConfig};
use fedllm_data::record::{Format, Record};
use fedllm_data::split::Splitter;
use fedllm_data::template::Template;
use fedllm_data::tokenize::tokenize;
use fedllm_model::{CausalLm, LoadOptions, Tokenizer};

#[derive(Subcommand)]
pub enum DataCmd {
    /// Split a dataset (file or preset) across clients; writes per-client files and a manifest
    Split(SplitArgs),
    /// Preview rendered prompts with the loss-carrying part marked
    Show(ShowArgs),
    /// List the benchmark presets
    Presets,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum SplitterKind {
    Iid,
    Dirichlet,
    Meta,
    SizeSkew,
}

#[derive(Args)]
pub struct SplitArgs {
    /// A data file, or a preset name (see `fedllm data presets`; files under $FEDLLM_DATA or data/)
    #[arg(long)]
    data: String,
    /// A separate test file (split across clients too; also the server's test set)
    #[arg(long)]
    test_data: Option<PathBuf>,
    /// Data file layout (auto detects it from the first record)
    #[arg(long, default_value = "auto")]
    format: String,
    /// How records are dealt to clients [default: the preset's, else iid]
    #[arg(long, value_enum)]
    splitter: Option<SplitterKind>,
    /// Number of clients [default: the preset's]
    #[arg(long)]
    clients: Option<usize>,
    /// Dirichlet concentration (smaller = more skewed)
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Dirichlet: minimum records per client
    #[arg(long, default_value_t = 1)]
    min_size: usize,
    /// Size-skew exponent
    #[arg(long, default_value_t = 1.0)]
    gamma: f64,
    /// train,val,test fractions
    #[arg(long, value_delimiter = ',')]
    splits: Option<Vec<f64>>,
    /// Derive categories from code (programming language) when records have none
    #[arg(long)]
    derive_code_category: bool,
    /// Seed for the split (same seed, same split)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Count tokens with this model's tokenizer
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt template used to count tokens (alpaca, chat, raw)
    #[arg(long, default_value = "alpaca")]
    template: String,
    /// Output folder: one JSONL per client and split, plus manifest.json
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct ShowArgs {
    /// A data file, or a preset name (see `fedllm data presets`; its training file is shown)
    #[arg(long)]
    data: String,
    /// Data file layout (auto detects it from the first record)
    #[arg(long, default_value = "auto")]
    format: String,
    /// Prompt template (alpaca, chat, raw)
    #[arg(long, default_value = "alpaca")]
    template: String,
    /// The model whose tokenizer (and chat template) renders the samples
    #[arg(long)]
    model: PathBuf,
    /// Records to show
    #[arg(long, default_value_t = 3)]
    n: usize,
    /// Index of the first record shown
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Tokens per sample (prompt + response); longer samples are truncated
    #[arg(long, default_value_t = 512)]
    tok_len: usize,
}

fn tokenizer(model: &std::path::Path) -> Result<Tokenizer> {
    let opts = LoadOptions {
        layers: Some(vec![]),
        ..Default::default()
    };
    CausalLm::load(model, opts)
        .context("loading model")?
        .tokenizer
        .context("the model has no tokenizer")
}

pub fn run(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Split(a) => split(a),
        DataCmd::Show(a) => show(a),
        DataCmd::Presets => {
            for p in presets() {
                println!(
                    "{:<16} {}  [{}{}]",
                    p.name,
                    p.about,
                    p.train,
                    p.test.map(|t| format!(" + {t}")).unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}

fn write_jsonl(path: &PathBuf, recs: &[&Record]) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| path.display().to_string())?,
    );
    for r in recs {
        writeln!(f, "{}", serde_json::to_string(r)?)?;
    }
    Ok(())
}

fn split(a: SplitArgs) -> Result<()> {
    let (source, mut cfg) = match preset(&a.data) {
        Some(p) => (p.source(&data_root())?, p.split_config(a.seed)),
        None => {
            let format: Format = a.format.parse()?;
            let src = Source {
                train: PathBuf::from(&a.data),
                test: a.test_data.clone(),
                format: Some(format),
                derive_category: a.derive_code_category,
            };
            let clients = a
                .clients
                .context("--clients is required unless --data names a preset")?;
            let fr = if a.test_data.is_some() {
                [1.0, 0.0, 0.0]
            } else {
                [0.9, 0.05, 0.05]
            };
            (
                src,
                SplitConfig {
                    splitter: Splitter::Iid,
                    clients,
                    seed: a.seed,
                    fractions: fr,
                },
            )
        }
    };
    if let Some(c) = a.clients {
        cfg.clients = c;
    }
    if let Some(s) = a.splitter {
        cfg.splitter = match s {
            SplitterKind::Iid => Splitter::Iid,
            SplitterKind::Dirichlet => Splitter::Dirichlet {
                alpha: a.alpha,
                min_size: a.min_size,
            },
            SplitterKind::Meta => Splitter::Meta,
            SplitterKind::SizeSkew => Splitter::SizeSkew { gamma: a.gamma },
        };
    }
    if let Some(s) = &a.splits {
        if s.len() != 3 {
            bail!(
                "--splits needs three fractions (train,val,test), got {}",
                s.len()
            );
        }
        cfg.fractions = [s[0], s[1], s[2]];
    }
    let fed = build(&source, &cfg)?;
    for (p, r) in &fed.reports {
        eprintln!(
            "{}: {} records read, {} kept, {} empty dropped, {} header rows",
            p.display(),
            r.read,
            r.kept,
            r.empty,
            r.headers
        );
    }
    let tok = a.model.as_deref().map(tokenizer).transpose()?;
    let template: Template = a.template.parse()?;
    std::fs::create_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
    println!(
        "splitter {} ({:?}), {} clients, seed {}",
        cfg.splitter.name(),
        cfg.splitter,
        cfg.clients,
        cfg.seed
    );
    println!(
        "{:>6} {:>7} {:>5} {:>5} {:>10}  categories (train)",
        "client",
        "train",
        "val",
        "test",
        if tok.is_some() { "tokens" } else { "words" }
    );
    for c in 0..cfg.clients {
        let dir = a.out.join(format!("client_{c}"));
        std::fs::create_dir_all(&dir)?;
        let mut n = [0usize; 3];
        for (k, part) in ["train", "val", "test"].iter().enumerate() {
            let recs = fed.client(part, c);
            n[k] = recs.len();
            write_jsonl(&dir.join(format!("{part}.jsonl")), &recs)?;
        }
        let train = fed.client("train", c);
        let size: usize = match &tok {
            Some(t) => train
                .iter()
                .map(|r| {
                    tokenize(r, template, t, usize::MAX)
                        .map(|s| s.map(|(s, _)| s.ids.len()).unwrap_or(0))
                })
                .sum::<fedllm_data::Result<usize>>()?,
            None => train
                .iter()
                .map(|r| {
                    format!("{} {} {}", r.instruction, r.input, r.output)
                        .split_whitespace()
                        .count()
                })
                .sum(),
        };
        let mut hist: BTreeMap<String, usize> = BTreeMap::new();
        for r in &train {
            *hist
                .entry(r.category.clone().unwrap_or_else(|| "-".into()))
                .or_default() += 1;
        }
        let mut h: Vec<(String, usize)> = hist.into_iter().collect();
        h.sort_by_key(|x| std::cmp::Reverse(x.1));
        let shown: Vec<String> = h.iter().take(4).map(|(k, v)| format!("{k}:{v}")).collect();
        let more = if h.len() > 4 {
            format!(" (+{} more)", h.len() - 4)
        } else {
            String::new()
        };
        println!(
            "{c:>6} {:>7} {:>5} {:>5} {size:>10}  {}{more}",
            n[0],
            n[1],
            n[2],
            shown.join(" ")
        );
    }
    write_jsonl(&a.out.join("server_test.jsonl"), &fed.server_test())?;
    let m = a.out.join("manifest.json");
    std::fs::write(&m, serde_json::to_string_pretty(&fed.manifest)?)?;
    println!(
        "wrote {} and client_*/{{train,val,test}}.jsonl",
        m.display()
    );
    Ok(())
}

fn show(a: ShowArgs) -> Result<()> {
    let (path, format) = match preset(&a.data) {
        Some(p) => {
            let src = p.source(&data_root())?;
            let f = src.format.unwrap_or(Format::Auto);
            (src.train, f)
        }
        None => (PathBuf::from(&a.data), a.format.parse()?),
    };
    let template: Template = a.template.parse()?;
    let (recs, _) = fedllm_data::load(&path, &format)?;
    let tok = tokenizer(&a.model)?;
    for (i, r) in recs.iter().enumerate().skip(a.offset).take(a.n) {
        println!("──── record {i} ────");
        match tokenize(r, template, &tok, a.tok_len)? {
            Some((s, truncated)) => {
                let prompt = tok.decode(&s.ids[..s.target_start], false)?;
                let target = tok.decode(&s.ids[s.target_start..], false)?;
                println!("{prompt}[[LOSS>>{target}<<LOSS]]");
                println!(
                    "({} prompt tokens without loss, {} target tokens with loss{})",
                    s.target_start,
                    s.ids.len() - s.target_start,
                    if truncated {
                        ", truncated at --tok-len"
                    } else {
                        ""
                    }
                );
            }
            None => println!(
                "(dropped: the prompt fills --tok-len {}, no target token would remain)",
                a.tok_len
            ),
        }
    }
    Ok(())
}
