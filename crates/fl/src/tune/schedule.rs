//! Budget schedules over rounds (the fidelity): successive halving (Jamieson & Talwalkar 2016)
//! and Hyperband (Li et al. 2018, Algorithm 1), as rungs of (trials, rounds).

/// One rung: how many trials run to how many rounds in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rung {
    pub trials: usize,
    pub rounds: usize,
}

/// A bracket: trials start at rung 0; the best 1/η of each rung go on to the next.
pub type Bracket = Vec<Rung>;

/// ⌊log_η(x)⌋ for integers, exactly (no floating point).
fn ilog(x: usize, eta: usize) -> usize {
    let mut k = 0;
    let mut p = eta;
    while p <= x {
        k += 1;
        p *= eta;
    }
    k
}

/// Successive halving of `n` trials from `min` to at most `max` rounds: rung i runs
/// ⌊n/ηⁱ⌋ trials to min·ηⁱ rounds, while that is within `max` and at least one trial remains.
pub fn successive_halving(n: usize, min: usize, max: usize, eta: usize) -> Bracket {
    let mut out = Vec::new();
    let (mut trials, mut rounds) = (n, min);
    while trials >= 1 && rounds <= max {
        out.push(Rung { trials, rounds });
        trials /= eta;
        rounds *= eta;
    }
    out
}

/// Hyperband with maximum budget R = `max` rounds in units of r = `min`: s_max = ⌊log_η(R/r)⌋,
/// B = (s_max + 1)·R; bracket s starts n = ⌈B/R · ηˢ/(s + 1)⌉ trials at R·η⁻ˢ and halves them
/// s times (rung i: ⌊n·η⁻ⁱ⌋ trials at R·η^(i−s)).
pub fn hyperband(min: usize, max: usize, eta: usize) -> Vec<Bracket> {
    let ratio = max / min;
    let s_max = ilog(ratio, eta);
    (0..=s_max)
        .rev()
        .map(|s| {
            let eta_s = eta.pow(s as u32);
            // ⌈(s_max + 1)·ηˢ / (s + 1)⌉ in integers.
            let n = ((s_max + 1) * eta_s).div_ceil(s + 1);
            (0..=s)
                .map(|i| Rung {
                    trials: n / eta.pow(i as u32),
                    rounds: max / eta.pow((s - i) as u32),
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(b: &Bracket) -> Vec<(usize, usize)> {
        b.iter().map(|r| (r.trials, r.rounds)).collect()
    }

    /// Li et al. 2018, Table 1: R = 81, η = 3.
    #[test]
    fn hyperband_matches_the_papers_table() {
        let hb = hyperband(1, 81, 3);
        let want: Vec<Vec<(usize, usize)>> = vec![
            vec![(81, 1), (27, 3), (9, 9), (3, 27), (1, 81)],
            vec![(34, 3), (11, 9), (3, 27), (1, 81)],
            vec![(15, 9), (5, 27), (1, 81)],
            vec![(8, 27), (2, 81)],
            vec![(5, 81)],
        ];
        assert_eq!(hb.iter().map(pairs).collect::<Vec<_>>(), want);
    }

    /// Successive halving: n = 27, η = 3 from 1 to 9 rounds keeps 27, 9, 3 trials at 1, 3, 9;
    /// the budget per rung is the same (27·1 = 9·3 = 3·9), as its definition intends.
    #[test]
    fn successive_halving_arithmetic() {
        let b = successive_halving(27, 1, 9, 3);
        assert_eq!(pairs(&b), vec![(27, 1), (9, 3), (3, 9)]);
        assert!(b.iter().all(|r| r.trials * r.rounds == 27));
        assert_eq!(
            pairs(&successive_halving(10, 1, 100, 2)),
            vec![(10, 1), (5, 2), (2, 4), (1, 8)]
        );
    }
}
