//! Tensors on the wire: per tensor a header (name, shape, encoding, byte count) and then its
//! bytes in chunks, so an update of any size streams through fixed-size messages. Encodings:
//! raw little-endian fp32, fp16, bf16, or int8 with one absmax scale per block; zstd optional
//! on top. The decoder (`Assembler`) trusts nothing: every frame is checked against the
//! expected tensor set and the size limits before a byte is kept.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use fedllm_fl::params::ParamSet;

use crate::pb::{frame::Body, Encoding, Frame, TensorHeader};

/// Values per int8 block (one f32 scale each: 6.25% on top of the int8 bytes).
pub const INT8_BLOCK: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("malformed update: {0}")]
    Malformed(String),
    #[error("update too large: {0}")]
    TooLarge(String),
}

type Result<T> = std::result::Result<T, WireError>;

fn bad<T>(m: impl Into<String>) -> Result<T> {
    Err(WireError::Malformed(m.into()))
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WireOpts {
    pub encoding: Encoding,
    pub zstd: bool,
    pub chunk: usize,
}

impl WireOpts {
    pub fn raw() -> Self {
        Self {
            encoding: Encoding::F32,
            zstd: false,
            chunk: 1 << 20,
        }
    }

    pub fn from_config(d: &fedllm_fl::config::DistributedCfg) -> Self {
        use fedllm_fl::config::Compression;
        Self {
            encoding: match d.compression {
                Compression::Fp16 => Encoding::F16,
                Compression::Bf16 => Encoding::Bf16,
                Compression::Int8 => Encoding::Int8,
                Compression::None => Encoding::F32,
            },
            zstd: d.zstd,
            chunk: d.chunk_bytes,
        }
    }
}

/// Encoded byte length of `n` values.
pub fn encoded_len(enc: Encoding, n: usize) -> usize {
    match enc {
        Encoding::F32 => 4 * n,
        Encoding::F16 | Encoding::Bf16 => 2 * n,
        Encoding::Int8 => n + 4 * n.div_ceil(INT8_BLOCK),
        Encoding::U32 => 4 * n,
    }
}

pub fn encode_values(v: &[f32], enc: Encoding) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(enc, v.len()));
    match enc {
        // Ring elements are u32 tensors (`tensor_frames`), never floats.
        Encoding::F32 | Encoding::U32 => {
            if cfg!(target_endian = "little") {
                // SAFETY: f32 has no padding and u8 no alignment; the bytes are the LE encoding.
                out.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v))
                });
            } else {
                v.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
        }
        Encoding::F16 => v
            .iter()
            .for_each(|x| out.extend(half::f16::from_f32(*x).to_le_bytes())),
        Encoding::Bf16 => v
            .iter()
            .for_each(|x| out.extend(half::bf16::from_f32(*x).to_le_bytes())),
        Encoding::Int8 => {
            let scales: Vec<f32> = v
                .chunks(INT8_BLOCK)
                .map(|b| b.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0)
                .collect();
            scales.iter().for_each(|s| out.extend(s.to_le_bytes()));
            for (b, &s) in v.chunks(INT8_BLOCK).zip(&scales) {
                let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                out.extend(
                    b.iter()
                        .map(|x| (x * inv).round().clamp(-127.0, 127.0) as i8 as u8),
                );
            }
        }
    }
    out
}

pub fn decode_values(b: &[u8], enc: Encoding, n: usize) -> Result<Vec<f32>> {
    if b.len() != encoded_len(enc, n) {
        return bad(format!(
            "{} bytes for {n} values in {enc:?} (expected {})",
            b.len(),
            encoded_len(enc, n)
        ));
    }
    Ok(match enc {
        Encoding::U32 => return bad("u32 values in a float tensor"),
        Encoding::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Encoding::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Encoding::Bf16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Encoding::Int8 => {
            let nb = n.div_ceil(INT8_BLOCK);
            let (sc, q) = b.split_at(4 * nb);
            let scales: Vec<f32> = sc
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if scales.iter().any(|s| !s.is_finite()) {
                return bad("non-finite int8 scale");
            }
            q.chunks(INT8_BLOCK)
                .zip(&scales)
                .flat_map(|(blk, &s)| blk.iter().map(move |&x| x as i8 as f32 * s))
                .collect()
        }
    })
}

/// The frames of one tensor: its header, then chunks of at most `o.chunk` bytes.
pub fn tensor_frames(name: &str, t: &Tensor, o: &WireOpts) -> candle_core::Result<Vec<Frame>> {
    // Masked inputs (u32) travel raw: any loss breaks the masks' cancellation, and uniformly
    // random bytes do not compress.
    let ring = t.dtype() == candle_core::DType::U32;
    let (encoding, zstd) = if ring {
        (Encoding::U32, false)
    } else {
        (o.encoding, o.zstd)
    };
    let mut bytes = if ring {
        let v: Vec<u32> = t.flatten_all()?.to_vec1()?;
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    } else {
        let v: Vec<f32> = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        encode_values(&v, encoding)
    };
    if zstd {
        bytes = zstd::bulk::compress(&bytes, 3).map_err(candle_core::Error::wrap)?;
    }
    let header = TensorHeader {
        name: name.to_string(),
        shape: t.dims().iter().map(|&d| d as u64).collect(),
        encoding: encoding as i32,
        zstd,
        bytes: bytes.len() as u64,
        block: INT8_BLOCK as u32,
    };
    let mut out = vec![Frame {
        body: Some(Body::Tensor(header)),
    }];
    out.extend(bytes.chunks(o.chunk.max(1)).map(|c| Frame {
        body: Some(Body::Chunk(c.to_vec())),
    }));
    Ok(out)
}

/// Bytes a frame takes on the wire: the protobuf message plus gRPC's 5-byte prefix.
pub fn wire_len(f: &Frame) -> usize {
    prost::Message::encoded_len(f) + 5
}

/// Reassembles a parameter set from tensor frames.
pub struct Assembler {
    /// Expected names and shapes (None = accept any set, within the byte limit).
    expect: Option<BTreeMap<String, Vec<usize>>>,
    /// Whether a set may leave out expected tensors (a task may carry part of an adapter).
    subset: bool,
    /// Most decoded fp32 bytes accepted in total.
    max_bytes: usize,
    current: Option<(TensorHeader, Vec<u8>)>,
    done: ParamSet,
    decoded_bytes: usize,
}

impl Assembler {
    pub fn new(expect: Option<BTreeMap<String, Vec<usize>>>, max_bytes: usize) -> Self {
        Self {
            expect,
            subset: false,
            max_bytes,
            current: None,
            done: ParamSet::new(),
            decoded_bytes: 0,
        }
    }

    /// Accepts sets that carry only some of the expected tensors (each still checked by name
    /// and shape).
    pub fn allow_subset(mut self) -> Self {
        self.subset = true;
        self
    }

    pub fn push(&mut self, body: Body) -> Result<()> {
        match body {
            Body::Tensor(h) => {
                self.close()?;
                let shape: Vec<usize> = h
                    .shape
                    .iter()
                    .map(|&d| usize::try_from(d).map_err(|_| ()))
                    .collect::<std::result::Result<_, _>>()
                    .or_else(|_| bad(format!("tensor `{}`: dimension too large", h.name)))?;
                let n = shape
                    .iter()
                    .try_fold(1usize, |a, &d| a.checked_mul(d))
                    .ok_or_else(|| WireError::TooLarge(format!("tensor `{}`", h.name)))?;
                if self.done.contains_key(&h.name) {
                    return bad(format!("tensor `{}` sent twice", h.name));
                }
                if let Some(e) = &self.expect {
                    match e.get(&h.name) {
                        None => return bad(format!("unexpected tensor `{}`", h.name)),
                        Some(s) if *s != shape => {
                            return bad(format!(
                                "tensor `{}` has shape {shape:?}, expected {s:?}",
                                h.name
                            ))
                        }
                        _ => {}
                    }
                }
                let enc = Encoding::try_from(h.encoding)
                    .or_else(|_| bad(format!("tensor `{}`: unknown encoding", h.name)))?;
                if enc == Encoding::Int8 && h.block as usize != INT8_BLOCK {
                    return bad(format!("tensor `{}`: int8 block {}", h.name, h.block));
                }
                let raw = n.saturating_mul(4);
                if self.decoded_bytes.saturating_add(raw) > self.max_bytes {
                    return Err(WireError::TooLarge(format!(
                        "tensor `{}` takes the update past {} bytes",
                        h.name, self.max_bytes
                    )));
                }
                // zstd may expand incompressible data by a little; never by more than this.
                let cap = encoded_len(enc, n) + encoded_len(enc, n) / 64 + 1024;
                if h.bytes as usize > cap {
                    return Err(WireError::TooLarge(format!(
                        "tensor `{}` announces {} bytes",
                        h.name, h.bytes
                    )));
                }
                self.decoded_bytes += raw;
                let cap = h.bytes as usize;
                self.current = Some((h, Vec::with_capacity(cap)));
                Ok(())
            }
            Body::Chunk(c) => match &mut self.current {
                None => bad("data chunk before any tensor header"),
                Some((h, buf)) => {
                    if buf.len() + c.len() > h.bytes as usize {
                        return bad(format!("tensor `{}`: more bytes than announced", h.name));
                    }
                    buf.extend_from_slice(&c);
                    Ok(())
                }
            },
            _ => bad("a header frame inside the tensor stream"),
        }
    }

    fn close(&mut self) -> Result<()> {
        let Some((h, buf)) = self.current.take() else {
            return Ok(());
        };
        if buf.len() != h.bytes as usize {
            return bad(format!(
                "tensor `{}`: {} of {} bytes arrived",
                h.name,
                buf.len(),
                h.bytes
            ));
        }
        let shape: Vec<usize> = h.shape.iter().map(|&d| d as usize).collect();
        let n: usize = shape.iter().product();
        let enc = Encoding::try_from(h.encoding).expect("checked at the header");
        let buf = if h.zstd {
            zstd::bulk::decompress(&buf, encoded_len(enc, n))
                .or_else(|e| bad(format!("tensor `{}`: zstd: {e}", h.name)))?
        } else {
            buf
        };
        if enc == Encoding::U32 {
            if buf.len() != 4 * n {
                return bad(format!(
                    "tensor `{}`: {} bytes for {n} u32 values",
                    h.name,
                    buf.len()
                ));
            }
            let v: Vec<u32> = buf
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let t = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)
                .or_else(|e| bad(format!("tensor `{}`: {e}", h.name)))?;
            self.done.insert(h.name, t);
            return Ok(());
        }
        let v = decode_values(&buf, enc, n)
            .map_err(|e| WireError::Malformed(format!("tensor `{}`: {e}", h.name)))?;
        // A NaN or infinity would poison every aggregate it enters.
        if v.iter().any(|x| !x.is_finite()) {
            return bad(format!("tensor `{}` holds non-finite values", h.name));
        }
        let t = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)
            .or_else(|e| bad(format!("tensor `{}`: {e}", h.name)))?;
        self.done.insert(h.name, t);
        Ok(())
    }

    /// The complete set; an error if a tensor is cut short or (with an expected set) missing.
    pub fn finish(mut self) -> Result<ParamSet> {
        self.close()?;
        if let (Some(e), false) = (&self.expect, self.subset) {
            if let Some(missing) = e.keys().find(|k| !self.done.contains_key(*k)) {
                return bad(format!("tensor `{missing}` missing"));
            }
        }
        Ok(self.done)
    }
}

/// Expected names and shapes of a set.
pub fn layout(p: &ParamSet) -> BTreeMap<String, Vec<usize>> {
    p.iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect()
}

/// Feeds arbitrary bytes to the decoder as a sequence of length-prefixed frames: the fuzz
/// target's body (and the garbage test's). Must never panic.
/// The fuzz body: decodes length-delimited frames for the tensor set {a: [3, 5], b: [70]}.
/// `Some` only for a stream that decodes whole into exactly that set.
pub fn fuzz_decode(data: &[u8]) -> Option<ParamSet> {
    use prost::Message;
    let expect = BTreeMap::from([
        ("a".to_string(), vec![3usize, 5]),
        ("b".to_string(), vec![70usize]),
    ]);
    let mut asm = Assembler::new(Some(expect), 1 << 16);
    let mut rest = data;
    while !rest.is_empty() {
        let f = Frame::decode_length_delimited(&mut rest).ok()?;
        asm.push(f.body?).ok()?;
    }
    asm.finish().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn set() -> ParamSet {
        let dev = Device::Cpu;
        let a: Vec<f32> = (0..15).map(|i| (i as f32 - 7.0) * 0.37).collect();
        let b: Vec<f32> = (0..70)
            .map(|i| ((i * 7919) % 101) as f32 * 1e-3 - 0.05)
            .collect();
        ParamSet::from([
            ("a".into(), Tensor::from_vec(a, (3, 5), &dev).unwrap()),
            ("b".into(), Tensor::from_vec(b, 70, &dev).unwrap()),
        ])
    }

    fn roundtrip(o: &WireOpts) -> (ParamSet, usize) {
        let p = set();
        let mut asm = Assembler::new(Some(layout(&p)), 1 << 20);
        let mut wire = 0;
        for (k, t) in &p {
            for f in tensor_frames(k, t, o).unwrap() {
                wire += wire_len(&f);
                asm.push(f.body.unwrap()).unwrap();
            }
        }
        (asm.finish().unwrap(), wire)
    }

    /// Feeds `p` to `asm` and finishes it.
    fn assemble(mut asm: Assembler, p: &ParamSet) -> Result<ParamSet> {
        for (k, t) in p {
            for f in tensor_frames(k, t, &WireOpts::raw()).unwrap() {
                asm.push(f.body.unwrap())?;
            }
        }
        asm.finish()
    }

    /// A client accepts a task carrying part of its adapter, but each tensor must still be
    /// one of its own with its shape; without `allow_subset` a part is refused as incomplete.
    #[test]
    fn a_subset_is_accepted_only_where_allowed_and_still_checked() {
        let full = set();
        let part: ParamSet = full
            .iter()
            .take(1)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let asm = || Assembler::new(Some(layout(&full)), 1 << 20);
        let got = assemble(asm().allow_subset(), &part).unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), ["a"]);
        let e = assemble(asm(), &part).unwrap_err().to_string();
        assert!(e.contains("`b` missing"), "{e}");
        let dev = Device::Cpu;
        let stranger = ParamSet::from([("c".into(), Tensor::zeros(3, DType::F32, &dev).unwrap())]);
        let e = assemble(asm().allow_subset(), &stranger)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unexpected tensor `c`"), "{e}");
        let reshaped =
            ParamSet::from([("a".into(), Tensor::zeros((5, 3), DType::F32, &dev).unwrap())]);
        let e = assemble(asm().allow_subset(), &reshaped)
            .unwrap_err()
            .to_string();
        assert!(e.contains("shape"), "{e}");
    }

    fn max_err(a: &ParamSet, b: &ParamSet) -> f32 {
        a.iter()
            .map(|(k, t)| {
                let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                let y: Vec<f32> = b[k].flatten_all().unwrap().to_vec1().unwrap();
                x.iter()
                    .zip(&y)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0., f32::max)
            })
            .fold(0., f32::max)
    }

    #[test]
    fn every_encoding_round_trips_within_its_precision() {
        let p = set();
        for (enc, tol) in [
            (Encoding::F32, 0.0),
            (Encoding::F16, 2e-3),
            (Encoding::Bf16, 1.6e-2),
            (Encoding::Int8, 2.6 / 127.0 / 2.0 + 1e-6),
        ] {
            for zstd in [false, true] {
                let o = WireOpts {
                    encoding: enc,
                    zstd,
                    chunk: 7,
                };
                let (q, _) = roundtrip(&o);
                let e = max_err(&p, &q);
                assert!(e <= tol, "{enc:?} zstd={zstd}: error {e} > {tol}");
            }
        }
        // Raw fp32: the frames cost little beyond the tensor bytes.
        let (_, wire) = roundtrip(&WireOpts {
            chunk: 1 << 20,
            ..WireOpts::raw()
        });
        assert!(wire <= 340 + 60, "{wire} bytes for 340 raw");
    }

    #[test]
    fn int8_matches_the_blockwise_absmax_formula() {
        let v: Vec<f32> = (0..130)
            .map(|i| (i as f32).sin() * (1 + i / 64) as f32)
            .collect();
        let d = decode_values(&encode_values(&v, Encoding::Int8), Encoding::Int8, v.len()).unwrap();
        for (blk, dblk) in v.chunks(INT8_BLOCK).zip(d.chunks(INT8_BLOCK)) {
            let s = blk.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (x, y) in blk.iter().zip(dblk) {
                assert_eq!(*y, (x / s).round() * s);
            }
        }
        assert_eq!(encoded_len(Encoding::Int8, 130), 130 + 12);
    }

    #[test]
    fn malformed_streams_are_rejected() {
        let p = set();
        let o = WireOpts::raw();
        let frames = |k: &str| tensor_frames(k, &p[k], &o).unwrap();
        let run = |fs: Vec<Frame>, max: usize| -> Result<ParamSet> {
            let mut asm = Assembler::new(Some(layout(&p)), max);
            for f in fs {
                asm.push(f.body.unwrap())?;
            }
            asm.finish()
        };
        let mut all = frames("a");
        all.extend(frames("b"));
        assert!(run(all.clone(), 1 << 20).is_ok());
        // missing tensor, duplicate, truncated, chunk first, oversized, wrong shape, too many bytes
        assert!(run(frames("a"), 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("`b` missing"));
        let mut dup = frames("a");
        dup.extend(frames("a"));
        assert!(run(dup, 1 << 20).unwrap_err().to_string().contains("twice"));
        let cut = all[..all.len() - 1].to_vec();
        assert!(run(cut, 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("bytes arrived"));
        assert!(run(all[1..].to_vec(), 1 << 20).is_err());
        assert!(matches!(run(all.clone(), 100), Err(WireError::TooLarge(_))));
        let mut wrong = all.clone();
        if let Some(Body::Tensor(h)) = &mut wrong[0].body {
            h.shape = vec![5, 3];
        }
        assert!(run(wrong, 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("shape"));
        let mut extra = all.clone();
        extra.insert(
            2,
            Frame {
                body: Some(Body::Chunk(vec![0; 9])),
            },
        );
        assert!(run(extra, 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("more bytes"));
        let mut nan = frames("a");
        if let Some(Body::Chunk(c)) = &mut nan[1].body {
            c[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        nan.extend(frames("b"));
        assert!(run(nan, 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("non-finite"));
        let mut bomb = all;
        if let Some(Body::Tensor(h)) = &mut bomb[0].body {
            h.bytes = u64::MAX;
        }
        assert!(matches!(run(bomb, 1 << 20), Err(WireError::TooLarge(_))));
    }

    #[test]
    fn garbage_never_panics_the_decoder() {
        use prost::Message;
        let mut rng = fedllm_rng::Rng::new(7);
        // Valid streams (raw and zstd) decode to the set, within int8's half step per block.
        let p = set();
        let streams: Vec<Vec<u8>> = [false, true]
            .into_iter()
            .map(|zstd| {
                let o = WireOpts {
                    encoding: Encoding::Int8,
                    zstd,
                    chunk: 16,
                };
                let mut bytes = Vec::new();
                for (k, t) in &p {
                    for f in tensor_frames(k, t, &o).unwrap() {
                        f.encode_length_delimited(&mut bytes).unwrap();
                    }
                }
                bytes
            })
            .collect();
        for s in &streams {
            let got = fuzz_decode(s).expect("a valid stream decodes");
            assert!(max_err(&p, &got) <= 2.6 / 127.0 / 2.0 + 1e-6);
        }
        // The same streams with random bytes flipped, cut short, and pure noise: never a panic,
        // and whatever is accepted is exactly the expected layout with finite values.
        let (mut accepted, mut rejected) = (0, 0);
        for i in 0..20_000 {
            let mut d = if i % 3 == 0 {
                (0..(rng.next_u64() % 300))
                    .map(|_| rng.next_u64() as u8)
                    .collect()
            } else {
                streams[i % 2].clone()
            };
            if !d.is_empty() {
                for _ in 0..(1 + rng.next_u64() % 4) {
                    let at = (rng.next_u64() as usize) % d.len();
                    d[at] = rng.next_u64() as u8;
                }
                let cut = (rng.next_u64() as usize) % d.len();
                if i % 2 == 0 {
                    d.truncate(cut);
                }
            }
            match fuzz_decode(&d) {
                Some(got) => {
                    accepted += 1;
                    assert_eq!(layout(&got), layout(&p));
                    for t in got.values() {
                        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                        assert!(v.iter().all(|x| x.is_finite()));
                    }
                }
                None => rejected += 1,
            }
        }
        // Noise and cut streams must mostly be refused (a flipped byte inside a value is legal).
        assert!(
            rejected > 10_000,
            "accepted {accepted}, rejected {rejected}"
        );
    }
}
