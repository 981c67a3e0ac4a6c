//! Batches with dynamic padding (to the longest sample of each batch), deterministic shuffling
//! by seed, and optional length grouping (similar lengths together, less padding).

use candle_core::{Device, Tensor};
use fedllm_model::Batch;
use fedllm_rng::Rng;

use crate::error::{DataError, Result};
use crate::tokenize::Sample;

#[derive(Debug, Clone)]
pub struct BatchOptions {
    pub batch_size: usize,
    pub pad_id: u32,
    /// None keeps the sample order.
    pub shuffle_seed: Option<u64>,
    pub group_by_length: bool,
}

/// Fisher–Yates with our seeded generator.
pub fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Sample indices per batch, in order.
pub fn batch_order(lengths: &[usize], o: &BatchOptions) -> Result<Vec<Vec<usize>>> {
    if o.batch_size == 0 {
        return Err(DataError::Config("batch size must be at least 1".into()));
    }
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    if let Some(seed) = o.shuffle_seed {
        shuffle(&mut idx, &mut Rng::new(seed));
    }
    if o.group_by_length {
        // Sort within mega-batches of 50 batches: similar lengths, still shuffled across the epoch.
        for chunk in idx.chunks_mut(o.batch_size * 50) {
            chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        }
    }
    Ok(idx.chunks(o.batch_size).map(|c| c.to_vec()).collect())
}

/// Right-pads the chosen samples into one batch.
pub fn collate(samples: &[&Sample], pad_id: u32, device: &Device) -> Result<Batch> {
    let t = samples.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let b = samples.len();
    let mut ids = Vec::with_capacity(b * t);
    let mut labels = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b);
    for s in samples {
        let pad = t - s.ids.len();
        ids.extend_from_slice(&s.ids);
        ids.extend(std::iter::repeat_n(pad_id, pad));
        labels.extend_from_slice(&s.labels);
        labels.extend(std::iter::repeat_n(-100i64, pad));
        mask.push([vec![1u8; s.ids.len()], vec![0u8; pad]].concat());
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        mask,
        labels: Tensor::from_vec(labels, (b, t), device)?,
    })
}

pub fn batches(samples: &[Sample], o: &BatchOptions, device: &Device) -> Result<Vec<Batch>> {
    let lengths: Vec<usize> = samples.iter().map(|s| s.ids.len()).collect();
    batch_order(&lengths, o)?
        .into_iter()
        .map(|idx| {
            collate(
                &idx.iter().map(|&i| &samples[i]).collect::<Vec<_>>(),
                o.pad_id,
                device,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Sample {
        Sample {
            ids: (0..n as u32).collect(),
            labels: vec![-100; n],
            target_start: 0,
            category: None,
        }
    }

    #[test]
    fn dynamic_padding_and_deterministic_order() {
        let s: Vec<Sample> = [3, 5, 2, 7, 1].iter().map(|&n| sample(n)).collect();
        let o = BatchOptions {
            batch_size: 2,
            pad_id: 9,
            shuffle_seed: Some(4),
            group_by_length: false,
        };
        let lens: Vec<usize> = s.iter().map(|x| x.ids.len()).collect();
        let a = batch_order(&lens, &o).unwrap();
        assert_eq!(a, batch_order(&lens, &o).unwrap());
        let mut all: Vec<usize> = a.concat();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
        let b = collate(&[&s[0], &s[1]], 9, &Device::Cpu).unwrap();
        assert_eq!(b.input_ids.dims(), &[2, 5]);
        assert_eq!(b.mask[0], vec![1, 1, 1, 0, 0]);
        assert_eq!(
            b.input_ids.to_vec2::<u32>().unwrap()[0],
            vec![0, 1, 2, 9, 9]
        );
        let g = batch_order(
            &lens,
            &BatchOptions {
                group_by_length: true,
                ..o
            },
        )
        .unwrap();
        assert_eq!(g[0], vec![3, 1]);
    }
}
