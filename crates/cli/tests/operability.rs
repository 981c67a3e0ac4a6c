//! What a new user meets through the binary: bad values stop a run before any training, a used
//! output folder is never overwritten piecemeal, configs work from any directory, errors name
//! what is at fault, progress shows without a terminal, one held-out loss across commands, and
//! the data fetcher checks what it installs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fedllm(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedllm"));
    c.current_dir(dir).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run fedllm")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A learnable toy instruction set.
fn write_data(path: &Path, n: usize) {
    let words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let w = words[i % words.len()];
            serde_json::json!({"instruction": format!("Repeat: {w}"), "input": "", "output": format!("{w} {w}")})
                .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// A folder laid out as a user's project: configs/run.yaml, models/tiny, data/toy.jsonl, with
/// the config's paths relative to its own folder.
fn project(root: &Path, extra: &str) -> PathBuf {
    let models = root.join("models/tiny");
    std::fs::create_dir_all(&models).unwrap();
    let tiny = fedllm_testing::golden_dir().join("llama-tiny");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny.join(f), models.join(f)).unwrap();
    }
    std::fs::create_dir_all(root.join("data")).unwrap();
    write_data(&root.join("data/toy.jsonl"), 60);
    std::fs::create_dir_all(root.join("configs")).unwrap();
    let cfg = root.join("configs/run.yaml");
    std::fs::write(
        &cfg,
        format!(
            "federate: {{client_num: 3, sample_client_num: 3, total_round_num: 2}}
data: {{source: ../data/toy.jsonl, template: raw, tok_len: 64}}
model: {{path: ../models/tiny}}
adapter: {{type: lora, r: 4}}
train: {{local_update_steps: 2, batch_size: 4, optimizer: adamw, lr: 0.01}}
eval: {{max_samples: 8}}
outdir: ../runs/a
{extra}"
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn negative_lr_exits_nonzero_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = project(tmp.path(), "");
    let o = fedllm(
        tmp.path(),
        &["run", "--config", cfg.to_str().unwrap(), "train.lr=-0.001"],
        &[],
    );
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("train.lr must be in (0, ∞), got -0.001"), "{t}");
    assert!(
        !tmp.path().join("runs/a").exists(),
        "nothing may be written: {t}"
    );
}

/// `fedllm config check` prints the resolved config, or names every problem at once.
#[test]
fn config_check_reports_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = project(tmp.path(), "");
    let c = cfg.to_str().unwrap();
    let o = fedllm(tmp.path(), &["config", "check", c], &[]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let models = std::fs::canonicalize(tmp.path())
        .unwrap()
        .join("models/tiny");
    assert!(
        t.contains(&format!("path: {}", models.display())),
        "resolved path: {t}"
    );
    let o = fedllm(
        tmp.path(),
        &[
            "config",
            "check",
            c,
            "train.lr=-1",
            "adapter.r=0",
            "train.momentum=2",
        ],
        &[],
    );
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    for key in ["train.lr", "adapter.r", "train.momentum"] {
        assert!(t.contains(key), "{key} not named: {t}");
    }
}

#[test]
fn config_from_another_folder_finds_its_files_and_a_used_outdir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = project(tmp.path(), "");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--config", cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        fedllm(&elsewhere, &args, &[("FEDLLM_PROGRESS_SECS", "0")])
    };
    let o = run(&[]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let out = tmp.path().join("runs/a");
    assert!(
        out.join("adapter/adapter_model.safetensors").exists(),
        "{t}"
    );
    // Progress without a terminal: plain lines per round.
    assert!(t.contains("round 1/2: 3/3 clients"), "{t}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(m["status"], "finished");
    assert_eq!(m["adapter_round"], 2);
    // The plot holds every loss the metrics hold, with point markers.
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(
        svg.contains("client test") && svg.contains("<circle"),
        "loss.svg"
    );

    let snapshot = |d: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = [
            "metrics.jsonl",
            "metrics.csv",
            "run.json",
            "adapter/adapter_model.safetensors",
        ]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(d.join(f)).unwrap()))
        .collect();
        v.sort();
        v
    };
    let before = snapshot(&out);
    let o = run(&["federate.total_round_num=1"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("holds another run") && t.contains("--overwrite"),
        "{t}"
    );
    assert_eq!(snapshot(&out), before, "the first run's files changed");
    // --overwrite replaces it.
    let o = run(&["--overwrite", "federate.total_round_num=1"]);
    assert!(o.status.success(), "{}", text(&o));
    let rows = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        rows.lines().count(),
        2,
        "round 0 and round 1 of the new run only"
    );
}

#[test]
fn data_mistakes_name_the_file_or_the_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = project(tmp.path(), "");
    let empty = tmp.path().join("data/empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let o = fedllm(
        tmp.path(),
        &[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "data.source=data/empty.jsonl",
        ],
        &[],
    );
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("empty.jsonl") && t.contains("empty"),
        "{t}"
    );
    // The alpaca template's prompt alone is longer than 16 tokens.
    let o = fedllm(
        tmp.path(),
        &[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "data.template=alpaca",
            "data.tok_len=16",
        ],
        &[],
    );
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("data.tok_len = 16 is too short"),
        "{t}"
    );
    assert!(!t.contains("panicked"), "{t}");
}

/// Each eval task lists only its own options.
#[test]
fn eval_tasks_have_their_own_options() {
    let tmp = tempfile::tempdir().unwrap();
    let help = |task: &str| text(&fedllm(tmp.path(), &["eval", task, "--help"], &[]));
    let loss = help("loss");
    assert!(
        loss.contains("--tok-len") && !loss.contains("--shots") && !loss.contains("--completions")
    );
    let mmlu = help("mmlu");
    assert!(mmlu.contains("--shots") && !mmlu.contains("--full-text"));
    let he = help("humaneval");
    assert!(he.contains("--completions") && !he.contains("--every"));
}

/// finetune's held-out loss and `eval loss` agree on the same file at the same tok_len, and both
/// say how many samples that length truncated.
#[test]
fn one_heldout_loss_across_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, held) = (
        tmp.path().join("train.jsonl"),
        tmp.path().join("held.jsonl"),
    );
    write_data(&train, 24);
    // Long responses, so tok_len 40 truncates some.
    let long: Vec<String> = (0..6)
        .map(|i| serde_json::json!({"instruction": "Count", "input": "", "output": (0..(5 + 6 * i)).map(|k| k.to_string()).collect::<Vec<_>>().join(" ")}).to_string())
        .collect();
    std::fs::write(&held, long.join("\n")).unwrap();
    let tiny = fedllm_testing::golden_dir().join("llama-tiny");
    let out = tmp.path().join("ft");
    let o = fedllm(
        tmp.path(),
        &[
            "finetune",
            "--model",
            tiny.to_str().unwrap(),
            "--data",
            train.to_str().unwrap(),
            "--eval-data",
            held.to_str().unwrap(),
            "--steps",
            "3",
            "--lr",
            "0.01",
            "--tok-len",
            "40",
            "--template",
            "raw",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let line = t
        .lines()
        .find(|l| l.starts_with("held-out:"))
        .expect("held-out report");
    assert!(
        !line.contains(" 0 truncated"),
        "tok_len 40 must truncate some: {line}"
    );
    let after: f64 = t
        .lines()
        .find_map(|l| l.strip_prefix("held-out loss after:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("held-out loss after");
    let res = tmp.path().join("loss.json");
    let o = fedllm(
        tmp.path(),
        &[
            "eval",
            "loss",
            "--model",
            tiny.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--data",
            held.to_str().unwrap(),
            "--template",
            "raw",
            "--tok-len",
            "40",
            "--out",
            res.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&res).unwrap()).unwrap();
    // finetune prints 4 decimals.
    assert!(
        (r["value"].as_f64().unwrap() - after).abs() <= 5e-5,
        "{r} vs {after}"
    );
    assert!(r["truncated"].as_u64().unwrap() > 0);
}

fn sha256(p: &Path) -> String {
    let o = Command::new("python3")
        .args([
            "-c",
            "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())",
        ])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

/// `scripts/fetch-data.sh --mirror DIR` installs every file the presets read, each checked
/// against its pinned hash; a corrupted mirror file is refused and never installed.
#[test]
fn fetch_data_from_a_mirror_checks_hashes() {
    let files = [
        "gsm8k/train.jsonl",
        "gsm8k/test.jsonl",
        "codealpaca/code_alpaca_2k.json",
        "mmlu/mmlu.jsonl",
        "humaneval/HumanEval.jsonl.gz",
    ];
    let mut found = Vec::new();
    for f in files {
        let Some(p) = fedllm_testing::data_file(f) else {
            return;
        };
        found.push((f, p));
    }
    let tmp = tempfile::tempdir().unwrap();
    let mirror = tmp.path().join("mirror");
    for (f, p) in &found {
        std::fs::create_dir_all(mirror.join(f).parent().unwrap()).unwrap();
        std::fs::copy(p, mirror.join(f)).unwrap();
    }
    let script = repo().join("scripts/fetch-data.sh");
    let fetch = |out: &Path| {
        Command::new("bash")
            .arg(&script)
            .args([
                "--mirror",
                mirror.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    let out = tmp.path().join("data");
    let o = fetch(&out);
    assert!(o.status.success(), "{}", text(&o));
    for (f, p) in &found {
        assert_eq!(sha256(&out.join(f)), sha256(p), "{f}");
    }
    // The presets resolve against what it installed.
    let o = fedllm(
        tmp.path(),
        &[
            "data",
            "split",
            "--data",
            "fed-gsm8k-3",
            "--out",
            tmp.path().join("split").to_str().unwrap(),
        ],
        &[("FEDLLM_DATA", out.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", text(&o));
    // One changed byte in the mirror: refused, named, not installed.
    let bad = mirror.join("gsm8k/test.jsonl");
    let mut bytes = std::fs::read(&bad).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&bad, bytes).unwrap();
    let out2 = tmp.path().join("data2");
    let o = fetch(&out2);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("gsm8k/test.jsonl") && t.contains("sha256"),
        "{t}"
    );
    assert!(!out2.join("gsm8k/test.jsonl").exists());
}

/// `fedllm tune` killed with SIGKILL after its first finished trial resumes with `--resume`:
/// every trial ends up in trials.jsonl exactly once, the ones finished before the kill are not
/// run again, and best.yaml is a config `fedllm config check` accepts.
#[test]
fn tune_survives_kill_and_resumes_without_rerunning() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = project(tmp.path(), "");
    let space = tmp.path().join("space.yaml");
    std::fs::write(&space, "train.lr: {log_uniform: [0.001, 0.05]}\n").unwrap();
    let out = tmp.path().join("tune");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedllm"))
        .current_dir(tmp.path())
        .args([
            "tune",
            "--config",
            cfg.to_str().unwrap(),
            "--space",
            space.to_str().unwrap(),
            "--trials",
            "12",
            "--max-rounds",
            "2",
            "--out",
            out.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("trial 0"), "{first}");
    child.kill().unwrap();
    child.wait().unwrap();
    let jsonl = || std::fs::read_to_string(out.join("trials.jsonl")).unwrap();
    let before = jsonl().lines().count();
    assert!(
        (1..12).contains(&before),
        "killed mid-run: {before} trials recorded"
    );
    let o = fedllm(
        tmp.path(),
        &["tune", "--resume", out.to_str().unwrap()],
        &[],
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for id in 0..before {
        assert!(
            !t.contains(&format!("trial {id} at")),
            "trial {id} reran: {t}"
        );
    }
    let after = jsonl();
    let trials: std::collections::BTreeSet<u64> = after
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["trial"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!((after.lines().count(), trials.len()), (12, 12));
    // Twelve trials at 2 rounds each: round 1's ranking against round 2's, measured.
    assert!(
        t.contains("rank correlation, round 1 vs the largest budget"),
        "{t}"
    );
    assert!(out.join("trials.svg").exists() && out.join("trials.csv").exists());
    let best = out.join("best.yaml");
    let o = fedllm(
        tmp.path(),
        &["config", "check", best.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
}
