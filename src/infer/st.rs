//! Raw tensors (any of the dtypes the sparse export needs: `U16` indices, `F16` values) and
//! whole safetensors files with their `__metadata__`, over the `safetensors` crate (candle's
//! tensors have no `U16` type and candle's writer takes no metadata). Every malformed or
//! truncated file gives an error naming the file, never a panic.

use anyhow::{bail, Context, Result};
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
    /// Serialises to the safetensors byte layout.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut views = Vec::with_capacity(self.tensors.len());
        for (name, t) in &self.tensors {
            let dtype = match t.dtype {
                Dtype::U8 => safetensors::Dtype::U8,
                Dtype::U16 => safetensors::Dtype::U16,
                Dtype::U32 => safetensors::Dtype::U32,
                Dtype::F16 => safetensors::Dtype::F16,
                Dtype::F32 => safetensors::Dtype::F32,
            };
            let view = safetensors::tensor::TensorView::new(dtype, t.shape.clone(), &t.data)
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))?;
            views.push((name.clone(), view));
        }
        let meta: Option<std::collections::HashMap<String, String>> = if self.metadata.is_empty() {
            None
        } else {
            Some(self.metadata.clone().into_iter().collect())
        };
        safetensors::serialize(views, meta).map_err(|e| anyhow::anyhow!("serialising: {e}"))
    }

    /// Parses safetensors bytes; `what` names the source in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Self> {
        let bad = |e: safetensors::SafeTensorError| {
            anyhow::anyhow!("{what} is not a valid safetensors file (truncated or corrupt): {e}")
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(bad)?;
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(bad)?;
        let mut file = StFile {
            metadata: header
                .metadata()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            ..Default::default()
        };
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                safetensors::Dtype::U8 | safetensors::Dtype::BOOL => Dtype::U8,
                safetensors::Dtype::U16 => Dtype::U16,
                safetensors::Dtype::U32 => Dtype::U32,
                safetensors::Dtype::F16 => Dtype::F16,
                safetensors::Dtype::F32 => Dtype::F32,
                other => {
                    bail!("{what}: tensor {name} has type {other:?}, which rest does not read")
                }
            };
            file.tensors.insert(
                name,
                RawTensor {
                    dtype,
                    shape: view.shape().to_vec(),
                    data: view.data().to_vec(),
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

/// IEEE 754 half-precision bits of `x` (round to nearest, ties to even).
pub fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// The `f32` value of half-precision bits `h` (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
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
