//! `fedllm serve`: parses the options, loads the base and each adapter, hands them to
//! `fedllm_serve`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use fedllm_serve::{Options, Slot};

use crate::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An adapter served as model NAME (repeatable); the bare base is model `base`
    #[arg(long, value_name = "NAME=DIR")]
    adapter: Vec<String>,
    /// Address to listen on (port 0: any free port, printed on start)
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Requests waiting beyond this many are answered 429
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Requests decoded together at most
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let loaded = a.model.load()?;
    let tok = loaded.tokenizer.context("the model has no tokenizer")?;
    let base = loaded.model;
    let mut slots = BTreeMap::new();
    slots.insert(
        "base".to_string(),
        Slot {
            model: base.clone(),
            prefix: None,
        },
    );
    for spec in &a.adapter {
        let Some((name, dir)) = spec.split_once('=') else {
            bail!("--adapter {spec}: expected NAME=DIR");
        };
        if name.is_empty() || slots.contains_key(name) {
            bail!("--adapter {spec}: the name `{name}` is empty or taken");
        }
        let dir = PathBuf::from(dir);
        let mut model = base.clone();
        let prefix = crate::attach_for_generation(&mut model, &dir)?;
        slots.insert(name.to_string(), Slot { model, prefix });
    }
    let names: Vec<String> = slots.keys().cloned().collect();
    let opts = Options {
        listen: a.listen,
        max_queue: a.max_queue,
        max_batch: a.max_batch,
    };
    fedllm_serve::serve(slots, tok, opts, |addr| {
        eprintln!("serving {} on http://{addr}/v1", names.join(", "));
    })
    .context("serving")
}
