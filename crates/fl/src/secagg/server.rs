//! The server's side of one SecAgg+ round: the neighbour graph, forwarding sealed shares, and
//! removing the masks from the sum of the surviving inputs. It never holds what would unmask
//! one client: a survivor's mask key and a dropped client's seed are never asked for.

use std::collections::{BTreeMap, BTreeSet};

use super::protocol::{seed_hash, FitMask, Params, PeerKeys, Reply, Sealed, Stage};
use super::{add_into, keypair, neighbours, pair_seed, prg, reconstruct, Share};

/// Why a round cannot finish securely (it is abandoned; the run goes on).
pub type Abandon = String;

pub struct ServerRound {
    pub round: usize,
    pub params: Params,
    graph: BTreeMap<usize, Vec<usize>>,
    /// Stage 1 survivors' keys and seed commitments.
    keys: BTreeMap<usize, (PeerKeys, [u8; 32])>,
    /// Stage 2 survivors: owner → the holders it sealed shares for.
    sealed_for: BTreeMap<usize, BTreeSet<usize>>,
    forward: BTreeMap<usize, Vec<Sealed>>,
    /// Stage 3 survivors' masked inputs.
    masked: BTreeMap<usize, Vec<u32>>,
}

impl ServerRound {
    /// Stage 1 for the sampled clients: `degree` neighbours each on a seeded ring (None: all).
    pub fn new(
        round: usize,
        params: Params,
        sampled: &[usize],
        degree: Option<usize>,
        seed: u64,
    ) -> (Self, Vec<(usize, Stage)>) {
        let n = sampled.len();
        let graph: BTreeMap<usize, Vec<usize>> = match degree {
            Some(k) if k < n.saturating_sub(1) => neighbours(n, k, seed)
                .into_iter()
                .enumerate()
                .map(|(i, ns)| (sampled[i], ns.into_iter().map(|j| sampled[j]).collect()))
                .collect(),
            _ => sampled
                .iter()
                .map(|&i| (i, sampled.iter().copied().filter(|&j| j != i).collect()))
                .collect(),
        };
        let reqs = graph
            .iter()
            .map(|(&i, ns)| {
                let s = Stage::Setup {
                    params: params.clone(),
                    neighbours: ns.clone(),
                };
                (i, s)
            })
            .collect();
        let r = Self {
            round,
            params,
            graph,
            keys: BTreeMap::new(),
            sealed_for: BTreeMap::new(),
            forward: BTreeMap::new(),
            masked: BTreeMap::new(),
        };
        (r, reqs)
    }

    /// Stage 2 requests: each client that announced keys gets its announcing neighbours' keys.
    pub fn on_keys(
        &mut self,
        replies: Vec<(usize, Reply)>,
        log: &mut dyn FnMut(String),
    ) -> Vec<(usize, Stage)> {
        for (c, r) in replies {
            match r {
                Reply::Keys { c_pk, s_pk, b_hash } if self.graph.contains_key(&c) => {
                    self.keys.insert(
                        c,
                        (
                            PeerKeys {
                                client: c,
                                c_pk,
                                s_pk,
                            },
                            b_hash,
                        ),
                    );
                }
                other => log(format!(
                    "secagg: client {c}: ignored {} in stage 1",
                    kind(&other)
                )),
            }
        }
        self.keys
            .keys()
            .map(|&i| {
                let keys = self.graph[&i]
                    .iter()
                    .filter_map(|j| self.keys.get(j).map(|k| k.0))
                    .collect();
                (i, Stage::ShareKeys { keys })
            })
            .collect()
    }

    /// Stage 3 instructions: each client that shared gets the envelopes sealed for it.
    pub fn on_shares(
        &mut self,
        replies: Vec<(usize, Reply)>,
        log: &mut dyn FnMut(String),
    ) -> BTreeMap<usize, FitMask> {
        for (c, r) in replies {
            let Reply::Shares { sealed } = r else {
                log(format!(
                    "secagg: client {c}: ignored {} in stage 2",
                    kind(&r)
                ));
                continue;
            };
            let holders: BTreeSet<usize> = sealed.iter().map(|e| e.to).collect();
            let ok = self.keys.contains_key(&c)
                && holders.len() == sealed.len()
                && holders.len() >= self.params.threshold
                && sealed.iter().all(|e| {
                    e.from == c && self.graph[&c].contains(&e.to) && self.keys.contains_key(&e.to)
                });
            if !ok {
                log(format!("secagg: client {c}: its envelopes are not one per announced neighbour; left out"));
                continue;
            }
            self.sealed_for.insert(c, holders);
            for e in sealed {
                self.forward.entry(e.to).or_default().push(e);
            }
        }
        self.sealed_for
            .keys()
            .map(|&i| {
                // Envelopes are kept only when their sender's whole set was accepted.
                let sealed: Vec<Sealed> = self.forward.remove(&i).unwrap_or_default();
                (i, FitMask { sealed })
            })
            .collect()
    }

    /// Stage 3: a masked input of `len` ring elements from a client told to send one.
    pub fn on_masked(
        &mut self,
        c: usize,
        y: Vec<u32>,
        len: usize,
    ) -> std::result::Result<(), String> {
        if !self.sealed_for.contains_key(&c) {
            return Err(format!("client {c} was not asked for a masked input"));
        }
        if y.len() != len {
            return Err(format!(
                "client {c}: masked input of {} values, expected {len}",
                y.len()
            ));
        }
        self.masked.insert(c, y);
        Ok(())
    }

    pub fn survivors(&self) -> Vec<usize> {
        self.masked.keys().copied().collect()
    }

    fn dropped(&self) -> Vec<usize> {
        self.sealed_for
            .keys()
            .filter(|c| !self.masked.contains_key(c))
            .copied()
            .collect()
    }

    /// Stage 4 requests, to every survivor.
    pub fn unmask_requests(&self) -> std::result::Result<Vec<(usize, Stage)>, Abandon> {
        let survivors = self.survivors();
        if survivors.len() < self.params.threshold {
            return Err(format!(
                "{} masked input(s), below the threshold {}",
                survivors.len(),
                self.params.threshold
            ));
        }
        let dropped = self.dropped();
        Ok(survivors
            .iter()
            .map(|&i| {
                let s = Stage::Unmask {
                    survivors: survivors.clone(),
                    dropped: dropped.clone(),
                };
                (i, s)
            })
            .collect())
    }

    /// The survivors' summed inputs, masks removed. Shares that are not where their holder
    /// stands, or that rebuild a secret its commitment or public key does not match, are
    /// refused (logged); each secret needs `threshold` good ones.
    pub fn finish(
        &self,
        replies: Vec<(usize, Reply)>,
        log: &mut dyn FnMut(String),
    ) -> std::result::Result<Vec<u32>, Abandon> {
        let survivors = self.survivors();
        let dropped = self.dropped();
        let mut b: BTreeMap<usize, Vec<Share>> = BTreeMap::new();
        let mut sk: BTreeMap<usize, Vec<Share>> = BTreeMap::new();
        for (h, r) in replies {
            let Reply::Unmask { b: bs, sk: ks } = r else {
                log(format!(
                    "secagg: client {h}: ignored {} in stage 4",
                    kind(&r)
                ));
                continue;
            };
            for (owners, list, into) in [(&survivors, bs, &mut b), (&dropped, ks, &mut sk)] {
                for (o, s) in list {
                    let held = self.sealed_for.get(&o).is_some_and(|hs| hs.contains(&h));
                    if !owners.contains(&o) || !held || s.0 != h as u64 + 1 {
                        log(format!("secagg: client {h}: refused a share of client {o}'s secret (not one it holds)"));
                        continue;
                    }
                    into.entry(o).or_default().push(s);
                }
            }
        }
        let len = self.masked.values().next().map_or(0, |y| y.len());
        let mut sum = vec![0u32; len];
        for y in self.masked.values() {
            add_into(&mut sum, y, true);
        }
        for &i in &survivors {
            let want = self.keys[&i].1;
            let seed = self.rebuild(i, b.get(&i), |s| seed_hash(s) == want, log)?;
            add_into(&mut sum, &prg(&seed, len), false);
        }
        for &j in &dropped {
            let users: Vec<usize> = self.sealed_for[&j]
                .iter()
                .filter(|i| self.masked.contains_key(i))
                .copied()
                .collect();
            if users.is_empty() {
                continue;
            }
            let want = self.keys[&j].0.s_pk;
            let secret = self.rebuild(j, sk.get(&j), |s| keypair(*s).1 == want, log)?;
            let (sk_j, _) = keypair(secret);
            for i in users {
                // i added +PRG(s_ij) when j > i and −PRG when j < i: take it out again.
                let m = prg(&pair_seed(&sk_j, &self.keys[&i].0.s_pk), len);
                add_into(&mut sum, &m, j < i);
            }
        }
        Ok(sum)
    }

    /// A secret from its shares: `threshold` of them that rebuild one passing `check`, first
    /// the first ones, then leaving out each share in turn (so one bad share among spares is
    /// skipped).
    fn rebuild(
        &self,
        owner: usize,
        shares: Option<&Vec<Share>>,
        check: impl Fn(&[u8; 32]) -> bool,
        log: &mut dyn FnMut(String),
    ) -> std::result::Result<[u8; 32], Abandon> {
        let t = self.params.threshold;
        let shares = shares.map(Vec::as_slice).unwrap_or(&[]);
        let pick = |skip: usize| -> Vec<Share> {
            let keep = shares.iter().enumerate().filter(|(k, _)| *k != skip);
            keep.map(|(_, s)| *s).take(t).collect()
        };
        let tries = std::iter::once(shares.len()).chain(0..shares.len());
        for w in tries.map(pick).filter(|w| w.len() == t) {
            match reconstruct(&w) {
                Ok(s) if check(&s) => return Ok(s),
                Ok(_) => log(format!(
                    "secagg: shares of client {owner}'s secret do not rebuild it; trying others"
                )),
                Err(e) => log(format!("secagg: client {owner}'s shares: {e}")),
            }
        }
        Err(format!(
            "client {owner}'s secret could not be rebuilt from {} share(s) (threshold {t})",
            shares.len()
        ))
    }
}

fn kind(r: &Reply) -> &'static str {
    match r {
        Reply::Keys { .. } => "keys",
        Reply::Shares { .. } => "shares",
        Reply::Unmask { .. } => "unmasking shares",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secagg::client::ClientRound;
    use crate::secagg::protocol::FitMask;
    use crate::secagg::{quantize, Share};

    const LEN: usize = 300;

    fn params() -> Params {
        Params {
            threshold: 2,
            clip_range: 1.0,
            bits: 24,
            max_weight: 100.0,
        }
    }

    /// Five clients (complete graph, t = 2) through stages 1–3 in memory; client 4 drops
    /// before its masked input, so each survivor's seed has three live holders (one spare).
    /// Returns the server, the survivors' states, their stage-4 replies and the exact quantised
    /// sum the server must find.
    type Case = (
        ServerRound,
        BTreeMap<usize, ClientRound>,
        Vec<(usize, Reply)>,
        Vec<u32>,
    );

    type Shared = (
        ServerRound,
        BTreeMap<usize, ClientRound>,
        BTreeMap<usize, FitMask>,
    );

    /// Stages 1 and 2 in memory for `ids` (complete graph): the server, the clients' states
    /// and each client's stage-3 envelopes.
    fn keys_and_shares(round: usize, ids: &[usize]) -> Shared {
        let (mut sr, s1) = ServerRound::new(round, params(), ids, None, 7);
        let mut cs = BTreeMap::new();
        let mut r1 = Vec::new();
        for (c, st) in s1 {
            let Stage::Setup { params, neighbours } = st else {
                panic!()
            };
            let (cr, reply) = ClientRound::setup(round, c, params, neighbours).unwrap();
            cs.insert(c, cr);
            r1.push((c, reply));
        }
        let s2 = sr.on_keys(r1, &mut |_| {});
        let r2 = s2
            .into_iter()
            .map(|(c, st)| {
                let Stage::ShareKeys { keys } = st else {
                    panic!()
                };
                (c, cs.get_mut(&c).unwrap().share_keys(keys).unwrap())
            })
            .collect();
        let fits = sr.on_shares(r2, &mut |_| {});
        (sr, cs, fits)
    }

    fn four_survivors() -> Case {
        let (mut sr, mut cs, fits) = keys_and_shares(1, &[0, 1, 2, 3, 4]);
        let mut want = vec![0u32; LEN + 1];
        for c in [0usize, 1, 2, 3] {
            let delta: Vec<f32> = (0..LEN)
                .map(|k| ((k * (c + 3)) % 17) as f32 / 100.0 - 0.08)
                .collect();
            let y = cs
                .get_mut(&c)
                .unwrap()
                .mask_update(&fits[&c], &delta, 50)
                .unwrap();
            let mut x: Vec<f32> = delta.iter().map(|d| (*d as f64 * 0.5) as f32).collect();
            x.push(0.5);
            add_into(&mut want, &quantize(&x, 1.0, 24), true);
            sr.on_masked(c, y, LEN + 1).unwrap();
        }
        let s4 = sr.unmask_requests().unwrap();
        let r4 = s4
            .into_iter()
            .map(|(c, st)| {
                let Stage::Unmask { survivors, dropped } = st else {
                    panic!()
                };
                (
                    c,
                    cs.get_mut(&c)
                        .unwrap()
                        .unmask(&survivors, &dropped)
                        .unwrap(),
                )
            })
            .collect();
        (sr, cs, r4, want)
    }

    /// The dropped client's pairwise masks and the survivors' self masks come off exactly.
    #[test]
    fn survivors_sum_is_exact_after_a_dropout() {
        let (sr, _, r4, want) = four_survivors();
        assert_eq!(sr.finish(r4, &mut |_| {}).unwrap(), want);
    }

    /// A wrong share (in the field, so it decodes) is caught — the rebuilt value is no secret
    /// (not 32-bit limbs) or fails the seed's commitment — and skipped when a spare exists;
    /// with no spare the round is abandoned, never mis-summed.
    #[test]
    fn a_bad_share_is_skipped_or_the_round_abandoned() {
        let (sr, _, mut r4, want) = four_survivors();
        let Reply::Unmask { b, .. } = &mut r4[0].1 else {
            panic!()
        };
        b[0].1 .1[0] = (b[0].1 .1[0] + 1) % crate::secagg::P;
        let mut lines = Vec::new();
        assert_eq!(sr.finish(r4.clone(), &mut |l| lines.push(l)).unwrap(), want);
        let Reply::Unmask { b: bad_b, .. } = r4[0].1.clone() else {
            panic!()
        };
        let owner = bad_b[0].0;
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("client {owner}'s"))),
            "{lines:?}"
        );
        // Only the bad share and one good one left for that owner: one good share, below t.
        let keep: Vec<(usize, Reply)> = r4
            .into_iter()
            .enumerate()
            .map(|(k, (c, r))| match r {
                Reply::Unmask { b, sk } if k == 2 => {
                    let b: Vec<(usize, Share)> =
                        b.into_iter().filter(|(o, _)| *o != owner).collect();
                    (c, Reply::Unmask { b, sk })
                }
                r => (c, r),
            })
            .collect();
        let e = sr.finish(keep, &mut |_| {}).unwrap_err();
        assert!(e.contains(&format!("client {owner}'s secret")), "{e}");
    }

    /// A client reveals nothing twice, nothing for a request naming one client both survivor
    /// and dropped (that would unmask it), and refuses an altered envelope.
    #[test]
    fn clients_refuse_requests_that_would_unmask_an_input() {
        let (_, mut cs, _, _) = four_survivors();
        let c0 = cs.get_mut(&0).unwrap();
        assert!(c0
            .unmask(&[0, 1, 2, 3], &[])
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let (_, mut cs, mut fits) = keys_and_shares(2, &[0, 1, 2]);
        let c1 = cs.get_mut(&1).unwrap();
        let e = c1.unmask(&[0, 1, 2], &[2]).unwrap_err().to_string();
        assert!(e.contains("inconsistent"), "{e}");
        let f = fits.get_mut(&1).unwrap();
        f.sealed[0].data[3] ^= 1;
        let e = c1.mask_update(f, &[0.1; 4], 10).unwrap_err().to_string();
        assert!(e.contains("do not open"), "{e}");
    }
}
