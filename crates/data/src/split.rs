//! Client splitters. Each is a pure, seeded function from records to per-client index lists that
//! form a partition (no record lost or duplicated). The dataset is first cut into train/val/test,
//! then each part is split across clients, as FS-LLM does — but the category → client mapping
//! of `meta` is decided once, so a client keeps its categories in every part.

use std::collections::{BTreeMap, BTreeSet};

use fedllm_rng::Rng;
use serde::{Deserialize, Serialize};

use crate::batch::shuffle;
use crate::error::{DataError, Result};
use crate::record::Record;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Splitter {
    /// Uniformly random, near-equal client sizes.
    Iid,
    /// Latent Dirichlet allocation over categories: per category, client shares ~ Dir(alpha);
    /// redrawn until every client holds at least `min_size` records.
    Dirichlet { alpha: f64, min_size: usize },
    /// One category per client; surplus categories are merged into the smallest clients.
    Meta,
    /// Power-law client sizes: client i gets a share ∝ (i + 1)^(−gamma).
    SizeSkew { gamma: f64 },
}

impl Splitter {
    pub fn name(&self) -> &'static str {
        match self {
            Splitter::Iid => "iid",
            Splitter::Dirichlet { .. } => "dirichlet",
            Splitter::Meta => "meta",
            Splitter::SizeSkew { .. } => "size-skew",
        }
    }
}

fn category(r: &Record) -> String {
    r.category.clone().unwrap_or_else(|| "none".into())
}

/// Near-equal contiguous cuts of `idx` (numpy's `array_split`).
fn array_split(idx: &[usize], n: usize) -> Vec<Vec<usize>> {
    let (q, r) = (idx.len() / n, idx.len() % n);
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    for i in 0..n {
        let len = q + usize::from(i < r);
        out.push(idx[at..at + len].to_vec());
        at += len;
    }
    out
}

/// Cuts `idx` by proportions (largest-remainder rounding, so the sizes sum exactly).
fn cut_by(idx: &[usize], props: &[f64]) -> Vec<Vec<usize>> {
    let n = idx.len();
    let total: f64 = props.iter().sum();
    let exact: Vec<f64> = props.iter().map(|p| p / total * n as f64).collect();
    let mut sizes: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut rest = n - sizes.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..props.len()).collect();
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    for &i in order.iter().cycle() {
        if rest == 0 {
            break;
        }
        sizes[i] += 1;
        rest -= 1;
    }
    let mut out = Vec::with_capacity(props.len());
    let mut at = 0;
    for s in sizes {
        out.push(idx[at..at + s].to_vec());
        at += s;
    }
    out
}

/// Gamma(shape, 1) by Marsaglia–Tsang (with the shape < 1 boost).
fn gamma(rng: &mut Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u = rng.next_f64().max(f64::MIN_POSITIVE);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = rng.normal();
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = rng.next_f64();
        if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
}

pub fn dirichlet(rng: &mut Rng, alpha: f64, n: usize) -> Vec<f64> {
    let g: Vec<f64> = (0..n).map(|_| gamma(rng, alpha).max(1e-300)).collect();
    let s: f64 = g.iter().sum();
    g.into_iter().map(|x| x / s).collect()
}

/// Category → client for `meta`: categories sorted by size (largest first) go to clients in
/// turn, and every surplus category joins the client that currently holds the fewest records.
pub fn meta_assignment(records: &[Record], clients: usize) -> Result<BTreeMap<String, usize>> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in records {
        *counts.entry(category(r)).or_default() += 1;
    }
    if counts.len() < clients {
        return Err(DataError::Config(format!(
            "meta splitter: {} categories cannot fill {clients} clients (one category per client at least)",
            counts.len()
        )));
    }
    let mut cats: Vec<(String, usize)> = counts.into_iter().collect();
    cats.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut load = vec![0usize; clients];
    let mut map = BTreeMap::new();
    for (i, (c, n)) in cats.into_iter().enumerate() {
        let client = if i < clients {
            i
        } else {
            (0..clients).min_by_key(|&k| (load[k], k)).unwrap()
        };
        load[client] += n;
        map.insert(c, client);
    }
    Ok(map)
}

/// Splits the records `idx` (indices into `records`) across `clients`.
pub fn split(
    records: &[Record],
    idx: &[usize],
    clients: usize,
    splitter: &Splitter,
    rng: &mut Rng,
    meta: Option<&BTreeMap<String, usize>>,
) -> Result<Vec<Vec<usize>>> {
    if clients == 0 {
        return Err(DataError::Config("at least 1 client".into()));
    }
    let mut idx = idx.to_vec();
    shuffle(&mut idx, rng);
    let mut out = match splitter {
        Splitter::Iid => array_split(&idx, clients),
        Splitter::SizeSkew { gamma } => {
            if idx.len() < clients {
                return Err(DataError::Config(format!(
                    "size-skew: {} records for {clients} clients",
                    idx.len()
                )));
            }
            let props: Vec<f64> = (0..clients)
                .map(|i| ((i + 1) as f64).powf(-gamma))
                .collect();
            // Every client gets one record first, the rest follows the power law.
            let (first, rest) = idx.split_at(clients);
            let mut parts = cut_by(rest, &props);
            for (p, &f) in parts.iter_mut().zip(first) {
                p.insert(0, f);
            }
            parts
        }
        Splitter::Meta => {
            let map = meta
                .ok_or_else(|| DataError::Config("meta splitter needs its category map".into()))?;
            let mut parts = vec![Vec::new(); clients];
            for &i in &idx {
                let c = category(&records[i]);
                let client = *map.get(&c).ok_or_else(|| {
                    DataError::Config(format!(
                        "meta splitter: category `{c}` appears only outside the training part"
                    ))
                })?;
                parts[client].push(i);
            }
            parts
        }
        Splitter::Dirichlet { alpha, min_size } => {
            if alpha.is_nan() || *alpha <= 0.0 {
                return Err(DataError::Config(format!(
                    "dirichlet alpha must be > 0, got {alpha}"
                )));
            }
            if idx.len() < clients * min_size {
                return Err(DataError::Config(format!(
                    "dirichlet: {} records cannot give {clients} clients {min_size} each",
                    idx.len()
                )));
            }
            let mut by_cat: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for &i in &idx {
                by_cat.entry(category(&records[i])).or_default().push(i);
            }
            let mut tries = 0;
            loop {
                let mut parts = vec![Vec::new(); clients];
                for members in by_cat.values() {
                    let p = dirichlet(rng, *alpha, clients);
                    for (k, chunk) in cut_by(members, &p).into_iter().enumerate() {
                        parts[k].extend(chunk);
                    }
                }
                if parts.iter().all(|p| p.len() >= *min_size) {
                    break parts;
                }
                tries += 1;
                if tries > 1000 {
                    return Err(DataError::Config(format!(
                        "dirichlet: no draw in 1000 gave every client {min_size} records (raise alpha or lower min_size)"
                    )));
                }
            }
        }
    };
    for p in &mut out {
        p.sort_unstable();
    }
    Ok(out)
}

/// Cuts indices 0..n into train/val/test by fractions (seeded shuffle first).
pub fn train_val_test(n: usize, fractions: [f64; 3], rng: &mut Rng) -> Result<[Vec<usize>; 3]> {
    if fractions.iter().any(|f| *f < 0.0) || fractions.iter().sum::<f64>() <= 0.0 {
        return Err(DataError::Config(format!(
            "bad split fractions {fractions:?}"
        )));
    }
    let mut idx: Vec<usize> = (0..n).collect();
    shuffle(&mut idx, rng);
    let parts = cut_by(&idx, &fractions);
    Ok([parts[0].clone(), parts[1].clone(), parts[2].clone()])
}

/// Checks that `parts` partition `idx` exactly.
pub fn is_partition(idx: &[usize], parts: &[Vec<usize>]) -> bool {
    let mut all: Vec<usize> = parts.concat();
    all.sort_unstable();
    let mut want = idx.to_vec();
    want.sort_unstable();
    all == want && all.iter().collect::<BTreeSet<_>>().len() == all.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(n: usize, cats: usize) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                instruction: format!("q{i}"),
                input: String::new(),
                output: "a".into(),
                category: Some(format!("c{}", ((i * 31) % 97) % cats)),
            })
            .collect()
    }

    #[test]
    fn every_splitter_is_a_seeded_partition() {
        let r = recs(500, 6);
        let idx: Vec<usize> = (0..r.len()).collect();
        let map = meta_assignment(&r, 4).unwrap();
        for s in [
            Splitter::Iid,
            Splitter::Dirichlet {
                alpha: 0.5,
                min_size: 5,
            },
            Splitter::Meta,
            Splitter::SizeSkew { gamma: 1.0 },
        ] {
            let a = split(&r, &idx, 4, &s, &mut Rng::new(3), Some(&map)).unwrap();
            let b = split(&r, &idx, 4, &s, &mut Rng::new(3), Some(&map)).unwrap();
            let c = split(&r, &idx, 4, &s, &mut Rng::new(4), Some(&map)).unwrap();
            assert!(is_partition(&idx, &a), "{s:?}");
            assert_eq!(a, b, "{s:?} not deterministic");
            if s != Splitter::Meta {
                assert_ne!(a, c, "{s:?} ignores the seed");
            }
        }
    }

    #[test]
    fn meta_keeps_categories_and_drops_none() {
        let r = recs(300, 7);
        let map = meta_assignment(&r, 3).unwrap();
        assert_eq!(map.len(), 7, "every category is assigned");
        assert_eq!(
            map.values().collect::<BTreeSet<_>>().len(),
            3,
            "every client gets a category"
        );
        let mut rng = Rng::new(1);
        let [tr, va, te] = train_val_test(r.len(), [0.8, 0.1, 0.1], &mut rng).unwrap();
        for part in [&tr, &va, &te] {
            let p = split(&r, part, 3, &Splitter::Meta, &mut rng, Some(&map)).unwrap();
            for (client, ids) in p.iter().enumerate() {
                for &i in ids {
                    assert_eq!(
                        map[&category(&r[i])],
                        client,
                        "category moved between parts"
                    );
                }
            }
        }
        assert!(meta_assignment(&r, 8).is_err());
    }

    #[test]
    fn dirichlet_tends_to_iid_as_alpha_grows() {
        let r = recs(3000, 5);
        let idx: Vec<usize> = (0..r.len()).collect();
        let spread = |alpha: f64| {
            let p = split(
                &r,
                &idx,
                5,
                &Splitter::Dirichlet { alpha, min_size: 1 },
                &mut Rng::new(9),
                None,
            )
            .unwrap();
            let sizes: Vec<usize> = p.iter().map(Vec::len).collect();
            *sizes.iter().max().unwrap() as f64 / *sizes.iter().min().unwrap() as f64
        };
        let (small, large) = (spread(0.3), spread(1e4));
        assert!(large < 1.1, "alpha 1e4: max/min size {large}");
        assert!(small > large, "{small} vs {large}");
    }

    #[test]
    fn size_skew_follows_power_law() {
        let r = recs(1000, 1);
        let idx: Vec<usize> = (0..r.len()).collect();
        let p = split(
            &r,
            &idx,
            4,
            &Splitter::SizeSkew { gamma: 1.0 },
            &mut Rng::new(2),
            None,
        )
        .unwrap();
        let sizes: Vec<usize> = p.iter().map(Vec::len).collect();
        assert!(sizes.windows(2).all(|w| w[0] > w[1]), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 1000);
    }
}
