/*!
The Open Inference Protocol's own inference route, `POST /v2/models/{name}/infer`, as Triton
clients (`tritonclient.http`) and KServe V2 gateways send it:

```json
{"id": "1", "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Hi"]}],
 "parameters": {"max_tokens": 16, "temperature": 0}}
```

answers

```json
{"model_name": "...", "id": "1",
 "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1], "data": ["..."]}]}
```

`text_input` holds one prompt per element (`shape` `[n]` or `[n, 1]`, `n` up to
`--max-instances`); `text_output` has the same shape, one completion per prompt. The
generation parameters are the request's `parameters`, as on `generate`; `binary_data_output`
is accepted and the answer is JSON anyway (which Triton's clients read).

A body in the binary tensor data extension (an `Inference-Header-Content-Length` header,
the JSON part, then the tensors' bytes: what `tritonclient` sends by default) is first turned
into its JSON form ([`infer`]), then takes the one pipeline like any other.
*/

use axum::body::Body;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::OipGenerate;
use crate::error::{ApiError, Wire};
use crate::generation::Generation;
use crate::params::json::{read_bool, read_string};
use crate::params::{describe, parse_body, Dialect, Limits, ParamsReader, ValidationError};
use crate::pipeline::{generate_at, read_body, Outcome, Protocol, RequestContext};

/// The binary tensor data extension's header: the length of the body's JSON part.
const HEADER_LENGTH: &str = "inference-header-content-length";

/// `POST /v2/models/{name}/infer`: [`OipInfer`] through the pipeline, after turning a body
/// in the binary tensor data extension into JSON. Such a body is read (413 past
/// `--body-limit`) before the model and admission are checked.
pub async fn infer(
    ctx: RequestContext,
    model: Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(len) = headers.get(HEADER_LENGTH) else {
        return generate_at::<OipInfer>(ctx, model, body).await;
    };
    let config = ctx.state.config();
    match binary_to_json(len, body, config.body_limit, config.body_read_timeout).await {
        Ok(json) => generate_at::<OipInfer>(ctx, model, Body::from(json)).await,
        Err(e) => e.into_response(Wire::Oip),
    }
}

fn binary_error(field: String, message: String) -> ApiError {
    ValidationError::Unsupported { field, message }.into()
}

/// The JSON form of a binary-extension body: each input's `binary_data_size` bytes become its
/// `data` (BYTES elements: a 4-byte little-endian length, then the bytes).
async fn binary_to_json(
    len: &HeaderValue,
    body: Body,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Vec<u8>, ApiError> {
    let n: usize = len
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            binary_error(
                HEADER_LENGTH.into(),
                "must be the length in bytes of the body's JSON part".into(),
            )
        })?;
    let bytes = read_body(body, limit, timeout).await?;
    if n > bytes.len() {
        return Err(binary_error(
            HEADER_LENGTH.into(),
            format!("is {n} but the body has only {} bytes", bytes.len()),
        ));
    }
    let (head, mut rest) = bytes.split_at(n);
    let mut doc = parse_body(head)?;
    if let Some(Value::Array(inputs)) = doc.get_mut("inputs") {
        for (i, input) in inputs.iter_mut().enumerate() {
            let Some(size) = input.pointer("/parameters/binary_data_size") else {
                continue;
            };
            let field = format!("inputs[{i}].parameters.binary_data_size");
            let size = size
                .as_u64()
                .and_then(|s| usize::try_from(s).ok())
                .filter(|&s| s <= rest.len())
                .ok_or_else(|| {
                    binary_error(
                        field.clone(),
                        format!(
                            "must be at most the {} bytes of binary data left",
                            rest.len()
                        ),
                    )
                })?;
            if input["datatype"] != "BYTES" {
                return Err(binary_error(
                    format!("inputs[{i}].datatype"),
                    "`text_input` is a BYTES tensor".into(),
                ));
            }
            let (data, tail) = rest.split_at(size);
            rest = tail;
            input["data"] = json!(bytes_elements(data, i)?);
            let emptied = match input.get_mut("parameters") {
                Some(Value::Object(p)) => {
                    p.remove("binary_data_size");
                    p.is_empty()
                }
                _ => false,
            };
            if let (true, Some(o)) = (emptied, input.as_object_mut()) {
                o.remove("parameters");
            }
        }
    }
    if !rest.is_empty() {
        return Err(binary_error(
            "inputs".into(),
            format!(
                "{} bytes of binary data follow the tensors the inputs' `binary_data_size` name",
                rest.len()
            ),
        ));
    }
    serde_json::to_vec(&doc).map_err(|e| ApiError::Internal(e.to_string()))
}

/// The elements of a serialized BYTES tensor, as UTF-8 strings.
fn bytes_elements(mut data: &[u8], input: usize) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let field = format!("inputs[{input}].data[{}]", out.len());
        let broken = || binary_error(field.clone(), "the BYTES tensor's data is truncated".into());
        let (len, tail) = data.split_first_chunk::<4>().ok_or_else(broken)?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > tail.len() {
            return Err(broken());
        }
        let (s, tail) = tail.split_at(len);
        let s = std::str::from_utf8(s)
            .map_err(|_| binary_error(field.clone(), "the prompt is not valid UTF-8".into()))?;
        out.push(s.to_owned());
        data = tail;
    }
    Ok(out)
}

/// A parsed infer body.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The prompts and parameters.
    pub generation: Generation,
    /// The request's `id`, echoed (else the request id).
    pub id: Option<String>,
    /// The shape of `text_input`, which `text_output` takes.
    pub shape: Vec<u64>,
}

/// `POST /v2/models/{name}/infer`.
pub struct OipInfer;

const INPUT: &str = "text_input";
const OUTPUT: &str = "text_output";

fn wrong(field: String, expected: &'static str, v: &Value) -> ValidationError {
    ValidationError::WrongType {
        field,
        expected,
        got: describe(v),
    }
}

fn unsupported(field: String, message: &str) -> ValidationError {
    ValidationError::Unsupported {
        field,
        message: message.into(),
    }
}

const BINARY: &str = "binary tensor data needs the `Inference-Header-Content-Length` header \
                      (the length of the JSON part), or send the tensor as JSON";

impl Protocol for OipInfer {
    const WIRE: Wire = Wire::Oip;
    const DIALECT: Dialect = OipGenerate::<false>::DIALECT;
    type Request = InferRequest;

    fn prompt_name(i: usize) -> String {
        format!("{INPUT}[{i}]")
    }

    fn parse(body: &Map<String, Value>, limits: Limits) -> Result<InferRequest, ValidationError> {
        let mut id = None;
        let mut prompts = None;
        let mut params = Default::default();
        for (k, v) in body {
            match k.as_str() {
                "id" => id = Some(read_string("id", v)?.to_owned()),
                "inputs" => prompts = Some(parse_inputs(v, limits)?),
                "outputs" => parse_outputs(v)?,
                "parameters" => params = parse_parameters(v, limits)?,
                _ => {
                    return Err(ValidationError::UnknownField {
                        field: k.clone(),
                        known: "id, inputs, outputs, parameters".into(),
                    })
                }
            }
        }
        let (prompts, shape) = prompts.ok_or_else(|| ValidationError::Missing {
            field: "inputs".into(),
            what: "one BYTES input named `text_input`",
        })?;
        let mut params: crate::params::RequestParams = params;
        params.return_full_text.get_or_insert(false);
        params.num_return_sequences = Some(1);
        Ok(InferRequest {
            generation: Generation {
                model: None,
                prompts: prompts.into(),
                params,
                stream: false,
            },
            id,
            shape,
        })
    }

    fn generation(req: &InferRequest) -> &Generation {
        &req.generation
    }

    fn render(req: &InferRequest, out: &Outcome<'_>) -> Value {
        let texts: Vec<String> = (0..out.finished.len()).map(|i| out.text(i)).collect();
        json!({
            "model_name": out.meta.model,
            "id": req.id.clone().unwrap_or_else(|| out.meta.request_id.clone()),
            "outputs": [{
                "name": OUTPUT,
                "datatype": "BYTES",
                "shape": req.shape,
                "data": texts,
            }],
        })
    }
}

/// `inputs`: exactly one tensor, `text_input`, BYTES, its data one string per prompt.
fn parse_inputs(v: &Value, limits: Limits) -> Result<(Vec<String>, Vec<u64>), ValidationError> {
    let inputs = v
        .as_array()
        .ok_or_else(|| wrong("inputs".into(), "an array of tensors", v))?;
    let [input] = inputs.as_slice() else {
        return Err(ValidationError::OutOfRange {
            field: "inputs".into(),
            range: "exactly one tensor, `text_input`".into(),
            value: format!("{} tensors", inputs.len()),
        });
    };
    let at = "inputs[0]";
    let obj = input
        .as_object()
        .ok_or_else(|| wrong(at.into(), "a tensor object", input))?;
    let mut shape = None;
    let mut data = None;
    for (k, v) in obj {
        let f = format!("{at}.{k}");
        match k.as_str() {
            "name" => {
                let name = read_string(&f, v)?;
                if name != INPUT {
                    return Err(ValidationError::OutOfRange {
                        field: f,
                        range: format!("`{INPUT}` (the model's only input)"),
                        value: format!("`{name}`"),
                    });
                }
            }
            "datatype" => {
                if read_string(&f, v)? != "BYTES" {
                    return Err(unsupported(f, "`text_input` is a BYTES tensor"));
                }
            }
            "shape" => {
                let dims = v
                    .as_array()
                    .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| wrong(f.clone(), "an array of integers >= 0", v))?;
                shape = Some(dims);
            }
            "data" => data = Some(v),
            "parameters" => {
                if v.get("binary_data_size").is_some() {
                    return Err(unsupported(f, BINARY));
                }
            }
            _ => {
                return Err(ValidationError::UnknownField {
                    field: f,
                    known: "name, datatype, shape, data, parameters".into(),
                })
            }
        }
    }
    if !obj.contains_key("name") {
        return Err(ValidationError::Missing {
            field: format!("{at}.name"),
            what: "`text_input`",
        });
    }
    let shape = shape.ok_or_else(|| ValidationError::Missing {
        field: format!("{at}.shape"),
        what: "`[n]` for n prompts",
    })?;
    let data = data.ok_or_else(|| unsupported(format!("{at}.data"), BINARY))?;
    let items = data
        .as_array()
        .ok_or_else(|| wrong(format!("{at}.data"), "an array of strings", data))?;
    let n = items.len();
    if n == 0 {
        return Err(ValidationError::OutOfRange {
            field: format!("{at}.data"),
            range: "at least one prompt".into(),
            value: "[]".into(),
        });
    }
    let fits = matches!(shape.as_slice(), [a] | [a, 1] if *a == n as u64);
    if !fits {
        return Err(ValidationError::OutOfRange {
            field: format!("{at}.shape"),
            range: format!("[{n}] or [{n}, 1] for {n} strings of data"),
            value: format!("{shape:?}"),
        });
    }
    if n > limits.max_prompts {
        return Err(ValidationError::TooManyInstances {
            given: n,
            max: limits.max_prompts,
        });
    }
    let prompts = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_str()
                .map(str::to_owned)
                .ok_or_else(|| wrong(format!("{at}.data[{i}]"), "a string (a prompt)", item))
        })
        .collect::<Result<_, _>>()?;
    Ok((prompts, shape))
}

/// `outputs`: optional; only `text_output`, in JSON.
fn parse_outputs(v: &Value) -> Result<(), ValidationError> {
    let outputs = v
        .as_array()
        .ok_or_else(|| wrong("outputs".into(), "an array of requested outputs", v))?;
    for (i, o) in outputs.iter().enumerate() {
        let f = format!("outputs[{i}].name");
        match o.get("name").and_then(Value::as_str) {
            Some(OUTPUT) => {}
            _ => {
                return Err(ValidationError::OutOfRange {
                    field: f,
                    range: format!("`{OUTPUT}` (the model's only output)"),
                    value: describe(o.get("name").unwrap_or(&Value::Null)),
                })
            }
        }
        if let Some(b) = o.pointer("/parameters/binary_data") {
            // Asked for binary: the answer is JSON all the same, which clients accept.
            read_bool(&format!("outputs[{i}].parameters.binary_data"), b)?;
        }
    }
    Ok(())
}

/// `parameters`: the generation parameters, plus Triton's `binary_data_output` (ignored).
fn parse_parameters(
    v: &Value,
    limits: Limits,
) -> Result<crate::params::RequestParams, ValidationError> {
    let obj = v
        .as_object()
        .ok_or_else(|| wrong("parameters".into(), "an object", v))?;
    // One sequence per prompt: `text_output` has one element per prompt.
    let one = Limits {
        max_sequences: 1,
        ..limits
    };
    let mut reader = ParamsReader::new(OipInfer::DIALECT, one);
    for (k, v) in obj {
        if reader.read(k, v)? {
            continue;
        }
        if k == "binary_data_output" {
            read_bool("parameters.binary_data_output", v)?;
            continue;
        }
        return Err(reader.unknown(k, &["binary_data_output"]));
    }
    reader.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::Prompts;

    const LIMITS: Limits = Limits {
        max_sequences: 8,
        max_prompts: 4,
    };

    fn parse(v: Value) -> Result<InferRequest, ValidationError> {
        OipInfer::parse(v.as_object().unwrap(), LIMITS)
    }

    fn input(shape: Value, data: Value) -> Value {
        json!([{"name": "text_input", "datatype": "BYTES", "shape": shape, "data": data}])
    }

    #[test]
    fn infer_body() {
        let r = parse(json!({
            "id": "7",
            "inputs": input(json!([2, 1]), json!(["a", "b"])),
            "outputs": [{"name": "text_output", "parameters": {"binary_data": false}}],
            "parameters": {"max_tokens": 5, "binary_data_output": true},
        }))
        .unwrap();
        assert_eq!(
            r.generation.prompts,
            Prompts::Text(vec!["a".into(), "b".into()])
        );
        assert_eq!(r.shape, vec![2, 1]);
        assert_eq!(r.id.as_deref(), Some("7"));
        assert_eq!(r.generation.params.max_new_tokens, Some(5));
        assert_eq!(r.generation.params.num_return_sequences, Some(1));
    }

    #[test]
    fn infer_errors_name_the_field() {
        let cases = [
            (json!({}), "missing `inputs`"),
            (json!({"inputs": []}), "exactly one tensor"),
            (
                json!({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}),
                "inputs[0].name",
            ),
            (
                json!({"inputs": [{"name": "text_input", "datatype": "INT32", "shape": [1], "data": [1]}]}),
                "BYTES",
            ),
            (
                json!({"inputs": input(json!([2]), json!(["a"]))}),
                "inputs[0].shape",
            ),
            (
                json!({"inputs": input(json!([1]), json!([3]))}),
                "inputs[0].data[0]",
            ),
            (
                json!({"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 5}}]}),
                "Inference-Header-Content-Length",
            ),
            (
                json!({"inputs": input(json!([5]), json!(["a", "b", "c", "d", "e"]))}),
                "too many instances",
            ),
            (
                json!({"inputs": input(json!([1]), json!(["a"])), "parameters": {"temprature": 1}}),
                "parameters.temprature",
            ),
            (
                json!({"inputs": input(json!([1]), json!(["a"])), "parameters": {"num_return_sequences": 2}}),
                "[1, 1]",
            ),
            (
                json!({"inputs": input(json!([1]), json!(["a"])), "outputs": [{"name": "logits"}]}),
                "outputs[0].name",
            ),
        ];
        for (body, needle) in cases {
            let e = parse(body.clone()).unwrap_err().to_string();
            assert!(e.contains(needle), "{body}: {e}");
        }
    }
}
