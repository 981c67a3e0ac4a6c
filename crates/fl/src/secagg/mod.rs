//! SecAgg+ building blocks (Bell et al. 2020): the server learns only the sum of the sampled
//! clients' updates. Updates are quantised into the ring Z_{2^32}; each client adds a self
//! mask PRG(b_i) and, for every neighbour j in a sparse graph, ±PRG(s_ij) with s_ij from an
//! X25519 agreement (+ for j > i, − for j < i), so pairwise masks cancel in the sum. The seeds
//! b_i and the clients' X25519 secret keys are Shamir-shared with threshold t among the
//! neighbours; the server removes the survivors' self masks and the dropped clients' pairwise
//! masks from the shares. `client` and `server` run the four stages (keys, shares, masked
//! input, unmasking) on top of these; the round driver moves their messages.

pub mod client;
pub mod protocol;
pub mod round;
pub mod server;

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20::ChaCha20;
use fedllm_rng::Rng;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::error::{FlError, Result};

/// The Shamir field: integers modulo the Mersenne prime 2^61 − 1.
pub const P: u64 = (1 << 61) - 1;

fn mul(a: u64, b: u64) -> u64 {
    ((a as u128 * b as u128) % P as u128) as u64
}

fn pow(mut a: u64, mut e: u64) -> u64 {
    let mut r = 1;
    while e > 0 {
        if e & 1 == 1 {
            r = mul(r, a);
        }
        a = mul(a, a);
        e >>= 1;
    }
    r
}

fn inv(a: u64) -> u64 {
    pow(a, P - 2)
}

/// One Shamir share: x and the 8 polynomials' values there.
pub type Share = (u64, [u64; 8]);

/// Shares of a 32-byte secret: 8 field elements (4 bytes each), each on its own polynomial of
/// degree t − 1; share k (k = 1..=n) is the polynomials' values at x = k.
pub fn share(secret: &[u8; 32], t: usize, n: usize, rng: &mut Rng) -> Result<Vec<Share>> {
    let xs: Vec<u64> = (1..=n as u64).collect();
    share_at(secret, t, &xs, || rng.next_u64())
}

/// Shares at the given distinct, non-zero x (in SecAgg+, x = holder's client id + 1), the
/// polynomials' other coefficients drawn from `coeff` (a secret source in the protocol).
pub fn share_at(
    secret: &[u8; 32],
    t: usize,
    xs: &[u64],
    mut coeff: impl FnMut() -> u64,
) -> Result<Vec<Share>> {
    let n = xs.len();
    if t == 0 || t > n {
        return Err(FlError::Config(format!(
            "secure aggregation: threshold {t} must be in 1..={n}"
        )));
    }
    let polys: Vec<Vec<u64>> = (0..8)
        .map(|c| {
            let mut p =
                vec![u32::from_le_bytes(secret[4 * c..4 * c + 4].try_into().unwrap()) as u64];
            p.extend((1..t).map(|_| coeff() % P));
            p
        })
        .collect();
    Ok(xs
        .iter()
        .map(|&x| {
            let mut ys = [0u64; 8];
            for (c, p) in polys.iter().enumerate() {
                // Horner.
                ys[c] = p.iter().rev().fold(0, |acc, &a| (mul(acc, x) + a) % P);
            }
            (x, ys)
        })
        .collect())
}

/// The secret from any t shares (Lagrange interpolation at 0); shares must have distinct,
/// non-zero x and values in the field, else a clear error (a malformed share is refused).
pub fn reconstruct(shares: &[Share]) -> Result<[u8; 32]> {
    let bad = |m: String| FlError::Protocol(format!("secure aggregation: {m}"));
    for (i, (x, ys)) in shares.iter().enumerate() {
        if *x == 0 || *x >= P || ys.iter().any(|&y| y >= P) {
            return Err(bad(format!("share {i} is outside the field")));
        }
        if shares[..i].iter().any(|(x2, _)| x2 == x) {
            return Err(bad(format!("two shares at x = {x}")));
        }
    }
    let mut out = [0u8; 32];
    for c in 0..8 {
        let mut acc = 0u64;
        for (i, (xi, ys)) in shares.iter().enumerate() {
            let mut num = 1u64;
            let mut den = 1u64;
            for (j, (xj, _)) in shares.iter().enumerate() {
                if i != j {
                    num = mul(num, *xj);
                    den = mul(den, (xj + P - xi) % P);
                }
            }
            acc = (acc + mul(ys[c], mul(num, inv(den)))) % P;
        }
        let v = u32::try_from(acc).map_err(|_| bad("shares do not lie on one secret".into()))?;
        out[4 * c..4 * c + 4].copy_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// A mask of `len` ring elements from a 32-byte seed: ChaCha20's keystream (zero nonce).
pub fn prg(seed: &[u8; 32], len: usize) -> Vec<u32> {
    let mut buf = vec![0u8; 4 * len];
    let mut c = ChaCha20::new(seed.into(), &[0u8; 12].into());
    c.apply_keystream(&mut buf);
    buf.chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// A client's X25519 key pair from 32 secret bytes.
pub fn keypair(secret: [u8; 32]) -> (StaticSecret, [u8; 32]) {
    let s = StaticSecret::from(secret);
    let p = PublicKey::from(&s).to_bytes();
    (s, p)
}

/// The pairwise mask seed of two clients: SHA-256 of their X25519 shared secret.
pub fn pair_seed(mine: &StaticSecret, theirs: &[u8; 32]) -> [u8; 32] {
    let shared = mine.diffie_hellman(&PublicKey::from(*theirs));
    Sha256::digest(shared.as_bytes()).into()
}

/// Fixed-point encoding of x ∈ [−range, range] (clipped) with `bits` bits per value, so that
/// the sum of `clients` encodings stays below 2^32: bits ≤ 32 − ⌈log2 clients⌉.
pub fn quantize(x: &[f32], range: f32, bits: u32) -> Vec<u32> {
    let levels = ((1u64 << bits) - 1) as f64;
    x.iter()
        .map(|&v| {
            let c = v.clamp(-range, range) as f64;
            (((c + range as f64) / (2.0 * range as f64)) * levels).round() as u32
        })
        .collect()
}

/// The sum of `clients` quantised vectors back to real values (the sum of their values).
pub fn dequantize_sum(sum: &[u32], clients: usize, range: f32, bits: u32) -> Vec<f32> {
    let levels = ((1u64 << bits) - 1) as f64;
    sum.iter()
        .map(|&s| (s as f64 / levels * 2.0 * range as f64 - clients as f64 * range as f64) as f32)
        .collect()
}

/// SecAgg+'s sparse graph: clients on a ring in a seeded random order, each joined to the
/// `k / 2` nearest on either side (k even, below n); symmetric. Returns each client's sorted
/// neighbours.
pub fn neighbours(n: usize, k: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    fedllm_data::batch::shuffle(&mut order, &mut rng);
    let half = (k / 2).min((n - 1) / 2);
    let mut out = vec![Vec::new(); n];
    for pos in 0..n {
        for d in 1..=half {
            let a = order[pos];
            let b = order[(pos + d) % n];
            out[a].push(b);
            out[b].push(a);
        }
    }
    for v in &mut out {
        v.sort_unstable();
        v.dedup();
    }
    out
}

/// Client `i`'s masked input: x + PRG(b) + Σ_{j>i} PRG(s_ij) − Σ_{j<i} PRG(s_ij) (mod 2^32).
pub fn mask(x: &[u32], i: usize, self_seed: &[u8; 32], pairs: &[(usize, [u8; 32])]) -> Vec<u32> {
    let mut y: Vec<u32> = x.to_vec();
    add_into(&mut y, &prg(self_seed, x.len()), true);
    for (j, s) in pairs {
        add_into(&mut y, &prg(s, x.len()), *j > i);
    }
    y
}

/// y ± m in the ring.
pub fn add_into(y: &mut [u32], m: &[u32], plus: bool) {
    for (a, b) in y.iter_mut().zip(m) {
        *a = if plus {
            a.wrapping_add(*b)
        } else {
            a.wrapping_sub(*b)
        };
    }
}

/// The masked weight's tensor in a masked upload (the other tensors keep their names).
pub const WEIGHT: &str = "secagg.weight";

/// A masked vector as an upload: the shared tensors' names and shapes in u32, then the weight.
pub fn masked_set(y: &[u32], layout: &[(String, Vec<usize>)]) -> Result<crate::params::ParamSet> {
    let dev = candle_core::Device::Cpu;
    let mut out = crate::params::ParamSet::new();
    let mut at = 0;
    for (name, shape) in layout {
        let n: usize = shape.iter().product();
        out.insert(
            name.clone(),
            candle_core::Tensor::from_slice(&y[at..at + n], shape.as_slice(), &dev)?,
        );
        at += n;
    }
    out.insert(
        WEIGHT.into(),
        candle_core::Tensor::from_slice(&y[at..at + 1], 1, &dev)?,
    );
    Ok(out)
}

/// The masked vector of an upload laid out as `layout` (+ the weight); an error names what
/// does not fit.
pub fn masked_values(
    p: &crate::params::ParamSet,
    layout: &[(String, Vec<usize>)],
) -> std::result::Result<Vec<u32>, String> {
    let wanted = layout.len() + 1;
    if p.len() != wanted {
        return Err(format!(
            "a masked upload of {} tensors, expected {wanted}",
            p.len()
        ));
    }
    let one = (WEIGHT.to_string(), vec![1]);
    let mut out = Vec::new();
    for (name, shape) in layout.iter().chain(std::iter::once(&one)) {
        let t = p
            .get(name)
            .ok_or_else(|| format!("masked tensor `{name}` missing"))?;
        if t.dims() != shape.as_slice() || t.dtype() != candle_core::DType::U32 {
            return Err(format!(
                "masked tensor `{name}` is {:?} {:?}, expected u32 {shape:?}",
                t.dtype(),
                t.dims()
            ));
        }
        out.extend(
            t.flatten_all()
                .and_then(|t| t.to_vec1::<u32>())
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(n: u8) -> [u8; 32] {
        [n; 32]
    }

    /// Any t of n shares give the secret back; fewer give something else; a tampered or
    /// repeated share is refused or yields a wrong secret, never a panic.
    #[test]
    fn shamir_threshold() {
        let mut rng = Rng::new(5);
        let secret: [u8; 32] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        let sh = share(&secret, 3, 5, &mut rng).unwrap();
        assert_eq!(reconstruct(&sh[..3]).unwrap(), secret);
        assert_eq!(reconstruct(&[sh[4], sh[1], sh[2]]).unwrap(), secret);
        assert_ne!(reconstruct(&sh[..2]).ok(), Some(secret));
        let mut bad = sh[..3].to_vec();
        bad[0].1[0] = P + 5;
        assert!(reconstruct(&bad).is_err());
        assert!(reconstruct(&[sh[0], sh[0], sh[1]]).is_err());
        assert!(share(&secret, 6, 5, &mut rng).is_err());
    }

    /// Both ends of an X25519 agreement derive the same pairwise seed.
    #[test]
    fn pairwise_seeds_agree() {
        let (a, pa) = keypair(seed(1));
        let (b, pb) = keypair(seed(2));
        assert_eq!(pair_seed(&a, &pb), pair_seed(&b, &pa));
        assert_ne!(pair_seed(&a, &pb), pair_seed(&a, &pa));
    }

    /// Quantisation error is at most half a level per value, so a sum of n stays within n/2
    /// levels: 2·range/(2^bits − 1)·n/2.
    #[test]
    fn quantised_sum_is_within_the_bound() {
        let mut rng = Rng::new(9);
        let (range, bits, n) = (0.5f32, 24u32, 10usize);
        let xs: Vec<Vec<f32>> = (0..n)
            .map(|_| {
                crate::dp::normals(&mut rng, 100)
                    .iter()
                    .map(|z| z * 0.1)
                    .collect()
            })
            .collect();
        let mut sum = vec![0u32; 100];
        for x in &xs {
            add_into(&mut sum, &quantize(x, range, bits), true);
        }
        let got = dequantize_sum(&sum, n, range, bits);
        let step = 2.0 * range as f64 / ((1u64 << bits) - 1) as f64;
        for (k, g) in got.iter().enumerate() {
            let want: f64 = xs.iter().map(|x| x[k] as f64).sum();
            assert!(
                (*g as f64 - want).abs() <= step * n as f64 / 2.0 + 1e-6,
                "{g} vs {want}"
            );
        }
    }

    /// The masked protocol end to end in memory: 8 clients on a 4-regular graph, threshold 3;
    /// two drop before uploading. The server removes the survivors' self masks (seeds from
    /// shares) and the dropped clients' pairwise masks (their secret keys from shares) and gets
    /// exactly the survivors' quantised sum; one masked input alone looks nothing like its
    /// input (correlation with the plaintext near 0).
    #[test]
    fn masks_cancel_and_dropouts_are_recovered() {
        let (n, t, len) = (8usize, 3usize, 2000usize);
        let graph = neighbours(n, 4, 42);
        assert!(graph.iter().all(|g| g.len() == 4));
        let mut rng = Rng::new(1);
        let secrets: Vec<[u8; 32]> = (0..n).map(|i| seed(10 + i as u8)).collect();
        let selfs: Vec<[u8; 32]> = (0..n).map(|i| seed(100 + i as u8)).collect();
        let keys: Vec<(StaticSecret, [u8; 32])> = secrets.iter().map(|s| keypair(*s)).collect();
        // Shares go to the neighbours (share k to the k-th neighbour).
        let share_of = |s: &[u8; 32], rng: &mut Rng| share(s, t, 4, rng).unwrap();
        let key_shares: Vec<_> = secrets.iter().map(|s| share_of(s, &mut rng)).collect();
        let self_shares: Vec<_> = selfs.iter().map(|s| share_of(s, &mut rng)).collect();
        let inputs: Vec<Vec<u32>> = (0..n)
            .map(|i| quantize(&crate::dp::normals(&mut Rng::new(i as u64), len), 3.0, 28))
            .collect();
        let dropped = [2usize, 5];
        let alive: Vec<usize> = (0..n).filter(|i| !dropped.contains(i)).collect();
        let masked: Vec<(usize, Vec<u32>)> = alive
            .iter()
            .map(|&i| {
                let pairs: Vec<(usize, [u8; 32])> = graph[i]
                    .iter()
                    .map(|&j| (j, pair_seed(&keys[i].0, &keys[j].1)))
                    .collect();
                (i, mask(&inputs[i], i, &selfs[i], &pairs))
            })
            .collect();
        let mut sum = vec![0u32; len];
        for (_, y) in &masked {
            add_into(&mut sum, y, true);
        }
        for &i in &alive {
            let b = reconstruct(&self_shares[i][..t]).unwrap();
            add_into(&mut sum, &prg(&b, len), false);
        }
        for &d in &dropped {
            let sk = reconstruct(&key_shares[d][1..1 + t]).unwrap();
            let (dk, _) = keypair(sk);
            for &j in graph[d].iter().filter(|j| alive.contains(j)) {
                // j added +PRG(s_jd) if d > j, −PRG if d < j: undo that.
                add_into(&mut sum, &prg(&pair_seed(&dk, &keys[j].1), len), d < j);
            }
        }
        let mut want = vec![0u32; len];
        for &i in &alive {
            add_into(&mut want, &inputs[i], true);
        }
        assert_eq!(sum, want);
        let (x, y) = (&inputs[alive[0]], &masked[0].1);
        let corr = fedllm_testing::correlation(x, y);
        // For independent uniform masks the sample correlation is ~N(0, 1/len): |r| < 4/√2000.
        assert!(corr.abs() < 4.0 / (len as f64).sqrt(), "{corr}");
    }
}
