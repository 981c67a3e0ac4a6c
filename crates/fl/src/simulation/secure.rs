//! Secure aggregation in the round loop: `secagg::round` asks the clients through the same
//! path as a plain round (in process or a `Remote`), and in-process clients answer through
//! `secagg::client`, so standalone and distributed runs share one protocol.

use fedllm_rng::Rng;

use super::Simulation;
use crate::error::Result;
use crate::message::{ToClient, ToServer};
use crate::params::ParamSet;
use crate::secagg;
use crate::server::RoundOutcome;

impl Simulation {
    /// Client `c`'s answer to `msg` (secure-aggregation stages and masked fits included).
    pub(super) fn answer_as(
        &mut self,
        c: usize,
        msg: ToClient,
        state: &mut ParamSet,
    ) -> Result<Option<ToServer>> {
        let client = self
            .clients
            .iter()
            .position(|k| k.id == c)
            .expect("own data");
        let mut states = std::mem::take(&mut self.secagg);
        let shared = self.shared();
        let out = secagg::client::answer(&mut states, c, msg, |m| {
            self.clients[client].handle(m, &shared, state)
        });
        self.secagg = states;
        out
    }

    /// A round under SecAgg+; below the threshold at any point it is abandoned (logged) and
    /// the global tensors stay.
    pub(super) fn secure_fit_round(&mut self, log: &mut impl FnMut(&str)) -> Result<RoundOutcome> {
        let reqs = self.server.start_round()?;
        let round = self.server.round;
        let cfg = self.cfg.secagg.clone();
        let seed = Rng::derive(&[self.server.seed, round as u64, 0x5ec_a66]);
        let min = self.cfg.distributed.min_received.unwrap_or(usize::MAX);
        let mut say = |m: String| log(&format!("round {round}: {m}"));
        let mut ask = |msgs: Vec<(usize, ToClient)>, min: usize| match self.remote.as_mut() {
            Some(r) => r.exchange(round, msgs, min),
            None => self.answer_here(round, msgs, &fedllm_train::Progress::new("", "", 0, false)),
        };
        let o = secagg::round::run(round, reqs, &cfg, seed, min, &mut ask, &mut say)?;
        for m in o.other {
            if let Err(e) = self.server.on_message(m) {
                say(format!("ignored message: {e}"));
            }
        }
        for (r, bytes) in o.masked {
            self.server.on_masked(round, r, bytes);
        }
        match &o.mean_delta {
            Ok(_) => say(format!(
                "secagg: aggregated the masked inputs of clients {:?}",
                o.survivors
            )),
            Err(why) => say(format!(
                "secagg: round abandoned, the global adapter stays as it was: {why}"
            )),
        }
        let global = &self.server.global;
        let mean = o.mean_delta.and_then(|d| {
            d.into_iter()
                .map(|(k, d)| Ok((k.clone(), (&global[&k] + d).map_err(|e| e.to_string())?)))
                .collect()
        });
        self.server.close_secure_round(mean)
    }
}
