
pub mod sampling;
pub use sampling::{Sampler, SamplingParams};
