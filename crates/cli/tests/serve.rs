//! `fedllm serve` over real HTTP on loopback: OpenAI-shaped answers that equal `fedllm
//! generate`, adapters chosen by the `model` field, streaming, errors with their status codes,
//! batching of waiting requests and 429 when the queue is full.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(model: &Path, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedllm"))
        .args([
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("serving") {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "the server exited before listening"
        );
    }
    let addr = line
        .split("http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    Server { child, addr }
}

/// One HTTP/1.1 exchange: (status, headers lower-cased, body de-chunked).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse(&String::from_utf8(raw).unwrap())
}

fn parse(raw: &str) -> (u16, String, String) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let head = head.to_lowercase();
    let body = if head.contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = body;
        loop {
            let (len, after) = rest.split_once("\r\n").unwrap();
            let n = usize::from_str_radix(len.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out += &after[..n];
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (status, head, body)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn tiny_chat_model(dir: &Path) -> PathBuf {
    let src = fedllm_testing::golden_dir().join("llama-tiny");
    let m = dir.join("tiny-chat");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, m.join(p.file_name().unwrap())).unwrap();
        }
    }
    let tpl = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
    std::fs::write(
        m.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": tpl}).to_string(),
    )
    .unwrap();
    m
}

fn generate(model: &Path, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fedllm"))
        .args(["generate", "--model", model.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end_matches('\n')
        .to_string()
}

/// Models listed; a chat completion with the base and one with a prompt-tuning adapter equal
/// `generate --chat` (with and without `--adapter`); the stream's deltas add up to the same
/// text, end with a finish reason and `[DONE]`; bad requests get OpenAI-style errors.
#[test]
fn answers_equal_generate_streaming_included_and_errors_have_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_chat_model(tmp.path());
    let prompt_ad = fedllm_testing::golden_dir().join("llama-tiny/prompt_peft");
    let spec = format!("soft={}", prompt_ad.display());
    let s = serve(&model, &["--adapter", &spec]);
    let (code, _, body) = http(&s.addr, "GET", "/v1/models", "");
    assert_eq!(code, 200);
    let ids: Vec<String> = json(&body)["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().into())
        .collect();
    assert_eq!(ids, ["base", "soft"]);
    for (name, adapter) in [("base", None), ("soft", Some(&prompt_ad))] {
        let req = serde_json::json!({"model": name, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 6}).to_string();
        let (code, head, body) = http(&s.addr, "POST", "/v1/chat/completions", &req);
        assert_eq!(code, 200, "{body}");
        assert!(head.contains("x-fedllm-batch: 1"));
        let v = json(&body);
        let content = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        let mut args = vec!["--chat", "--prompt", "hello there", "--max-new-tokens", "6"];
        let dir;
        if let Some(a) = adapter {
            dir = a.to_str().unwrap().to_string();
            args.extend(["--adapter", &dir]);
        }
        assert_eq!(content, generate(&model, &args), "{name}");
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
        let sreq = serde_json::json!({"model": name, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 6, "stream": true}).to_string();
        let (code, _, sse) = http(&s.addr, "POST", "/v1/chat/completions", &sreq);
        assert_eq!(code, 200);
        let events: Vec<&str> = sse
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(events.last(), Some(&"[DONE]"));
        let chunks: Vec<serde_json::Value> =
            events[..events.len() - 1].iter().map(|e| json(e)).collect();
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, content, "{name}: stream");
        assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());
    }
    let cases = [
        ("/v1/chat/completions", "{not json", 400),
        (
            "/v1/chat/completions",
            r#"{"model": "nope", "messages": [{"role": "user", "content": "x"}]}"#,
            404,
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "base", "messages": []}"#,
            400,
        ),
        (
            "/v1/completions",
            r#"{"model": "base", "prompt": "x", "max_tokens": 0}"#,
            400,
        ),
        (
            "/v1/completions",
            r#"{"model": "base", "prompt": "x", "temperature": 9}"#,
            400,
        ),
        (
            "/v1/completions",
            r#"{"model": "base", "prompt": "x", "max_tokens": 100000}"#,
            400,
        ),
    ];
    for (path, body, want) in cases {
        let (code, _, resp) = http(&s.addr, "POST", path, body);
        assert_eq!(code, want, "{body}: {resp}");
        assert!(json(&resp)["error"]["message"].is_string(), "{resp}");
    }
    // The server kept serving after every bad request.
    assert_eq!(http(&s.addr, "GET", "/v1/models", "").0, 200);
}

/// Plain completions: `stop` cuts the text before the stop string; a seed makes sampling
/// reproducible.
#[test]
fn completions_stop_and_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_chat_model(tmp.path());
    let s = serve(&model, &[]);
    let full = json(
        &http(
            &s.addr,
            "POST",
            "/v1/completions",
            r#"{"model": "base", "prompt": "In the beginning", "max_tokens": 12}"#,
        )
        .2,
    );
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(
        text,
        generate(
            &model,
            &["--prompt", "In the beginning", "--max-new-tokens", "12"]
        )
    );
    let cut: String = text.chars().skip(3).take(2).collect();
    let req = serde_json::json!({"model": "base", "prompt": "In the beginning", "max_tokens": 12, "stop": [cut.clone()]}).to_string();
    let stopped = json(&http(&s.addr, "POST", "/v1/completions", &req).2);
    let st = stopped["choices"][0]["text"].as_str().unwrap();
    assert_eq!(st, &text[..text.find(&cut).unwrap()]);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    let sampled = || {
        http(&s.addr, "POST", "/v1/completions", r#"{"model": "base", "prompt": "In the beginning", "max_tokens": 12, "temperature": 0.9, "seed": 7}"#).2
    };
    assert_eq!(json(&sampled())["choices"], json(&sampled())["choices"]);
}

/// While the worker decodes a long streamed request (its first chunk has arrived): with one
/// batch row and a queue of 1, of three requests sent together one is queued and two get 429;
/// with room, three greedy requests join the running batch (continuous batching): each gets
/// exactly its own answer, decoded beside the long one (batch ≥ 2), and all three are answered
/// while the long stream is still going (its next event is text, not its end). SmolLM2, so the
/// long request lasts many seconds.
#[test]
fn requests_join_a_running_batch_and_a_full_queue_answers_429() {
    let Some(model) = fedllm_testing::smollm2() else {
        return;
    };
    // The long request: 120 tokens while the queue fills (the queued request is answered after
    // it), 2,000 while others join (so it is certainly still going when they are answered).
    let long = |n: usize| {
        format!(
            r#"{{"model": "base", "prompt": "1, 2, 3, 4, 5,", "max_tokens": {n}, "stream": true}}"#
        )
    };
    let short = |i: usize| {
        serde_json::json!({"model": "base", "prompt": format!("{i}, {}, {},", i + 1, i + 2), "max_tokens": 4}).to_string()
    };
    // Opens the long stream and returns once its first event is in (the worker is busy).
    let busy = |addr: &str, n: usize| {
        let long = long(n);
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{long}", long.len()).unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        while !line.starts_with("data:") && !line.contains("data: ") {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0);
        }
        r
    };
    let three = |addr: String| -> Vec<(u16, String, String)> {
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let a = addr.clone();
                let b = short(i);
                std::thread::spawn(move || http(&a, "POST", "/v1/completions", &b))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    };
    let s = serve(&model, &["--max-queue", "1", "--max-batch", "1"]);
    let stream = busy(&s.addr, 120);
    let mut codes: Vec<u16> = three(s.addr.clone()).iter().map(|r| r.0).collect();
    codes.sort();
    assert_eq!(codes, [200, 429, 429]);
    drop(stream);
    drop(s);

    let s = serve(&model, &["--max-queue", "8"]);
    let alone: Vec<String> = (0..3)
        .map(|i| {
            json(&http(&s.addr, "POST", "/v1/completions", &short(i)).2)["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut stream = busy(&s.addr, 2000);
    let together = three(s.addr.clone());
    for (i, (code, head, body)) in together.iter().enumerate() {
        assert_eq!(*code, 200, "{body}");
        let batch: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("x-fedllm-batch: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no batch header: {head}"));
        assert!((2..=4).contains(&batch), "{head}");
        assert_eq!(
            json(body)["choices"][0]["text"].as_str().unwrap(),
            alone[i],
            "request {i}"
        );
    }
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stream.read_line(&mut line).unwrap() > 0,
            "the long stream ended"
        );
        if let Some(data) = line.strip_prefix("data: ") {
            let v = json(data);
            assert!(
                v["choices"][0]["finish_reason"].is_null(),
                "the long stream had finished before the short ones were answered: {data}"
            );
            break;
        }
    }
    drop(stream);
}
