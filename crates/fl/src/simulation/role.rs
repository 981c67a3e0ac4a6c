//! A distributed client: the same engine, answering one server message at a time with its own
//! data, and keeping its own tensors in its folder so that a restart goes on with them.

use super::Simulation;
use crate::checkpoint;
use crate::error::{FlError, Result};
use crate::message::{ToClient, ToServer};
use crate::remote::Role;

impl Simulation {
    /// A distributed client's answer to one server message (None for `Finish`).
    pub fn handle(&mut self, msg: ToClient) -> Result<Option<ToServer>> {
        let Role::Client(i) = self.role else {
            return Err(FlError::Protocol(
                "only a client answers server messages".into(),
            ));
        };
        let eval = matches!(msg, ToClient::Evaluate { .. });
        if eval {
            self.adapter.attach(&mut self.model, false)?;
        }
        let fit = matches!(msg, ToClient::Fit { .. });
        if let ToClient::Fit { params, .. } | ToClient::Evaluate { params, .. } = &msg {
            self.last_shared = params.clone();
        }
        if matches!(msg, ToClient::Finish) {
            self.save_own_adapter(i)?;
        }
        let mut state = self.local.take(i)?;
        let out = self.answer_as(i, msg, &mut state);
        if eval {
            self.adapter.attach(&mut self.model, true)?;
        }
        if fit && !state.is_empty() && out.is_ok() {
            // The client's own tensors outlive the process (a restarted client resumes them).
            checkpoint::save_client_state(&self.cfg.outdir, &state)?;
        }
        self.local.put(i, state)?;
        out
    }
}

impl Simulation {
    /// At the end of a run, a client with tensors of its own writes the adapter it uses to
    /// `client-<i>/adapter/`: the last global tensors it received completed by its own, or its
    /// personal adapter.
    fn save_own_adapter(&mut self, i: usize) -> Result<()> {
        let own = self.local.get(i)?;
        if own.is_empty() {
            return Ok(());
        }
        let dir = self.cfg.outdir.join("adapter");
        self.save_client_adapter(self.last_shared.clone(), &own, &dir)
    }
}
