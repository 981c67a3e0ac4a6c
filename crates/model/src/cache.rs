//! Per-forward attention context (positions, rotary tables, additive mask) and the KV cache.
//! Masks and positions are built on the host from the 0/1 attention mask, then uploaded: they
//! are tiny next to the activations and this keeps the model code device-generic.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

/// Additive mask value: finite so a fully masked row (a left-pad query) gives a uniform
/// softmax instead of NaN, and representable in bf16.
const MASKED: f32 = -1e30;

/// One layer's cached keys/values, [B, KV, S, D] each.
pub type Slot = (Tensor, Tensor);

/// Room added when an inference cache grows (positions), so decoding appends in place.
const GROW: usize = 256;

/// One layer's keys/values: the valid part, and (inference only) the buffer it is a view of,
/// with spare room for the next positions.
#[derive(Debug, Default)]
pub(crate) struct LayerKv {
    kv: Option<Slot>,
    /// Keys/values [1, KV, P, D] of a prefix every row continues (few-shot examples): stored
    /// once, attended before `kv` (which then holds only the positions after it).
    shared: Option<Slot>,
    buf: Option<Slot>,
    /// Spare positions a new buffer gets (0: `GROW`).
    room: usize,
    /// What inference buffers store (None: the keys' own dtype).
    dtype: Option<DType>,
}

#[derive(Debug, Default)]
pub struct KvCache {
    slots: Vec<LayerKv>,
    /// Number of cached positions (same for every row: batches are padded), the shared
    /// prefix's included.
    pub len: usize,
    /// Positions at the front that every row shares (stored once, `LayerKv::shared`).
    shared_len: usize,
    /// The 0/1 key mask for the cached positions, one row per batch element.
    pub mask: Vec<Vec<u8>>,
    /// Spare positions each layer's buffer is allocated with (0: `GROW`).
    room: usize,
    /// The dtype inference buffers store keys/values in (set by the model; None: as computed).
    pub(crate) dtype: Option<DType>,
}

impl Clone for KvCache {
    /// A clone shares the cached tensors but not the spare room: its first append copies, so
    /// neither cache ever writes where the other reads.
    fn clone(&self) -> Self {
        Self {
            slots: self
                .slots
                .iter()
                .map(|l| LayerKv {
                    kv: l.kv.clone(),
                    shared: l.shared.clone(),
                    buf: None,
                    room: l.room,
                    dtype: l.dtype,
                })
                .collect(),
            len: self.len,
            shared_len: self.shared_len,
            mask: self.mask.clone(),
            room: self.room,
            dtype: self.dtype,
        }
    }
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache pre-filled with per-layer keys/values [B, KV, n, D] that every position may see
    /// (prefix tuning's virtual tokens). Gradients flow back into the given tensors.
    pub fn from_prefix(slots: Vec<Slot>) -> Result<Self> {
        let (b, n) = match slots.first() {
            Some((k, _)) => (k.dim(0)?, k.dim(2)?),
            None => (0, 0),
        };
        Ok(Self {
            slots: slots
                .into_iter()
                .map(|s| LayerKv {
                    kv: Some(s),
                    shared: None,
                    buf: None,
                    room: 0,
                    dtype: None,
                })
                .collect(),
            len: n,
            shared_len: 0,
            mask: vec![vec![1u8; n]; b],
            room: 0,
            dtype: None,
        })
    }

    /// A cache of `rows` rows that all continue the one-row `prefix`, whose keys and values
    /// are shared rather than copied per row: decoding then reads them once per step for the
    /// whole batch (from the CPU caches) instead of once per row (from memory). A prefix that
    /// itself shares one, or whose rows differ, is copied per row instead.
    pub fn sharing(prefix: &KvCache, rows: usize) -> Result<Self> {
        let whole = prefix.mask.len() == 1 && prefix.mask[0].iter().all(|&m| m == 1);
        let plain = prefix.shared_len == 0
            && prefix.slots.iter().all(|l| {
                l.kv.as_ref()
                    .is_some_and(|(k, v)| !k.track_op() && !v.track_op())
            });
        if !(whole && plain && prefix.len > 0) {
            let mut c = prefix.clone();
            c.select_rows(&vec![0; rows])?;
            return Ok(c);
        }
        Ok(Self {
            slots: prefix
                .slots
                .iter()
                .map(|l| LayerKv {
                    kv: None,
                    shared: l.kv.clone(),
                    buf: None,
                    room: l.room,
                    dtype: l.dtype,
                })
                .collect(),
            len: prefix.len,
            shared_len: prefix.len,
            mask: vec![prefix.mask[0].clone(); rows],
            room: prefix.room,
            dtype: prefix.dtype,
        })
    }

    /// Bytes of keys and values this cache holds (its valid positions; a shared prefix once).
    pub fn stored_bytes(&self) -> usize {
        let bytes = |s: &Option<Slot>| {
            s.as_ref().map_or(0, |(k, v)| {
                (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()
            })
        };
        self.slots
            .iter()
            .map(|l| bytes(&l.kv) + bytes(&l.shared))
            .sum()
    }

    /// The dtype the first layer's keys are stored in (None while empty).
    pub fn stored_dtype(&self) -> Option<DType> {
        self.slots
            .iter()
            .find_map(|l| l.kv.as_ref().map(|(k, _)| k.dtype()))
    }

    /// Makes each layer's next buffer hold `positions` more than it stores (a generation
    /// reserves its new tokens once, so the cache neither reallocates nor idles spare room).
    pub fn reserve(&mut self, positions: usize) {
        self.room = positions.max(1);
    }

    pub(crate) fn slot(&mut self, layer: usize) -> &mut LayerKv {
        if self.slots.len() <= layer {
            self.slots.resize_with(layer + 1, LayerKv::default);
        }
        let slot = &mut self.slots[layer];
        slot.room = self.room;
        slot.dtype = self.dtype;
        slot
    }

    /// Adds `other`'s rows after this cache's (waiting prompts join a batched generation). The
    /// shorter side is left-padded with masked positions (after the shared prefix), so both
    /// share one length; a row's positions come from its own mask, so padding changes none of
    /// its numbers. Both must share the same prefix, or none.
    pub fn append_rows(&mut self, other: &KvCache) -> Result<()> {
        let p = self.shared_len;
        if self.slots.len() != other.slots.len() {
            candle_core::bail!("caches of different depths cannot share a batch");
        }
        let same_prefix = other.shared_len == p
            && self
                .slots
                .iter()
                .zip(&other.slots)
                .all(|(a, o)| match (&a.shared, &o.shared) {
                    (Some((ka, _)), Some((kb, _))) => ka.id() == kb.id(),
                    (None, None) => true,
                    _ => false,
                });
        if !same_prefix {
            candle_core::bail!("caches continuing different shared prefixes cannot share a batch");
        }
        let len = self.len.max(other.len);
        let pad = |t: &Tensor, have: usize| -> Result<Tensor> {
            let t = t.contiguous()?;
            if have == len {
                return Ok(t);
            }
            let (b, h, _, d) = t.dims4()?;
            let z = Tensor::zeros((b, h, len - have, d), t.dtype(), t.device())?;
            Tensor::cat(&[&z, &t], 2)
        };
        for (a, o) in self.slots.iter_mut().zip(&other.slots) {
            a.kv = match (&a.kv, &o.kv) {
                (Some((ka, va)), Some((kb, vb))) => Some((
                    Tensor::cat(&[&pad(ka, self.len)?, &pad(kb, other.len)?], 0)?,
                    Tensor::cat(&[&pad(va, self.len)?, &pad(vb, other.len)?], 0)?,
                )),
                (None, None) if p > 0 && len == p => None,
                _ => candle_core::bail!("a cache layer without keys cannot share a batch"),
            };
            a.buf = None;
        }
        let left = |m: &Vec<u8>, have: usize| [&m[..p], &vec![0u8; len - have], &m[p..]].concat();
        let mut mask: Vec<Vec<u8>> = self.mask.iter().map(|m| left(m, self.len)).collect();
        mask.extend(other.mask.iter().map(|m| left(m, other.len)));
        self.mask = mask;
        self.len = len;
        Ok(())
    }

    /// Keeps only the given batch rows (finished rows leave a batched generation), and drops
    /// the leading positions (after a shared prefix) every kept row masks: a joining row is
    /// left-padded to the running length, so under continuous batching the cache would
    /// otherwise grow by one position a step for as long as the batch runs (seen: 4.7 GB and
    /// 2 s per GSM8K question after 650). Positions come from each row's mask, so dropping
    /// masked columns changes none of them.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let p = self.shared_len;
        let own = self.len - p;
        let cut = rows
            .iter()
            .map(|&r| {
                self.mask[r][p..]
                    .iter()
                    .position(|&m| m != 0)
                    .unwrap_or(own)
            })
            .min()
            .unwrap_or(0)
            .min(own.saturating_sub(1));
        let dev = self
            .slots
            .iter()
            .filter_map(|l| l.kv.as_ref())
            .next()
            .map(|(k, _)| k.device().clone());
        if let Some(dev) = dev {
            let idx = Tensor::from_vec(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                rows.len(),
                &dev,
            )?;
            let keep = own - cut;
            for l in self.slots.iter_mut() {
                if let Some((k, v)) = &mut l.kv {
                    *k = k
                        .narrow(2, cut, keep)?
                        .contiguous()?
                        .index_select(&idx, 0)?;
                    *v = v
                        .narrow(2, cut, keep)?
                        .contiguous()?
                        .index_select(&idx, 0)?;
                }
                l.buf = None;
            }
        }
        self.mask = rows
            .iter()
            .map(|&r| [&self.mask[r][..p], &self.mask[r][p + cut..]].concat())
            .collect();
        self.len -= cut;
        Ok(())
    }
}

impl LayerKv {
    /// The shared prefix's keys/values, attended before the slot's own.
    pub(crate) fn shared(&self) -> Option<&Slot> {
        self.shared.as_ref()
    }
}

/// Appends new keys/values to a cache slot and returns the keys/values to attend to (after
/// the slot's shared prefix, if it has one).
/// Without gradients they are written into the slot's buffer (grown by `GROW` positions when
/// full), so a decoding step copies only its own token's keys and values.
pub(crate) fn append(slot: Option<&mut LayerKv>, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
    let Some(slot) = slot else {
        return Ok((k, v));
    };
    let old = slot.kv.take();
    let tracked = k.track_op()
        || v.track_op()
        || old
            .as_ref()
            .is_some_and(|(a, b)| a.track_op() || b.track_op());
    let new = if tracked {
        slot.buf = None;
        match old {
            None => (k.contiguous()?, v.contiguous()?),
            Some((ok, ov)) => (Tensor::cat(&[&ok, &k], 2)?, Tensor::cat(&[&ov, &v], 2)?),
        }
    } else {
        let (k, v) = match slot.dtype {
            Some(dt) if dt != k.dtype() => (stored(&k, dt)?, stored(&v, dt)?),
            _ => (k, v),
        };
        let have = old.as_ref().map_or(Ok(0), |(ok, _)| ok.dim(2))?;
        let need = have + k.dim(2)?;
        let fits = slot.buf.as_ref().is_some_and(|(bk, _)| {
            bk.dim(2).is_ok_and(|c| c >= need)
                && bk.dims()[..2] == k.dims()[..2]
                && bk.dtype() == k.dtype()
        });
        if !fits {
            let (b, h, _, d) = k.dims4()?;
            let cap = need + if slot.room > 0 { slot.room } else { GROW };
            let bk = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
            let bv = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
            if let Some((ok, ov)) = &old {
                bk.slice_set(&ok.to_dtype(k.dtype())?.contiguous()?, 2, 0)?;
                bv.slice_set(&ov.to_dtype(k.dtype())?.contiguous()?, 2, 0)?;
            }
            slot.buf = Some((bk, bv));
        }
        let (bk, bv) = slot.buf.as_ref().expect("allocated above");
        bk.slice_set(&k.contiguous()?, 2, have)?;
        bv.slice_set(&v.contiguous()?, 2, have)?;
        (bk.narrow(2, 0, need)?, bv.narrow(2, 0, need)?)
    };
    slot.kv = Some(new.clone());
    Ok(new)
}

/// x in the cache's dtype. f32 to f16 on the CPU converts eight values per instruction (F16C,
/// through `half`'s slice conversion, round to nearest even as the one-value conversion):
/// candle's value-by-value conversion took 4.6 ms of a 256-token SmolLM2 prefill.
fn stored(x: &Tensor, dt: DType) -> Result<Tensor> {
    use candle_core::{CpuStorage, Storage};
    use half::slice::HalfFloatSliceExt;
    if dt == DType::F16 && x.dtype() == DType::F32 && x.device().is_cpu() {
        let x = x.contiguous()?;
        let (st, l) = x.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((a, z))) = (&*st, l.contiguous_offsets()) {
            // SAFETY: the conversion writes every value.
            let mut out: Vec<half::f16> = unsafe { fedllm_kernels::uninit(z - a) };
            out.convert_from_f32_slice(&v[a..z]);
            return Tensor::from_vec(out, x.shape(), x.device());
        }
    }
    x.to_dtype(dt)
}

/// Which positions a forward's last layer computes outputs for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outputs {
    /// Every position (training, scoring).
    All,
    /// The last position and as few before it as keep the products on the kernels the whole
    /// batch takes, so on its numbers ([`crate::linear::same_kernel_tail`]): generation reads
    /// only the last position's logits. Every position's keys and values still reach the cache.
    Last,
}

/// Everything a layer needs besides its input.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Position ids [B, T] (u32).
    pub positions: Tensor,
    /// Rotary (cos, sin), each [B, 1, T, head_dim] in the compute dtype (LLaMA only).
    pub rope: Option<(Tensor, Tensor)>,
    /// Additive attention bias [B, 1, T, past + T] (f32), None when nothing is masked.
    pub bias: Option<Tensor>,
    /// Host f32 copies of the rotary tables and bias, made once per forward for the CPU kernels
    /// (every layer reads the same ones).
    host: std::sync::OnceLock<Arc<HostCtx>>,
}

/// `Ctx`'s tables as host f32 rows: cos/sin [B, T, D], bias [B, T, past + T].
#[derive(Debug)]
pub struct HostCtx {
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
    pub bias: Option<Arc<Vec<f32>>>,
}

impl Ctx {
    /// The host tables (None without rotary tables), computed on first use.
    pub fn host(&self) -> Result<Option<Arc<HostCtx>>> {
        let Some((cos, sin)) = &self.rope else {
            return Ok(None);
        };
        if let Some(h) = self.host.get() {
            return Ok(Some(h.clone()));
        }
        let host = |t: &Tensor| -> Result<Arc<Vec<f32>>> {
            Ok(Arc::new(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?))
        };
        let h = Arc::new(HostCtx {
            cos: host(cos)?,
            sin: host(sin)?,
            bias: self.bias.as_ref().map(host).transpose()?,
        });
        Ok(Some(self.host.get_or_init(|| h).clone()))
    }
}

/// Positions and mask for `t` new tokens after `past` cached ones. `key_mask` holds one 0/1 row
/// per batch element covering past + new positions (None = no padding).
pub struct CtxSpec<'a> {
    pub batch: usize,
    pub t: usize,
    pub past: usize,
    pub key_mask: Option<&'a [Vec<u8>]>,
    pub sliding_window: Option<usize>,
}

pub fn host_positions(spec: &CtxSpec) -> Vec<u32> {
    let mut pos = Vec::with_capacity(spec.batch * spec.t);
    for b in 0..spec.batch {
        match spec.key_mask {
            None => pos.extend((spec.past..spec.past + spec.t).map(|p| p as u32)),
            Some(m) => {
                // transformers: position_ids = cumsum(mask) - 1, set to 1 where masked.
                let mut c = 0u32;
                for (j, &mj) in m[b].iter().enumerate() {
                    c += mj as u32;
                    if j >= spec.past {
                        pos.push(if mj == 0 { 1 } else { c - 1 });
                    }
                }
            }
        }
    }
    pos
}

pub fn build_ctx(
    spec: &CtxSpec,
    inv_freq: Option<&[f32]>,
    dtype: DType,
    device: &Device,
) -> Result<Ctx> {
    let (b, t, past) = (spec.batch, spec.t, spec.past);
    let s = past + t;
    if let Some(m) = spec.key_mask {
        if m.len() != b || m.iter().any(|r| r.len() != s) {
            candle_core::bail!("attention mask must be [batch, past + new] = [{b}, {s}]");
        }
    }
    let pos = host_positions(spec);
    let any_pad = spec
        .key_mask
        .is_some_and(|m| m.iter().any(|r| r.contains(&0)));
    let windowed = spec.sliding_window.is_some_and(|w| s > w);
    let bias = if t > 1 || any_pad || windowed {
        let mut v = vec![0f32; b * t * s];
        for bi in 0..b {
            for i in 0..t {
                let q = past + i;
                for j in 0..s {
                    let visible = j <= q
                        && spec.key_mask.is_none_or(|m| m[bi][j] == 1)
                        && spec.sliding_window.is_none_or(|w| q - j < w);
                    if !visible {
                        v[(bi * t + i) * s + j] = MASKED;
                    }
                }
            }
        }
        Some(Tensor::from_vec(v, (b, 1, t, s), device)?)
    } else {
        None
    };
    let rope = match inv_freq {
        None => None,
        Some(inv) => {
            let half = inv.len();
            let mut cos = Vec::with_capacity(b * t * half * 2);
            let mut sin = Vec::with_capacity(b * t * half * 2);
            for &p in &pos {
                // f32 product as transformers computes `inv_freq @ position_ids`
                let angles: Vec<f32> = inv.iter().map(|&f| f * p as f32).collect();
                for _ in 0..2 {
                    cos.extend(angles.iter().map(|&a| (a as f64).cos() as f32));
                    sin.extend(angles.iter().map(|&a| (a as f64).sin() as f32));
                }
            }
            let cos = Tensor::from_vec(cos, (b, 1, t, half * 2), device)?.to_dtype(dtype)?;
            let sin = Tensor::from_vec(sin, (b, 1, t, half * 2), device)?.to_dtype(dtype)?;
            Some((cos, sin))
        }
    };
    let positions = Tensor::from_vec(pos, (b, t), device)?;
    Ok(Ctx {
        positions,
        rope,
        bias,
        host: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows leaving drop the positions every remaining row masks, and only those: the kept
    /// rows' keys and masks are their old ones minus those leading columns.
    #[test]
    fn leaving_rows_take_the_common_padding_with_them() {
        let dev = Device::Cpu;
        let mut cache = KvCache::new();
        let k = Tensor::arange(0f32, 3.0 * 2.0 * 5.0 * 4.0, &dev)
            .unwrap()
            .reshape((3, 2, 5, 4))
            .unwrap();
        append(Some(cache.slot(0)), k.clone(), k.clone()).unwrap();
        cache.len = 5;
        cache.mask = vec![
            vec![1, 1, 1, 1, 1],
            vec![0, 0, 0, 1, 1],
            vec![0, 0, 1, 1, 1],
        ];
        cache.select_rows(&[2, 1]).unwrap();
        assert_eq!(cache.len, 3);
        assert_eq!(cache.mask, vec![vec![1, 1, 1], vec![0, 1, 1]]);
        let got = cache.slots[0].kv.as_ref().unwrap().0.clone();
        let want = Tensor::cat(&[&k.get(2).unwrap(), &k.get(1).unwrap()], 0)
            .unwrap()
            .reshape((2, 2, 5, 4))
            .unwrap()
            .narrow(2, 2, 3)
            .unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // A kept row without padding keeps every position.
        cache.select_rows(&[0]).unwrap();
        assert_eq!((cache.len, cache.mask.clone()), (3, vec![vec![1, 1, 1]]));
    }

    /// A reserved cache allocates once, with exactly the reserved room after the prompt, and
    /// the decode steps that follow write into that buffer (no copy, no spare positions).
    #[test]
    fn reserved_room_is_allocated_once() {
        let dev = Device::Cpu;
        let mut cache = KvCache::new();
        cache.reserve(10);
        let kv = |t: usize| {
            let k = Tensor::ones((2, 3, t, 4), DType::F32, &dev).unwrap();
            (k.clone(), k)
        };
        let (k, v) = kv(5);
        append(Some(cache.slot(0)), k, v).unwrap();
        let cap = |c: &KvCache| c.slots[0].buf.as_ref().unwrap().0.dim(2).unwrap();
        let first = cache.slots[0].buf.as_ref().unwrap().0.id();
        assert_eq!(cap(&cache), 15);
        for _ in 0..10 {
            let (k, v) = kv(1);
            append(Some(cache.slot(0)), k, v).unwrap();
            assert_eq!(cache.slots[0].buf.as_ref().unwrap().0.id(), first);
        }
        assert_eq!(cache.slots[0].kv.as_ref().unwrap().0.dim(2).unwrap(), 15);
        // Past the reservation the buffer grows by the same room again.
        let (k, v) = kv(1);
        append(Some(cache.slot(0)), k, v).unwrap();
        assert_eq!(cap(&cache), 16 + 10);
    }

    /// A cache given a storage dtype keeps keys/values in it, whatever the layer computes.
    #[test]
    fn stores_in_the_cache_dtype() {
        let dev = Device::Cpu;
        let mut cache = KvCache::new();
        cache.dtype = Some(DType::F16);
        let k = Tensor::new(&[[[[1.0f32, 0.1]]]], &dev).unwrap();
        let (ck, cv) = append(Some(cache.slot(0)), k.clone(), k).unwrap();
        assert_eq!((ck.dtype(), cv.dtype()), (DType::F16, DType::F16));
        assert_eq!(cache.stored_dtype(), Some(DType::F16));
        let back: Vec<f32> = ck
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        // 0.1 is not exact in f16: it comes back as the nearest f16, 1638 / 2^14.
        assert_eq!(back, vec![1.0, 1638.0 / 16384.0]);
    }

    #[test]
    fn left_padding_positions_and_mask() {
        let mask = vec![vec![0u8, 0, 1, 1], vec![1, 1, 1, 1]];
        let spec = CtxSpec {
            batch: 2,
            t: 4,
            past: 0,
            key_mask: Some(&mask),
            sliding_window: None,
        };
        assert_eq!(host_positions(&spec), vec![1, 1, 0, 1, 0, 1, 2, 3]);
        let b = build_ctx(&spec, None, DType::F32, &Device::Cpu)
            .unwrap()
            .bias
            .unwrap();
        let row: Vec<f32> = b
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(3)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(row, vec![MASKED, MASKED, 0.0, 0.0]);
        // decode step: one new token after 4 cached
        let mask = vec![vec![0u8, 0, 1, 1, 1]];
        let spec = CtxSpec {
            batch: 1,
            t: 1,
            past: 4,
            key_mask: Some(&mask),
            sliding_window: None,
        };
        assert_eq!(host_positions(&spec), vec![2]);
    }
}
