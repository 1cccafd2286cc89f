//! `rest.load` and `rest.Model`: a trained model loaded by `rest::infer::load` (a run
//! directory's `best.safetensors` or a sparse export), classifying uint8 NumPy images in
//! batches with the GIL released (`rest::infer::predict::probabilities`, what `rest predict`
//! runs on decoded files) and evaluated on a `Dataset` (`rest::infer::evaluate`, what `rest
//! eval` runs).

use crate::dataset::Dataset;
use crate::errors::{self, value};
use numpy::ndarray::{Array1, Array2};
use numpy::{
    IntoPyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use rest::infer::LoadedModel;
use std::path::{Path, PathBuf};

/// A trained model, ready for inference (from `rest.load` or `Run.load`).
#[pyclass(module = "rest", frozen)]
pub struct Model {
    m: LoadedModel,
}

impl Model {
    /// Loads `path`: a run directory (its `best.safetensors`), a `best.safetensors`, or a file
    /// written by `rest export`.
    pub fn open(py: Python<'_>, path: &Path) -> PyResult<Self> {
        let file = if path.is_dir() {
            path.join("best.safetensors")
        } else {
            path.to_path_buf()
        };
        if !file.exists() {
            let msg = if path.is_dir() {
                format!(
                    "{}: no best.safetensors in this directory; give a run directory (its \
                     training finished an epoch) or a file written by `rest export`",
                    path.display()
                )
            } else {
                format!("{}: no such file or directory", path.display())
            };
            return Err(pyo3::exceptions::PyFileNotFoundError::new_err(msg));
        }
        let m = py
            .detach(|| rest::infer::load(&file))
            .map_err(errors::value_error)?;
        Ok(Self { m })
    }

    /// `images` checked against the model's input (uint8 `[N, H, W, C]`), as the CHW `f32`
    /// values in [0, 1] of each image, and `N`.
    fn images(&self, images: &Bound<'_, PyAny>) -> PyResult<(Vec<u8>, usize)> {
        let (c, h, w) = self.m.input;
        let arr = images.cast::<PyUntypedArray>().map_err(|_| {
            value(format!(
                "images must be a NumPy uint8 array of shape [N, {h}, {w}, {c}], got {}",
                images
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        let shape = arr.shape().to_vec();
        let ok_dtype = arr.dtype().is_equiv_to(&numpy::dtype::<u8>(images.py()));
        if !ok_dtype || shape.len() != 4 || shape[1..] != [h, w, c] {
            return Err(value(format!(
                "images must be a uint8 array of shape [N, {h}, {w}, {c}] (the model's input), \
                 got {} with shape {shape:?}",
                arr.dtype()
            )));
        }
        let arr = arr.clone().into_any().cast_into::<PyArrayDyn<u8>>()?;
        let ro = arr.readonly();
        let pixels = match ro.as_slice() {
            Ok(s) => s.to_vec(),
            Err(_) => ro.as_array().iter().copied().collect(),
        };
        Ok((pixels, shape[0]))
    }

    /// Softmax probabilities `[N, classes]` of NHWC `u8` images, `batch_size` at a time.
    fn probabilities(
        &self,
        py: Python<'_>,
        pixels: &[u8],
        n: usize,
        batch_size: usize,
    ) -> PyResult<Vec<f32>> {
        if batch_size == 0 {
            return Err(value("batch_size must be at least 1"));
        }
        let (c, h, w) = self.m.input;
        let hw = h * w;
        let per = hw * c;
        let m = &self.m;
        py.detach(|| {
            let mut out = Vec::with_capacity(n * m.classes);
            for chunk in pixels.chunks(batch_size * per) {
                let k = chunk.len() / per;
                // NHWC u8 -> CHW f32 in [0, 1], as `rest predict` reads image files.
                let mut buf = vec![0f32; chunk.len()];
                for (i, img) in chunk.chunks_exact(per).enumerate() {
                    let dst = &mut buf[i * per..(i + 1) * per];
                    for p in 0..hw {
                        for ch in 0..c {
                            dst[ch * hw + p] = img[p * c + ch] as f32 * (1.0 / 255.0);
                        }
                    }
                }
                for row in rest::infer::predict::probabilities(m, buf, k)? {
                    out.extend(row);
                }
            }
            Ok(out)
        })
        .map_err(errors::run_error)
    }
}

#[pymethods]
impl Model {
    /// Class probabilities (softmax) of `images`, uint8 `[N, H, W, C]` as the model was
    /// trained on (normalised as the run was); returns float32 `[N, classes]`.
    #[pyo3(signature = (images, *, batch_size=256))]
    fn predict_proba<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (pixels, n) = self.images(images)?;
        let probs = self.probabilities(py, &pixels, n, batch_size)?;
        let arr = Array2::from_shape_vec((n, self.m.classes), probs)
            .map_err(|e| value(format!("internal: {e}")))?;
        Ok(arr.into_pyarray(py).into_any())
    }

    /// The most probable class of each image (ties: the lowest class, as `rest predict`);
    /// returns int64 `[N]`.
    #[pyo3(signature = (images, *, batch_size=256))]
    fn predict<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (pixels, n) = self.images(images)?;
        let probs = self.probabilities(py, &pixels, n, batch_size)?;
        let k = self.m.classes.max(1);
        let classes = Array1::from_iter(probs.chunks(k).map(|row| {
            let mut best = 0;
            for (j, &p) in row.iter().enumerate() {
                if p > row[best] {
                    best = j;
                }
            }
            best as i64
        }));
        Ok(classes.into_pyarray(py).into_any())
    }

    /// Evaluates the model on the validation and test splits of `dataset`, as `rest eval`:
    /// returns its report (`eval.json`) as a dict, metrics as fractions.
    fn eval<'py>(&self, py: Python<'py>, dataset: &Dataset) -> PyResult<Bound<'py, PyAny>> {
        let ds = dataset.load(py)?;
        let report = py
            .detach(|| rest::infer::evaluate(&self.m, &ds))
            .map_err(errors::value_error)?;
        let text = serde_json::to_string(&report).map_err(|e| value(format!("internal: {e}")))?;
        py.import("json")?.call_method1("loads", (text,))
    }

    /// The input shape `(H, W, C)` the model takes.
    #[getter]
    fn image_shape(&self) -> (usize, usize, usize) {
        let (c, h, w) = self.m.input;
        (h, w, c)
    }

    /// Number of classes.
    #[getter]
    fn num_classes(&self) -> usize {
        self.m.classes
    }

    /// Active weights over all maskable weights.
    #[getter]
    fn density(&self) -> f64 {
        self.m.density()
    }

    /// The run's configuration (`config.toml`) as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let text =
            serde_json::to_string(&self.m.config).map_err(|e| value(format!("internal: {e}")))?;
        py.import("json")?.call_method1("loads", (text,))
    }

    fn __repr__(&self) -> String {
        format!(
            "Model({}, {} {}, density {:.4})",
            self.m.path.display(),
            self.m.config.model.kind.as_str(),
            if self.m.exported {
                "sparse export"
            } else {
                "checkpoint"
            },
            self.m.density()
        )
    }
}

/// Loads a trained model: a run directory, its `best.safetensors`, or a sparse export
/// (`rest export`).
#[pyfunction]
pub fn load(py: Python<'_>, path: PathBuf) -> PyResult<Model> {
    Model::open(py, &path)
}
