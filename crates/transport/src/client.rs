//! The client process's loop: join, pull a task, work, push the result; again until FINISH.
//! An unreachable server (restarting, say) is retried until `connect_timeout_s`; a refusal
//! (bad token, wrong run, TLS mismatch) ends the client at once with the server's reason.
//! The last result is kept, so a task sent again (after a lost upload or a server restart)
//! is answered without redoing the work.

use std::hash::{Hash, Hasher};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedllm_fl::config::DistributedCfg;
use fedllm_fl::message::{ToClient, ToServer};
use fedllm_fl::params::ParamSet;
use fedllm_fl::Simulation;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::convert::{result_header, to_client};
use crate::error::{Result, TransportError};
use crate::pb::federation_client::FederationClient;
use crate::pb::{frame::Body, Encoding, Frame, JoinRequest, PullRequest, TaskKind};
use crate::server::spawn_frames;
use crate::wire::{layout, Assembler, WireOpts};

const POLL_MS: u32 = 10_000;

#[derive(Clone)]
struct Auth {
    client: MetadataValue<tonic::metadata::Ascii>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut r: Request<()>) -> std::result::Result<Request<()>, Status> {
        r.metadata_mut()
            .insert("x-fedllm-client", self.client.clone());
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        Ok(r)
    }
}

type Conn = FederationClient<InterceptedService<Channel, Auth>>;

pub struct ClientOptions {
    pub client: usize,
    pub token: Option<String>,
    /// Sleep this long before answering each task (simulates a slow device; chaos tests).
    pub straggle: Duration,
}

#[derive(Debug, Default, Clone)]
pub struct ClientStats {
    pub tasks: usize,
    pub reused: usize,
    pub bytes_down: usize,
    pub bytes_up: usize,
}

fn fatal(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unauthenticated
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::Unimplemented
    )
}

/// An error and its sources, joined by ": " (tonic hides the cause of a transport failure there).
fn chain(e: &dyn std::error::Error) -> String {
    let mut m = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        m += &format!(": {c}");
        cur = c.source();
    }
    m
}

fn describe(s: &Status) -> String {
    let src = std::error::Error::source(s).map(chain).unwrap_or_default();
    format!("{:?}: {} {src}", s.code(), s.message())
        .trim()
        .to_string()
}

/// "round R: <what>" of an upload, for the client's log.
fn upload_label(m: &ToServer) -> String {
    let (round, what) = match m {
        ToServer::FitRes { round, .. } => (*round, "fit result"),
        ToServer::EvalRes { round, .. } => (*round, "evaluation"),
        ToServer::Failed { round, .. } => (*round, "failure report"),
        ToServer::SecAgg { round, .. } => (*round, "secure-aggregation reply"),
        ToServer::Join { .. } => (0, "join"),
    };
    format!("round {round}: {what}")
}

/// Identifies a task by kind, round, seed and parameter values.
fn digest(m: &ToClient) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let (kind, round, params, seed) = match m {
        ToClient::Fit {
            round,
            params,
            seed,
            ..
        } => (1u8, *round, Some(params), *seed),
        ToClient::Evaluate { round, params, .. } => (2, *round, Some(params), 0),
        ToClient::Finish => (3, 0, None, 0),
        ToClient::SecAgg { round, stage } => {
            serde_json::to_string(stage).expect("json").hash(&mut h);
            (4, *round, None, 0)
        }
    };
    (kind, round, seed).hash(&mut h);
    for (k, t) in params.into_iter().flatten() {
        k.hash(&mut h);
        if let Ok(v) = t.flatten_all().and_then(|x| x.to_vec1::<f32>()) {
            v.iter().for_each(|x| x.to_bits().hash(&mut h));
        }
    }
    h.finish()
}

async fn connect(d: &DistributedCfg, o: &ClientOptions) -> Result<Conn> {
    let mut ep = Endpoint::from_shared(d.server.clone())
        .map_err(|e| TransportError::Config(format!("distributed.server `{}`: {e}", d.server)))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20));
    if let Some(t) = crate::tls::client_config(&d.tls)? {
        ep = ep
            .tls_config(t)
            .map_err(|e| TransportError::Config(format!("distributed.tls: {e}")))?;
    }
    let ch = ep
        .connect()
        .await
        .map_err(|e| TransportError::Net(format!("cannot reach {}: {}", d.server, chain(&e))))?;
    let auth = Auth {
        client: MetadataValue::try_from(o.client.to_string()).expect("digits"),
        token: match &o.token {
            Some(t) => Some(MetadataValue::try_from(format!("Bearer {t}")).map_err(|_| {
                TransportError::Config("the token holds invalid characters".into())
            })?),
            None => None,
        },
    };
    Ok(FederationClient::with_interceptor(ch, auth)
        .max_decoding_message_size(d.max_message_bytes)
        .max_encoding_message_size(d.max_message_bytes))
}

/// What a step of the loop needs next.
enum Next {
    Task(ToClient),
    Wait,
}

fn net_or_fatal(s: Status, what: &str) -> TransportError {
    if fatal(&s) {
        TransportError::Refused(format!("server refused {what}: {}", describe(&s)))
    } else {
        TransportError::Net(format!("{what}: {}", describe(&s)))
    }
}

async fn pull(
    conn: &mut Conn,
    run: &str,
    o: &ClientOptions,
    expect: &ParamSet,
    stats: &mut ClientStats,
) -> Result<Next> {
    let mut s = conn
        .pull(PullRequest {
            run: run.to_string(),
            client: o.client as u32,
            wait_ms: POLL_MS,
        })
        .await
        .map_err(|e| net_or_fatal(e, "pull"))?
        .into_inner();
    let head = match s.message().await.map_err(|e| net_or_fatal(e, "pull"))? {
        Some(Frame {
            body: Some(Body::Task(h)),
        }) => h,
        _ => {
            return Err(TransportError::Net(
                "pull: the stream did not start with a task".into(),
            ))
        }
    };
    stats.bytes_down += crate::wire::wire_len(&Frame {
        body: Some(Body::Task(head.clone())),
    });
    let kind = TaskKind::try_from(head.kind).unwrap_or(TaskKind::Wait);
    if kind == TaskKind::Wait {
        return Ok(Next::Wait);
    }
    // A task may carry any part of the adapter (the server decides per client what travels);
    // each tensor must still be one of ours, with our shape.
    let mut asm = Assembler::new(
        Some(layout(expect)),
        expect.values().map(|t| t.elem_count() * 4).sum::<usize>() + 4096,
    )
    .allow_subset();
    while let Some(f) = s.message().await.map_err(|e| net_or_fatal(e, "pull"))? {
        stats.bytes_down += crate::wire::wire_len(&f);
        let body = f
            .body
            .ok_or_else(|| TransportError::Net("empty frame".into()))?;
        asm.push(body)?;
    }
    let params = if matches!(kind, TaskKind::Fit | TaskKind::Evaluate) {
        asm.finish()?
    } else {
        ParamSet::new()
    };
    Ok(Next::Task(to_client(&head, params)?))
}

async fn push(
    conn: &mut Conn,
    run: &str,
    msg: &ToServer,
    opts: WireOpts,
    stats: &mut ClientStats,
) -> Result<(bool, String)> {
    let (head, params) = result_header(run, msg);
    let counter = Arc::new(AtomicUsize::new(0));
    let rx = spawn_frames(
        Frame {
            body: Some(Body::Result(head)),
        },
        params.cloned(),
        opts,
        counter.clone(),
    );
    let reply = conn
        .push(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| net_or_fatal(e, "upload"))?
        .into_inner();
    stats.bytes_up += counter.load(std::sync::atomic::Ordering::Relaxed);
    Ok((reply.accepted, reply.reason))
}

/// Serves as client `o.client` of the run until the server says FINISH.
pub fn run_client(
    sim: &mut Simulation,
    o: &ClientOptions,
    log: impl FnMut(&str),
) -> Result<ClientStats> {
    let d = sim.cfg.distributed.clone();
    // Tasks carry some of the adapter's tensors: the shared ones, per the server's choice.
    let expect = sim.initial().clone();
    run_with(&d, o, &expect, |m| sim.handle(m), log)
}

/// The client loop around any worker (`run_client` plugs in the simulation's; the transport
/// benchmark an echo). `expect` is the parameter layout tasks carry (part of it).
pub fn run_with(
    d: &DistributedCfg,
    o: &ClientOptions,
    expect: &ParamSet,
    mut work: impl FnMut(ToClient) -> fedllm_fl::Result<Option<ToServer>>,
    mut log: impl FnMut(&str),
) -> Result<ClientStats> {
    let d = d.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| TransportError::Net(format!("runtime: {e}")))?;
    let mut stats = ClientStats::default();
    let mut conn: Option<Conn> = None;
    let mut run = String::new();
    let mut opts = WireOpts::from_config(&d);
    let mut last_ok = Instant::now();
    let mut backoff = Duration::from_millis(200);
    let mut cache: Option<(u64, ToServer)> = None;
    loop {
        let step: Result<bool> = rt.block_on(async {
            if conn.is_none() {
                let mut c = connect(&d, o).await?;
                let r = c
                    .join(JoinRequest {
                        client: o.client as u32,
                        run: run.clone(),
                    })
                    .await
                    .map_err(|e| net_or_fatal(e, "join"))?
                    .into_inner();
                if run.is_empty() {
                    log(&format!("joined run {} ({} clients)", r.run, r.client_num));
                } else {
                    log(&format!("rejoined run {}", r.run));
                }
                run = r.run;
                opts.encoding = Encoding::try_from(r.encoding).unwrap_or(Encoding::F32);
                opts.zstd = r.zstd;
                conn = Some(c);
            }
            let c = conn.as_mut().expect("connected");
            let task = match pull(c, &run, o, expect, &mut stats).await? {
                Next::Wait => return Ok(false),
                Next::Task(ToClient::Finish) => {
                    // The worker's last word (a client writes its own adapter).
                    tokio::task::block_in_place(|| work(ToClient::Finish))?;
                    return Ok(true);
                }
                Next::Task(t) => t,
            };
            let key = digest(&task);
            let reply = match &cache {
                Some((k, r)) if *k == key => {
                    stats.reused += 1;
                    log("task seen before: sending the kept result again");
                    r.clone()
                }
                _ => {
                    let (round, what) = match &task {
                        ToClient::Fit { round, .. } => (*round, "fit"),
                        ToClient::Evaluate { round, .. } => (*round, "evaluate"),
                        ToClient::Finish => (0, ""),
                        ToClient::SecAgg { round, .. } => (*round, "secure-aggregation stage"),
                    };
                    log(&format!("round {round}: {what} received"));
                    if !o.straggle.is_zero() {
                        tokio::time::sleep(o.straggle).await;
                    }
                    let t0 = Instant::now();
                    let r = tokio::task::block_in_place(|| work(task));
                    let r = match r {
                        Ok(Some(m)) => m,
                        Ok(None) => return Ok(true),
                        Err(e) => ToServer::Failed {
                            round,
                            client: o.client,
                            reason: e.to_string(),
                        },
                    };
                    log(&format!(
                        "round {round}: {what} done in {:.1}s",
                        t0.elapsed().as_secs_f64()
                    ));
                    stats.tasks += 1;
                    cache = Some((key, r.clone()));
                    r
                }
            };
            let (ok, why) = push(c, &run, &reply, opts, &mut stats).await?;
            if ok {
                log(&format!("{} accepted", upload_label(&reply)));
            } else {
                log(&format!("server ignored the result: {why}"));
            }
            Ok(false)
        });
        match step {
            Ok(true) => {
                log("run finished");
                return Ok(stats);
            }
            Ok(false) => {
                last_ok = Instant::now();
                backoff = Duration::from_millis(200);
            }
            Err(TransportError::Net(m)) => {
                conn = None;
                if last_ok.elapsed().as_secs_f64() > d.connect_timeout_s {
                    return Err(TransportError::Net(format!(
                        "{m} (gave up after {:.0}s)",
                        d.connect_timeout_s
                    )));
                }
                log(&format!("{m}; retrying"));
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}
