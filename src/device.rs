//! Where a run's tensors live: `--device cpu|cuda|cuda:N|auto`. The CPU path runs rest's own
//! kernels (dense and sparse); a CUDA device runs candle's CUDA backend through the generic
//! layer ops of `kernels::generic` (builds with `--features cuda`; see the README).

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (rest's kernels).
    #[default]
    Cpu,
    /// CUDA GPU number N (`cuda` = `cuda:0`).
    Cuda(usize),
    /// The first CUDA GPU when this build has CUDA support and a GPU is present, else the CPU.
    Auto,
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        Ok(match t.as_str() {
            "cpu" => DeviceSpec::Cpu,
            "auto" => DeviceSpec::Auto,
            "cuda" | "gpu" => DeviceSpec::Cuda(0),
            _ => match t.strip_prefix("cuda:") {
                Some(n) => DeviceSpec::Cuda(n.parse().map_err(|_| {
                    anyhow::anyhow!("--device {s}: the GPU number after `cuda:` must be an integer")
                })?),
                None => bail!("--device {s}: expected cpu, cuda, cuda:N or auto"),
            },
        })
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Auto => write!(f, "auto"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether this binary was built with CUDA support (`--features cuda`).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Opens the device `spec` names, with an error saying what to do when it cannot.
pub fn open(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => {
            if !CUDA_BUILT {
                bail!(
                    "--device {spec}: this build of rest has no CUDA support; rebuild with \
                     `cargo build --release --features cuda` (see the README's GPU section) \
                     or use --device cpu"
                );
            }
            Device::new_cuda(n).with_context(|| {
                format!(
                    "--device {spec}: cannot open CUDA GPU {n} (is the NVIDIA driver loaded \
                     and the GPU visible? `nvidia-smi` lists them)"
                )
            })
        }
        DeviceSpec::Auto => {
            if CUDA_BUILT {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
    }
}

/// A short name of an opened device for logs and summaries (`cpu`, `cuda:0`).
pub fn name(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_device_names() {
        for (s, d) in [
            ("cpu", DeviceSpec::Cpu),
            ("CUDA", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("auto", DeviceSpec::Auto),
        ] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap(), d);
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        for bad in ["cuda:x", "tpu", "cuda:-1", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains("--device"), "{e}");
        }
    }

    #[test]
    fn cpu_and_auto_open_and_cuda_explains_itself_without_cuda() {
        assert!(open(DeviceSpec::Cpu).unwrap().is_cpu());
        let auto = open(DeviceSpec::Auto).unwrap();
        if !CUDA_BUILT {
            assert!(auto.is_cpu());
            let e = format!("{:#}", open(DeviceSpec::Cuda(0)).unwrap_err());
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
