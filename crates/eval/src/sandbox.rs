//! Runs untrusted Python (model completions) in a separate `python3 -I` process: its own session
//! (the whole process group is killed at the deadline), address-space / CPU / file-size limits
//! (setrlimit), no network namespace where the OS allows it, a scratch directory, an empty
//! environment, and HumanEval's reliability guard (no fork, no subprocess, no file removal).
//!
//! The verdict cannot be forged by how the program ends: a trusted runner reads a per-run random
//! token from a pipe (fd 3) and closes it before any untrusted code runs, executes the solution and
//! the test, calls `check(entry_point)` itself, and only when that call returns writes the token
//! to a second pipe (fd 4) and leaves with `_exit`. Exit status, stdout and atexit hooks count for
//! nothing. What this does not stop is code written to dig the token out of the runner's frame
//! (`sys._getframe`): the guard is against accidents and sloppy completions, not a determined
//! adversary, exactly like HumanEval's own harness.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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

/// HumanEval's reliability guard, applied by the runner after it has taken what it needs.
const GUARD: &str = r#"
import builtins as _b, os as _os, shutil as _sh, subprocess as _sp, sys as _sys, faulthandler as _fh
_fh.disable()
for _n in ["kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
           "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
           "fchown", "chmod", "chown", "chroot", "lchown", "spawnv", "spawnve", "execv", "execve",
           "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle",
           "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "popen"]:
    if hasattr(_os, _n):
        setattr(_os, _n, None)
_sh.rmtree = None
_sh.move = None
_sh.chown = None
_sp.Popen = None
_b.help = None
for _m in ["ipdb", "joblib", "resource", "psutil", "tkinter", "_posixsubprocess"]:
    _sys.modules[_m] = None
"#;

/// The trusted part of every run (`ENTRY` becomes the entry point's name as a string literal).
const RUNNER: &str = r#"
def _fedllm_run():
    import os
    read, write, close, exit_ = os.read, os.write, os.close, os._exit
    token = b""
    while True:
        chunk = read(3, 64)
        if not chunk:
            break
        token += chunk
    close(3)
    with open("solution.py") as f:
        solution = compile(f.read(), "solution.py", "exec")
    with open("test.py") as f:
        test = compile(f.read(), "test.py", "exec")
    with open("guard.py") as f:
        guard = compile(f.read(), "guard.py", "exec")
    exec(guard, {})
    env = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(solution, env)
    exec(test, env)
    check, candidate = env["check"], env[ENTRY]
    check(candidate)
    write(4, token)
    exit_(0)
_fedllm_run()
"#;

/// Runs `solution` (prompt + completion), then `test`, then `check(entry_point)`.
/// Passed means `check` returned before the deadline; the second value is stderr's last line.
pub fn run_check(
    solution: &str,
    test: &str,
    entry_point: &str,
    limits: &Limits,
) -> std::io::Result<(Outcome, String)> {
    if !entry_point
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
        || entry_point.is_empty()
    {
        return Err(std::io::Error::other(format!(
            "entry point `{entry_point}` is not a Python identifier"
        )));
    }
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("solution.py"), solution)?;
    std::fs::write(dir.path().join("test.py"), test)?;
    std::fs::write(dir.path().join("guard.py"), GUARD)?;
    let runner = RUNNER.replace("ENTRY", &format!("\"{entry_point}\""));
    std::fs::write(dir.path().join("runner.py"), runner)?;
    let log = dir.path().join("stderr.txt");
    let token = random_token()?;
    let (token_r, token_w) = pipe()?;
    let (result_r, result_w) = pipe()?;
    let (tr, rw) = (token_r.as_raw_fd(), result_w.as_raw_fd());
    let (mem, fsize) = (limits.memory_bytes, limits.max_file_bytes);
    let cpu = limits.timeout.as_secs().max(1) + 1;
    let mut cmd = Command::new("python3");
    cmd.arg("-I")
        .arg("runner.py")
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
            // Lift both pipe ends above 4 first, so dup2 never meets its own target.
            let hi_t = libc::fcntl(tr, libc::F_DUPFD_CLOEXEC, 10);
            let hi_r = libc::fcntl(rw, libc::F_DUPFD_CLOEXEC, 10);
            if hi_t < 0 || hi_r < 0 || libc::dup2(hi_t, 3) < 0 || libc::dup2(hi_r, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
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
    drop((token_r, result_w));
    let mut tw = std::fs::File::from(token_w);
    // The child may already be gone (it cannot fail to start later than this): a broken pipe is
    // its failure, not ours.
    let _ = std::io::Write::write_all(&mut tw, token.as_bytes());
    drop(tw);
    let pgid = child.id() as i32;
    let start = Instant::now();
    let finished = loop {
        if child.try_wait()?.is_some() {
            break true;
        }
        if start.elapsed() >= limits.timeout {
            break false;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Whatever happened, nothing of the program outlives it.
    unsafe { libc::killpg(pgid, libc::SIGKILL) };
    let _ = child.wait();
    let said = read_nonblocking(result_r, token.len() + 64);
    let mut err = String::new();
    if let Ok(mut f) = std::fs::File::open(&log) {
        let _ = f.by_ref().take(4096).read_to_string(&mut err);
    }
    let outcome = if said == token.as_bytes() {
        Outcome::Passed
    } else if finished {
        Outcome::Failed
    } else {
        Outcome::TimedOut
    };
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .to_string();
    Ok((outcome, last))
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array; each is owned once below.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What the program wrote to the result pipe, at most `max` bytes (all writers are dead by now,
/// but a leaked descriptor must not hang us, hence non-blocking).
fn read_nonblocking(fd: OwnedFd, max: usize) -> Vec<u8> {
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut out = Vec::new();
    let _ = std::fs::File::from(fd)
        .take(max as u64)
        .read_to_end(&mut out);
    out
}

/// 128 bits from the OS, as hex: unknown to the program until `check` has returned.
fn random_token() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
