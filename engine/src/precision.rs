//! Weight precision, the seed's "Precision" parameter plus 8-bit weights.

use std::fmt;
use std::str::FromStr;

use candle_core::DType;

/// How weights are stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// The checkpoint's own dtype.
    #[default]
    Native,
    /// 32-bit floats.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16. On CPU, candle has no bf16 matmul kernel and widens to f32 on every call: slow.
    Bf16,
    /// 8-bit block-quantized weights (ggml Q8_0) with f32 activations: the fastest choice on
    /// CPU, where decoding is bound by memory bandwidth.
    Q8_0,
}

impl Precision {
    /// The dtype activations and the KV cache use under this precision.
    pub fn activation_dtype(self, native: DType) -> DType {
        match self {
            Self::Native => match native {
                DType::F16 | DType::BF16 => native,
                _ => DType::F32,
            },
            Self::F32 | Self::Q8_0 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "native" => Self::Native,
            "f32" | "fp32" | "float32" => Self::F32,
            "f16" | "fp16" | "float16" => Self::F16,
            "bf16" | "bfloat16" => Self::Bf16,
            "q8_0" | "q8" | "int8" => Self::Q8_0,
            other => {
                return Err(format!(
                "unknown precision `{other}`: use native, f32, f16 (fp16), bf16 (bfloat16) or q8_0"
            ))
            }
        })
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
        })
    }
}

/// The KV cache's element type: vLLM's `--kv-cache-dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// The activation dtype, except under q8_0, where f16 halves the bytes every decode step
    /// reads from the cache (at batch 64 and a few hundred tokens of context they outweigh
    /// the q8_0 weights several times) for an error well inside q8_0's own.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl KvCacheDtype {
    /// The dtype for a model under `precision` whose activations are `act`.
    pub fn resolve(self, precision: Precision, act: DType) -> DType {
        match self {
            Self::Auto if precision == Precision::Q8_0 => DType::F16,
            Self::Auto => act,
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

impl FromStr for KvCacheDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "f32" | "fp32" | "float32" => Self::F32,
            "f16" | "fp16" | "float16" => Self::F16,
            "bf16" | "bfloat16" => Self::Bf16,
            other => {
                return Err(format!(
                    "unknown KV cache dtype `{other}`: use auto, f32, f16 (fp16) or bf16 (bfloat16)"
                ))
            }
        })
    }
}

impl fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_dtype_resolves_and_parses() {
        assert_eq!(
            KvCacheDtype::Auto.resolve(Precision::Q8_0, DType::F32),
            DType::F16
        );
        assert_eq!(
            KvCacheDtype::Auto.resolve(Precision::F32, DType::F32),
            DType::F32
        );
        assert_eq!(
            KvCacheDtype::Auto.resolve(Precision::Bf16, DType::BF16),
            DType::BF16
        );
        assert_eq!(
            KvCacheDtype::F32.resolve(Precision::Q8_0, DType::F32),
            DType::F32
        );
        for s in ["auto", "f32", "fp16", "BF16"] {
            let d: KvCacheDtype = s.parse().unwrap();
            assert_eq!(d.to_string().parse::<KvCacheDtype>(), Ok(d));
        }
        let err = "int4".parse::<KvCacheDtype>().unwrap_err();
        assert!(err.contains("int4") && err.contains("auto"), "{err}");
    }
}
