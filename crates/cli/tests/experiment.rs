//! `fedllm experiment` end to end on the smoke profile (tiny models, real data files): every cell
//! of `configs/paper/` runs, a `kill -9` mid-experiment loses no finished cell, and the report
//! has every table, row, plot and finding. The numbers are not results; the structure is.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn study() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/paper")
}

fn experiment(out: &Path, resume: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedllm"));
    c.arg("experiment")
        .arg(study())
        .args(["--scale", "smoke", "--out"])
        .arg(out);
    if resume {
        c.arg("--resume");
    }
    c
}

/// Every cell file of the study's tables (`<table>/<stem>`), with the table's folder.
fn cells() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(study()).unwrap() {
        let t = t.unwrap().path();
        if !t.is_dir() {
            continue;
        }
        let table = t.file_name().unwrap().to_string_lossy().to_string();
        for f in std::fs::read_dir(&t).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|x| x == "yaml") {
                let stem = f.file_stem().unwrap().to_string_lossy().to_string();
                v.push((table.clone(), format!("{table}/{stem}")));
            }
        }
    }
    v.sort();
    v
}

fn dolly_present() -> bool {
    let root = std::env::var_os("FEDLLM_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| study().join("../../data"));
    root.join("dolly/databricks-dolly-15k.jsonl").exists()
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .modified()
        .unwrap()
}

#[test]
fn smoke_matrix_runs_every_cell_survives_kill9_and_reports_every_row() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("exp");
    let err_log = tmp.path().join("stderr.log");
    // First start: killed (SIGKILL) as soon as two cells have finished.
    let mut child = experiment(&out, false)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err_log).unwrap())
        .spawn()
        .unwrap();
    let mut done = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(id) = line
            .strip_prefix("cell ")
            .and_then(|l| l.strip_suffix(": done"))
        {
            done.push(id.to_string());
            if done.len() == 2 {
                break;
            }
        }
    }
    assert_eq!(
        done.len(),
        2,
        "the experiment ended before two cells finished: {}",
        std::fs::read_to_string(&err_log).unwrap_or_default()
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let cell_dir = |id: &str| out.join("cells").join(id);
    let before: Vec<_> = done
        .iter()
        .map(|id| mtime(&cell_dir(id).join("result.json")))
        .collect();
    // The resume finishes the rest and leaves the finished cells alone.
    let r = experiment(&out, true)
        .stderr(std::fs::File::create(&err_log).unwrap())
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "{}",
        std::fs::read_to_string(&err_log).unwrap_or_default()
    );
    let stdout = String::from_utf8_lossy(&r.stdout);
    for (id, t) in done.iter().zip(&before) {
        assert_eq!(
            mtime(&cell_dir(id).join("result.json")),
            *t,
            "{id} was run again"
        );
        assert!(
            !stdout.contains(&format!("cell {id}: training")),
            "{stdout}"
        );
    }
    // Every cell ran (Fed-Dolly's only where its file is present), and each main table's base row.
    let dolly = dolly_present();
    let all = cells();
    for (table, id) in &all {
        let ran = cell_dir(id).join("result.json").exists();
        assert_eq!(ran, table != "fed-dolly" || dolly, "{id}");
    }
    for t in ["fed-gsm8k-3", "fed-codealpaca", "fed-mmlu"] {
        assert!(
            cell_dir(&format!("{t}/base")).join("result.json").exists(),
            "{t}"
        );
    }
    assert!(out.join("hpo/hpo.json").exists());
    // The report: banner, every table, one row per cell, plots, HPO and findings.
    let rep = std::fs::read_to_string(out.join("REPORT.md")).unwrap();
    assert!(rep.contains("Smoke profile"), "{rep}");
    for t in [
        "## Fed-GSM8K-3",
        "## Fed-CodeAlpaca",
        "## Fed-MMLU",
        "## Fed-Dolly",
        "## Personalised FL",
        "## Federated HPO",
        "## The paper's findings at this scale",
    ] {
        assert!(rep.contains(t), "{t} missing from the report");
    }
    let section = |title: &str| -> String {
        let at = rep.find(title).unwrap();
        let rest = &rep[at + title.len()..];
        rest[..rest.find("\n## ").unwrap_or(rest.len())].to_string()
    };
    for (t, title) in [
        ("fed-gsm8k-3", "## Fed-GSM8K-3"),
        ("fed-codealpaca", "## Fed-CodeAlpaca"),
        ("fed-mmlu", "## Fed-MMLU"),
    ] {
        let s = section(title);
        let rows = s
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| method"))
            .count();
        let n = all.iter().filter(|c| c.0 == t).count();
        assert_eq!(
            rows,
            n + 1,
            "{t}: one row per cell and the base model's\n{s}"
        );
        assert!(s.contains("| base model |"), "{s}");
        for m in [
            "LoRA",
            "P-tuning",
            "prompt tuning",
            "prefix tuning",
            "FedOT (drop 0.2, aligned)",
        ] {
            for st in ["Global", "Fed", "Local"] {
                assert!(
                    s.contains(&format!("| {m} | {st} |")),
                    "{t}: {m} {st} missing\n{s}"
                );
            }
        }
        for plot in ["loss", "scores"] {
            let svg = std::fs::read_to_string(out.join(format!("{t}-{plot}.svg"))).unwrap();
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
            let mark = if plot == "loss" {
                "<polyline"
            } else {
                "<rect x="
            };
            assert!(svg.contains(mark), "{t}-{plot}.svg has no data");
            assert!(s.contains(&format!("({t}-{plot}.svg)")), "{s}");
        }
    }
    // Trainable parameters by hand for the smoke model (hidden 64, 4 layers, q_proj 64 → 64,
    // v_proj 64 → 32): LoRA r = 8 on q and v = 4 · (8·64 + 64·8 + 8·64 + 32·8) = 7,168; prompt
    // tuning's 20 virtual tokens = 20 · 64 = 1,280.
    let gsm = section("## Fed-GSM8K-3");
    let row = |m: &str| {
        gsm.lines()
            .find(|l| l.starts_with(&format!("| {m} | Fed |")))
            .unwrap()
            .to_string()
    };
    assert!(row("LoRA").contains("| 7168 |"), "{}", row("LoRA"));
    assert!(
        row("prompt tuning").contains("| 1280 |"),
        "{}",
        row("prompt tuning")
    );
    if !dolly {
        assert!(
            section("## Fed-Dolly").contains("not run (15 cells): its data is missing"),
            "{rep}"
        );
    }
    let pfl = section("## Personalised FL");
    let pfl_cells = all.iter().filter(|c| c.0 == "pfl").count();
    let rows = pfl
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| method"))
        .count();
    assert_eq!(rows, pfl_cells, "{pfl}");
    let hpo = section("## Federated HPO");
    assert!(
        hpo.contains("Best: trial") && hpo.contains("| 1 |"),
        "{hpo}"
    );
    let findings = section("## The paper's findings at this scale");
    assert_eq!(
        findings.lines().filter(|l| l.starts_with("- **")).count(),
        8,
        "{findings}"
    );
}
