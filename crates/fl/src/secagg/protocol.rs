//! What SecAgg+'s stages say to each other, and the envelopes that carry a client's shares
//! to its neighbours through the server without the server reading them.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use super::Share;
use crate::error::{FlError, Result};

/// This round's secure-aggregation settings, as every sampled client is told them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// Shares needed to rebuild a secret (t).
    pub threshold: usize,
    /// Each value of w·Δ is clipped to [−clip_range, clip_range] before quantisation.
    pub clip_range: f32,
    /// Bits per quantised value; the sum of the round's clients stays below 2^32.
    pub bits: u32,
    /// w = num_samples / max_weight ∈ (0, 1] weights the masked mean.
    pub max_weight: f64,
}

/// A client's two public keys: `c` seals shares, `s` agrees pairwise masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerKeys {
    pub client: usize,
    pub c_pk: [u8; 32],
    pub s_pk: [u8; 32],
}

/// The commitment to a mask seed sent in stage 1.
pub fn seed_hash(b: &[u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"fedllm secagg seed")
        .chain_update(b)
        .finalize()
        .into()
}

/// Server → client, stages 1, 2 and 4 (stage 3 is the fit task itself, carrying `FitMask`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Stage {
    /// Make this round's key pairs; `neighbours` are the clients you will share with.
    Setup {
        params: Params,
        neighbours: Vec<usize>,
    },
    /// Your neighbours' public keys (those that answered stage 1): share your mask seed and
    /// your mask key with them.
    ShareKeys { keys: Vec<PeerKeys> },
    /// Reveal your shares of the survivors' mask seeds and of the dropped clients' mask keys.
    Unmask {
        survivors: Vec<usize>,
        dropped: Vec<usize>,
    },
}

/// Client → server, answering a `Stage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// `b_hash`: SHA-256 of the mask seed, so that a seed rebuilt from bad shares is caught.
    Keys {
        c_pk: [u8; 32],
        s_pk: [u8; 32],
        b_hash: [u8; 32],
    },
    Shares {
        sealed: Vec<Sealed>,
    },
    Unmask {
        /// (owner, share of the owner's mask seed).
        b: Vec<(usize, Share)>,
        /// (owner, share of the owner's mask key).
        sk: Vec<(usize, Share)>,
    },
}

/// Stage 3's addition to a fit task: the envelopes sealed for this client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitMask {
    pub sealed: Vec<Sealed>,
}

/// `from`'s shares for `to`, readable by `to` only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sealed {
    pub from: usize,
    pub to: usize,
    pub data: Vec<u8>,
}

fn cipher(mine: &StaticSecret, theirs: &[u8; 32]) -> ChaCha20Poly1305 {
    let dh = mine.diffie_hellman(&PublicKey::from(*theirs));
    let key: [u8; 32] = Sha256::new()
        .chain_update(b"fedllm secagg envelope")
        .chain_update(dh.as_bytes())
        .finalize()
        .into();
    ChaCha20Poly1305::new(&key.into())
}

/// Both directions of a pair share one key (fresh each round); the sender's id in the nonce
/// keeps their nonces apart, and round/from/to as associated data stop replays elsewhere.
fn nonce_and_aad(round: usize, from: usize, to: usize) -> ([u8; 12], Vec<u8>) {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&(from as u64).to_le_bytes());
    let aad = [round as u64, from as u64, to as u64]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    (nonce, aad)
}

fn share_bytes(s: &Share, out: &mut Vec<u8>) {
    out.extend(s.0.to_le_bytes());
    s.1.iter().for_each(|y| out.extend(y.to_le_bytes()));
}

fn read_share(b: &[u8]) -> Share {
    let u = |k: usize| u64::from_le_bytes(b[8 * k..8 * k + 8].try_into().unwrap());
    (u(0), std::array::from_fn(|k| u(k + 1)))
}

/// Seals (share of b, share of the mask key) from `from` for `to`.
pub fn seal(
    round: usize,
    from: usize,
    to: usize,
    c_sk: &StaticSecret,
    to_c_pk: &[u8; 32],
    shares: (&Share, &Share),
) -> Result<Sealed> {
    let mut msg = Vec::with_capacity(144);
    share_bytes(shares.0, &mut msg);
    share_bytes(shares.1, &mut msg);
    let (nonce, aad) = nonce_and_aad(round, from, to);
    let data = cipher(c_sk, to_c_pk)
        .encrypt(
            &nonce.into(),
            Payload {
                msg: &msg,
                aad: &aad,
            },
        )
        .map_err(|_| FlError::Protocol("secure aggregation: sealing a share failed".into()))?;
    Ok(Sealed { from, to, data })
}

/// Opens an envelope sealed for this client; a forged, altered or misaddressed one is an error.
pub fn open(
    round: usize,
    e: &Sealed,
    c_sk: &StaticSecret,
    from_c_pk: &[u8; 32],
) -> Result<(Share, Share)> {
    let (nonce, aad) = nonce_and_aad(round, e.from, e.to);
    let msg = cipher(c_sk, from_c_pk)
        .decrypt(&nonce.into(), Payload { msg: &e.data, aad: &aad })
        .ok()
        .filter(|m| m.len() == 144)
        .ok_or_else(|| {
            FlError::Protocol(format!(
                "secure aggregation: the shares of client {} for client {} do not open (forged or altered)",
                e.from, e.to
            ))
        })?;
    Ok((read_share(&msg[..72]), read_share(&msg[72..])))
}
