//! Initial weights from a file (`--init-from`): a PyTorch state dict (`.pth`/`.pt`/`.bin`,
//! checked by [`super::pth`] and read with candle's pickle reader; also under a `state_dict` or `model` key, and with
//! DataParallel's `module.` prefix) or safetensors, with torchvision's parameter and buffer
//! names (`conv1.weight`, `bn1.running_mean`, `layer1.0.conv1.weight`, ..., `fc.weight`), which
//! are the names `rest`'s models use. Every tensor is checked by name and shape; the classifier
//! head (the model's last layer) keeps its fresh initialisation when the file's has another
//! class count; BatchNorm's `num_batches_tracked` counters are ignored.

use super::Model;
use crate::nn::Buffer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// What [`init_from`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct InitReport {
    /// Parameters and buffers loaded.
    pub loaded: usize,
    /// The head's names and the file's shape for it, when the head was left fresh because
    /// its class count differs.
    pub head_replaced: Option<(Vec<String>, Vec<usize>)>,
}

/// The named tensors of `path`: safetensors by extension (`.safetensors`), else a PyTorch
/// pickle (zip) state dict.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let is_st = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if !path.is_file() {
        bail!("--init-from {}: no such file", path.display());
    }
    let list: Vec<(String, Tensor)> = if is_st {
        candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .with_context(|| {
                format!(
                    "--init-from {}: not a readable safetensors file",
                    path.display()
                )
            })?
            .into_iter()
            .collect()
    } else {
        let mut found = Vec::new();
        let shown = format!("--init-from {}", path.display());
        for key in [None, Some("state_dict"), Some("model")] {
            let r = super::pth::read_pth(path, key, &shown);
            match (r, key) {
                (Ok(v), _) if !v.is_empty() => {
                    found = v;
                    break;
                }
                (Err(e), None) => bail!(
                    "{e:#} (not a PyTorch checkpoint that can be read; save the model's \
                     state_dict with torch.save, or convert it to .safetensors)"
                ),
                _ => {}
            }
        }
        found
    };
    if list.is_empty() {
        bail!(
            "--init-from {}: the file holds no tensors (expected a state dict of named tensors)",
            path.display()
        );
    }
    let strip = list.iter().all(|(n, _)| n.starts_with("module."));
    Ok(list
        .into_iter()
        .map(|(n, t)| {
            let n = if strip {
                n["module.".len()..].to_string()
            } else {
                n
            };
            (n, t)
        })
        .collect())
}

/// Loads the tensors of `path` into `model` (its parameters and BatchNorm buffers, by name):
/// every one the model has must be in the file with its shape, except the head (the model's
/// last parameters) when only its class count differs; the file may hold nothing else but
/// `num_batches_tracked` counters. Nothing changes on an error.
pub fn init_from(model: &dyn Model, path: &Path) -> Result<InitReport> {
    let mut file = read_tensors(path)?;
    file.retain(|n, _| !n.ends_with("num_batches_tracked"));
    let shown = path.display();
    let params = model.params();
    let buffers = model.buffers()?;
    // The head: the last layer's parameters (`fc.weight`, `fc.bias`).
    let head_layer = params
        .last()
        .and_then(|p| p.name.rsplit_once('.'))
        .map(|(l, _)| l.to_string());
    let is_head = |n: &str| {
        head_layer
            .as_deref()
            .is_some_and(|h| n.rsplit_once('.').is_some_and(|(l, _)| l == h))
    };
    let mut head_replaced: Option<(Vec<String>, Vec<usize>)> = None;
    let mut new_params: Vec<(usize, Tensor)> = Vec::new();
    let mut expected: Vec<(String, Vec<usize>)> = params
        .iter()
        .map(|p| (p.name.clone(), p.var.dims().to_vec()))
        .collect();
    expected.extend(
        buffers
            .iter()
            .map(|b| (b.name.clone(), b.tensor.dims().to_vec())),
    );
    for (name, want) in &expected {
        let Some(t) = file.get(name) else {
            let have: Vec<&str> = file.keys().take(6).map(String::as_str).collect();
            bail!(
                "--init-from {shown}: no tensor `{name}` (the model's {} {:?}); the file holds \
                 {} tensors ({}, ...): is it a torchvision state dict of this --model?",
                if is_head(name) { "head" } else { "tensor" },
                want,
                file.len(),
                have.join(", ")
            );
        };
        let got = t.dims().to_vec();
        if &got != want {
            let head_count_differs = is_head(name)
                && got.len() == want.len()
                && got.get(1..) == want.get(1..)
                && got.first() != want.first();
            if head_count_differs {
                let e = head_replaced.get_or_insert_with(|| (Vec::new(), got.clone()));
                e.0.push(name.clone());
                continue;
            }
            bail!(
                "--init-from {shown}: tensor `{name}` has shape {got:?} in the file, the model's \
                 is {want:?} (check --model, --width and --stem)"
            );
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(extra) = file.keys().find(|n| !known.contains(n.as_str())) {
        bail!(
            "--init-from {shown}: the file's tensor `{extra}` has no place in the model (is it \
             a deeper or different network than --model?)"
        );
    }
    // All checked: convert, then write.
    for (i, p) in params.iter().enumerate() {
        if head_replaced
            .as_ref()
            .is_some_and(|h| h.0.contains(&p.name))
        {
            continue;
        }
        let t = file
            .get(&p.name)
            .with_context(|| format!("--init-from {shown}: no tensor `{}`", p.name))?
            .to_dtype(DType::F32)?
            .to_device(p.var.device())?;
        new_params.push((i, t));
    }
    let new_buffers: Vec<Buffer> = buffers
        .iter()
        .map(|b| -> Result<Buffer> {
            Ok(Buffer {
                name: b.name.clone(),
                tensor: file
                    .get(&b.name)
                    .with_context(|| format!("--init-from {shown}: no tensor `{}`", b.name))?
                    .to_dtype(DType::F32)?
                    .to_device(b.tensor.device())?,
            })
        })
        .collect::<Result<_>>()?;
    model.set_buffers(&new_buffers)?;
    let loaded = new_params.len() + new_buffers.len();
    for (i, t) in new_params {
        params[i].var.set(&t)?;
    }
    Ok(InitReport {
        loaded,
        head_replaced,
    })
}
