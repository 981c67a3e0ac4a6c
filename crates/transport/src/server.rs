//! The gRPC server. A `Hub` is shared by the tonic handlers and the round driver
//! (`GrpcRemote`, fl's `Remote`): the driver posts one task per asked client and waits; clients
//! long-poll for their task and push their result; the round closes when everyone answered,
//! enough results are in, or the deadline passes. Nothing a client sends can stall the driver.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fedllm_fl::config::DistributedCfg;
use fedllm_fl::message::{ToClient, ToServer};
use fedllm_fl::params::ParamSet;
use fedllm_fl::Remote;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{task_header, to_server};
use crate::error::{read_file, Result, TransportError};
use crate::pb::federation_server::{Federation, FederationServer};

use crate::pb::{frame::Body, Frame, JoinReply, JoinRequest, PullRequest, PushReply, TaskHeader};
use crate::wire::{layout, tensor_frames, wire_len, Assembler, WireOpts};

/// Longest a pull waits for a task before answering WAIT.
const MAX_POLL: Duration = Duration::from_secs(30);
/// Longest the server waits for the next frame of an upload.
const FRAME_TIMEOUT: Duration = Duration::from_secs(120);

pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// The authenticated client of a request (set by the interceptor).
#[derive(Debug, Clone, Copy)]
struct ClientId(usize);

#[derive(Default)]
struct State {
    joined: BTreeSet<usize>,
    tasks: BTreeMap<usize, Arc<ToClient>>,
    /// Clients that answered the open exchange (a retried upload is then acknowledged again).
    answered: BTreeSet<usize>,
    open_round: usize,
    inbox: Vec<ToServer>,
    finished: bool,
    /// Clients that were told FINISH.
    told: BTreeSet<usize>,
    wire_down: BTreeMap<usize, usize>,
    wire_up: BTreeMap<usize, usize>,
}

pub struct Hub {
    st: Mutex<State>,
    cv: Condvar,
    notify: tokio::sync::Notify,
    run: String,
    client_num: usize,
    opts: WireOpts,
    expect: BTreeMap<String, Vec<usize>>,
    max_update: usize,
    log: Log,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn client_of<T>(r: &Request<T>) -> std::result::Result<usize, Status> {
    r.extensions()
        .get::<ClientId>()
        .map(|c| c.0)
        .ok_or_else(|| Status::unauthenticated("no client id"))
}

struct Svc(Arc<Hub>);

type FrameStream =
    Pin<Box<dyn tokio_stream::Stream<Item = std::result::Result<Frame, Status>> + Send>>;

/// Streams a header and then the tensors of `params`, encoded one tensor at a time on a
/// blocking thread, so memory holds one encoded tensor and a few chunks, not the whole set.
pub(crate) fn spawn_frames(
    head: Frame,
    params: Option<ParamSet>,
    opts: WireOpts,
    counter: Arc<AtomicUsize>,
) -> tokio::sync::mpsc::Receiver<Frame> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        counter.fetch_add(wire_len(&head), Ordering::Relaxed);
        if tx.blocking_send(head).is_err() {
            return;
        }
        for (name, t) in params.iter().flatten() {
            let Ok(frames) = tensor_frames(name, t, &opts) else {
                return;
            };
            for f in frames {
                counter.fetch_add(wire_len(&f), Ordering::Relaxed);
                if tx.blocking_send(f).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

#[tonic::async_trait]
impl Federation for Svc {
    async fn join(
        &self,
        req: Request<JoinRequest>,
    ) -> std::result::Result<Response<JoinReply>, Status> {
        let id = client_of(&req)?;
        let r = req.into_inner();
        let hub = &self.0;
        if r.client as usize != id {
            return Err(Status::permission_denied(format!(
                "authenticated as client {id}, joining as {}",
                r.client
            )));
        }
        if !r.run.is_empty() && r.run != hub.run {
            return Err(Status::failed_precondition(format!(
                "client belongs to run {}, this server runs {}",
                r.run, hub.run
            )));
        }
        if hub.lock().joined.insert(id) {
            (hub.log)(&format!("client {id} joined"));
        }
        hub.cv.notify_all();
        Ok(Response::new(JoinReply {
            run: hub.run.clone(),
            client_num: hub.client_num as u32,
            encoding: hub.opts.encoding as i32,
            zstd: hub.opts.zstd,
        }))
    }

    type PullStream = FrameStream;

    async fn pull(
        &self,
        req: Request<PullRequest>,
    ) -> std::result::Result<Response<Self::PullStream>, Status> {
        let id = client_of(&req)?;
        let r = req.into_inner();
        let hub = self.0.clone();
        if r.run != hub.run || r.client as usize != id {
            return Err(Status::failed_precondition("join this run first"));
        }
        // A pull is proof of life: a client that reconnected to a restarted server is back.
        if hub.lock().joined.insert(id) {
            (hub.log)(&format!("client {id} rejoined"));
            hub.cv.notify_all();
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(r.wait_ms as u64).min(MAX_POLL);
        let task: Option<Arc<ToClient>> = loop {
            let notified = hub.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = hub.lock();
                if let Some(t) = st.tasks.get(&id) {
                    break Some(t.clone());
                }
                if st.finished {
                    drop(st);
                    hub.lock().told.insert(id);
                    break Some(Arc::new(ToClient::Finish));
                }
            }
            tokio::select! {
                _ = &mut notified => continue,
                _ = tokio::time::sleep_until(deadline) => break None,
            }
        };
        let (head, params) = match &task {
            Some(t) => {
                let (h, p) = task_header(t);
                (h, p.cloned())
            }
            None => (TaskHeader::default(), None),
        };
        let counter = Arc::new(AtomicUsize::new(0));
        let rx = spawn_frames(
            Frame {
                body: Some(Body::Task(head)),
            },
            params,
            hub.opts,
            counter.clone(),
        );
        // Bytes are booked when the stream ends (sent or not: they were produced for it).
        let done = Arc::new(Booked {
            hub: hub.clone(),
            id,
            counter,
        });
        let s = ReceiverStream::new(rx).map(move |f| {
            let _keep = &done;
            Ok(f)
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn push(
        &self,
        req: Request<Streaming<Frame>>,
    ) -> std::result::Result<Response<PushReply>, Status> {
        let id = client_of(&req)?;
        let hub = self.0.clone();
        let mut s = req.into_inner();
        let mut wire = 0usize;
        let reject = |m: String| {
            (hub.log)(&format!("client {id}: rejected upload: {m}"));
            Status::invalid_argument(m)
        };
        let head = match next_frame(&mut s).await? {
            Some(Frame {
                body: Some(Body::Result(h)),
            }) => h,
            _ => return Err(reject("an upload must start with a result header".into())),
        };
        wire += crate::wire::wire_len(&Frame {
            body: Some(Body::Result(head.clone())),
        });
        if head.client as usize != id || head.run != hub.run {
            return Err(reject(format!(
                "result for client {} of run {} on a connection of client {id}",
                head.client, head.run
            )));
        }
        let fit = head.kind == crate::pb::ResultKind::FitRes as i32;
        // An update carries exactly the tensors its task sent (which may be part of the adapter).
        // A masked update (secure aggregation) carries the same names in u32 and its weight.
        let sent = hub.lock().tasks.get(&id).and_then(|t| match &**t {
            ToClient::Fit { params, config, .. } => {
                let mut l = layout(params);
                if config.secagg.is_some() {
                    l.insert(fedllm_fl::secagg::WEIGHT.to_string(), vec![1]);
                }
                Some(l)
            }
            _ => None,
        });
        let expect = sent.unwrap_or_else(|| hub.expect.clone());
        let mut asm = Assembler::new(fit.then_some(expect), hub.max_update);
        while let Some(f) = next_frame(&mut s).await? {
            wire += wire_len(&f);
            let body = f.body.ok_or_else(|| reject("empty frame".into()))?;
            if !fit {
                return Err(reject("tensors in a result that carries none".into()));
            }
            asm.push(body).map_err(|e| reject(e.to_string()))?;
        }
        *hub.lock().wire_up.entry(id).or_default() += wire;
        let params = if fit {
            asm.finish().map_err(|e| reject(e.to_string()))?
        } else {
            ParamSet::new()
        };
        let msg = to_server(&head, params).map_err(|e| reject(e.to_string()))?;
        let round = head.round as usize;
        let mut st = hub.lock();
        let matches = st.tasks.get(&id).is_some_and(|t| match (&**t, &msg) {
            (ToClient::Fit { round: r, .. }, ToServer::FitRes { .. } | ToServer::Failed { .. })
            | (
                ToClient::Evaluate { round: r, .. },
                ToServer::EvalRes { .. } | ToServer::Failed { .. },
            )
            | (
                ToClient::SecAgg { round: r, .. },
                ToServer::SecAgg { .. } | ToServer::Failed { .. },
            ) => *r == round,
            _ => false,
        });
        if matches {
            st.tasks.remove(&id);
            st.answered.insert(id);
            st.inbox.push(msg);
            drop(st);
            hub.cv.notify_all();
            return Ok(Response::new(PushReply {
                accepted: true,
                reason: String::new(),
            }));
        }
        if st.answered.contains(&id) && st.open_round == round {
            return Ok(Response::new(PushReply {
                accepted: true,
                reason: "duplicate (already received)".into(),
            }));
        }
        drop(st);
        let why = format!("no open task for client {id} in round {round} (late or stray)");
        (hub.log)(&format!("client {id}: ignored upload: {why}"));
        Ok(Response::new(PushReply {
            accepted: false,
            reason: why,
        }))
    }
}

async fn next_frame(s: &mut Streaming<Frame>) -> std::result::Result<Option<Frame>, Status> {
    match tokio::time::timeout(FRAME_TIMEOUT, s.message()).await {
        Err(_) => Err(Status::deadline_exceeded("upload stalled")),
        Ok(r) => r,
    }
}

struct Booked {
    hub: Arc<Hub>,
    id: usize,
    counter: Arc<AtomicUsize>,
}

impl Drop for Booked {
    fn drop(&mut self) {
        let n = self.counter.load(Ordering::Relaxed);
        *self.hub.lock().wire_down.entry(self.id).or_default() += n;
    }
}

/// Token bucket per client: `rate` requests/s, bursts of 4x.
struct Limiter {
    rate: f64,
    buckets: Mutex<BTreeMap<usize, (f64, Instant)>>,
}

impl Limiter {
    fn allow(&self, id: usize) -> bool {
        self.allow_at(id, Instant::now())
    }

    /// `allow` at a given time (tests drive the clock instead of sleeping).
    fn allow_at(&self, id: usize, now: Instant) -> bool {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let cap = 4.0 * self.rate;
        let (tokens, at) = b.entry(id).or_insert((cap, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(cap);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Tokens by client id from a YAML/JSON map file (`0: secret` or `client-0: secret`).
pub fn load_tokens(path: &std::path::Path) -> Result<BTreeMap<usize, String>> {
    let text = String::from_utf8(read_file(path)?).map_err(|e| TransportError::File {
        path: path.into(),
        msg: e.to_string(),
    })?;
    let bad = |m: String| TransportError::File {
        path: path.into(),
        msg: m,
    };
    let m: BTreeMap<String, String> = serde_yaml::from_str(&text)
        .map_err(|e| bad(format!("not a map of client id to token: {e}")))?;
    m.into_iter()
        .map(|(k, v)| {
            let id = k
                .trim_start_matches("client-")
                .parse::<usize>()
                .map_err(|_| bad(format!("key `{k}` is not a client id")))?;
            if v.len() < 8 {
                return Err(bad(format!(
                    "token of client {id} is shorter than 8 characters"
                )));
            }
            Ok((id, v))
        })
        .collect()
}

fn same_secret(a: &str, b: &str) -> bool {
    // Constant time in the length of the expected token.
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The running server: the round driver's end of the hub.
pub struct GrpcRemote {
    hub: Arc<Hub>,
    round_timeout: Duration,
    join_timeout: Duration,
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    rt: Option<tokio::runtime::Runtime>,
}

pub struct ServeOptions {
    pub run: String,
    pub client_num: usize,
    /// The adapter's names and shapes: an update carries exactly the part its task sent.
    pub expect: ParamSet,
    pub log: Log,
}

/// Binds `d.listen` and serves in background threads.
pub fn serve(d: &DistributedCfg, o: ServeOptions) -> Result<GrpcRemote> {
    let tokens = match &d.tokens_file {
        Some(p) => Some(load_tokens(p)?),
        None => None,
    };
    let tls = crate::tls::server_config(&d.tls)?;
    if tokens.is_none() && !d.tls.client_auth {
        (o.log)("warning: no distributed.tokens_file and no mTLS: clients are not authenticated");
    }
    let raw: usize = o.expect.values().map(|t| t.elem_count() * 4).sum();
    let hub = Arc::new(Hub {
        st: Mutex::new(State::default()),
        cv: Condvar::new(),
        notify: tokio::sync::Notify::new(),
        run: o.run,
        client_num: o.client_num,
        opts: WireOpts::from_config(d),
        expect: layout(&o.expect),
        max_update: raw + 4096,
        log: o.log,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| TransportError::Net(format!("runtime: {e}")))?;
    let addr: SocketAddr = d
        .listen
        .parse()
        .map_err(|e| TransportError::Config(format!("distributed.listen `{}`: {e}", d.listen)))?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| TransportError::Net(format!("cannot listen on {addr}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| TransportError::Net(e.to_string()))?;
    let limiter = Arc::new(Limiter {
        rate: d.rate_limit,
        buckets: Mutex::new(BTreeMap::new()),
    });
    let client_num = o.client_num;
    let log = hub.log.clone();
    let check = move |mut req: Request<()>| -> std::result::Result<Request<()>, Status> {
        let md = req.metadata();
        let id = md
            .get("x-fedllm-client")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&c| c < client_num)
            .ok_or_else(|| Status::unauthenticated("missing or unknown x-fedllm-client"))?;
        if let Some(t) = &tokens {
            let given = md
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            let ok = matches!((t.get(&id), given), (Some(want), Some(g)) if same_secret(g, want));
            if !ok {
                log(&format!(
                    "refused a request for client {id}: bad or missing token"
                ));
                return Err(Status::unauthenticated(format!(
                    "bad token for client {id}"
                )));
            }
        }
        if !limiter.allow(id) {
            return Err(Status::resource_exhausted(format!(
                "client {id}: rate limit"
            )));
        }
        req.extensions_mut().insert(ClientId(id));
        Ok(req)
    };
    let svc = tonic::service::interceptor::InterceptedService::new(
        FederationServer::new(Svc(hub.clone()))
            .max_decoding_message_size(d.max_message_bytes)
            .max_encoding_message_size(d.max_message_bytes),
        check,
    );
    let mut builder = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(16)
        // Large flow-control windows: updates are megabytes, HTTP/2's 64 KiB default throttles.
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(30)));
    if let Some(t) = tls {
        builder = builder
            .tls_config(t)
            .map_err(|e| TransportError::Config(format!("distributed.tls: {e}")))?;
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let router = builder.add_service(svc);
    let log = hub.log.clone();
    rt.spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await
        {
            log(&format!("server stopped: {e}"));
        }
    });
    Ok(GrpcRemote {
        hub,
        round_timeout: Duration::from_secs_f64(d.round_timeout_s),
        join_timeout: Duration::from_secs_f64(d.join_timeout_s),
        addr,
        shutdown: Some(tx),
        rt: Some(rt),
    })
}

impl GrpcRemote {
    pub fn run_id(&self) -> &str {
        &self.hub.run
    }
}

impl Drop for GrpcRemote {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Remote for GrpcRemote {
    fn wait_for_clients(&mut self, min: usize) -> fedllm_fl::Result<()> {
        let hub = &self.hub;
        let end = Instant::now() + self.join_timeout;
        let mut st = hub.lock();
        let mut shown = usize::MAX;
        while st.joined.len() < min {
            if st.joined.len() != shown {
                shown = st.joined.len();
                (hub.log)(&format!("waiting for clients: {shown} of {min} joined"));
            }
            let now = Instant::now();
            if now >= end {
                let missing: Vec<usize> = (0..hub.client_num)
                    .filter(|c| !st.joined.contains(c))
                    .collect();
                return Err(fedllm_fl::FlError::Protocol(format!(
                    "only {} of {min} clients joined within {:.0}s (missing {missing:?})",
                    st.joined.len(),
                    self.join_timeout.as_secs_f64()
                )));
            }
            st = hub
                .cv
                .wait_timeout(st, end - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    fn exchange(
        &mut self,
        round: usize,
        reqs: Vec<(usize, ToClient)>,
        min_received: usize,
    ) -> fedllm_fl::Result<Vec<ToServer>> {
        let hub = &self.hub;
        let asked: BTreeSet<usize> = reqs.iter().map(|(c, _)| *c).collect();
        {
            let mut st = hub.lock();
            st.tasks = reqs.into_iter().map(|(c, m)| (c, Arc::new(m))).collect();
            st.answered.clear();
            st.inbox.clear();
            st.open_round = round;
        }
        hub.notify.notify_waiters();
        let end = Instant::now() + self.round_timeout;
        let mut st = hub.lock();
        loop {
            let fits = st
                .inbox
                .iter()
                .filter(|m| matches!(m, ToServer::FitRes { .. }))
                .count();
            let all = asked.iter().all(|c| st.answered.contains(c));
            if all || (min_received > 0 && fits >= min_received) {
                break;
            }
            let now = Instant::now();
            if now >= end {
                let missing: Vec<usize> = asked
                    .iter()
                    .filter(|c| !st.answered.contains(c))
                    .copied()
                    .collect();
                (hub.log)(&format!(
                    "round {round}: deadline ({:.0}s) passed without clients {missing:?}",
                    self.round_timeout.as_secs_f64()
                ));
                break;
            }
            st = hub
                .cv
                .wait_timeout(st, end - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.tasks.clear();
        Ok(std::mem::take(&mut st.inbox))
    }

    fn take_wire_bytes(&mut self) -> (BTreeMap<usize, usize>, BTreeMap<usize, usize>) {
        let mut st = self.hub.lock();
        (
            std::mem::take(&mut st.wire_down),
            std::mem::take(&mut st.wire_up),
        )
    }

    fn finish(&mut self) {
        self.hub.lock().finished = true;
        self.hub.notify.notify_waiters();
        // Give waiting clients a moment to hear FINISH before the server goes away.
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            let st = self.hub.lock();
            if st.joined.is_subset(&st.told) {
                break;
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_allows_a_burst_then_refuses() {
        let l = Limiter {
            rate: 2.0,
            buckets: Mutex::new(BTreeMap::new()),
        };
        let t0 = Instant::now();
        let allowed = (0..20).filter(|_| l.allow_at(3, t0)).count();
        assert_eq!(allowed, 8, "burst of 4x the rate");
        assert!(l.allow_at(4, t0), "clients have separate buckets");
        // At 2 per second, 0.4 s refills 0.8 of a token (refused), 0.6 s more than one.
        assert!(!l.allow_at(3, t0 + Duration::from_millis(400)));
        assert!(
            l.allow_at(3, t0 + Duration::from_millis(600)),
            "refills at the rate"
        );
    }

    #[test]
    fn tokens_file_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.yaml");
        std::fs::write(&p, "0: abcdefgh12\nclient-1: zyxwvuts98\n").unwrap();
        let t = load_tokens(&p).unwrap();
        assert_eq!(t[&1], "zyxwvuts98");
        std::fs::write(&p, "bob: abcdefgh12\n").unwrap();
        assert!(load_tokens(&p)
            .unwrap_err()
            .to_string()
            .contains("`bob` is not a client id"));
        std::fs::write(&p, "0: short\n").unwrap();
        assert!(load_tokens(&p)
            .unwrap_err()
            .to_string()
            .contains("shorter than 8"));
        assert!(
            same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("ab", "abc")
        );
    }
}
