//! GGUF reader (spec: ggml/docs/gguf.md). Our own parser over a memory map, so that every
//! truncation or bad field becomes an error naming the file, and tensor bytes are never copied
//! until a tensor is materialised.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{ModelError, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        Some(match *self {
            Value::U8(v) => v as u64,
            Value::I8(v) if v >= 0 => v as u64,
            Value::U16(v) => v as u64,
            Value::I16(v) if v >= 0 => v as u64,
            Value::U32(v) => v as u64,
            Value::I32(v) if v >= 0 => v as u64,
            Value::U64(v) => v,
            Value::I64(v) if v >= 0 => v as u64,
            _ => return None,
        })
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Shape in candle order (outermost first); GGUF stores it innermost first.
    pub shape: Vec<usize>,
    pub ggml_type: u32,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    mmap: memmap2::Mmap,
}

/// GGML type id → (name, block size in elements, bytes per block); None if unknown to us.
pub fn ggml_type_info(ty: u32) -> Option<(&'static str, usize, usize)> {
    Some(match ty {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        30 => ("BF16", 1, 2),
        _ => return None,
    })
}

fn ggml_type_name(ty: u32) -> String {
    const OTHER: &[(u32, &str)] = &[
        (16, "IQ2_XXS"),
        (17, "IQ2_XS"),
        (18, "IQ3_XXS"),
        (19, "IQ1_S"),
        (20, "IQ4_NL"),
        (21, "IQ3_S"),
        (22, "IQ2_S"),
        (23, "IQ4_XS"),
        (24, "I8"),
        (25, "I16"),
        (26, "I32"),
        (27, "I64"),
        (28, "F64"),
        (29, "IQ1_M"),
        (34, "TQ1_0"),
        (35, "TQ2_0"),
    ];
    match ggml_type_info(ty) {
        Some((n, _, _)) => n.to_string(),
        None => OTHER
            .iter()
            .find(|(t, _)| *t == ty)
            .map(|(_, n)| n.to_string())
            .unwrap_or_else(|| format!("#{ty}")),
    }
}

fn ggml_dtype(ty: u32) -> Option<GgmlDType> {
    Some(match ty {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                ModelError::format(
                    self.path,
                    format!(
                        "truncated GGUF: file ends while reading {what} at byte {}",
                        self.pos
                    ),
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        // A length larger than the file is corruption, not a reason to allocate.
        if n as usize > self.buf.len() {
            return Err(ModelError::format(
                self.path,
                format!("corrupt GGUF: {what} claims length {n}, larger than the file"),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| {
            ModelError::format(self.path, format!("corrupt GGUF: {what} is not UTF-8"))
        })
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8(what)?),
            1 => Value::I8(self.u8(what)? as i8),
            2 => Value::U16(self.u16(what)?),
            3 => Value::I16(self.u16(what)? as i16),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => Value::Bool(self.u8(what)? != 0),
            8 => Value::String(self.string(what)?),
            9 if depth == 0 => {
                let ety = self.u32(what)?;
                let n = self.len(what)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(ety, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            _ => {
                return Err(ModelError::format(
                    self.path,
                    format!("corrupt GGUF: {what} has unknown value type {ty}"),
                ))
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the file is opened read-only; we accept that a concurrent writer could change it.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            path,
        };
        let magic = c.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(ModelError::format(path, "not a GGUF file (bad magic)"));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::format(
                path,
                format!("unsupported GGUF version {version}"),
            ));
        }
        let n_tensors = c.u64("tensor count")? as usize;
        let n_kv = c.u64("metadata count")? as usize;
        if n_tensors > mmap.len() || n_kv > mmap.len() {
            return Err(ModelError::format(
                path,
                "corrupt GGUF: impossible tensor/metadata count",
            ));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let nd = c.u32(&name)? as usize;
            if nd > 4 {
                return Err(ModelError::format(
                    path,
                    format!("tensor `{name}` has {nd} dimensions"),
                ));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(c.u64(&name)? as usize);
            }
            dims.reverse();
            let ty = c.u32(&name)?;
            let off = c.u64(&name)? as usize;
            infos.push((name, dims, ty, off));
        }
        let align = metadata
            .get("general.alignment")
            .and_then(|v| v.as_u64())
            .unwrap_or(32) as usize;
        if align == 0 || !align.is_power_of_two() {
            return Err(ModelError::format(
                path,
                format!("corrupt GGUF: alignment {align}"),
            ));
        }
        let data_start = c.pos.div_ceil(align) * align;
        let mut tensors = BTreeMap::new();
        for (name, shape, ty, off) in infos {
            let elems: usize = shape.iter().product();
            // Unknown types keep len 0 here; using such a tensor reports the type by name.
            let len = match ggml_type_info(ty) {
                Some((_, bs, bytes)) => {
                    if !elems.is_multiple_of(bs) {
                        return Err(ModelError::format(
                            path,
                            format!(
                                "tensor `{name}`: {elems} elements not a multiple of block {bs}"
                            ),
                        ));
                    }
                    elems / bs * bytes
                }
                None => 0,
            };
            let start = data_start.saturating_add(off);
            if start.saturating_add(len) > mmap.len() {
                return Err(ModelError::format(
                    path,
                    format!(
                        "truncated GGUF: tensor `{name}` needs bytes {start}..{} but the file has {}",
                        start.saturating_add(len),
                        mmap.len()
                    ),
                ));
            }
            tensors.insert(
                name,
                TensorInfo {
                    shape,
                    ggml_type: ty,
                    start,
                    len,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            mmap,
        })
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        self.meta(key).and_then(|v| v.as_u64())
    }

    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta(key).and_then(|v| v.as_f64())
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key).and_then(|v| v.as_str())
    }

    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.meta_u64(key).ok_or_else(|| {
            ModelError::format(
                &self.path,
                format!("missing or non-integer metadata `{key}`"),
            )
        })
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingWeight(name.to_string()))
    }

    pub fn type_name(&self, ty: u32) -> String {
        ggml_type_name(ty)
    }

    /// The tensor as a quantized candle tensor. `row_perm` reorders the outermost dimension
    /// (used to undo llama.cpp's Q/K permutation); quantization blocks run along the innermost
    /// dimension, so whole rows can be moved without touching their bytes.
    pub fn qtensor(
        &self,
        name: &str,
        row_perm: Option<&[usize]>,
        device: &Device,
    ) -> Result<QTensor> {
        let info = self.info(name)?;
        let dtype = ggml_dtype(info.ggml_type).ok_or_else(|| ModelError::UnsupportedQuant {
            path: self.path.clone(),
            tensor: name.to_string(),
            ty: ggml_type_name(info.ggml_type),
        })?;
        let raw = &self.mmap[info.start..info.start + info.len];
        let q = match row_perm {
            None => qtensor_from_ggml(dtype, raw, info.shape.clone(), device)?,
            Some(perm) => {
                let rows = info.shape[0];
                assert_eq!(perm.len(), rows, "row permutation length");
                let row_bytes = info.len / rows;
                let mut buf = Vec::with_capacity(info.len);
                for &r in perm {
                    buf.extend_from_slice(&raw[r * row_bytes..(r + 1) * row_bytes]);
                }
                qtensor_from_ggml(dtype, &buf, info.shape.clone(), device)?
            }
        };
        self.release(info.start, info.len);
        Ok(q)
    }

    /// Drops the mapped pages of bytes already copied out, so that a model being loaded does
    /// not hold both the file's pages and its own copy (peak memory twice the weights). The
    /// mapping is private and read-only: pages read again come back from the file.
    fn release(&self, start: usize, len: usize) {
        const PAGE: usize = 4096;
        let (a, b) = (start.div_ceil(PAGE) * PAGE, (start + len) / PAGE * PAGE);
        if b > a {
            // SAFETY: nothing borrows these bytes past this point (the tensor owns its copy),
            // and a read-only private file mapping refills dropped pages from the file.
            let _ = unsafe {
                self.mmap
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
            };
        }
    }
}

/// A tensor to write: name, GGML type id, shape in candle order, raw bytes.
pub type GgufTensor = (String, u32, Vec<usize>, Vec<u8>);

/// Writes a GGUF v3 file: metadata, then tensors given as (name, ggml type id, shape in candle
/// order, raw bytes). Used to export models and to build test fixtures.
pub fn write(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[GgufTensor],
) -> std::io::Result<()> {
    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }
    fn ty(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
    fn val(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::String(x) => s(out, x),
            Value::Array(a) => {
                out.extend(a.first().map(ty).unwrap_or(4).to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|x| val(out, x));
            }
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
        }
    }
    const ALIGN: usize = 32;
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        s(&mut out, k);
        out.extend(ty(v).to_le_bytes());
        val(&mut out, v);
    }
    let mut offset = 0usize;
    for (name, t, shape, bytes) in tensors {
        s(&mut out, name);
        out.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(t.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += bytes.len().div_ceil(ALIGN) * ALIGN;
    }
    out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
    for (_, _, _, bytes) in tensors {
        out.extend(bytes);
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
    }
    std::fs::write(path, out)
}

/// Row order that undoes llama.cpp's `permute(w, n_head)` on q_proj/k_proj, i.e. what
/// transformers' `reverse_permute_weights` computes: within each head the GGUF interleaves the
/// two rotary halves (rows 0,h,1,h+1,...); HF wants them split (first half, then second half).
pub fn unpermute_rows(n_rows: usize, n_head: usize) -> Vec<usize> {
    let dim = n_rows / n_head;
    let half = dim / 2;
    let mut perm = Vec::with_capacity(n_rows);
    for h in 0..n_head {
        for i in 0..dim {
            // HF row (h, i) with i = j*half + r (j in {0,1}) sits at GGUF row (h, 2r + j).
            let (j, r) = (i / half, i % half);
            perm.push(h * dim + 2 * r + j);
        }
    }
    perm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, dim/2, in).swapaxes(1, 2) → GGUF row (h, 2r + j) = HF row (h, j*half + r)
        let (n_head, dim) = (3, 8);
        let half = dim / 2;
        let mut gguf_of_hf = vec![0; n_head * dim];
        for h in 0..n_head {
            for j in 0..2 {
                for r in 0..half {
                    gguf_of_hf[h * dim + 2 * r + j] = h * dim + j * half + r;
                }
            }
        }
        let perm = unpermute_rows(n_head * dim, n_head);
        for (hf_row, &g) in perm.iter().enumerate() {
            assert_eq!(gguf_of_hf[g], hf_row);
        }
    }
}
