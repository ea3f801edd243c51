//! The KV cache: keys and values of every layer preallocated for the whole generation (no per-token
//! concatenation), plus which slots hold real tokens. Rows of a batch stay aligned: slot `i` of every row
//! was written by the same forward call, and left padding is simply a slot marked invalid.
//! Rows can be reordered or replicated by index, which is how guided search keeps the prefixes it picks.

use tch::{Device, Kind, Tensor};

pub struct KvCache {
    /// Per layer, [B, kv_heads, capacity, head_dim].
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// [B, capacity] bool: the slot holds a real token (not padding).
    valid: Tensor,
    len: i64,
    capacity: i64,
}

/// Shape of one layer's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    pub layers: usize,
    pub kv_heads: i64,
    pub head_dim: i64,
}

impl KvCache {
    pub fn new(shape: CacheShape, batch: i64, capacity: i64, kind: Kind, device: Device) -> Self {
        let alloc = || Tensor::zeros([batch, shape.kv_heads, capacity, shape.head_dim], (kind, device));
        Self {
            keys: (0..shape.layers).map(|_| alloc()).collect(),
            values: (0..shape.layers).map(|_| alloc()).collect(),
            valid: Tensor::zeros([batch, capacity], (Kind::Bool, device)),
            len: 0,
            capacity,
        }
    }

    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    pub fn batch(&self) -> i64 {
        self.valid.size()[0]
    }

    /// Marks the next `new` slots with `valid_new` [B, new] and returns the validity of all slots so far.
    /// Called once per forward, before the layers write their keys and values.
    pub fn push_valid(&mut self, valid_new: &Tensor) -> Tensor {
        let new = valid_new.size()[1];
        assert!(self.len + new <= self.capacity, "KV cache overflow: {} + {new} > {}", self.len, self.capacity);
        self.valid.narrow(1, self.len, new).copy_(valid_new);
        self.valid.narrow(1, 0, self.len + new)
    }

    /// Writes layer `layer`'s new keys/values [B, kv_heads, new, D] at the pending slots and returns the
    /// keys and values of every slot up to and including them. `len` advances in `advance`.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let new = k.size()[2];
        self.keys[layer].narrow(2, self.len, new).copy_(k);
        self.values[layer].narrow(2, self.len, new).copy_(v);
        (self.keys[layer].narrow(2, 0, self.len + new), self.values[layer].narrow(2, 0, self.len + new))
    }

    /// Commits `new` slots after every layer has appended.
    pub fn advance(&mut self, new: i64) {
        self.len += new;
    }

    /// Forgets every slot from `len` on (they are overwritten by the next forward): undoes a look-ahead.
    pub fn rewind(&mut self, len: i64) {
        assert!(len <= self.len, "rewinding the KV cache forward: {len} > {}", self.len);
        self.len = len;
    }

    /// Keeps row `index[i]` as new row `i` (rows may repeat or be dropped): one gather per layer.
    pub fn reorder(&mut self, index: &Tensor) {
        let index = index.to_device(self.valid.device());
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *t = t.index_select(0, &index);
        }
        self.valid = self.valid.index_select(0, &index);
    }
}
