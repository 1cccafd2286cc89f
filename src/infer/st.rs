//! A small, strict reader and writer of the safetensors container (8-byte little-endian
//! header length, JSON header with `dtype`/`shape`/`data_offsets` per tensor and an optional
//! `__metadata__` string map, then the raw little-endian data). Ours rather than candle's
//! because the sparse export needs `U16` indices, `F16` values and metadata, and because every
//! malformed or truncated file must give an error naming the file, never a panic.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Element types this module reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    U8,
    U16,
    U32,
    F16,
    F32,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::U8 => "U8",
            Dtype::U16 => "U16",
            Dtype::U32 => "U32",
            Dtype::F16 => "F16",
            Dtype::F32 => "F32",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::U16 | Dtype::F16 => 2,
            Dtype::U32 | Dtype::F32 => 4,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "U8" | "BOOL" => Dtype::U8,
            "U16" => Dtype::U16,
            "U32" => Dtype::U32,
            "F16" => Dtype::F16,
            "F32" => Dtype::F32,
            _ => return None,
        })
    }
}

/// One tensor: its type, shape and raw little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn f32(shape: Vec<usize>, v: &[f32]) -> Self {
        Self {
            dtype: Dtype::F32,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    pub fn u32(shape: Vec<usize>, v: &[u32]) -> Self {
        Self {
            dtype: Dtype::U32,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    pub fn u16(shape: Vec<usize>, v: &[u16]) -> Self {
        Self {
            dtype: Dtype::U16,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// `f32` values stored as IEEE half precision (round to nearest even).
    pub fn f16(shape: Vec<usize>, v: &[f32]) -> Self {
        Self {
            dtype: Dtype::F16,
            shape,
            data: v
                .iter()
                .flat_map(|x| f32_to_f16(*x).to_le_bytes())
                .collect(),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as `f32` (exact for every dtype here).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => self
                .data
                .chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            _ => self.to_u32().into_iter().map(|v| v as f32).collect(),
        }
    }

    /// Integer values as `u32` (for `U8`, `U16`, `U32`; float data is reinterpreted).
    pub fn to_u32(&self) -> Vec<u32> {
        match self.dtype {
            Dtype::U8 => self.data.iter().map(|&b| b as u32).collect(),
            Dtype::U16 | Dtype::F16 => self
                .data
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
                .collect(),
            Dtype::U32 | Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        }
    }
}

/// The content of a safetensors file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StFile {
    pub tensors: BTreeMap<String, RawTensor>,
    pub metadata: BTreeMap<String, String>,
}

impl StFile {
    /// Serialises to the safetensors byte layout (tensors in name order, header padded with
    /// spaces to a multiple of 8 bytes).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut header = Map::new();
        if !self.metadata.is_empty() {
            let m: Map<String, Value> = self
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            header.insert("__metadata__".into(), Value::Object(m));
        }
        let mut offset = 0usize;
        for (name, t) in &self.tensors {
            if t.data.len() != t.numel() * t.dtype.size() {
                bail!(
                    "tensor {name}: {} bytes for shape {:?} of {}",
                    t.data.len(),
                    t.shape,
                    t.dtype.name()
                );
            }
            header.insert(
                name.clone(),
                serde_json::json!({
                    "dtype": t.dtype.name(),
                    "shape": t.shape,
                    "data_offsets": [offset, offset + t.data.len()],
                }),
            );
            offset += t.data.len();
        }
        let mut h = serde_json::to_vec(&Value::Object(header))?;
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let mut out = Vec::with_capacity(8 + h.len() + offset);
        out.extend_from_slice(&(h.len() as u64).to_le_bytes());
        out.extend_from_slice(&h);
        for t in self.tensors.values() {
            out.extend_from_slice(&t.data);
        }
        Ok(out)
    }

    /// Parses a safetensors byte buffer; `what` names the source in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Self> {
        let bad = |why: String| anyhow::anyhow!("{what} is not a valid safetensors file: {why}");
        if bytes.len() < 8 {
            return Err(bad(format!(
                "{} bytes, too short for a header (truncated?)",
                bytes.len()
            )));
        }
        let mut n8 = [0u8; 8];
        n8.copy_from_slice(&bytes[..8]);
        let n = u64::from_le_bytes(n8);
        let data_start = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_add(8))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| {
                bad(format!(
                    "its header claims {n} bytes but the file has {} (truncated?)",
                    bytes.len()
                ))
            })?;
        let header: Map<String, Value> = serde_json::from_slice(&bytes[8..data_start])
            .map_err(|e| bad(format!("unreadable header ({e})")))?;
        let data = &bytes[data_start..];
        let mut file = StFile::default();
        for (name, v) in header {
            if name == "__metadata__" {
                let m = v
                    .as_object()
                    .ok_or_else(|| bad("__metadata__ is not a map".into()))?;
                for (k, v) in m {
                    let s = v
                        .as_str()
                        .ok_or_else(|| bad(format!("metadata {k} is not a string")))?;
                    file.metadata.insert(k.clone(), s.to_string());
                }
                continue;
            }
            let dtype = v
                .get("dtype")
                .and_then(Value::as_str)
                .and_then(Dtype::parse)
                .ok_or_else(|| bad(format!("tensor {name} has a missing or unsupported dtype")))?;
            let ints = |key: &str| -> Option<Vec<usize>> {
                v.get(key)?
                    .as_array()?
                    .iter()
                    .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
                    .collect()
            };
            let shape =
                ints("shape").ok_or_else(|| bad(format!("tensor {name} has no valid shape")))?;
            let off = ints("data_offsets")
                .filter(|o| o.len() == 2 && o[0] <= o[1])
                .ok_or_else(|| bad(format!("tensor {name} has no valid data_offsets")))?;
            if off[1] > data.len() {
                return Err(bad(format!(
                    "tensor {name} ends at byte {} of the data but the file holds {} data \
                     bytes (truncated?)",
                    off[1],
                    data.len()
                )));
            }
            let numel = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("tensor {name} has an absurd shape {shape:?}")))?;
            if numel.checked_mul(dtype.size()) != Some(off[1] - off[0]) {
                return Err(bad(format!(
                    "tensor {name} of shape {shape:?} ({}) has {} bytes",
                    dtype.name(),
                    off[1] - off[0]
                )));
            }
            file.tensors.insert(
                name,
                RawTensor {
                    dtype,
                    shape,
                    data: data[off[0]..off[1]].to_vec(),
                },
            );
        }
        Ok(file)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::util::write_atomic(path, &self.to_bytes()?)
    }
}

/// IEEE 754 half-precision bits of `x`, rounded to nearest, ties to even; overflow gives
/// infinity, NaN stays NaN.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    // Unbiased exponent, re-biased for half precision (bias 15).
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    // The full significand with its implicit leading one (zero/subnormal f32 inputs are far
    // below the half range and round to zero below).
    let full = if exp == 0 { man } else { man | 0x80_0000 };
    // Bits to drop: 13 for a normal half, more for a subnormal one.
    let shift = if e >= 1 { 13 } else { 14 - e };
    if shift > 24 {
        return sign;
    }
    let kept = full >> shift;
    let rem = full & ((1u32 << shift) - 1);
    let half = 1u32 << (shift - 1);
    let round_up = rem > half || (rem == half && kept & 1 == 1);
    let kept = kept + round_up as u32;
    if e >= 1 {
        // Normal: exponent field + 10-bit mantissa; a mantissa carry bumps the exponent
        // (and may reach infinity, which is the correct overflow).
        let v = ((e as u32) << 10) + (kept - 0x400);
        sign | v.min(0x7c00) as u16
    } else {
        // Subnormal (a carry into bit 10 correctly gives the smallest normal).
        sign | kept as u16
    }
}

/// The `f32` value of IEEE half-precision bits (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m * 2^-24.
            let v = m as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_known_values() {
        assert_eq!(f32_to_f16(1.0), 0x3c00);
        assert_eq!(f32_to_f16(-2.0), 0xc000);
        assert_eq!(f32_to_f16(65504.0), 0x7bff);
        assert_eq!(f32_to_f16(65520.0), 0x7c00); // rounds up to infinity
        assert_eq!(f32_to_f16(0.1), 0x2e66);
        assert_eq!(f32_to_f16(2f32.powi(-24)), 0x0001); // smallest subnormal
        assert_eq!(f32_to_f16(2f32.powi(-26)), 0x0000); // below half of it
        assert_eq!(f32_to_f16(2f32.powi(-14)), 0x0400); // smallest normal
                                                        // 1 + 2^-11 is a tie between 1 and 1 + 2^-10: ties to even (1.0).
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0xc000), -2.0);
    }

    #[test]
    fn f16_matches_candle_conversion() -> Result<()> {
        // candle converts through the `half` crate: an independent implementation.
        let mut rng = crate::util::rng(3, 0);
        let xs: Vec<f32> = (0..20_000)
            .map(|i| {
                let u: f32 = rand::Rng::random_range(&mut rng, -1.0..1.0);
                u * 2f32.powi((i % 40) - 28)
            })
            .collect();
        let dev = candle_core::Device::Cpu;
        let t = candle_core::Tensor::from_slice(&xs, xs.len(), &dev)?;
        let back: Vec<f32> = t
            .to_dtype(candle_core::DType::F16)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        for (x, b) in xs.iter().zip(&back) {
            assert_eq!(f16_to_f32(f32_to_f16(*x)).to_bits(), b.to_bits(), "{x}");
        }
        Ok(())
    }

    #[test]
    fn roundtrip_and_truncation() -> Result<()> {
        let mut f = StFile::default();
        f.tensors.insert(
            "a".into(),
            RawTensor::f32(vec![2, 2], &[1.0, -2.0, 3.5, 0.0]),
        );
        f.tensors
            .insert("b".into(), RawTensor::u16(vec![3], &[1, 65535, 7]));
        f.metadata.insert("k".into(), "v".into());
        let bytes = f.to_bytes()?;
        assert_eq!(StFile::from_bytes(&bytes, "x")?, f);
        assert_eq!(f.tensors["b"].to_u32(), vec![1, 65535, 7]);
        for cut in [0, 5, 20, bytes.len() - 1] {
            let e = StFile::from_bytes(&bytes[..cut], "model.st").expect_err("truncated");
            assert!(e.to_string().contains("model.st"), "{e}");
        }
        Ok(())
    }
}
