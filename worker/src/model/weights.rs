//! HF checkpoint weights: one `model.safetensors`, or shards listed by `model.safetensors.index.json`.
//! Tensors keep their HF names, so building an architecture is a lookup; every lookup checks the shape
//! and a failure names the tensor and the file it came from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// How the dense layers built from a checkpoint keep their matrices (`model::Linear`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// HF's [out, in]: the checkpoint's own tensor, which is what training updates and saves.
    Checkpoint,
    /// A contiguous [in, out] copy, for inference on CPU: libtorch's CPU GEMM ran x·W 4–17% faster than x·Wᵀ
    /// on SmolLM2's decode shapes in session 3's run of `cargo run --release -p iro-worker --example gemm_probe`
    /// (0.87–1.13× from 1 to 128 rows in session 4's), and a whole decode step 3% faster at 8 rows and 10% at 32
    /// (`--example decode_profile`). Most decode shapes now go through MKL's packed copies (`model::packed`).
    Transposed,
}

impl WeightLayout {
    /// Transposed on CPU; on CUDA the checkpoint's layout (cuBLAS takes either, and nothing was measured there).
    pub fn for_inference(device: Device) -> Self {
        if device == Device::Cpu { Self::Transposed } else { Self::Checkpoint }
    }
}

pub struct Weights {
    dir: PathBuf,
    layout: WeightLayout,
    /// name → (tensor already on the target device and dtype, file it came from)
    tensors: HashMap<String, (Tensor, PathBuf)>,
    files: Vec<PathBuf>,
}

impl Weights {
    /// Loads every tensor of the checkpoint in `dir`, cast to `kind` (floating tensors only) on `device`.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let files = weight_files(dir)?;
        let mut tensors = HashMap::new();
        for file in &files {
            let loaded = Tensor::read_safetensors(file).map_err(|e| Error::Checkpoint {
                path: file.clone(),
                message: format!("cannot read safetensors: {e}"),
            })?;
            for (name, t) in loaded {
                let t = if t.is_floating_point() { t.to_kind(kind) } else { t };
                tensors.insert(name, (t.to_device(device), file.clone()));
            }
        }
        Ok(Self { dir: dir.to_owned(), layout: WeightLayout::for_inference(device), tensors, files })
    }

    /// Layers built from these weights use the checkpoint's own tensors, so gradients reach them.
    pub fn trainable(mut self) -> Self {
        self.layout = WeightLayout::Checkpoint;
        self
    }

    pub fn layout(&self) -> WeightLayout {
        self.layout
    }

    /// From tensors already in memory (tests, freshly initialised heads).
    pub fn from_tensors(dir: &Path, tensors: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        let origin = dir.join("<memory>");
        let tensors = tensors.into_iter().map(|(n, t)| (n, (t, origin.clone()))).collect();
        Self { dir: dir.to_owned(), layout: WeightLayout::Checkpoint, tensors, files: vec![origin] }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let (t, file) = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.dir.clone(),
            name: name.to_owned(),
            files: self.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "),
        })?;
        if t.size() != shape {
            return Err(Error::TensorShape {
                file: file.clone(),
                name: name.to_owned(),
                expected: shape.to_vec(),
                actual: t.size(),
            });
        }
        Ok(t.shallow_clone())
    }

    /// Like `get`, but `None` when the tensor is absent (optional biases, untied heads).
    pub fn get_opt(&self, name: &str, shape: &[i64]) -> Result<Option<Tensor>> {
        if self.contains(name) { self.get(name, shape).map(Some) } else { Ok(None) }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Every tensor with its HF name (shallow handles: same storage), e.g. to mark them trainable.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(n, (t, _))| (n.as_str(), t))
    }
}

/// The weight files of a checkpoint folder: the sharded index wins over a single file when both exist.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(Error::io(&index))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Checkpoint { path: index.clone(), message: format!("malformed JSON: {e}") })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Checkpoint { path: index.clone(), message: "no `weight_map` object".into() })?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| Error::Checkpoint {
                path: index.clone(),
                message: format!("weight_map entry for `{tensor}` is not a file name"),
            })?;
            if file.contains('/') || file.contains("..") {
                return Err(Error::Checkpoint {
                    path: index.clone(),
                    message: format!("weight_map file `{file}` must be a plain file name"),
                });
            }
            let path = dir.join(file);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        for f in &files {
            if !f.exists() {
                return Err(Error::Checkpoint {
                    path: f.clone(),
                    message: "shard listed in the index is missing".into(),
                });
            }
        }
        files.sort();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::Checkpoint {
        path: dir.to_owned(),
        message: "no model.safetensors or model.safetensors.index.json".into(),
    })
}
