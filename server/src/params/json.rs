//! Reading JSON values into typed fields: each reader checks the type and range and names the
//! field in its error. Protocol-independent; [`super::table`] says which reader each
//! parameter uses.

use serde_json::{Map, Value};

use super::ValidationError;

type Result<T, E = ValidationError> = std::result::Result<T, E>;

/// Most stop strings per request.
pub const MAX_STOP_SEQUENCES: usize = 8;
/// Longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 256;

/// A short description of a JSON value for error messages: its type and, for scalars, the
/// value (long strings cut).
pub fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("a boolean ({b})"),
        Value::Number(n) => format!("a number ({n})"),
        Value::String(s) => {
            let cut: String = s.chars().take(40).collect();
            let dots = if cut.len() < s.len() { "..." } else { "" };
            format!("a string ({:?}{dots})", cut)
        }
        Value::Array(a) => format!("an array of {} element(s)", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

/// Parses a request body: JSON, and an object.
pub fn parse_body(bytes: &[u8]) -> Result<Map<String, Value>> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ValidationError::BadJson(e.to_string()))?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ValidationError::BodyNotObject(describe(&other))),
    }
}

/// A non-negative integer within `[min, max]`; integral floats (`100.0`) are accepted.
pub fn read_uint(field: &str, v: &Value, min: u64, max: u64) -> Result<u64> {
    let range = || {
        if max == u64::MAX {
            format!("an integer >= {min}")
        } else {
            format!("an integer in [{min}, {max}]")
        }
    };
    let n = match v {
        Value::Number(n) => n,
        other => {
            return Err(ValidationError::WrongType {
                field: field.into(),
                expected: "an integer",
                got: describe(other),
            })
        }
    };
    let value = if let Some(u) = n.as_u64() {
        u
    } else if let Some(f) = n
        .as_f64()
        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19)
    {
        f as u64
    } else if n.as_i64().is_some() || n.as_f64().is_some_and(|f| f.fract() == 0.0) {
        return Err(ValidationError::OutOfRange {
            field: field.into(),
            range: range(),
            value: n.to_string(),
        });
    } else {
        return Err(ValidationError::WrongType {
            field: field.into(),
            expected: "an integer",
            got: describe(v),
        });
    };
    if value < min || value > max {
        return Err(ValidationError::OutOfRange {
            field: field.into(),
            range: range(),
            value: value.to_string(),
        });
    }
    Ok(value)
}

/// A finite number that passes `ok`, whose range is described by `range`.
pub fn read_float(field: &str, v: &Value, range: &str, ok: impl Fn(f64) -> bool) -> Result<f64> {
    let f = match v {
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        other => {
            return Err(ValidationError::WrongType {
                field: field.into(),
                expected: "a number",
                got: describe(other),
            })
        }
    };
    if !f.is_finite() || !ok(f) {
        return Err(ValidationError::OutOfRange {
            field: field.into(),
            range: range.into(),
            value: v.to_string(),
        });
    }
    Ok(f)
}

/// A boolean.
pub fn read_bool(field: &str, v: &Value) -> Result<bool> {
    v.as_bool().ok_or_else(|| ValidationError::WrongType {
        field: field.into(),
        expected: "a boolean",
        got: describe(v),
    })
}

/// A string.
pub fn read_string<'a>(field: &str, v: &'a Value) -> Result<&'a str> {
    v.as_str().ok_or_else(|| ValidationError::WrongType {
        field: field.into(),
        expected: "a string",
        got: describe(v),
    })
}

/// Stop strings: one string or an array of them, non-empty, at most [`MAX_STOP_SEQUENCES`].
pub fn read_stop(field: &str, v: &Value) -> Result<Vec<String>> {
    let items: Vec<&Value> = match v {
        Value::String(_) => vec![v],
        Value::Array(a) => a.iter().collect(),
        other => {
            return Err(ValidationError::WrongType {
                field: field.into(),
                expected: "a string or an array of strings",
                got: describe(other),
            })
        }
    };
    if items.len() > MAX_STOP_SEQUENCES {
        return Err(ValidationError::OutOfRange {
            field: field.into(),
            range: format!("at most {MAX_STOP_SEQUENCES} strings"),
            value: format!("{} strings", items.len()),
        });
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let f = format!("{field}[{i}]");
            let s = read_string(&f, item)?;
            if s.is_empty() || s.len() > MAX_STOP_LEN {
                return Err(ValidationError::OutOfRange {
                    field: f,
                    range: format!("a non-empty string of at most {MAX_STOP_LEN} bytes"),
                    value: describe(item),
                });
            }
            Ok(s.to_owned())
        })
        .collect()
}

/// Most token ids in one `stop_token_ids`.
pub const MAX_STOP_TOKEN_IDS: usize = 64;

/// An array of at most [`MAX_STOP_TOKEN_IDS`] token ids (integers in `[0, u32::MAX]`).
pub fn read_token_ids(field: &str, v: &Value) -> Result<Vec<u32>> {
    let Value::Array(items) = v else {
        return Err(ValidationError::WrongType {
            field: field.into(),
            expected: "an array of token ids (integers >= 0)",
            got: describe(v),
        });
    };
    if items.len() > MAX_STOP_TOKEN_IDS {
        return Err(ValidationError::OutOfRange {
            field: field.into(),
            range: format!("at most {MAX_STOP_TOKEN_IDS} token ids"),
            value: format!("{} token ids", items.len()),
        });
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            read_uint(&format!("{field}[{i}]"), item, 0, u64::from(u32::MAX)).map(|n| n as u32)
        })
        .collect()
}

/// Every element of `items` (the array at `field`) as a string; `expected` says what each
/// must be in the message.
pub fn read_strings(field: &str, items: &[Value], expected: &'static str) -> Result<Vec<String>> {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| ValidationError::WrongType {
                    field: format!("{field}[{i}]"),
                    expected,
                    got: describe(v),
                })
        })
        .collect()
}

/// Most entries of a `logit_bias` object (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

/// OpenAI's `logit_bias`: an object from token ids (as strings) to biases in [-100, 100].
pub fn read_logit_bias(field: &str, v: &Value) -> Result<Vec<(u32, f32)>> {
    let Value::Object(map) = v else {
        return Err(ValidationError::WrongType {
            field: field.into(),
            expected: "an object from token ids to biases",
            got: describe(v),
        });
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(ValidationError::OutOfRange {
            field: field.into(),
            range: format!("at most {MAX_LOGIT_BIAS} entries"),
            value: format!("{} entries", map.len()),
        });
    }
    map.iter()
        .map(|(k, bias)| {
            let at = format!("{field}.{k}");
            let id: u32 = k.parse().map_err(|_| ValidationError::WrongType {
                field: at.clone(),
                expected: "a token id (an integer >= 0) as the key",
                got: format!("the key {k:?}"),
            })?;
            let b = read_float(&at, bias, "a number in [-100, 100]", |b| {
                (-100.0..=100.0).contains(&b)
            })?;
            Ok((id, b as f32))
        })
        .collect()
}
