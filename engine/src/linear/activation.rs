//! The activation a linear layer's outputs go through, chosen per call.

use candle_core::Tensor;

use crate::error::Result;

/// What follows a product: nothing, or GPT-J's `gelu_new` (the tanh approximation,
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`). The packed kernels apply it while the
/// outputs are in cache; the other backends apply it afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// The product itself.
    Identity,
    /// transformers' `gelu_new` (`NewGELUActivation`).
    GeluNew,
}

impl Activation {
    /// Applies the activation to `x` as a separate op (the unfused path).
    pub(crate) fn apply(self, x: Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Identity => x,
            // candle's `gelu` is the tanh approximation: `gelu_new`.
            Self::GeluNew => x.gelu()?,
        })
    }
}
