//! `fedllm data split` / `show` / `presets` on a project-written fixture.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fedllm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fedllm"))
        .args(args)
        .output()
        .expect("run fedllm")
}

fn golden(name: &str) -> PathBuf {
    fedllm_testing::golden_dir().join(name)
}

fn fixture(dir: &Path) -> PathBuf {
    let p = dir.join("dolly.jsonl");
    let cats = [
        "open_qa",
        "brainstorming",
        "classification",
        "summarization",
        "creative_writing",
    ];
    let lines: Vec<String> = (0..200)
        .map(|i| {
            serde_json::json!({"instruction": format!("question {i}"), "context": "", "response": format!("answer {i}"),
                               "category": cats[(i * 7 + i / 5) % cats.len()]})
            .to_string()
        })
        .collect();
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn read_lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn split_writes_clients_and_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    for splitter in ["iid", "dirichlet", "meta", "size-skew"] {
        let out = tmp.path().join(splitter);
        let o = fedllm(&[
            "data",
            "split",
            "--data",
            data.to_str().unwrap(),
            "--splitter",
            splitter,
            "--clients",
            "3",
            "--alpha",
            "1.0",
            "--seed",
            "7",
            "--model",
            golden("llama-tiny").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            o.status.success(),
            "{splitter}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let table = String::from_utf8_lossy(&o.stdout);
        assert!(table.contains("tokens"), "{table}");
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap())
                .unwrap();
        let mut total = 0;
        for part in ["train", "val", "test"] {
            for c in 0..3 {
                let recs = read_lines(&out.join(format!("client_{c}/{part}.jsonl")));
                let m = &manifest["parts"][part][c];
                assert_eq!(m["records"].as_u64().unwrap() as usize, recs.len());
                assert_eq!(m["sha256"].as_str().unwrap().len(), 64);
                total += recs.len();
            }
        }
        assert_eq!(total, 200, "{splitter}: every record exactly once");
        if splitter == "meta" {
            // Each category lives with one client, in every part.
            let mut owner = std::collections::HashMap::new();
            for part in ["train", "val", "test"] {
                for c in 0..3 {
                    for r in read_lines(&out.join(format!("client_{c}/{part}.jsonl"))) {
                        let cat = r["category"].as_str().unwrap().to_string();
                        assert_eq!(*owner.entry(cat).or_insert(c), c);
                    }
                }
            }
            assert_eq!(owner.len(), 5, "no category dropped");
        }
        // Same seed → same manifest.
        let again = tmp.path().join(format!("{splitter}-again"));
        fedllm(&[
            "data",
            "split",
            "--data",
            data.to_str().unwrap(),
            "--splitter",
            splitter,
            "--clients",
            "3",
            "--alpha",
            "1.0",
            "--seed",
            "7",
            "--out",
            again.to_str().unwrap(),
        ]);
        assert_eq!(
            std::fs::read(out.join("manifest.json")).unwrap(),
            std::fs::read(again.join("manifest.json")).unwrap()
        );
    }
}

#[test]
fn show_marks_the_loss_part_and_presets_list() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    let o = fedllm(&[
        "data",
        "show",
        "--data",
        data.to_str().unwrap(),
        "--model",
        golden("llama-tiny").to_str().unwrap(),
        "--n",
        "2",
    ]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && s.contains("### Response:[[LOSS>>answer 0") && s.contains("<<LOSS]]"),
        "{s}"
    );
    let o = fedllm(&["data", "presets"]);
    let s = String::from_utf8_lossy(&o.stdout);
    for p in ["fed-gsm8k-3", "fed-codealpaca", "fed-dolly", "fed-mmlu"] {
        assert!(s.contains(p), "{s}");
    }
    // A preset without its files names the missing file and where to get it: the fetch script
    // for the presets it installs, Dolly's own page for Dolly (which it does not fetch).
    for (preset, file, advice) in [
        ("fed-gsm8k-3", "gsm8k/train.jsonl", "scripts/fetch-data.sh"),
        (
            "fed-dolly",
            "databricks-dolly-15k.jsonl",
            "huggingface.co/datasets/databricks",
        ),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_fedllm"))
            .args([
                "data",
                "split",
                "--data",
                preset,
                "--out",
                tmp.path().join("x").to_str().unwrap(),
            ])
            .env("FEDLLM_DATA", tmp.path())
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && e.contains(file) && e.contains(advice),
            "{e}"
        );
    }
}
