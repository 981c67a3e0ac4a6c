//! A client's side of one SecAgg+ round: fresh keys, its secrets shared with its neighbours,
//! its update masked, and only the shares an honest unmasking needs revealed.

use std::collections::{BTreeMap, BTreeSet};

use x25519_dalek::StaticSecret;

use super::protocol::{open, seal, seed_hash, FitMask, Params, PeerKeys, Reply};
use super::{keypair, mask, pair_seed, prg, quantize, share_at, Share};
use crate::error::{FlError, Result};
use crate::message::{ToClient, ToServer};
use crate::params::{flatten, layout};

fn bad(m: String) -> FlError {
    FlError::Protocol(format!("secure aggregation: {m}"))
}

/// 32 bytes from the operating system. The protocol's secrets must be unknown to the server,
/// which knows the run's seed: they cannot come from the seeded generators used elsewhere.
fn os_secret() -> Result<[u8; 32]> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).map_err(|e| bad(format!("no OS randomness: {e}")))?;
    Ok(b)
}

pub struct ClientRound {
    pub round: usize,
    me: usize,
    params: Params,
    neighbours: BTreeSet<usize>,
    c_sk: StaticSecret,
    s_sk: StaticSecret,
    s_secret: [u8; 32],
    b: [u8; 32],
    /// Stage 2: the neighbours' keys.
    peers: BTreeMap<usize, PeerKeys>,
    /// Stage 3: (share of b_j, share of sk_j) that neighbour j sealed for this client.
    held: BTreeMap<usize, (Share, Share)>,
    unmasked: bool,
}

impl ClientRound {
    /// Stage 1: this round's key pairs and mask seed.
    pub fn setup(
        round: usize,
        me: usize,
        params: Params,
        neighbours: Vec<usize>,
    ) -> Result<(Self, Reply)> {
        if params.threshold == 0 || neighbours.contains(&me) || neighbours.len() < params.threshold
        {
            return Err(bad(format!(
                "client {me} was given neighbours {neighbours:?} for threshold {}",
                params.threshold
            )));
        }
        let (c_sk, c_pk) = keypair(os_secret()?);
        let s_secret = os_secret()?;
        let (s_sk, s_pk) = keypair(s_secret);
        let b = os_secret()?;
        let b_hash = seed_hash(&b);
        let r = Self {
            round,
            me,
            params,
            neighbours: neighbours.into_iter().collect(),
            c_sk,
            s_sk,
            s_secret,
            b,
            peers: BTreeMap::new(),
            held: BTreeMap::new(),
            unmasked: false,
        };
        Ok((r, Reply::Keys { c_pk, s_pk, b_hash }))
    }

    /// Stage 2: Shamir-shares b and the mask key among the neighbours that announced keys,
    /// each pair of shares sealed for its holder.
    pub fn share_keys(&mut self, keys: Vec<PeerKeys>) -> Result<Reply> {
        for k in &keys {
            if !self.neighbours.contains(&k.client) || self.peers.insert(k.client, *k).is_some() {
                return Err(bad(format!(
                    "keys of client {} are not one neighbour's",
                    k.client
                )));
            }
        }
        let t = self.params.threshold;
        if self.peers.len() < t {
            return Err(bad(format!(
                "{} neighbour(s) left, below the threshold {t}",
                self.peers.len()
            )));
        }
        let xs: Vec<u64> = self.peers.keys().map(|&j| j as u64 + 1).collect();
        // Coefficients from a keystream on a fresh secret: as unpredictable as the secrets.
        // Two secrets × 8 polynomials × (t − 1) coefficients, a u64 from each pair of words.
        let stream = prg(&os_secret()?, 32 * (t - 1));
        let mut words = stream
            .chunks_exact(2)
            .map(|w| (w[0] as u64) << 32 | w[1] as u64);
        let mut next = || words.next().expect("enough coefficients");
        let b = share_at(&self.b, t, &xs, &mut next)?;
        let sk = share_at(&self.s_secret, t, &xs, &mut next)?;
        let sealed = self
            .peers
            .values()
            .zip(b.iter().zip(&sk))
            .map(|(p, (bs, ks))| seal(self.round, self.me, p.client, &self.c_sk, &p.c_pk, (bs, ks)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Reply::Shares { sealed })
    }

    /// Stage 3: opens the envelopes forwarded by the server and masks [w·Δ, w] (w = samples /
    /// max_weight) with the self mask and a pairwise mask per neighbour whose shares arrived.
    pub fn mask_update(
        &mut self,
        fit: &FitMask,
        delta: &[f32],
        samples: usize,
    ) -> Result<Vec<u32>> {
        for e in &fit.sealed {
            let peer = self.peers.get(&e.from).filter(|_| e.to == self.me);
            let Some(peer) = peer else {
                return Err(bad(format!(
                    "an envelope from client {} for client {}",
                    e.from, e.to
                )));
            };
            let (b, sk) = open(self.round, e, &self.c_sk, &peer.c_pk)?;
            if b.0 != self.me as u64 + 1
                || sk.0 != b.0
                || self.held.insert(e.from, (b, sk)).is_some()
            {
                return Err(bad(format!(
                    "client {}'s shares are not at this client's point",
                    e.from
                )));
            }
        }
        let w = samples as f64 / self.params.max_weight;
        if !(w > 0.0 && w <= 1.0) {
            return Err(bad(format!(
                "{samples} samples do not fit secagg.max_weight {} (w must be in (0, 1])",
                self.params.max_weight
            )));
        }
        let mut x: Vec<f32> = delta.iter().map(|d| (*d as f64 * w) as f32).collect();
        x.push(w as f32);
        let q = quantize(&x, self.params.clip_range, self.params.bits);
        let pairs: Vec<(usize, [u8; 32])> = self
            .held
            .keys()
            .map(|&j| (j, pair_seed(&self.s_sk, &self.peers[&j].s_pk)))
            .collect();
        Ok(mask(&q, self.me, &self.b, &pairs))
    }

    /// Stage 4: this client's shares of the survivors' b and the dropped clients' mask keys,
    /// once. Never both for one client (that would unmask its input), never for a round with
    /// fewer survivors than the threshold, never if this client is said to have dropped.
    pub fn unmask(&mut self, survivors: &[usize], dropped: &[usize]) -> Result<Reply> {
        let s: BTreeSet<usize> = survivors.iter().copied().collect();
        let d: BTreeSet<usize> = dropped.iter().copied().collect();
        if self.unmasked {
            return Err(bad("asked to unmask twice".into()));
        }
        if !s.is_disjoint(&d) || !s.contains(&self.me) || s.len() != survivors.len() {
            return Err(bad(format!(
                "inconsistent unmasking request (survivors {survivors:?}, dropped {dropped:?})"
            )));
        }
        if s.len() < self.params.threshold {
            return Err(bad(format!(
                "{} survivor(s), below the threshold {}",
                s.len(),
                self.params.threshold
            )));
        }
        self.unmasked = true;
        let pick = |set: &BTreeSet<usize>, second: bool| -> Vec<(usize, Share)> {
            self.held
                .iter()
                .filter(|(j, _)| set.contains(j))
                .map(|(j, (b, sk))| (*j, if second { *sk } else { *b }))
                .collect()
        };
        Ok(Reply::Unmask {
            b: pick(&s, false),
            sk: pick(&d, true),
        })
    }
}

/// Client `c`'s answer to `msg` with its secure-aggregation state in `states`: stages here, a
/// masked fit as `plain`'s result with the update masked, anything else by `plain` alone.
pub fn answer(
    states: &mut BTreeMap<usize, ClientRound>,
    c: usize,
    msg: ToClient,
    plain: impl FnOnce(ToClient) -> Result<Option<ToServer>>,
) -> Result<Option<ToServer>> {
    let missing = |round: usize| {
        bad(format!(
            "no keys of round {round} (this client missed stage 1)"
        ))
    };
    match msg {
        ToClient::SecAgg { round, stage } => {
            let reply = match stage {
                super::protocol::Stage::Setup { params, neighbours } => {
                    let (st, reply) = ClientRound::setup(round, c, params, neighbours)?;
                    states.insert(c, st);
                    reply
                }
                other => {
                    let st = states
                        .get_mut(&c)
                        .filter(|s| s.round == round)
                        .ok_or_else(|| missing(round))?;
                    match other {
                        super::protocol::Stage::ShareKeys { keys } => st.share_keys(keys)?,
                        super::protocol::Stage::Unmask { survivors, dropped } => {
                            st.unmask(&survivors, &dropped)?
                        }
                        super::protocol::Stage::Setup { .. } => unreachable!("matched above"),
                    }
                }
            };
            Ok(Some(ToServer::SecAgg {
                round,
                client: c,
                reply,
            }))
        }
        ToClient::Fit {
            round,
            params,
            config,
            seed,
        } if config.secagg.is_some() => {
            let sent = params.clone();
            let fm = config.secagg.clone().expect("checked");
            let Some(ToServer::FitRes { round, mut result }) = plain(ToClient::Fit {
                round,
                params,
                config,
                seed,
            })?
            else {
                return Err(bad("a fit without a result".into()));
            };
            let st = states
                .get_mut(&c)
                .filter(|s| s.round == round)
                .ok_or_else(|| missing(round))?;
            let (new, old) = (flatten(&result.params)?, flatten(&sent)?);
            let delta: Vec<f32> = new.iter().zip(&old).map(|(a, b)| a - b).collect();
            let y = st.mask_update(&fm, &delta, result.num_samples)?;
            result.params = super::masked_set(&y, &layout(&sent))?;
            result.num_samples = 0;
            Ok(Some(ToServer::FitRes { round, result }))
        }
        msg => plain(msg),
    }
}
