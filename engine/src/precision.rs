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
    /// 8-bit integers, each head's row of a slot scaled by its own largest magnitude (see
    /// [`KvFormat::Int8`]): half f16's bytes, for an error of its own, so never the default.
    /// CPU only.
    Int8,
}

impl KvCacheDtype {
    /// The format for a model under `precision` whose activations are `act`.
    pub fn resolve(self, precision: Precision, act: DType) -> KvFormat {
        match self {
            Self::Auto if precision == Precision::Q8_0 => KvFormat::F16,
            Self::Auto => match act {
                DType::F16 => KvFormat::F16,
                DType::BF16 => KvFormat::Bf16,
                _ => KvFormat::F32,
            },
            Self::F32 => KvFormat::F32,
            Self::F16 => KvFormat::F16,
            Self::Bf16 => KvFormat::Bf16,
            Self::Int8 => KvFormat::Int8,
        }
    }
}

/// What the KV cache stores, [`KvCacheDtype`] resolved for a model. Each slot holds one row
/// per head, side by side; what a row is depends on the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvFormat {
    /// `head_dim` f32 values a row.
    F32,
    /// `head_dim` f16 values a row.
    F16,
    /// `head_dim` bf16 values a row.
    Bf16,
    /// `head_dim` signed bytes, then the row's scale as 4 little-endian bytes of an f32: value
    /// `i` is `scale * byte_i`, `scale` the row's largest magnitude over 127. The scale sits
    /// beside its row, so a kernel reading one head reads one stretch of memory.
    Int8,
}

impl KvFormat {
    /// Bytes of an int8 row's scale.
    pub const INT8_SCALE_BYTES: usize = 4;

    /// The element type of the cache tensor (bytes for int8).
    pub fn storage_dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
            Self::Int8 => DType::U8,
        }
    }

    /// The format whose cache tensor has elements of `dtype`, if any.
    pub fn from_storage(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(Self::F32),
            DType::F16 => Some(Self::F16),
            DType::BF16 => Some(Self::Bf16),
            DType::U8 => Some(Self::Int8),
            _ => None,
        }
    }

    /// Elements of one head's row in a slot.
    pub fn row_len(self, head_dim: usize) -> usize {
        match self {
            Self::Int8 => head_dim + Self::INT8_SCALE_BYTES,
            _ => head_dim,
        }
    }

    /// The head size whose rows are `row_len` elements, if one is.
    pub fn head_dim(self, row_len: usize) -> Option<usize> {
        match self {
            Self::Int8 => row_len.checked_sub(Self::INT8_SCALE_BYTES),
            _ => Some(row_len),
        }
    }

    /// Bytes one token's keys or values take for `heads` heads of `head_dim`.
    pub fn bytes_per_token(self, heads: usize, head_dim: usize) -> usize {
        heads * self.row_len(head_dim) * self.storage_dtype().size_in_bytes()
    }
}

impl fmt::Display for KvFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
        })
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
            "int8" | "i8" => Self::Int8,
            other => {
                return Err(format!(
                    "unknown KV cache dtype `{other}`: use auto, f32, f16 (fp16), bf16 (bfloat16) or int8"
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
            Self::Int8 => "int8",
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
            KvFormat::F16
        );
        assert_eq!(
            KvCacheDtype::Auto.resolve(Precision::F32, DType::F32),
            KvFormat::F32
        );
        assert_eq!(
            KvCacheDtype::Auto.resolve(Precision::Bf16, DType::BF16),
            KvFormat::Bf16
        );
        assert_eq!(
            KvCacheDtype::F32.resolve(Precision::Q8_0, DType::F32),
            KvFormat::F32
        );
        assert_eq!(
            KvCacheDtype::Int8.resolve(Precision::Bf16, DType::BF16),
            KvFormat::Int8
        );
        for s in ["auto", "f32", "fp16", "BF16", "int8"] {
            let d: KvCacheDtype = s.parse().unwrap();
            assert_eq!(d.to_string().parse::<KvCacheDtype>(), Ok(d));
        }
        let err = "int4".parse::<KvCacheDtype>().unwrap_err();
        assert!(err.contains("int4") && err.contains("int8"), "{err}");
    }

    #[test]
    fn kv_formats_know_their_rows() {
        for format in [KvFormat::F32, KvFormat::F16, KvFormat::Bf16, KvFormat::Int8] {
            assert_eq!(KvFormat::from_storage(format.storage_dtype()), Some(format));
            assert_eq!(format.head_dim(format.row_len(64)), Some(64));
        }
        assert_eq!(KvFormat::Int8.row_len(64), 68);
        assert_eq!(KvFormat::Int8.head_dim(3), None);
        assert_eq!(KvFormat::F16.bytes_per_token(12, 64), 1536);
        assert_eq!(KvFormat::Int8.bytes_per_token(12, 64), 816);
        assert_eq!(KvFormat::from_storage(DType::I64), None);
    }
}
