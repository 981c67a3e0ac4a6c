//! `fedllm server`, `fedllm client`, `fedllm certs`: the distributed mode over gRPC.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use fedllm_fl::config::{Mode, SplitterName};
use fedllm_fl::{Role, RunConfig, Simulation};
use fedllm_transport::client::{run_client, ClientOptions};
use fedllm_transport::server::{serve, ServeOptions};

#[derive(Args)]
pub struct ServerArgs {
    /// Run config (YAML with `federate.mode: distributed`); optional with --resume
    #[arg(long, required_unless_present = "resume")]
    pub config: Option<PathBuf>,
    /// Continue the run in this output folder from its last checkpoint (after a crash)
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Address to listen on [default: distributed.listen]
    #[arg(long)]
    pub listen: Option<String>,
    /// Replace the run already in the config's outdir (only its run files are removed)
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Overrides as key.sub=value
    pub overrides: Vec<String>,
}

#[derive(Args)]
pub struct ClientArgs {
    /// The run config (the same YAML as the server's)
    #[arg(long)]
    pub config: PathBuf,
    /// Server URL [default: distributed.server]
    #[arg(long)]
    pub server: Option<String>,
    /// This client's index in the federated split of `data.source`
    #[arg(long, required_unless_present = "data")]
    pub data_idx: Option<usize>,
    /// Train on this data file instead (the client's own records); needs --id
    #[arg(long, requires = "id")]
    pub data: Option<PathBuf>,
    /// Client id when using --data
    #[arg(long)]
    pub id: Option<usize>,
    /// File holding this client's token [default: distributed.token_file]
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Wait this long before answering each task (simulates a slow device)
    #[arg(long, default_value_t = 0)]
    pub straggle_ms: u64,
    /// Overrides as key.sub=value
    pub overrides: Vec<String>,
}

#[derive(Args)]
pub struct CertsArgs {
    /// Output folder for ca.pem, server.pem/.key, client-<i>.pem/.key
    #[arg(long)]
    pub out: PathBuf,
    /// DNS names / IPs the server certificate is valid for
    #[arg(long, default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    pub name: Vec<String>,
    /// Client certificates to issue (for mTLS)
    #[arg(long, default_value_t = 0)]
    pub clients: usize,
}

fn stamp(who: &str, line: &str) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    eprintln!("[{t:.3}] {who}: {line}");
}

fn need_distributed(cfg: &RunConfig) -> Result<()> {
    if cfg.federate.mode != Mode::Distributed {
        bail!(
            "federate.mode is `{}`: set federate.mode: distributed for `fedllm server`/`client` (or use `fedllm run`)",
            cfg.federate.mode
        );
    }
    Ok(())
}

/// A run id unique to this run (kept in the output folder so a resumed server keeps it).
fn run_id(outdir: &Path, resume: bool) -> Result<String> {
    let p = outdir.join("run_id");
    if resume {
        if let Ok(s) = std::fs::read_to_string(&p) {
            return Ok(s.trim().to_string());
        }
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let id = format!(
        "{:016x}",
        fedllm_rng::Rng::derive(&[t as u64, std::process::id() as u64])
    );
    std::fs::write(&p, &id).with_context(|| format!("{}", p.display()))?;
    Ok(id)
}

pub fn cmd_server(a: ServerArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut overrides = a.overrides.clone();
    if let Some(l) = &a.listen {
        overrides.push(format!("distributed.listen={l}"));
    }
    // Config mistakes surface before the model is loaded.
    let cfg = match (&a.resume, &a.config) {
        (Some(dir), _) => RunConfig::from_file(&dir.join("config.yaml"), &overrides)?,
        (None, Some(c)) => RunConfig::from_file(c, &overrides)?,
        (None, None) => bail!("give --config or --resume"),
    };
    need_distributed(&cfg)?;
    fedllm_transport::tls::server_config(&cfg.distributed.tls)?;
    if let Some(p) = &cfg.distributed.tokens_file {
        fedllm_transport::server::load_tokens(p)?;
    }
    if a.resume.is_none() {
        fedllm_fl::manifest::claim(&cfg.outdir, a.overwrite)?;
    }
    let mut sim = match &a.resume {
        Some(dir) => Simulation::resume_as(dir, &overrides, Role::Server)?,
        None => Simulation::with_role(cfg, Role::Server)?,
    };
    let run = run_id(&sim.cfg.outdir, a.resume.is_some())?;
    let log: fedllm_transport::server::Log = Arc::new(|l: &str| stamp("server", l));
    let remote = serve(
        &sim.cfg.distributed,
        ServeOptions {
            run: run.clone(),
            client_num: sim.cfg.federate.client_num,
            expect: sim.initial().clone(),
            log,
        },
    )?;
    stamp(
        "server",
        &format!(
            "run {run}: listening on {} for {} clients ({} per round), {} rounds{}",
            remote.addr,
            sim.cfg.federate.client_num,
            sim.cfg.clients_per_round(),
            sim.cfg.federate.total_round_num,
            if a.resume.is_some() {
                format!(", resuming after round {}", sim.server.round)
            } else {
                String::new()
            }
        ),
    );
    sim.remote = Some(Box::new(remote));
    let s = sim.run(false, None, |l| stamp("server", l))?;
    sim.remote = None;
    println!("{}", s.table);
    println!(
        "adapter: {}; metrics: {}/metrics.{{jsonl,csv}}; {:.1} s, peak RSS {:.0} MB",
        s.adapter_dir.display(),
        sim.cfg.outdir.display(),
        t0.elapsed().as_secs_f64(),
        fedllm_model::bench::peak_rss_bytes().unwrap_or(0) as f64 / 1e6
    );
    Ok(())
}

pub fn cmd_client(a: ClientArgs) -> Result<()> {
    let mut overrides = a.overrides.clone();
    if let Some(s) = &a.server {
        overrides.push(format!("distributed.server={s}"));
    }
    let mut cfg = RunConfig::from_file(&a.config, &overrides)?;
    need_distributed(&cfg)?;
    let id = match (a.data_idx, a.id) {
        (Some(i), _) | (None, Some(i)) => i,
        (None, None) => bail!("give --data-idx or --data with --id"),
    };
    let mut sim = match &a.data {
        None => Simulation::with_role(cfg, Role::Client(id))?,
        Some(file) => {
            // The client's own file: all of it is this client's (90/5/5 train/val/test).
            cfg.data.source = file.display().to_string();
            cfg.data.splitter = Some(SplitterName::Iid);
            cfg.outdir = cfg.outdir.join(format!("client-{id}"));
            cfg.federate.client_num = 1;
            cfg.federate.sample_client_num = 1;
            cfg.federate.sample_client_rate = None;
            let mut s = Simulation::with_role(cfg, Role::Client(0))?;
            s.clients[0].id = id;
            s.role = Role::Client(id);
            s
        }
    };
    let token_file = a.token_file.or(sim.cfg.distributed.token_file.clone());
    let token = match token_file {
        Some(p) => Some(
            std::fs::read_to_string(&p)
                .with_context(|| format!("token file {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let who = format!("client {id}");
    stamp(
        &who,
        &format!(
            "{} training records; server {}",
            sim.clients[0].train.len(),
            sim.cfg.distributed.server
        ),
    );
    let own = sim.local.get(id)?;
    if !own.is_empty() {
        stamp(
            &who,
            &format!(
                "resuming its own {} tensors from {}",
                own.len(),
                sim.cfg.outdir.join("client_state.safetensors").display()
            ),
        );
    }
    let o = ClientOptions {
        client: id,
        token,
        straggle: Duration::from_millis(a.straggle_ms),
    };
    let s = run_client(&mut sim, &o, |l| stamp(&who, l))?;
    println!(
        "client {id}: {} tasks ({} answered again from the kept result), {:.2} MB down, {:.2} MB up on the wire",
        s.tasks,
        s.reused,
        s.bytes_down as f64 / 1e6,
        s.bytes_up as f64 / 1e6
    );
    Ok(())
}

pub fn cmd_certs(a: CertsArgs) -> Result<()> {
    fedllm_transport::tls::generate(&a.out, &a.name, a.clients)?;
    println!(
        "wrote {}/ca.pem, server.pem, server.key{}",
        a.out.display(),
        if a.clients > 0 {
            format!(" and client-0..{} certificates", a.clients - 1)
        } else {
            String::new()
        }
    );
    Ok(())
}
