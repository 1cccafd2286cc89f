//! Evaluation of a model on a whole split in inference mode: predictions, mean loss and the
//! group metrics (`super::metrics`), through the run's evaluation transform.

use super::metrics::{group_metrics_in, GroupMetrics};
use crate::data::transform::{BatchLayout, Transform};
use crate::data::Split;
use crate::models::Model;
use anyhow::Result;
use candle_core::{Device, Tensor, D};

/// Gathers a batch into an `[N, C, H, W]` tensor laid out as `layout`, through the
/// non-random part of `tf` (evaluation). The tensor takes the gathered buffer over (a copy
/// would cost as much as the gather).
pub(crate) fn batch_tensor(
    split: &Split,
    idx: &[usize],
    tf: &Transform,
    layout: BatchLayout,
    dev: &Device,
) -> Result<Tensor> {
    let mut buf = Vec::new();
    tf.gather_as(split, idx, None, layout, &mut buf)?;
    layout.tensor_from_vec(
        buf,
        idx.len(),
        (split.channels, split.height, split.width),
        dev,
    )
}

/// Images per evaluation batch of images up to 32x32x3 bytes.
const EVAL_BATCH: usize = 1000;

/// Images per evaluation batch: [`EVAL_BATCH`] up to 32x32x3 bytes per image, fewer for larger
/// images (62 at 128x128x3, 20 at 224x224x3), so that a batch's input and activations do not
/// grow with the image size.
pub(crate) fn eval_batch(image_bytes: usize) -> usize {
    (EVAL_BATCH * 3072 / image_bytes.max(1)).clamp(1, EVAL_BATCH)
}

/// Evaluates `model` on a whole split in inference mode, with the run's evaluation
/// transform (`TrainConfig::eval_transform`: its normalisation, no augmentation).
pub fn evaluate(
    model: &dyn Model,
    split: &Split,
    tf: &Transform,
    dev: &Device,
) -> Result<GroupMetrics> {
    let (preds, loss) = predict(model, split, tf, dev)?;
    Ok(group_metrics_in(
        &preds,
        &split.labels,
        &split.bias,
        loss,
        split.groups.as_deref(),
    ))
}

/// Predicted classes of every sample of a split (inference mode, the non-random part of
/// `tf`) and the mean loss.
pub fn predict(
    model: &dyn Model,
    split: &Split,
    tf: &Transform,
    dev: &Device,
) -> Result<(Vec<u32>, f64)> {
    // Training's large blocks kept for reuse (`crate::alloc`) are not needed while evaluating.
    crate::alloc::release_cached();
    let mut preds = Vec::with_capacity(split.len());
    let mut loss_sum = 0.0f64;
    let all: Vec<usize> = (0..split.len()).collect();
    // No weight changes until the split is done: sparse layers read their values once.
    let _frozen = crate::kernels::freeze_weights();
    for chunk in all.chunks(eval_batch(split.image_size())) {
        let x = batch_tensor(split, chunk, tf, model.input_layout(), dev)?;
        // No graph: the batch's activations are freed as the pass goes.
        let _ng = crate::kernels::tape::no_grad();
        let logits = model.forward(&x, false)?;
        let y: Vec<u32> = chunk.iter().map(|&i| split.labels[i]).collect();
        let yt = Tensor::new(y.as_slice(), dev)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let nll = logp.gather(&yt.unsqueeze(1)?, 1)?.neg()?;
        loss_sum += nll.sum_all()?.to_scalar::<f32>()? as f64;
        preds.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    Ok((preds, loss_sum / split.len().max(1) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluation_batches_shrink_with_the_image_size_only_above_32px() {
        // Up to 32x32x3 the batches (and so every result) are those of before.
        for bytes in [1, 28 * 28 * 3, 32 * 32 * 3] {
            assert_eq!(eval_batch(bytes), EVAL_BATCH);
        }
        assert_eq!(eval_batch(128 * 128 * 3), 62);
        assert_eq!(eval_batch(224 * 224 * 3), 20);
        assert_eq!(eval_batch(4096 * 4096 * 3), 1);
        assert_eq!(eval_batch(0), EVAL_BATCH);
    }
}
