//! The search space: dotted run-config keys mapped to distributions, e.g.
//! `train.lr: {log_uniform: [0.0001, 0.05]}`, `adapter.r: {choice: [2, 4, 8]}`. A point of the
//! space is a list of config overrides (`key=value`), so it reaches the run through the same
//! parser and checks as the command line.

use std::collections::BTreeMap;

use fedllm_rng::Rng;
use serde::Deserialize;

use crate::config::RunConfig;
use crate::error::{FlError, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    /// Uniform on [lo, hi].
    Uniform([f64; 2]),
    /// exp of uniform on [ln lo, ln hi] (lo > 0).
    LogUniform([f64; 2]),
    /// An integer uniform on lo..=hi.
    Int([i64; 2]),
    /// One of the listed values, each equally likely.
    Choice(Vec<serde_yaml::Value>),
}

/// How a distribution is written: a map with exactly one of these keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    uniform: Option<[f64; 2]>,
    log_uniform: Option<[f64; 2]>,
    int: Option<[i64; 2]>,
    choice: Option<Vec<serde_yaml::Value>>,
}

impl Raw {
    fn dist(self, key: &str) -> Result<Dist> {
        let mut d: Vec<Dist> = Vec::new();
        d.extend(self.uniform.map(Dist::Uniform));
        d.extend(self.log_uniform.map(Dist::LogUniform));
        d.extend(self.int.map(Dist::Int));
        d.extend(self.choice.map(Dist::Choice));
        match d.len() {
            1 => Ok(d.remove(0)),
            _ => Err(FlError::Config(format!(
                "search space `{key}`: give exactly one of uniform, log_uniform, int, choice"
            ))),
        }
    }
}

/// A point: the overrides, in key order.
pub type Point = Vec<String>;

#[derive(Debug, Clone, PartialEq)]
pub struct Space(pub BTreeMap<String, Dist>);

fn scalar(v: &serde_yaml::Value) -> String {
    serde_yaml::to_string(v)
        .unwrap_or_default()
        .trim()
        .to_string()
}

impl Space {
    /// Parses a space file and checks each key and distribution against the run config: every
    /// key must exist and accept the distribution's values.
    pub fn parse(text: &str) -> Result<Self> {
        let raw: BTreeMap<String, Raw> = serde_yaml::from_str(text)
            .map_err(|e| FlError::Config(format!("search space: {e}")))?;
        let m: BTreeMap<String, Dist> = raw
            .into_iter()
            .map(|(k, r)| Ok((k.clone(), r.dist(&k)?)))
            .collect::<Result<_>>()?;
        if m.is_empty() {
            return Err(FlError::Config("search space: no keys".into()));
        }
        for (k, d) in &m {
            let bad = |why: &str| FlError::Config(format!("search space `{k}`: {why}"));
            let probes: Vec<String> = match d {
                Dist::Uniform([lo, hi]) | Dist::LogUniform([lo, hi]) => {
                    if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                        return Err(bad("bounds must be finite with lo <= hi"));
                    }
                    if matches!(d, Dist::LogUniform(_)) && *lo <= 0.0 {
                        return Err(bad("log_uniform needs lo > 0"));
                    }
                    vec![lo.to_string(), hi.to_string()]
                }
                Dist::Int([lo, hi]) => {
                    if lo > hi {
                        return Err(bad("int needs lo <= hi"));
                    }
                    vec![lo.to_string(), hi.to_string()]
                }
                Dist::Choice(v) => {
                    if v.is_empty() {
                        return Err(bad("choice needs at least one value"));
                    }
                    v.iter().map(scalar).collect()
                }
            };
            for p in probes {
                let c = RunConfig::from_yaml("", &[format!("{k}={p}")])
                    .map_err(|e| bad(&format!("value {p}: {e}")))?;
                if let Some(why) = c.problems().into_iter().find(|w| w.contains(k.as_str())) {
                    return Err(bad(&format!("value {p}: {why}")));
                }
            }
        }
        Ok(Self(m))
    }

    /// A random point; each key draws from its own stream derived from (seed, trial, key index)
    /// so adding a trial never changes another's point.
    pub fn sample(&self, seed: u64, trial: usize) -> Point {
        self.0
            .iter()
            .enumerate()
            .map(|(i, (k, d))| {
                let mut rng = Rng::new(Rng::derive(&[seed, trial as u64, i as u64]));
                let u = rng.next_f64();
                let v = match d {
                    Dist::Uniform([lo, hi]) => (lo + (hi - lo) * u).to_string(),
                    Dist::LogUniform([lo, hi]) => (lo.ln() + (hi.ln() - lo.ln()) * u)
                        .exp()
                        .clamp(*lo, *hi)
                        .to_string(),
                    Dist::Int([lo, hi]) => {
                        let n = (hi - lo + 1) as u64;
                        (lo + (rng.next_u64() % n) as i64).to_string()
                    }
                    Dist::Choice(v) => scalar(&v[(rng.next_u64() % v.len() as u64) as usize]),
                };
                format!("{k}={v}")
            })
            .collect()
    }

    /// Every point of a finite space (choices and ints), in key-major order; an error naming a
    /// continuous key otherwise.
    pub fn grid(&self) -> Result<Vec<Point>> {
        let mut out: Vec<Point> = vec![vec![]];
        for (k, d) in &self.0 {
            let values: Vec<String> = match d {
                Dist::Choice(v) => v.iter().map(scalar).collect(),
                Dist::Int([lo, hi]) => (*lo..=*hi).map(|x| x.to_string()).collect(),
                _ => {
                    return Err(FlError::Config(format!(
                        "grid search needs finite sets: `{k}` is continuous (use choice)"
                    )))
                }
            };
            out = out
                .into_iter()
                .flat_map(|p| {
                    values.iter().map(move |v| {
                        let mut q = p.clone();
                        q.push(format!("{k}={v}"));
                        q
                    })
                })
                .collect();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(p: &Point, key: &str) -> f64 {
        let s = p
            .iter()
            .find_map(|o| o.strip_prefix(&format!("{key}=")))
            .unwrap();
        s.parse().unwrap()
    }

    /// Log-uniform draws stay in bounds and are uniform in log space: over 4,000 draws on
    /// [1e-4, 1e-1] each of the three decades holds a third (binomial sd ≈ 30, allowed 4 sd);
    /// uniform draws' mean is the midpoint (sd of the mean ≈ 0.0046 for [0, 1], allowed 4 sd).
    #[test]
    fn samplers_match_their_definitions() {
        let s = Space::parse(
            "train.lr: {log_uniform: [0.0001, 0.1]}\nadapter.dropout: {uniform: [0.0, 0.5]}\nadapter.r: {int: [2, 4]}\n",
        )
        .unwrap();
        let mut decades = [0usize; 3];
        let mut sum = 0.0;
        let mut ints = [0usize; 3];
        let n = 4000;
        for t in 0..n {
            let p = s.sample(7, t);
            let lr = value(&p, "train.lr");
            assert!((1e-4..=0.1).contains(&lr));
            decades[((lr.log10() + 4.0).floor() as usize).min(2)] += 1;
            let d = value(&p, "adapter.dropout");
            assert!((0.0..=0.5).contains(&d));
            sum += d / 0.5;
            ints[value(&p, "adapter.r") as usize - 2] += 1;
        }
        for c in decades {
            assert!(
                (c as f64 - n as f64 / 3.0).abs() < 4.0 * 29.8,
                "{decades:?}"
            );
        }
        assert!((sum / n as f64 - 0.5).abs() < 4.0 * 0.0046);
        assert!(ints
            .iter()
            .all(|&c| (c as f64 - n as f64 / 3.0).abs() < 4.0 * 29.8));
        // Seeds: the same (seed, trial) gives the same point; another seed another one.
        assert_eq!(s.sample(7, 3), s.sample(7, 3));
        assert_ne!(s.sample(7, 3), s.sample(8, 3));
    }

    /// The grid is the full product of the finite keys, each point once.
    #[test]
    fn grid_covers_the_product() {
        let s = Space::parse(
            "adapter.r: {choice: [2, 4, 8]}\ntrain.local_update_steps: {int: [1, 2]}\n",
        )
        .unwrap();
        let g = s.grid().unwrap();
        assert_eq!(g.len(), 6);
        let set: std::collections::BTreeSet<_> = g.iter().collect();
        assert_eq!(set.len(), 6);
        assert!(g.contains(&vec![
            "adapter.r=8".to_string(),
            "train.local_update_steps=2".to_string()
        ]));
        let c = Space::parse("train.lr: {uniform: [0.1, 0.2]}\n").unwrap();
        assert!(c.grid().unwrap_err().to_string().contains("train.lr"));
    }

    /// Unknown keys, bad bounds and values the config refuses are named.
    #[test]
    fn bad_spaces_are_named() {
        for (text, needle) in [
            ("train.lrr: {uniform: [0.1, 0.2]}\n", "train.lrr"),
            ("train.lr: {log_uniform: [0.0, 0.2]}\n", "lo > 0"),
            ("adapter.type: {choice: [lora, bogus]}\n", "bogus"),
            ("train.lr: {normal: [0.0, 1.0]}\n", "normal"),
        ] {
            let e = Space::parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
