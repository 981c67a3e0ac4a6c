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
use fedllm_model::generate::{argmax, generate_streaming, GenerateConfig, Running, Sampling};
use fedllm_model::{CausalLm, ChatMessage, KvCache, Tokenizer};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::VecDeque;
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

/// Decodes what waits. Greedy jobs decode in one running batch per model: a job that arrives
/// while it runs joins at the next step (continuous batching, up to `max_batch` rows), and each
/// leaves as soon as it is done; its answer equals its solo answer (rows do not mix). A
/// sampled job decodes alone (its draws would depend on neighbours). Others wait their turn
/// in arrival order.
fn worker(slots: BTreeMap<String, Slot>, tok: Tokenizer, rx: Receiver<Job>, max_batch: usize) {
    let mut waiting: VecDeque<Job> = Default::default();
    loop {
        if waiting.is_empty() {
            match rx.recv() {
                Ok(j) => waiting.push_back(j),
                Err(_) => return,
            }
        }
        let first = waiting.pop_front().expect("one job");
        let slot = &slots[&first.model];
        if first.sampling.temperature > 0.0 {
            run_sampled(slot, &tok, first);
        } else {
            run_greedy(slot, &tok, first, &mut waiting, &rx, max_batch);
        }
    }
}

/// One job's answer so far: tokens, text already sent, largest batch it decoded in.
struct RowState {
    toks: Vec<u32>,
    sent: String,
    batch: usize,
}

impl RowState {
    fn new() -> Self {
        RowState {
            toks: Vec::new(),
            sent: String::new(),
            batch: 1,
        }
    }
}

/// Takes token `t` for `job`: streams the new complete text, and reports whether the answer
/// is done (end token, a stop string, or its token limit), having sent `Done` if so.
fn emit(job: &Job, st: &mut RowState, tok: &Tokenizer, eos: &[u32], t: u32) -> bool {
    let done = |st: &RowState, finish: &'static str| {
        let _ = job.tx.send(Out::Done {
            finish,
            prompt: job.ids.len(),
            completion: st.toks.len(),
            batch: st.batch,
        });
    };
    if eos.contains(&t) {
        done(st, "stop");
        return true;
    }
    st.toks.push(t);
    let text = match tok.decode(&st.toks, true) {
        Ok(t) => t,
        Err(e) => {
            let _ = job.tx.send(Out::Failed(e.to_string()));
            return true;
        }
    };
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
    if !text.ends_with('\u{fffd}') && ready > st.sent.len() && text.starts_with(st.sent.as_str()) {
        let _ = job
            .tx
            .send(Out::Text(text[st.sent.len()..ready].to_string()));
        st.sent = text[..ready].to_string();
    }
    let length = st.toks.len() >= job.max_tokens;
    if stopped || length {
        // The answer is complete: what is left goes out as decoded, as `generate` prints it.
        if text.len() > st.sent.len() && text.starts_with(st.sent.as_str()) {
            let _ = job.tx.send(Out::Text(text[st.sent.len()..].to_string()));
        }
        done(st, if stopped { "stop" } else { "length" });
        return true;
    }
    false
}

fn stop_ids(slot: &Slot, tok: &Tokenizer) -> Vec<u32> {
    let mut s = slot.model.config.eos_token_ids().to_vec();
    s.extend(&tok.eos_token_ids);
    s
}

/// A sampled job, alone.
fn run_sampled(slot: &Slot, tok: &Tokenizer, job: Job) {
    let cfg = GenerateConfig {
        max_new_tokens: job.max_tokens,
        sampling: job.sampling.clone(),
        stop_token_ids: stop_ids(slot, tok),
        stop_strings: vec![],
    };
    let eos = cfg.stop_token_ids.clone();
    let mut st = RowState::new();
    let mut finished = false;
    let mut on_token = |_: usize, t: u32| -> fedllm_model::Result<()> {
        if !finished {
            finished = emit(&job, &mut st, tok, &eos, t);
        }
        Ok(())
    };
    let r = generate_streaming(
        &slot.model,
        Some(tok),
        slot.prefix.as_ref(),
        std::slice::from_ref(&job.ids),
        &cfg,
        &mut on_token,
    );
    if let Err(e) = r {
        let _ = job.tx.send(Out::Failed(e.to_string()));
    }
}

/// Greedy jobs of `first`'s model in one running batch, admitting waiting ones between steps.
fn run_greedy(
    slot: &Slot,
    tok: &Tokenizer,
    first: Job,
    waiting: &mut VecDeque<Job>,
    rx: &Receiver<Job>,
    max_batch: usize,
) {
    let eos = stop_ids(slot, tok);
    let mut batch = Running::new(&slot.model, slot.prefix.as_ref(), first.max_tokens);
    let mut rows: Vec<(Job, RowState, Vec<f32>)> = Vec::new();
    let model = first.model.clone();
    let mut joining = vec![first];
    loop {
        admit(&model, &mut joining, rows.len(), waiting, rx, max_batch);
        if !joining.is_empty() {
            let prompts: Vec<Vec<u32>> = joining.iter().map(|j| j.ids.clone()).collect();
            match batch.join(&prompts) {
                Ok(ls) => rows.extend(
                    joining
                        .drain(..)
                        .zip(ls)
                        .map(|(j, l)| (j, RowState::new(), l)),
                ),
                Err(e) => {
                    return fail(joining.into_iter().chain(rows.into_iter().map(|r| r.0)), &e)
                }
            }
        }
        if rows.is_empty() {
            return;
        }
        let n = rows.len();
        // Per row: its next token, or None once it is done (or its client left).
        let next: Vec<Option<u32>> = rows
            .iter_mut()
            .map(|(job, st, logits)| {
                st.batch = st.batch.max(n);
                let t = argmax(logits);
                (!job.tx.is_closed() && !emit(job, st, tok, &eos, t)).then_some(t)
            })
            .collect();
        let keep: Vec<usize> = (0..n).filter(|&i| next[i].is_some()).collect();
        if let Err(e) = batch.keep(&keep) {
            return fail(rows.into_iter().map(|r| r.0), &e);
        }
        let mut flags = next.iter();
        rows.retain(|_| flags.next().is_some_and(Option::is_some));
        let next: Vec<u32> = next.into_iter().flatten().collect();
        if rows.is_empty() {
            continue;
        }
        match batch.step(next) {
            Ok(ls) => rows.iter_mut().zip(ls).for_each(|(r, l)| r.2 = l),
            Err(e) => return fail(rows.into_iter().map(|r| r.0), &e),
        }
    }
}

/// Moves greedy jobs for `model` into `joining` while the batch has room: first those already
/// waiting, then from the queue until it is empty or yields another kind of job (which waits,
/// in order, for its own turn). Jobs stay in the bounded queue while the batch is full, so a
/// full queue still answers 429.
fn admit(
    model: &str,
    joining: &mut Vec<Job>,
    rows: usize,
    waiting: &mut VecDeque<Job>,
    rx: &Receiver<Job>,
    max_batch: usize,
) {
    let room = |joining: &Vec<Job>| rows + joining.len() < max_batch.max(1);
    let fits = |j: &Job| j.model == model && j.sampling.temperature == 0.0;
    let mut rest = VecDeque::new();
    while let Some(j) = waiting.pop_front() {
        if room(joining) && fits(&j) {
            joining.push(j);
        } else {
            rest.push_back(j);
        }
    }
    *waiting = rest;
    while waiting.is_empty() && room(joining) {
        match rx.try_recv() {
            Ok(j) if fits(&j) => joining.push(j),
            Ok(j) => waiting.push_back(j),
            Err(_) => break,
        }
    }
}

fn fail(jobs: impl Iterator<Item = Job>, e: &fedllm_model::ModelError) {
    for j in jobs {
        let _ = j.tx.send(Out::Failed(e.to_string()));
    }
}
