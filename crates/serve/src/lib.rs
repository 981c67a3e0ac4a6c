//! `fedllm serve`: an OpenAI-compatible HTTP API (`/v1/models`, `/v1/chat/completions`,
//! `/v1/completions`, streaming by server-sent events) over one base model and its adapters,
//! chosen by the request's `model` field. One worker thread owns the models and decodes the
//! waiting requests of one model together (greedy ones in one batch; a sampled request alone,
//! so its seed alone decides its tokens). A bounded queue answers 429 instead of growing.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fedllm_model::generate::{generate_streaming, GenerateConfig, Sampling};
use fedllm_model::{CausalLm, ChatMessage, KvCache, Tokenizer};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

/// One servable model: the base with an adapter attached, or its virtual-token cache.
pub struct Slot {
    pub model: CausalLm,
    pub prefix: Option<KvCache>,
}

pub struct Options {
    pub listen: SocketAddr,
    /// Requests waiting beyond this many get 429.
    pub max_queue: usize,
    /// Requests decoded together at most.
    pub max_batch: usize,
}

/// What the worker streams back for one request.
enum Out {
    Text(String),
    Done {
        finish: &'static str,
        prompt: usize,
        completion: usize,
        batch: usize,
    },
    Failed(String),
}

struct Job {
    model: String,
    ids: Vec<u32>,
    max_tokens: usize,
    sampling: Sampling,
    stop: Vec<String>,
    tx: UnboundedSender<Out>,
}

struct Shared {
    queue: SyncSender<Job>,
    names: Vec<String>,
    tok: Tokenizer,
    context: usize,
    virtual_len: BTreeMap<String, usize>,
}

fn error(status: StatusCode, kind: &str, msg: impl Into<String>, param: Option<&str>) -> Response {
    let body =
        json!({"error": {"message": msg.into(), "type": kind, "param": param, "code": null}});
    (status, Json(body)).into_response()
}

fn bad(msg: impl Into<String>, param: Option<&str>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", msg, param)
}

#[derive(Deserialize)]
struct Request {
    model: String,
    messages: Option<Vec<ChatMessage>>,
    prompt: Option<String>,
    max_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    stream: bool,
}

/// Serves until the process ends; `ready` gets the bound address.
pub fn serve(
    slots: BTreeMap<String, Slot>,
    tok: Tokenizer,
    opts: Options,
    ready: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let (queue, rx) = sync_channel::<Job>(opts.max_queue);
    let names: Vec<String> = slots.keys().cloned().collect();
    let virtual_len = slots
        .iter()
        .map(|(k, s)| (k.clone(), s.prefix.as_ref().map_or(0, |c| c.len)))
        .collect();
    let context = slots
        .values()
        .next()
        .map_or(0, |s| s.model.config.context_length());
    let worker_tok = tok.clone();
    let max_batch = opts.max_batch.max(1);
    std::thread::spawn(move || worker(slots, worker_tok, rx, max_batch));
    let shared = Arc::new(Shared {
        queue,
        names,
        tok,
        context,
        virtual_len,
    });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .with_state(shared);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.listen).await?;
        ready(listener.local_addr()?);
        axum::serve(listener, app).await
    })
}

async fn models(State(s): State<Arc<Shared>>) -> Response {
    let data: Vec<Value> = s
        .names
        .iter()
        .map(|n| json!({"id": n, "object": "model", "created": 0, "owned_by": "fedllm"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn chat(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    handle(s, body, true).await
}

async fn completions(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    handle(s, body, false).await
}

async fn handle(s: Arc<Shared>, body: Bytes, chat: bool) -> Response {
    let req: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return bad(
                format!("the request body is not valid JSON for this endpoint: {e}"),
                None,
            )
        }
    };
    if !s.names.contains(&req.model) {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model `{}` does not exist; served: {}",
                req.model,
                s.names.join(", ")
            ),
            Some("model"),
        );
    }
    let text = if chat {
        match &req.messages {
            Some(m) if !m.is_empty() => match s.tok.apply_chat_template(m, true) {
                Ok(t) => t,
                Err(e) => return bad(format!("messages: {e}"), Some("messages")),
            },
            _ => return bad("`messages` must be a non-empty list", Some("messages")),
        }
    } else {
        match &req.prompt {
            Some(p) if !p.is_empty() => p.clone(),
            _ => return bad("`prompt` must be a non-empty string", Some("prompt")),
        }
    };
    let max_tokens = req.max_tokens.unwrap_or(256);
    if max_tokens == 0 {
        return bad("`max_tokens` must be at least 1", Some("max_tokens"));
    }
    let temperature = req.temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return bad("`temperature` must be in [0, 2]", Some("temperature"));
    }
    if let Some(p) = req.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return bad("`top_p` must be in (0, 1]", Some("top_p"));
        }
    }
    let stop: Vec<String> = match &req.stop {
        None | Some(Value::Null) => vec![],
        Some(Value::String(x)) => vec![x.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            a.iter().map(|x| x.as_str().unwrap().to_string()).collect()
        }
        _ => return bad("`stop` must be a string or a list of strings", Some("stop")),
    };
    let ids = match s.tok.encode(&text, true) {
        Ok(i) => i,
        Err(e) => return bad(format!("tokenizing: {e}"), None),
    };
    let used = ids.len() + max_tokens + s.virtual_len.get(&req.model).copied().unwrap_or(0);
    if used > s.context {
        return bad(
            format!(
                "{} prompt tokens + {max_tokens} max_tokens exceed the model's context of {}",
                ids.len(),
                s.context
            ),
            Some("max_tokens"),
        );
    }
    let sampling = if temperature > 0.0 {
        Sampling {
            temperature,
            top_k: None,
            top_p: req.top_p,
            seed: req.seed.unwrap_or(0),
        }
    } else {
        Sampling::greedy()
    };
    let (tx, mut rx) = unbounded_channel();
    let job = Job {
        model: req.model.clone(),
        ids,
        max_tokens,
        sampling,
        stop,
        tx,
    };
    match s.queue.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "the server's queue is full; retry later",
                None,
            )
        }
        Err(TrySendError::Disconnected(_)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the decoding worker stopped",
                None,
            )
        }
    }
    let id = format!(
        "cmpl-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let model = req.model.clone();
    if req.stream {
        let stream = async_stream(rx, id, model, chat);
        return Sse::new(stream).into_response();
    }
    let mut content = String::new();
    loop {
        match rx.recv().await {
            Some(Out::Text(t)) => content += &t,
            Some(Out::Done {
                finish,
                prompt,
                completion,
                batch,
            }) => {
                let choice = if chat {
                    json!({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish})
                } else {
                    json!({"index": 0, "text": content, "finish_reason": finish})
                };
                let body = json!({
                    "id": id, "object": if chat { "chat.completion" } else { "text_completion" },
                    "created": 0, "model": model, "choices": [choice],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
                });
                let mut r = Json(body).into_response();
                r.headers_mut().insert("x-fedllm-batch", batch.into());
                return r;
            }
            Some(Out::Failed(e)) => {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e, None)
            }
            None => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "the decoding worker stopped",
                    None,
                )
            }
        }
    }
}

/// Server-sent chunks in OpenAI's shape, then `[DONE]`.
fn async_stream(
    rx: tokio::sync::mpsc::UnboundedReceiver<Out>,
    id: String,
    model: String,
    chat: bool,
) -> impl tokio_stream::Stream<Item = Result<Event, Infallible>> {
    use tokio_stream::StreamExt;
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |delta: Value, finish: Value| {
        let choice = if chat {
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")), "finish_reason": finish})
        };
        Event::default().data(
            json!({"id": id, "object": object, "created": 0, "model": model, "choices": [choice]})
                .to_string(),
        )
    };
    let first = chat.then(|| chunk(json!({"role": "assistant", "content": ""}), Value::Null));
    let body = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |o| match o {
        Out::Text(t) => chunk(json!({"content": t}), Value::Null),
        Out::Done { finish, .. } => chunk(json!({}), json!(finish)),
        Out::Failed(e) => Event::default()
            .data(json!({"error": {"message": e, "type": "server_error"}}).to_string()),
    });
    tokio_stream::iter(first)
        .chain(body)
        .chain(tokio_stream::iter([Event::default().data("[DONE]")]))
        .map(Ok)
}

/// Decodes what waits: the first job and, behind it, every greedy job for the same model (up
/// to `max_batch`); the others wait for their own turn in arrival order.
fn worker(slots: BTreeMap<String, Slot>, tok: Tokenizer, rx: Receiver<Job>, max_batch: usize) {
    let mut waiting: std::collections::VecDeque<Job> = Default::default();
    loop {
        if waiting.is_empty() {
            match rx.recv() {
                Ok(j) => waiting.push_back(j),
                Err(_) => return,
            }
        }
        while let Ok(j) = rx.try_recv() {
            waiting.push_back(j);
        }
        let first = waiting.pop_front().expect("one job");
        let mut batch = vec![first];
        if batch[0].sampling.temperature == 0.0 {
            let mut rest = std::collections::VecDeque::new();
            while let Some(j) = waiting.pop_front() {
                if batch.len() < max_batch
                    && j.model == batch[0].model
                    && j.sampling.temperature == 0.0
                {
                    batch.push(j);
                } else {
                    rest.push_back(j);
                }
            }
            waiting = rest;
        }
        run_batch(&slots[&batch[0].model], &tok, batch);
    }
}

fn run_batch(slot: &Slot, tok: &Tokenizer, jobs: Vec<Job>) {
    let n = jobs.len();
    let cfg = GenerateConfig {
        max_new_tokens: jobs.iter().map(|j| j.max_tokens).max().unwrap_or(1),
        sampling: jobs[0].sampling.clone(),
        stop_token_ids: {
            let mut s = slot.model.config.eos_token_ids().to_vec();
            s.extend(&tok.eos_token_ids);
            s
        },
        stop_strings: vec![],
    };
    let prompts: Vec<Vec<u32>> = jobs.iter().map(|j| j.ids.clone()).collect();
    // Per row: tokens so far, text already sent, finished.
    let mut rows: Vec<(Vec<u32>, String, bool)> = vec![(Vec::new(), String::new(), false); n];
    let eos = cfg.stop_token_ids.clone();
    let mut on_token = |row: usize, t: u32| -> fedllm_model::Result<()> {
        let (toks, sent, done) = &mut rows[row];
        if *done {
            return Ok(());
        }
        let job = &jobs[row];
        if eos.contains(&t) {
            *done = true;
            let _ = job.tx.send(Out::Done {
                finish: "stop",
                prompt: job.ids.len(),
                completion: toks.len(),
                batch: n,
            });
            return Ok(());
        }
        toks.push(t);
        let text = tok.decode(toks, true)?;
        let (text, stopped) = match job.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            Some(cut) => (text[..cut].to_string(), true),
            None => (text, false),
        };
        // Send only complete characters (a token may end inside one), and never what a stop
        // string might still claim.
        let hold = if stopped {
            0
        } else {
            job.stop.iter().map(|s| s.len()).max().unwrap_or(0)
        };
        let mut ready = text.len().saturating_sub(hold);
        while !text.is_char_boundary(ready) {
            ready -= 1;
        }
        if !text.ends_with('\u{fffd}') && ready > sent.len() && text.starts_with(sent.as_str()) {
            let _ = job.tx.send(Out::Text(text[sent.len()..ready].to_string()));
            *sent = text[..ready].to_string();
        }
        let length = toks.len() >= job.max_tokens;
        if stopped || length {
            // The answer is complete: what is left goes out as decoded, as `generate` prints it.
            if text.len() > sent.len() && text.starts_with(sent.as_str()) {
                let _ = job.tx.send(Out::Text(text[sent.len()..].to_string()));
            }
            *done = true;
            let finish = if stopped { "stop" } else { "length" };
            let _ = job.tx.send(Out::Done {
                finish,
                prompt: job.ids.len(),
                completion: toks.len(),
                batch: n,
            });
        }
        Ok(())
    };
    let r = generate_streaming(
        &slot.model,
        Some(tok),
        slot.prefix.as_ref(),
        &prompts,
        &cfg,
        &mut on_token,
    );
    for (i, job) in jobs.iter().enumerate() {
        match &r {
            Err(e) => {
                let _ = job.tx.send(Out::Failed(e.to_string()));
            }
            Ok(_) if !rows[i].2 => {
                // Decoding ended (every row hit the batch's limit): flush what was held back.
                let (toks, sent, _) = &rows[i];
                if let Ok(text) = tok.decode(toks, true) {
                    if text.len() > sent.len() && text.starts_with(sent.as_str()) {
                        let _ = job.tx.send(Out::Text(text[sent.len()..].to_string()));
                    }
                }
                let _ = job.tx.send(Out::Done {
                    finish: "length",
                    prompt: job.ids.len(),
                    completion: toks.len(),
                    batch: n,
                });
            }
            Ok(_) => {}
        }
    }
}
