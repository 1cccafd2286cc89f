//! The masked layers of a sparse run, as one piece of state: the sparse engine (masks, ITOP
//! masks, prune/regrow), the model's maskable weights with their 0/1 mask tensors, which of
//! them run on the sparse kernels, and where mask updates run (host or device). Training and
//! `rest bench` build it the same way; the loop asks it before a step whether the step updates
//! the masks (the sparse layers then produce the dense gradient) and hands it the step's
//! gradients afterwards.

use super::optim::Sgd;
use crate::kernels::KernelMode;
use crate::kernels::SparseWeight;
use crate::nn::Param;
use crate::sparse::device::{self as sparse_device, LayerTensors, UpdatePlace};
use crate::sparse::flops::FlopsTable;
use crate::sparse::{LayerShape, SparseConfig, SparseEngine, UpdateInputs, UpdateStats};
use crate::train::TrainConfig;
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};

/// The masked-layer state of a sparse run (see the module doc).
pub struct MaskedLayers {
    pub engine: SparseEngine,
    /// The model's maskable weights (`Model::weights`), in the engine's layer order.
    pub weights: Vec<Param>,
    /// Per weight, its 0/1 mask as a tensor of the weight's shape on the run's device.
    masks: Vec<Tensor>,
    /// Per weight, whether it runs on the sparse kernels.
    on_sparse: Vec<bool>,
    /// Per weight, its index among the optimizer's parameters (`usize::MAX` if not held).
    weight_index: Vec<usize>,
    /// The kernel choice, `Dense` off the CPU (rest's sparse kernels are CPU code: on a GPU
    /// every layer runs dense with its mask).
    kernels: KernelMode,
    /// Mask updates run on the device (`sparse::device`) rather than on host copies.
    on_device: bool,
    dev: Device,
}

/// The engine's layer shapes for `weights`.
pub fn layer_shapes(weights: &[Param]) -> Vec<LayerShape> {
    weights
        .iter()
        .map(|p| LayerShape::new(p.name.clone(), p.var.dims()))
        .collect()
}

impl MaskedLayers {
    /// Takes over `engine` (its initial masks drawn for `weights`): multiplies the masks into
    /// the weights, puts each layer on the sparse or the dense kernel by `kernels`, and picks
    /// where mask updates run on `dev`.
    pub fn new(
        engine: SparseEngine,
        weights: Vec<Param>,
        opt: &Sgd,
        kernels: KernelMode,
        dev: &Device,
    ) -> Result<Self> {
        let kernels = match crate::kernels::Backend::of(dev) {
            crate::kernels::Backend::Generic => KernelMode::Dense,
            crate::kernels::Backend::Cpu => kernels,
        };
        let masks = mask_tensors(&engine, &weights, dev)?;
        for (p, mk) in weights.iter().zip(&masks) {
            p.var.set(&p.var.as_tensor().mul(mk)?)?;
        }
        let on_sparse = install_sparse_kernels(&engine, &weights, kernels)?;
        // Where mask updates run: on the device off the CPU (`REST_MASK_UPDATE` overrides).
        let on_device = if sparse_device::update_place(dev)? == UpdatePlace::Device {
            match sparse_device::host_only_reason(engine.options()) {
                Some(why) => {
                    tracing::info!("mask updates run on the host: {why} has no device version");
                    false
                }
                None => {
                    tracing::info!("mask updates run on the device");
                    true
                }
            }
        } else {
            false
        };
        Ok(Self {
            weight_index: weight_indices(opt, &weights),
            engine,
            weights,
            masks,
            on_sparse,
            kernels,
            on_device,
            dev: dev.clone(),
        })
    }

    /// Per weight: its name and whether it runs on the sparse kernels.
    pub fn kernel_choice(&self) -> impl Iterator<Item = (&str, bool)> {
        self.weights
            .iter()
            .zip(&self.on_sparse)
            .map(|(p, s)| (p.name.as_str(), *s))
    }

    /// Called before the forward pass of step `step` (1-based): whether it updates the masks;
    /// if so, the sparse layers are asked for the dense weight gradient the update ranks.
    pub fn begin_step(&self, step: usize) -> bool {
        let update = self.engine.is_update_step(step);
        if update {
            set_dense_grad(&self.weights, true);
        }
        update
    }

    /// Called after the optimizer step of step `step` with its gradients: on a mask-update
    /// step (`update`, from `begin_step`) prunes and regrows every layer (on the device, or
    /// on host copies of the weights, dense gradients and momentum), rebuilds the sparse
    /// kernels' patterns, then multiplies the masks into the weights and momentum.
    pub fn end_step(
        &mut self,
        step: usize,
        update: bool,
        grads: &GradStore,
        opt: &mut Sgd,
    ) -> Result<Option<UpdateStats>> {
        let stats = if update {
            Some(self.update(step, grads, opt)?)
        } else {
            None
        };
        self.apply(update, opt)?;
        Ok(stats)
    }

    fn update(&mut self, step: usize, grads: &GradStore, opt: &mut Sgd) -> Result<UpdateStats> {
        let (weights, dev, wi) = (&self.weights, &self.dev, &self.weight_index);
        let on_device = if self.on_device {
            let momentum: Vec<Option<Tensor>> = (0..weights.len())
                .map(|l| {
                    if wi[l] == usize::MAX {
                        Ok(None)
                    } else {
                        opt.momentum_buffer(wi[l])
                    }
                })
                .collect::<Result<_>>()?;
            let views: Vec<LayerTensors> = weights
                .iter()
                .zip(&self.masks)
                .enumerate()
                .map(|(l, (p, mask))| LayerTensors {
                    weight: p.var.as_tensor(),
                    grad: grads.get(p.var.as_tensor()),
                    momentum: momentum[l].as_ref(),
                    mask,
                })
                .collect();
            sparse_device::update_on_device(&mut self.engine, step, &views)?
        } else {
            None
        };
        // Without a device version (or on a non-finite value, which the host path reports),
        // the update runs on host copies.
        let stats = if let Some(u) = on_device {
            for (l, (p, (w, m))) in weights
                .iter()
                .zip(u.weights.into_iter().zip(u.momentum))
                .enumerate()
            {
                if let Some(w) = w {
                    p.var.set(&w)?;
                }
                if let Some(m) = m {
                    opt.set_momentum_buffer(wi[l], m)?;
                }
            }
            self.masks = u.masks;
            u.stats
        } else {
            let mut w_host: Vec<Vec<f32>> = weights
                .iter()
                .map(|p| to_host(p.var.as_tensor()))
                .collect::<Result<_>>()?;
            let g_host: Vec<Vec<f32>> = weights
                .iter()
                .map(|p| host_or_zeros(grads.get(p.var.as_tensor()), p))
                .collect::<Result<_>>()?;
            // Momentum before masking: at inactive positions it holds this step's dense
            // gradient (what `--growth momentum` ranks); the engine zeroes the dropped and
            // regrown positions, so a regrown weight starts from zero momentum.
            let mut m_host: Vec<Vec<f32>> = weights
                .iter()
                .enumerate()
                .map(|(l, p)| host_or_zeros(opt.momentum_buffer(wi[l])?.as_ref(), p))
                .collect::<Result<_>>()?;
            let stats = self.engine.update_with(
                step,
                UpdateInputs {
                    weights: &mut w_host,
                    grads: &g_host,
                    momentum: Some(&mut m_host),
                },
            )?;
            for (l, (p, (w, m))) in weights
                .iter()
                .zip(w_host.into_iter().zip(m_host))
                .enumerate()
            {
                p.var.set(&Tensor::from_vec(w, p.var.shape(), dev)?)?;
                if opt.momentum_buffer(wi[l])?.is_some() {
                    opt.set_momentum_buffer(wi[l], Tensor::from_vec(m, p.var.shape(), dev)?)?;
                }
            }
            self.masks = mask_tensors(&self.engine, weights, dev)?;
            stats
        };
        self.on_sparse = install_sparse_kernels(&self.engine, weights, self.kernels)?;
        Ok(stats)
    }

    /// After an optimizer step, multiplies each mask into its weight and momentum buffer.
    /// Layers on sparse kernels get zero gradient outside their pattern, so their masked
    /// weights and momentum stay zero by construction and are skipped, except on mask-update
    /// steps (dense gradient).
    pub fn apply(&self, update_step: bool, opt: &mut Sgd) -> Result<()> {
        for (l, (p, mk)) in self.weights.iter().zip(&self.masks).enumerate() {
            if self.on_sparse[l] && !update_step {
                continue;
            }
            p.var.set(&p.var.as_tensor().mul(mk)?)?;
            if self.weight_index[l] != usize::MAX {
                opt.mask_momentum(self.weight_index[l], mk)?;
            }
        }
        Ok(())
    }

    /// Replaces the masks (a checkpoint's or a snapshot's) and, if given, the ITOP masks;
    /// the sparse kernels take the new patterns.
    pub fn set_masks(
        &mut self,
        masks: Vec<Vec<bool>>,
        fired: Option<Vec<Vec<bool>>>,
    ) -> Result<()> {
        self.engine.set_masks_from(masks)?;
        if let Some(f) = fired {
            self.engine.set_fired_masks(f)?;
        }
        self.masks = mask_tensors(&self.engine, &self.weights, &self.dev)?;
        self.on_sparse = install_sparse_kernels(&self.engine, &self.weights, self.kernels)?;
        Ok(())
    }

    /// `(weight name, mask)` per layer, for checkpoints.
    pub fn named_masks(&self) -> Vec<(String, Vec<bool>)> {
        self.names().zip(self.engine.masks_bool()).collect()
    }

    /// `(weight name, ITOP mask)` per layer, for checkpoints.
    pub fn named_fired(&self) -> Vec<(String, Vec<bool>)> {
        self.names()
            .zip(self.engine.fired_masks().to_vec())
            .collect()
    }

    fn names(&self) -> impl Iterator<Item = String> + '_ {
        self.weights.iter().map(|p| p.name.clone())
    }
}

/// A tensor's values as a flat host vector.
pub(crate) fn to_host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// `t` (a gradient or momentum buffer of `p`) on the host, or zeros when there is none yet.
pub(crate) fn host_or_zeros(t: Option<&Tensor>, p: &Param) -> Result<Vec<f32>> {
    match t {
        Some(t) => to_host(t),
        None => Ok(vec![0.0; p.var.elem_count()]),
    }
}

/// Masks as `f32` 0/1 tensors on `dev`, one per maskable weight.
fn mask_tensors(engine: &SparseEngine, weights: &[Param], dev: &Device) -> Result<Vec<Tensor>> {
    weights
        .iter()
        .enumerate()
        .map(|(l, p)| Ok(Tensor::from_slice(engine.mask(l), p.var.shape(), dev)?))
        .collect()
}

/// Puts the compact form of each masked weight into its layer's sparse slot when the kernel
/// mode picks the sparse kernel for that layer's density (else clears the slot). Returns, per
/// weight, whether it runs sparse.
fn install_sparse_kernels(
    engine: &SparseEngine,
    weights: &[Param],
    mode: KernelMode,
) -> Result<Vec<bool>> {
    let densities = engine.densities();
    let mut on = Vec::with_capacity(weights.len());
    for (l, p) in weights.iter().enumerate() {
        let Some(slot) = &p.slot else {
            on.push(false);
            continue;
        };
        let sparse = mode.sparse_for(densities[l], p.var.rank() == 4);
        let new = if sparse {
            let rows = p.var.dims()[0];
            let cols = p.var.elem_count() / rows.max(1);
            let w = to_host(p.var.as_tensor())?;
            let sw = SparseWeight::new(&w, engine.mask(l), rows, cols)?;
            // The layer hands our SGD its gradient compactly (`Sgd::step`).
            sw.set_compact_grad(true);
            Some(sw)
        } else {
            None
        };
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = new;
        on.push(sparse);
    }
    Ok(on)
}

/// Asks every installed sparse weight for (or stops asking for) the dense gradient.
fn set_dense_grad(weights: &[Param], on: bool) {
    for p in weights {
        if let Some(sw) = p.slot.as_ref().and_then(crate::nn::slot_weight) {
            sw.set_dense_grad(on);
        }
    }
}

/// For each maskable weight, its index among the optimizer's parameters (`usize::MAX` if the
/// optimizer does not hold it).
fn weight_indices(opt: &Sgd, weights: &[Param]) -> Vec<usize> {
    weights
        .iter()
        .map(|w| {
            opt.params()
                .iter()
                .position(|p| p.name == w.name)
                .unwrap_or(usize::MAX)
        })
        .collect()
}

/// Inference FLOPs per sample of `model` with the engine's current masks (dense if none).
pub fn flops_table(
    model: &dyn crate::models::Model,
    input: (usize, usize, usize),
    engine: Option<&SparseEngine>,
) -> FlopsTable {
    let weights = model.weights();
    FlopsTable::new(&model.layer_flops(input), |name| {
        let l = weights.iter().position(|p| p.name == name)?;
        let n = weights[l].var.elem_count();
        Some((n, engine.map(|e| e.active_count(l)).unwrap_or(n)))
    })
}

/// Builds the engine for `weights` at `cfg.sparse.density` over `total_steps` with uniform/ERK-style
/// initial masks (no score-based init), for `rest bench`.
pub fn engine_for_bench(
    weights: &[Param],
    cfg: &TrainConfig,
    density: f64,
    total_steps: usize,
) -> Result<SparseEngine> {
    let scfg = SparseConfig {
        density,
        ..cfg.sparse.engine_config(total_steps)
    };
    SparseEngine::new(
        layer_shapes(weights),
        scfg,
        &mut crate::util::rng(cfg.optim.seed, 2),
    )
    .with_context(|| format!("building the masks for density {density}"))
}
