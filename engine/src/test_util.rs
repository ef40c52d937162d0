//! Helpers the unit tests of several modules share.

use candle_core::{DType, Tensor};

/// Every value of `t`, widened to f32 (exactly, for f16 and bf16) and flattened: comparing two
/// of these compares the tensors' values bit for bit (NaN aside).
pub(crate) fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}
