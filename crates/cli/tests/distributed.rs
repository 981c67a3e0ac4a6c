//! The distributed mode through the binary: real `fedllm server` and `fedllm client`
//! processes on 127.0.0.1 with the tiny golden LLaMA. Every wait is bounded; a test that
//! hangs fails at its deadline instead.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fedllm")
}

fn tiny() -> PathBuf {
    fedllm_testing::golden_dir().join("llama-tiny")
}

/// A port for a test's server, free when probed, below the kernel's ephemeral range: a port
/// from that range (what binding :0 hands out) can be taken by another test's outgoing
/// connection between the probe and the server's bind, which failed a run once. Below the
/// range only an explicit bind takes a port, and each call of this process probes a new one.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    // Test binaries of one run start at different places (their pids differ).
    let span = low.saturating_sub(10000).max(1000);
    let start = 10000 + (std::process::id() % 64) as u16 * (span / 64);
    loop {
        let p = start + NEXT.fetch_add(1, Ordering::Relaxed) % (span / 64);
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// A learnable toy instruction set.
fn data(dir: &Path) -> PathBuf {
    let words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"];
    let mut rng = fedllm_rng::Rng::new(1);
    let lines: Vec<String> = (0..120)
        .map(|i| {
            let w = words[(rng.next_u64() % words.len() as u64) as usize];
            let cat = ["a", "b", "c", "d"][i % 4];
            serde_json::json!({"instruction": format!("Repeat: {w}\n"), "input": "", "output": format!("{w} {w}"), "category": cat}).to_string()
        })
        .collect();
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn config(dir: &Path, port: u16, rounds: usize, extra: &str) -> PathBuf {
    let text = format!(
        "federate: {{mode: distributed, client_num: 3, sample_client_num: 3, total_round_num: {rounds}, seed: 0}}
data: {{source: {data}, template: raw, tok_len: 64}}
model: {{path: {model}}}
train: {{local_update_steps: 3, batch_size: 4, optimizer: adamw, lr: 0.01}}
adapter: {{r: 4, dropout: 0.1}}
eval: {{max_samples: 8}}
outdir: {out}
distributed:
  listen: 127.0.0.1:{port}
  server: http://127.0.0.1:{port}
  round_timeout_s: 60
  join_timeout_s: 60
  connect_timeout_s: 60
{extra}",
        data = data(dir).display(),
        model = tiny().display(),
        out = dir.join("run").display(),
    );
    let p = dir.join("cfg.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(args: &[&str], log: PathBuf) -> Self {
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin())
            .args(args)
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit; kills it and panics at the deadline.
    fn wait(&mut self, secs: u64) -> bool {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.success();
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "{} still running after {secs}s:\n{}",
                    self.log.display(),
                    self.text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the log contains `needle`.
    fn wait_for(&mut self, needle: &str, secs: u64) {
        let end = Instant::now() + Duration::from_secs(secs);
        while !self.text().contains(needle) {
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "no `{needle}` in {} after {secs}s:\n{}",
                    self.log.display(),
                    self.text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn server(dir: &Path, cfg: &Path, extra: &[&str]) -> Proc {
    let mut a = vec!["server", "--config", cfg.to_str().unwrap()];
    a.extend(extra);
    Proc::start(&a, dir.join(format!("server-{}.log", now_ms())))
}

fn client(dir: &Path, cfg: &Path, i: usize, extra: &[&str]) -> Proc {
    let idx = i.to_string();
    let mut a = vec![
        "client",
        "--config",
        cfg.to_str().unwrap(),
        "--data-idx",
        &idx,
    ];
    a.extend(extra);
    Proc::start(&a, dir.join(format!("client{i}-{}.log", now_ms())))
}

/// A server and three clients of `cfg`, run to the end; each must exit successfully.
fn run_three_clients(d: &Path, cfg: &Path) {
    let mut s = server(d, cfg, &[]);
    let mut cs: Vec<Proc> = (0..3).map(|i| client(d, cfg, i, &[])).collect();
    assert!(s.wait(120), "{}", s.text());
    for c in &mut cs {
        assert!(c.wait(30), "{}", c.text());
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The same config run in-process (`fedllm run`, standalone): the reference adapter bytes.
fn standalone(dir: &Path, cfg: &Path) -> Vec<u8> {
    let out = standalone_in(dir, cfg, "standalone", &[]);
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

/// `cfg` run standalone in `dir/name` with `extra` overrides; returns that folder.
fn standalone_in(dir: &Path, cfg: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let outdir = format!("outdir={}", out.display());
    let mut args = vec![
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--no-progress",
        "federate.mode=standalone",
        &outdir,
    ];
    args.extend_from_slice(extra);
    let o = Command::new(bin()).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn adapter(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("run/adapter/adapter_model.safetensors")).unwrap()
}

fn records(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn three_client_processes_match_standalone_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = config(d, free_port(), 3, "");
    run_three_clients(d, &cfg);
    assert_eq!(adapter(d), standalone(d, &cfg), "distributed != standalone");
    // Byte accounting: raw fp32 on the wire costs < 1% over the tensor bytes.
    let r = &records(d)[1];
    let raw = r["bytes_up_per_client"]["0"].as_u64().unwrap() as f64;
    let wire = r["wire_up_per_client"]["0"].as_u64().unwrap() as f64;
    // Per tensor a header with its PEFT name (~100 B); the bulk costs ≤ 1% (see wire's tests
    // and `fedllm bench transport` for large updates).
    let tensors = 16.0;
    assert!(
        wire >= raw && wire <= raw * 1.01 + 100.0 * tensors + 300.0,
        "wire {wire} raw {raw}"
    );
}

#[test]
fn compressed_updates_cut_the_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = config(d, free_port(), 2, "  compression: int8\n  zstd: true\n");
    run_three_clients(d, &cfg);
    let recs = records(d);
    let r = &recs[2];
    let raw = r["bytes_up_per_client"]["1"].as_u64().unwrap() as f64;
    let wire = r["wire_up_per_client"]["1"].as_u64().unwrap() as f64;
    assert!(wire < raw * 0.5, "int8+zstd: wire {wire} raw {raw}");
    let (a, b) = (
        recs[0]["server_test_loss"].as_f64().unwrap(),
        recs[2]["server_test_loss"].as_f64().unwrap(),
    );
    assert!(b < a, "held-out loss {a} -> {b}");
}

#[test]
fn killed_client_misses_the_round_then_rejoins() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = config(d, free_port(), 3, "");
    let over = ["distributed.round_timeout_s=4"];
    let mut s = server(d, &cfg, &over);
    let mut c0 = client(d, &cfg, 0, &[]);
    let mut c1 = client(d, &cfg, 1, &[]);
    // Client 2 answers slowly, so it is mid-round when it dies.
    let mut c2 = client(d, &cfg, 2, &["--straggle-ms", "2500"]);
    // Killed once it holds round 1's task (its 2.5 s straggle keeps it from answering first).
    c2.wait_for("round 1: fit received", 60);
    c2.kill9();
    s.wait_for("round   1:", 30);
    let t = s.text();
    assert!(
        t.contains("deadline (4s) passed without clients [2]"),
        "{t}"
    );
    // Restarted, it rejoins and trains in the next round.
    let mut c2 = client(d, &cfg, 2, &[]);
    assert!(s.wait(60), "{}", s.text());
    for c in [&mut c0, &mut c1, &mut c2] {
        assert!(c.wait(30), "{}", c.text());
    }
    let recs = records(d);
    assert_eq!(recs[1]["failed"], serde_json::json!([2]));
    assert!(recs[1]["client_train_loss"].get("2").is_none());
    assert!(
        recs[3]["client_train_loss"].get("2").is_some(),
        "{:?}",
        recs[3]
    );
    assert_eq!(recs.len(), 4);
}

#[test]
fn killed_server_resumes_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = config(d, free_port(), 4, "");
    let mut s = server(d, &cfg, &[]);
    let mut cs: Vec<Proc> = (0..3)
        .map(|i| client(d, &cfg, i, &["--straggle-ms", "300"]))
        .collect();
    // Killed in round 3: a client holds that round's task (and straggles 300 ms on it).
    cs[0].wait_for("round 3: fit received", 60);
    s.kill9();
    let run = d.join("run");
    let mut s2 = server(d, &cfg, &["--resume", run.to_str().unwrap()]);
    assert!(s2.wait(120), "{}", s2.text());
    assert!(
        s2.text().contains("resuming after round 2"),
        "{}",
        s2.text()
    );
    for c in &mut cs {
        assert!(c.wait(30), "{}", c.text());
    }
    let t = s2.text();
    assert!(
        (0..3).all(|i| t.contains(&format!("client {i} rejoined"))
            || t.contains(&format!("client {i} joined"))),
        "{t}"
    );
    assert_eq!(adapter(d), standalone(d, &cfg), "resumed != uninterrupted");
}

#[test]
fn tls_tokens_and_mtls_refuse_strangers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let certs = d.join("certs");
    let o = Command::new(bin())
        .args(["certs", "--out", certs.to_str().unwrap(), "--clients", "3"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tokens = d.join("tokens.yaml");
    std::fs::write(
        &tokens,
        "0: token-zero-123\n1: token-one-4567\nclient-2: token-two-89ab\n",
    )
    .unwrap();
    for (i, t) in [
        "token-zero-123",
        "token-one-4567",
        "token-two-89ab",
        "not-the-token",
    ]
    .iter()
    .enumerate()
    {
        let mut f = std::fs::File::create(d.join(format!("t{i}"))).unwrap();
        writeln!(f, "{t}").unwrap();
    }
    let port = free_port();
    let c = |f: &str| certs.join(f).display().to_string();
    let tls = format!(
        "  tokens_file: {}\n  tls: {{ca: {}, cert: {}, key: {}, client_auth: true}}\n",
        tokens.display(),
        c("ca.pem"),
        c("server.pem"),
        c("server.key")
    );
    let cfg = config(d, port, 2, &tls);
    let mut s = server(d, &cfg, &["federate.client_num=3"]);
    let https = format!("https://localhost:{port}");
    let client_tls = |i: usize| {
        vec![
            format!("distributed.tls.cert={}", c(&format!("client-{i}.pem"))),
            format!("distributed.tls.key={}", c(&format!("client-{i}.key"))),
        ]
    };
    let run = |i: usize, token: usize, extra: Vec<String>| {
        let mut a: Vec<String> = vec![
            "--server".into(),
            https.clone(),
            "--token-file".into(),
            d.join(format!("t{token}")).display().to_string(),
            "distributed.connect_timeout_s=3".into(),
        ];
        a.extend(extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        client(d, &cfg, i, &a)
    };
    // A wrong token: refused at once, with the reason.
    let mut bad = run(0, 3, client_tls(0));
    assert!(!bad.wait(30));
    assert!(
        bad.text().contains("bad token for client 0"),
        "{}",
        bad.text()
    );
    // No client certificate (mTLS): the handshake fails; the client gives up.
    let mut nocert = run(
        1,
        1,
        vec![
            "distributed.tls.cert=null".into(),
            "distributed.tls.key=null".into(),
        ],
    );
    assert!(!nocert.wait(30), "{}", nocert.text());
    // Plain HTTP against the TLS port: no connection.
    let a: Vec<String> = vec![
        "--server".into(),
        format!("http://127.0.0.1:{port}"),
        "distributed.connect_timeout_s=3".into(),
        "distributed.tls={}".into(),
        format!("distributed.token_file={}", d.join("t2").display()),
    ];
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut plain_http = client(d, &cfg, 2, &a);
    assert!(!plain_http.wait(30), "{}", plain_http.text());
    // The real clients complete the run.
    let mut good: Vec<Proc> = (0..3).map(|i| run(i, i, client_tls(i))).collect();
    assert!(s.wait(120), "{}", s.text());
    for g in &mut good {
        assert!(g.wait(30), "{}", g.text());
    }
    assert!(s
        .text()
        .contains("refused a request for client 0: bad or missing token"));
}

#[test]
fn garbage_and_malformed_uploads_do_not_stop_the_server() {
    use fedllm_transport::pb::{federation_client::FederationClient, frame::Body, Frame};
    use fedllm_transport::pb::{JoinRequest, ResultHeader, ResultKind, TensorHeader};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let port = free_port();
    let cfg = config(d, port, 1, "");
    let mut s = server(d, &cfg, &[]);
    s.wait_for("listening", 60);
    // Raw garbage, and an HTTP/2 preface followed by junk.
    let mut rng = fedllm_rng::Rng::new(3);
    for k in 0..20 {
        if let Ok(mut t) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let mut junk: Vec<u8> = if k % 2 == 0 {
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()
            } else {
                vec![]
            };
            junk.extend((0..(64 + k * 97)).map(|_| rng.next_u64() as u8));
            let _ = t.write_all(&junk);
        }
    }
    // Well-formed gRPC carrying bad updates.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let statuses: Vec<String> = rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut cl = FederationClient::with_interceptor(ch, |mut r: tonic::Request<()>| {
            r.metadata_mut()
                .insert("x-fedllm-client", "1".parse().unwrap());
            Ok(r)
        });
        let run = cl
            .join(JoinRequest {
                client: 1,
                run: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .run;
        let head = |client: u32| Frame {
            body: Some(Body::Result(ResultHeader {
                run: run.clone(),
                client,
                round: 1,
                kind: ResultKind::FitRes as i32,
                tensors: 1,
                ..Default::default()
            })),
        };
        let tensor = |name: &str, bytes: u64| Frame {
            body: Some(Body::Tensor(TensorHeader {
                name: name.into(),
                shape: vec![4],
                bytes,
                ..Default::default()
            })),
        };
        let chunk = |n: usize| Frame {
            body: Some(Body::Chunk(vec![7; n])),
        };
        let secagg = |json: &str| Frame {
            body: Some(Body::Result(ResultHeader {
                run: run.clone(),
                client: 1,
                round: 1,
                kind: ResultKind::SecaggRes as i32,
                secagg: json.into(),
                ..Default::default()
            })),
        };
        let cases: Vec<Vec<Frame>> = vec![
            vec![chunk(16)],                                               // no header
            vec![head(2)],                                // another client's result
            vec![head(1), chunk(3)],                      // chunk before a tensor
            vec![head(1), tensor("nope", 16), chunk(16)], // unknown tensor
            vec![head(1), tensor("x", u64::MAX)],         // absurd size
            vec![head(1), Frame { body: None }],          // empty frame
            vec![secagg(r#"{"Unmask": {"b": [[0, [1, 2]]], "sk": []}}"#)], // malformed shares
            vec![secagg("not json")],                     // not a reply at all
        ];
        let mut out = Vec::new();
        for c in cases {
            let r = cl.push(tokio_stream::iter(c)).await;
            out.push(match r {
                Ok(r) => format!("ok {:?}", r.into_inner()),
                Err(e) => format!("{:?}", e.code()),
            });
        }
        // A message over the size limit.
        let big = vec![head(1), chunk(5 << 20)];
        out.push(match cl.push(tokio_stream::iter(big)).await {
            Ok(_) => "accepted".into(),
            Err(e) => format!("{:?}", e.code()),
        });
        out
    });
    assert!(
        statuses
            .iter()
            .all(|s| !s.starts_with("ok PushReply { accepted: true")),
        "{statuses:?}"
    );
    assert!(
        statuses[..8].iter().all(|s| s == "InvalidArgument"),
        "{statuses:?}"
    );
    // The server still runs a round for real clients.
    let mut cs: Vec<Proc> = (0..3).map(|i| client(d, &cfg, i, &[])).collect();
    assert!(s.wait(120), "{}", s.text());
    for c in &mut cs {
        assert!(c.wait(30), "{}", c.text());
    }
    assert!(s.text().contains("rejected upload"), "{}", s.text());
    assert!(
        s.text().contains("secure-aggregation reply"),
        "{}",
        s.text()
    );
}

#[test]
fn a_client_with_its_own_data_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = config(d, free_port(), 1, "");
    let own = d.join("own.jsonl");
    let lines: Vec<String> = (0..40)
        .map(|i| serde_json::json!({"instruction": format!("Count to {}\n", i % 7), "input": "", "output": "1 2 3"}).to_string())
        .collect();
    std::fs::write(&own, lines.join("\n")).unwrap();
    let mut s = server(
        d,
        &cfg,
        &["federate.client_num=2", "federate.sample_client_num=2"],
    );
    let mut c0 = client(
        d,
        &cfg,
        0,
        &["federate.client_num=2", "federate.sample_client_num=2"],
    );
    let mut c1 = Proc::start(
        &[
            "client",
            "--config",
            cfg.to_str().unwrap(),
            "--data",
            own.to_str().unwrap(),
            "--id",
            "1",
        ],
        d.join("own-client.log"),
    );
    assert!(s.wait(120), "{}", s.text());
    assert!(c0.wait(30), "{}", c0.text());
    assert!(c1.wait(30), "{}", c1.text());
    assert!(
        c1.text().contains("client 1: 36 training records"),
        "{}",
        c1.text()
    );
    let recs = records(d);
    assert!(
        recs[1]["client_train_loss"].get("1").is_some(),
        "{:?}",
        recs[1]
    );
}

/// Rewrites a test config so that clients keep their LoRA B matrices (`federate.local_tensors`).
fn keep_b_local(cfg: &Path) {
    let text = std::fs::read_to_string(cfg)
        .unwrap()
        .replace("seed: 0}", "seed: 0, local_tensors: [\"*lora_B*\"]}");
    std::fs::write(cfg, text).unwrap();
}

/// With `federate.local_tensors`, only the shared tensors cross the wire, each client process
/// keeps its own in its folder (written after every fit), and the server's result equals the
/// standalone run's bit for bit.
#[test]
fn local_tensors_stay_in_the_client_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = config(d, free_port(), 2, "");
    keep_b_local(&cfg);
    run_three_clients(d, &cfg);
    assert_eq!(adapter(d), standalone(d, &cfg), "distributed != standalone");
    let r = &records(d)[1];
    let up = r["bytes_up_per_client"]["0"].as_u64().unwrap();
    let down = r["bytes_down_per_client"]["0"].as_u64().unwrap();
    // A is [r, 64] for q_proj and v_proj in 2 layers: 4 × 4 × 64 f32 = 4096 bytes each way
    // (down twice: the fit task and the round's evaluation).
    assert!(
        up == 4096 && down == 2 * up,
        "only A matrices travel: up {up}, down {down}"
    );
    for i in 0..3 {
        let st = d.join(format!("run/client-{i}/client_state.safetensors"));
        let t = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
        assert!(
            !t.is_empty() && t.keys().all(|k| k.contains("lora_B")),
            "{t:?}"
        );
    }
}

/// A client's own tensors survive its `kill -9`: restarted, it resumes them from its folder
/// (the state it wrote after round 1) and the run completes. Both kinds of own tensors: LoRA B
/// kept local (4 tensors), and Ditto's personal adapter (all 8).
#[test]
fn killed_client_resumes_its_own_tensors() {
    killed_client_resumes(keep_b_local, 4);
    killed_client_resumes(|cfg| with_personal(cfg, "ditto", ""), 8);
}

fn killed_client_resumes(setup: impl Fn(&Path), own: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = config(d, free_port(), 3, "");
    setup(&cfg);
    let mut s = server(d, &cfg, &["distributed.round_timeout_s=4"]);
    let mut c0 = client(d, &cfg, 0, &[]);
    let mut c1 = client(d, &cfg, 1, &[]);
    // Its 1.5 s straggle keeps it from finishing another task before the kill below.
    let mut c2 = client(d, &cfg, 2, &["--straggle-ms", "1500"]);
    let state = d.join("run/client-2/client_state.safetensors");
    c2.wait_for("round 1: fit done", 60);
    let saved = std::fs::read(&state).unwrap();
    c2.kill9();
    let mut c2 = client(d, &cfg, 2, &[]);
    c2.wait_for(&format!("resuming its own {own} tensors"), 30);
    assert!(s.wait(90), "{}", s.text());
    for c in [&mut c0, &mut c1, &mut c2] {
        assert!(c.wait(30), "{}", c.text());
    }
    // It kept training them after the restart.
    assert_ne!(std::fs::read(&state).unwrap(), saved);
}

/// Adds a `personal` section to a test config.
fn with_personal(cfg: &Path, method: &str, extra: &str) {
    let mut text = std::fs::read_to_string(cfg).unwrap();
    text += &format!("personal:\n  method: {method}\n{extra}");
    std::fs::write(cfg, text).unwrap();
}

/// Every personalised method runs distributed and ends as its standalone run does, bit for
/// bit: the global adapter and each client's own adapter (written by the client process at
/// the end, by the standalone run per client). FedSA-LoRA's B and FFA-LoRA's A never cross the
/// wire: here the A matrices take 4,096 bytes ([4, 64] for q_proj and v_proj in 2 layers) and
/// the B matrices 3,072 ([64, 4] and [32, 4]: v_proj has fewer output features); an upload
/// carries exactly the one its method sends, and on the wire, framing included, stays below
/// both together.
#[test]
fn personal_methods_run_distributed_as_standalone() {
    let methods = [
        ("ditto", ""),
        ("fedrep", "  head: [\"*layers.1.*\"]\n"),
        ("pfedme", "  beta: 0.8\n"),
        ("fedsa_lora", ""),
        ("ffa_lora", ""),
    ];
    for (method, extra) in methods {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let cfg = config(d, free_port(), 2, "");
        with_personal(&cfg, method, extra);
        run_three_clients(d, &cfg);
        assert_eq!(
            adapter(d),
            standalone(d, &cfg),
            "{method}: distributed != standalone"
        );
        for i in 0..3 {
            let mine = d.join(format!("run/client-{i}/adapter/adapter_model.safetensors"));
            let reference = d.join(format!(
                "standalone/adapter_client_{i}/adapter_model.safetensors"
            ));
            assert_eq!(mine.exists(), reference.exists(), "{method} client {i}");
            if mine.exists() {
                assert_eq!(
                    std::fs::read(&mine).unwrap(),
                    std::fs::read(&reference).unwrap(),
                    "{method}: client {i}'s own adapter"
                );
            }
        }
        let r = &records(d)[1];
        for i in 0..3 {
            let wire = r["wire_up_per_client"][i.to_string()].as_u64().unwrap();
            let raw = r["bytes_up_per_client"][i.to_string()].as_u64().unwrap();
            let only = match method {
                "fedsa_lora" => 4096,
                "ffa_lora" => 3072,
                _ => continue,
            };
            assert!(
                raw == only && wire < 4096 + 3072,
                "{method}: up {raw} raw, {wire} wire"
            );
        }
    }
}

/// Offsite tuning across processes: the server writes the emulator once; each client trains on
/// it (given as `model.path`) and is refused when handed the full model; the rounds move the
/// edge layers (with embeddings, final norm and head) and nothing else; no tensor a client
/// holds is one of the dropped middle layers; the result equals the standalone run's bit for bit.
#[test]
fn offsite_tuning_runs_distributed_as_standalone() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let deep = fedllm_testing::deep_model(d, "llama-tiny", 6);
    let cfg = config(
        d,
        free_port(),
        2,
        "offsite: {enabled: true, emu_l: 1, emu_r: 5, drop_ratio: 0.5}\n",
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&tiny().display().to_string(), &deep.display().to_string())
        .replace("adapter: {r: 4, dropout: 0.1}", "adapter: {type: full}");
    std::fs::write(&cfg, text).unwrap();
    let mut s = server(d, &cfg, &[]);
    s.wait_for("emulator written to", 60);
    let emu = d.join("run/emulator");
    let mut full = client(d, &cfg, 0, &[]);
    assert!(!full.wait(60), "a client on the full model must be refused");
    assert!(
        full.text()
            .contains("trains on the emulator its server wrote"),
        "{}",
        full.text()
    );
    let m = format!("model.path={}", emu.display());
    let mut cs: Vec<Proc> = (0..3).map(|i| client(d, &cfg, i, &[&m])).collect();
    assert!(s.wait(120), "{}", s.text());
    for c in &mut cs {
        assert!(c.wait(30), "{}", c.text());
    }
    assert_eq!(adapter(d), standalone(d, &cfg), "distributed != standalone");

    let lay = fedllm_fl::offsite::Layout::new(
        6,
        &fedllm_fl::config::OffsiteCfg {
            emu_l: 1,
            emu_r: 5,
            drop_ratio: 0.5,
            ..Default::default()
        },
    )
    .unwrap();
    let sent = candle_core::safetensors::load(
        d.join("run/adapter/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let edge_bytes: usize = sent.values().map(|t| t.elem_count() * 4).sum();
    for n in sent.keys() {
        let l = fedllm_peft::full::layer_of(n);
        assert!(l.is_none_or(|l| lay.edges.contains(&l)), "{n} travels");
    }
    let r = &records(d)[1];
    for i in 0..3 {
        let up = r["bytes_up_per_client"][i.to_string()].as_u64().unwrap() as usize;
        assert_eq!(up, edge_bytes, "client {i} uploads the edge tensors only");
    }
    let full_model = fedllm_model::CausalLm::load(&deep, Default::default())
        .unwrap()
        .model;
    let middle = fedllm_fl::offsite::middle_hashes(&full_model, &lay).unwrap();
    let held =
        candle_core::safetensors::load(emu.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    for (n, t) in held.iter().chain(sent.iter()) {
        let h = fedllm_fl::offsite::tensor_hash(t).unwrap();
        let hit = middle
            .iter()
            .find(|(_, m)| **m == h)
            .map(|(k, _)| k.clone());
        if let Some(k) = hit {
            let l = fedllm_peft::full::layer_of(&k).unwrap();
            assert!(lay.kept.contains(&l), "{n} is the full model's dropped {k}");
        }
    }
}

/// Differential privacy across processes: the clients clip their updates (told C in their
/// task), the server adds the calibrated noise; the result equals the standalone run's bit for
/// bit, and every round's record carries ε so far.
#[test]
fn dp_runs_distributed_as_standalone() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = config(
        d,
        free_port(),
        2,
        "dp: {mode: central, clip: 0.05, noise_multiplier: 0.8, adaptive: true, count_std: 1.0}\n",
    );
    run_three_clients(d, &cfg);
    assert_eq!(adapter(d), standalone(d, &cfg), "distributed != standalone");
    let recs = records(d);
    let eps: Vec<f64> = recs[1..]
        .iter()
        .map(|r| r["strategy"]["dp_epsilon"][0].as_f64().unwrap())
        .collect();
    assert!(eps[0] > 0.0 && eps[1] > eps[0], "{eps:?}");
}

const SECAGG: &str = "secagg: {enabled: true, clip_range: 1.0}\n";

/// SecAgg+ over gRPC: the masks cancel exactly in the ring, so three client processes give
/// the standalone secure run's adapter bit for bit; and that adapter is plain FedAvg's (the
/// same round without secure aggregation) within the quantisation bound. Per coordinate the
/// sums of w·Δ and of w are each off by at most e = n·range/(2^bits − 1) (half a level per
/// client), so the mean moves by at most e·(1 + |mean Δ|)/(W − e); W = Σ samples / max_weight
/// ≥ 3/1000 (every client holds a sample) and |mean Δ| ≤ 1 here (adapter values are far below
/// 1 after one round), plus f32 rounding of values below 1 (1e-6).
#[test]
fn secure_aggregation_runs_distributed_as_standalone() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = config(d, free_port(), 1, SECAGG);
    let mut s = server(d, &cfg, &[]);
    let mut cs: Vec<Proc> = (0..3).map(|i| client(d, &cfg, i, &[])).collect();
    assert!(s.wait(120), "{}", s.text());
    for c in &mut cs {
        assert!(c.wait(30), "{}", c.text());
    }
    let t = s.text();
    let line = "round 1: secagg: aggregated the masked inputs of clients [0, 1, 2]";
    assert!(t.contains(line), "{t}");
    assert_eq!(adapter(d), standalone(d, &cfg), "distributed != standalone");
    let plain_dir = standalone_in(d, &cfg, "plain", &["secagg.enabled=false"]);
    let load = |p: PathBuf| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let sec = load(d.join("run/adapter/adapter_model.safetensors"));
    let plain = load(plain_dir.join("adapter/adapter_model.safetensors"));
    let e = 3.0 / ((1u64 << 24) - 1) as f64; // n = 3, range 1, 24 bits
    let bound = e * 2.0 / (3.0 / 1000.0 - e) + 1e-6;
    let mut worst = 0f64;
    for (k, a) in &sec {
        let x: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = plain[k].flatten_all().unwrap().to_vec1().unwrap();
        for (p, q) in x.iter().zip(&y) {
            assert!(
                q.abs() < 1.0,
                "{k}: a value of {q} breaks the bound's premise"
            );
            worst = worst.max((*p as f64 - *q as f64).abs());
        }
    }
    assert!(
        worst > 0.0 && worst <= bound,
        "secure vs plain FedAvg: {worst} (bound {bound})"
    );
}

/// A client killed (-9) after its masked input arrived: its neighbours' shares rebuild its
/// mask seed, so the round completes with its update in the sum — the standalone adapter bit
/// for bit, where nobody died. (Threshold 1: with three clients each secret has two holders,
/// and one of them is the dead client.)
#[test]
fn secure_round_survives_a_client_killed_after_its_masked_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = config(
        d,
        free_port(),
        1,
        "secagg: {enabled: true, clip_range: 1.0, threshold: 1}\n",
    );
    let mut s = server(d, &cfg, &["distributed.round_timeout_s=8"]);
    let mut c0 = client(d, &cfg, 0, &[]);
    let mut c1 = client(d, &cfg, 1, &[]);
    // It waits 1.5 s before answering each task, so it is killed before it answers stage 4.
    let mut c2 = client(d, &cfg, 2, &["--straggle-ms", "1500"]);
    c2.wait_for("round 1: fit result accepted", 60);
    c2.kill9();
    assert!(s.wait(120), "{}", s.text());
    for c in [&mut c0, &mut c1] {
        assert!(c.wait(30), "{}", c.text());
    }
    let t = s.text();
    assert!(t.contains("without clients [2]"), "{t}");
    assert!(
        t.contains("aggregated the masked inputs of clients [0, 1, 2]"),
        "{t}"
    );
    assert_eq!(
        adapter(d),
        standalone(d, &cfg),
        "the sum lost the killed client's input"
    );
}

/// A client killed before it announced its keys leaves each survivor one neighbour, below the
/// threshold 2: round 1 is abandoned (the global adapter stays, the log says why) and round 2,
/// with the client restarted, aggregates all three.
#[test]
fn secure_round_below_threshold_is_abandoned_then_next_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = config(d, free_port(), 2, SECAGG);
    let mut s = server(d, &cfg, &["distributed.round_timeout_s=6"]);
    let mut c0 = client(d, &cfg, 0, &[]);
    let mut c1 = client(d, &cfg, 1, &[]);
    let mut c2 = client(d, &cfg, 2, &["--straggle-ms", "2000"]);
    c2.wait_for("round 1: secure-aggregation stage received", 60);
    c2.kill9();
    s.wait_for("round   1:", 60);
    let mut c2 = client(d, &cfg, 2, &[]);
    assert!(s.wait(120), "{}", s.text());
    for c in [&mut c0, &mut c1, &mut c2] {
        assert!(c.wait(30), "{}", c.text());
    }
    let t = s.text();
    assert!(t.contains("round 1: secagg: round abandoned"), "{t}");
    assert!(
        t.contains("round 2: secagg: aggregated the masked inputs of clients [0, 1, 2]"),
        "{t}"
    );
    let recs = records(d);
    assert!(
        recs[1]["client_train_loss"].as_object().unwrap().is_empty(),
        "{:?}",
        recs[1]
    );
    assert_eq!(
        recs[2]["client_train_loss"].as_object().unwrap().len(),
        3,
        "{:?}",
        recs[2]
    );
}
