//! The seam between the round loop and a network: the distributed mode's transport implements
//! `Remote`, so the same `Simulation` code drives in-process and remote clients alike.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::message::{ToClient, ToServer};

/// Who a `Simulation` is in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Server and every client in one process.
    Standalone,
    /// The distributed server: aggregates and evaluates on its test split; holds no client data.
    Server,
    /// One distributed client: its own data only.
    Client(usize),
}

pub trait Remote: Send {
    /// Blocks until `min` clients have joined; an error after the join timeout.
    fn wait_for_clients(&mut self, min: usize) -> Result<()>;
    /// Delivers each request to its client and returns the answers that arrived before the
    /// round closed: when all asked clients answered, when `min_received` fit results are in,
    /// or at the deadline. Missing clients are simply absent.
    fn exchange(
        &mut self,
        round: usize,
        reqs: Vec<(usize, ToClient)>,
        min_received: usize,
    ) -> Result<Vec<ToServer>>;
    /// Bytes on the wire (down, up) per client since the last call.
    fn take_wire_bytes(&mut self) -> (BTreeMap<usize, usize>, BTreeMap<usize, usize>);
    /// Tells every client the run is over.
    fn finish(&mut self);
}
