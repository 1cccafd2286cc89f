//! Snapshots of a model's state (weights, BatchNorm buffers, the masks they were trained
//! with) for model selection: taken when validation improves, written as
//! `best.safetensors`, read back on resume and restored for the final test evaluation.

use super::masked::MaskedLayers;
use super::output;
use crate::models::Model;
use crate::nn::Buffer;
use crate::sparse::SparseEngine;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A snapshot of the model state (weights, buffers, masks) for `best.safetensors`.
pub(crate) struct Snapshot {
    params: Vec<(String, Tensor)>,
    buffers: Vec<Buffer>,
    /// The masks the weights were trained with (sparse runs): evaluating the weights needs
    /// their own sparsity pattern.
    masks: Option<Vec<Vec<bool>>>,
}

pub(crate) fn snapshot(model: &dyn Model, engine: Option<&SparseEngine>) -> Result<Snapshot> {
    Ok(Snapshot {
        params: model
            .params()
            .iter()
            .map(|p| Ok((p.name.clone(), p.var.as_tensor().copy()?)))
            .collect::<Result<_>>()?,
        buffers: model.buffers()?,
        masks: engine.map(|e| e.masks_bool()),
    })
}

/// Puts a snapshot back into the model (and its masks into the engine and the layers'
/// sparse kernels).
pub(crate) fn restore(
    model: &dyn Model,
    snap: &Snapshot,
    layers: Option<&mut MaskedLayers>,
) -> Result<()> {
    for (p, (name, t)) in model.params().iter().zip(&snap.params) {
        debug_assert_eq!(&p.name, name);
        p.var.set(t)?;
    }
    model.set_buffers(&snap.buffers)?;
    if let (Some(ml), Some(m)) = (layers, &snap.masks) {
        ml.set_masks(m.clone(), None)?;
    }
    Ok(())
}

/// Loads the parameters and buffers of a `best.safetensors` as a snapshot of `model`.
pub(crate) fn load_snapshot(
    path: &Path,
    model: &dyn Model,
    sparse: bool,
    dev: &Device,
) -> Result<Snapshot> {
    let t = candle_core::safetensors::load(path, dev)
        .with_context(|| format!("cannot read {} to resume the run", path.display()))?;
    let get = |name: &str| -> Result<Tensor> {
        t.get(name)
            .cloned()
            .with_context(|| format!("{} has no tensor {name}", path.display()))
    };
    Ok(Snapshot {
        params: model
            .params()
            .iter()
            .map(|p| Ok((p.name.clone(), get(&p.name)?)))
            .collect::<Result<_>>()?,
        buffers: model
            .buffers()?
            .into_iter()
            .map(|b| {
                Ok(Buffer {
                    tensor: get(&b.name)?,
                    name: b.name,
                })
            })
            .collect::<Result<_>>()?,
        masks: if sparse {
            Some(
                model
                    .weights()
                    .iter()
                    .map(|p| {
                        let m = get(&format!("mask.{}", p.name))?;
                        Ok(m.flatten_all()?
                            .to_vec1::<u8>()?
                            .into_iter()
                            .map(|b| b != 0)
                            .collect())
                    })
                    .collect::<Result<_>>()?,
            )
        } else {
            None
        },
    })
}

/// Writes weights, BatchNorm buffers and masks (`mask.<weight>`, u8) to a safetensors file.
pub(crate) fn save_weights(
    path: &Path,
    snap: &Snapshot,
    layers: Option<&MaskedLayers>,
    dev: &Device,
) -> Result<()> {
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in &snap.params {
        map.insert(name.clone(), t.clone());
    }
    for b in &snap.buffers {
        map.insert(b.name.clone(), b.tensor.clone());
    }
    if let Some(ml) = layers {
        for (l, p) in ml.weights.iter().enumerate() {
            let m: Vec<u8> = ml
                .engine
                .mask(l)
                .iter()
                .map(|&v| (v != 0.0) as u8)
                .collect();
            map.insert(
                format!("mask.{}", p.name),
                Tensor::from_vec(m, p.var.shape(), dev)?.to_dtype(DType::U8)?,
            );
        }
    }
    output::save_safetensors(path, &map)
}
