//! OpenAI-compatible request validation and response/chunk formatting.
//!
//! Errors use OpenAI's shape:
//! `{"error":{"message":"...","type":"invalid_request_error","param":null,"code":null}}`.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::prefix::{block_hashes, tokenize};

/// Which OpenAI endpoint a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Completions,
    Chat,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::Completions => "/v1/completions",
            Api::Chat => "/v1/chat/completions",
        }
    }
}

/// A validated generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    pub api: Api,
    /// Tokens of the prompt text (chat: the rendered conversation), at least 1.
    pub prompt_tokens: u64,
    /// Chained hashes of the prompt's full blocks, for the prefix cache.
    pub blocks: Vec<u64>,
    /// Exact number of tokens to generate, when the client set it.
    pub max_tokens: Option<u64>,
    pub stream: bool,
    /// `stream_options.include_usage`: append a usage chunk before `[DONE]`.
    pub include_usage: bool,
    pub model: Option<String>,
}

/// A 400 error message.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest(pub String);

/// Body of an OpenAI-style error.
pub fn error_body(message: &str, kind: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

/// The OpenAI error `type` used for an HTTP status.
pub fn error_type_for(status: u16) -> &'static str {
    match status {
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

fn optional_u64(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, BadRequest> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                Ok(Some(v))
            } else if n.as_i64().is_some() {
                Err(BadRequest(format!("'{key}' must be at least 1, got {n}")))
            } else {
                Err(BadRequest(format!("'{key}' must be an integer, got {n}")))
            }
        }
        Some(other) => Err(BadRequest(format!(
            "'{key}' must be an integer, got {}",
            type_name(other)
        ))),
    }
}

fn optional_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, BadRequest> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(BadRequest(format!(
            "'{key}' must be a boolean, got {}",
            type_name(other)
        ))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The prompt's tokens: text is tokenised (an array of strings as their
/// concatenation), token ids are taken as they are.
fn prompt_tokens(v: Option<&Value>) -> Result<Vec<u64>, BadRequest> {
    let bad = || {
        BadRequest("'prompt' must be a string, an array of strings or an array of token ids".into())
    };
    match v {
        None | Some(Value::Null) => Err(BadRequest("'prompt' is required".into())),
        Some(Value::String(s)) => Ok(tokenize(s)),
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(BadRequest("'prompt' must not be empty".into()));
            }
            if items.iter().all(Value::is_string) {
                let text: String = items.iter().filter_map(Value::as_str).collect();
                Ok(tokenize(&text))
            } else if items.iter().all(Value::is_u64) {
                Ok(items.iter().filter_map(Value::as_u64).collect())
            } else {
                Err(bad())
            }
        }
        Some(_) => Err(bad()),
    }
}

/// The text a chat request is tokenised as: `role: content\n` per message,
/// in order (text parts of an array content concatenated), a stand-in for a
/// chat template that makes equal conversation prefixes equal token prefixes.
fn chat_prompt(v: Option<&Value>) -> Result<String, BadRequest> {
    let messages = match v {
        None | Some(Value::Null) => return Err(BadRequest("'messages' is required".into())),
        Some(Value::Array(m)) => m,
        Some(other) => {
            return Err(BadRequest(format!(
                "'messages' must be an array, got {}",
                type_name(other)
            )))
        }
    };
    if messages.is_empty() {
        return Err(BadRequest(
            "'messages' must contain at least one message".into(),
        ));
    }
    let mut text = String::new();
    for (i, m) in messages.iter().enumerate() {
        let Some(obj) = m.as_object() else {
            return Err(BadRequest(format!("'messages[{i}]' must be an object")));
        };
        match obj.get("role") {
            Some(Value::String(role)) => {
                text.push_str(role);
                text.push_str(": ");
            }
            _ => return Err(BadRequest(format!("'messages[{i}].role' must be a string"))),
        }
        match obj.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => text.push_str(s),
            Some(Value::Array(parts)) => {
                for part in parts {
                    match part.get("text") {
                        Some(Value::String(t)) => text.push_str(t),
                        _ if part.is_object() => {}
                        _ => {
                            return Err(BadRequest(format!(
                                "'messages[{i}].content' parts must be objects"
                            )))
                        }
                    }
                }
            }
            Some(other) => {
                return Err(BadRequest(format!(
                    "'messages[{i}].content' must be a string or an array, got {}",
                    type_name(other)
                )))
            }
        }
        text.push('\n');
    }
    Ok(text)
}

/// Parses and validates a request body for `api`.
pub fn parse_request(
    api: Api,
    body: &[u8],
    max_output_tokens: u64,
) -> Result<GenRequest, BadRequest> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| BadRequest(format!("Invalid JSON body: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(BadRequest("Request body must be a JSON object".into()));
    };
    let tokens = match api {
        Api::Completions => prompt_tokens(obj.get("prompt"))?,
        Api::Chat => tokenize(&chat_prompt(obj.get("messages"))?),
    };
    // An empty prompt still costs a token (as the estimate always did).
    let prompt_tokens = (tokens.len() as u64).max(1);
    let blocks = block_hashes(&tokens);
    let max_tokens = match api {
        Api::Completions => optional_u64(&obj, "max_tokens")?,
        Api::Chat => match optional_u64(&obj, "max_completion_tokens")? {
            Some(v) => Some(v),
            None => optional_u64(&obj, "max_tokens")?,
        },
    };
    if let Some(m) = max_tokens {
        if m < 1 {
            return Err(BadRequest(format!(
                "'max_tokens' must be at least 1, got {m}"
            )));
        }
        if m > max_output_tokens {
            return Err(BadRequest(format!(
                "'max_tokens' is too large: {m}. This model's maximum output length is {max_output_tokens} tokens"
            )));
        }
    }
    let stream = optional_bool(&obj, "stream")?.unwrap_or(false);
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => optional_bool(o, "include_usage")?.unwrap_or(false),
        Some(other) => {
            return Err(BadRequest(format!(
                "'stream_options' must be an object, got {}",
                type_name(other)
            )))
        }
    };
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(BadRequest(format!(
                "'model' must be a string, got {}",
                type_name(other)
            )))
        }
    };
    Ok(GenRequest {
        api,
        prompt_tokens,
        blocks,
        max_tokens,
        stream,
        include_usage,
        model,
    })
}

/// Filler "words" of about four characters each: one per generated token.
/// Plain ASCII with nothing to escape in JSON.
const WORDS: [&str; 16] = [
    " the", " sim", " llm", " tok", " gen", " out", " lab", " run", " box", " net", " bit", " and",
    " cat", " sky", " sun", " map",
];

/// Appends the text of tokens `start..start+count` to `out`.
pub fn push_filler(out: &mut String, start: u64, count: u64) {
    for i in start..start.saturating_add(count) {
        out.push_str(WORDS[(i % WORDS.len() as u64) as usize]);
    }
}

/// The text of `count` generated tokens.
pub fn filler(count: u64) -> String {
    let mut s = String::with_capacity(count.min(1 << 20) as usize * 4);
    push_filler(&mut s, 0, count);
    s
}

/// Token accounting of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// A complete (non-streaming) response body.
pub fn full_response(
    api: Api,
    id: &str,
    created: u64,
    model: &str,
    usage: Usage,
    finish_reason: &str,
) -> Value {
    let text = filler(usage.completion_tokens);
    match api {
        Api::Completions => json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}],
            "usage": usage.to_json(),
        }),
        Api::Chat => json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
            "usage": usage.to_json(),
        }),
    }
}

/// Formats SSE chunks for one streaming response. Content chunks are built
/// by string concatenation around a pre-rendered header, so each token costs
/// one small allocation.
#[derive(Debug, Clone)]
pub struct ChunkFormatter {
    api: Api,
    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[`
    head: String,
    /// Same, for the usage-only chunk (`"choices":[]`).
    usage_head: String,
}

impl ChunkFormatter {
    pub fn new(api: Api, id: &str, created: u64, model: &str) -> Self {
        let object = match api {
            Api::Completions => "text_completion",
            Api::Chat => "chat.completion.chunk",
        };
        let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
        let common = format!(
            "{{\"id\":{},\"object\":\"{object}\",\"created\":{created},\"model\":{}",
            q(id),
            q(model)
        );
        ChunkFormatter {
            api,
            head: format!("data: {common},\"choices\":["),
            usage_head: format!("data: {common},\"choices\":[]"),
        }
    }

    /// First chat chunk announcing the assistant role (empty content). `None`
    /// for the completions API, which has no such chunk.
    pub fn role_chunk(&self) -> Option<Bytes> {
        match self.api {
            Api::Chat => Some(Bytes::from(format!(
                "{}{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n",
                self.head
            ))),
            Api::Completions => None,
        }
    }

    /// A content chunk carrying the text of tokens `start..start+count`.
    pub fn content_chunk(&self, start: u64, count: u64) -> Bytes {
        let mut s = String::with_capacity(self.head.len() + 96 + 4 * count.min(4096) as usize);
        s.push_str(&self.head);
        match self.api {
            Api::Chat => {
                s.push_str("{\"index\":0,\"delta\":{\"content\":\"");
                push_filler(&mut s, start, count);
                s.push_str("\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
            }
            Api::Completions => {
                s.push_str("{\"index\":0,\"text\":\"");
                push_filler(&mut s, start, count);
                s.push_str("\",\"logprobs\":null,\"finish_reason\":null}]}\n\n");
            }
        }
        Bytes::from(s)
    }

    /// The last choice chunk, carrying the finish reason and no content.
    pub fn final_chunk(&self, finish_reason: &str) -> Bytes {
        let choice = match self.api {
            Api::Chat => format!("{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"{finish_reason}\"}}"),
            Api::Completions => {
                format!("{{\"index\":0,\"text\":\"\",\"logprobs\":null,\"finish_reason\":\"{finish_reason}\"}}")
            }
        };
        Bytes::from(format!("{}{choice}]}}\n\n", self.head))
    }

    /// The usage chunk sent when `stream_options.include_usage` is set.
    pub fn usage_chunk(&self, usage: Usage) -> Bytes {
        Bytes::from(format!(
            "{},\"usage\":{}}}\n\n",
            self.usage_head,
            usage.to_json()
        ))
    }

    pub fn done() -> Bytes {
        Bytes::from_static(b"data: [DONE]\n\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(api: Api, body: &str) -> Result<GenRequest, BadRequest> {
        parse_request(api, body.as_bytes(), 2048)
    }

    #[test]
    fn completions_prompt_forms() {
        let r = parse(
            Api::Completions,
            r#"{"prompt":"abcdefgh","max_tokens":5,"stream":true,"model":"m"}"#,
        )
        .unwrap();
        assert_eq!(r.prompt_tokens, 2);
        assert_eq!(r.max_tokens, Some(5));
        assert!(r.stream);
        assert_eq!(r.model.as_deref(), Some("m"));
        let r = parse(Api::Completions, r#"{"prompt":["abcd","efghi"]}"#).unwrap();
        assert_eq!(r.prompt_tokens, 3);
        assert_eq!(r.max_tokens, None);
        assert!(!r.stream);
        let r = parse(Api::Completions, r#"{"prompt":[1,2,3,4,5,6,7]}"#).unwrap();
        assert_eq!(r.prompt_tokens, 7);
        let r = parse(
            Api::Completions,
            r#"{"prompt":"","max_tokens":null,"stream":null}"#,
        )
        .unwrap();
        assert_eq!(r.prompt_tokens, 1);
    }

    #[test]
    fn chat_messages() {
        let r = parse(
            Api::Chat,
            r#"{"messages":[{"role":"system","content":"abcd"},{"role":"user","content":[{"type":"text","text":"efgh"},{"type":"image_url"}]}],"max_completion_tokens":9,"max_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        // "system: abcd\nuser: efgh\n": 24 characters.
        assert_eq!(r.prompt_tokens, 6);
        assert_eq!(r.max_tokens, Some(9), "max_completion_tokens wins");
        assert!(r.include_usage);
        let r = parse(
            Api::Chat,
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#,
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(3));
    }

    #[test]
    fn prompts_are_tokenised_for_the_prefix_cache() {
        let chat = |msgs: &str| parse(Api::Chat, &format!(r#"{{"messages":{msgs}}}"#)).unwrap();
        let system = "s".repeat(200);
        let a = chat(&format!(
            r#"[{{"role":"system","content":"{system}"}},{{"role":"user","content":"first question"}}]"#
        ));
        let b = chat(&format!(
            r#"[{{"role":"system","content":"{system}"}},{{"role":"user","content":"other question"}}]"#
        ));
        // "system: " + 200 + "\n" = 209 characters: 52 whole tokens, 3 full blocks.
        assert_eq!(a.blocks.len(), 3);
        assert_eq!(a.blocks, b.blocks);
        let c = chat(&format!(r#"[{{"role":"user","content":"{system}"}}]"#));
        assert_ne!(a.blocks[0], c.blocks[0], "roles are part of the prompt");
        // The count is still ceil(chars / 4).
        let text = "x".repeat(70);
        let r = parse(Api::Completions, &format!(r#"{{"prompt":"{text}"}}"#)).unwrap();
        assert_eq!(r.prompt_tokens, crate::model::estimate_tokens(70));
        assert_eq!(r.blocks.len(), 1);
        let split = parse(
            Api::Completions,
            &format!(r#"{{"prompt":["{}","{}"]}}"#, &text[..33], &text[33..]),
        )
        .unwrap();
        assert_eq!(split.blocks, r.blocks, "strings are concatenated");
        // Token ids are tokens.
        let ids: Vec<String> = (0..40).map(|i| i.to_string()).collect();
        let r = parse(
            Api::Completions,
            &format!(r#"{{"prompt":[{}]}}"#, ids.join(",")),
        )
        .unwrap();
        assert_eq!((r.prompt_tokens, r.blocks.len()), (40, 2));
        let r = parse(Api::Completions, r#"{"prompt":""}"#).unwrap();
        assert_eq!((r.prompt_tokens, r.blocks.len()), (1, 0));
    }

    #[test]
    fn bad_requests() {
        let cases = [
            (Api::Completions, "not json", "Invalid JSON"),
            (Api::Completions, "[1]", "JSON object"),
            (Api::Completions, "{}", "'prompt' is required"),
            (Api::Completions, r#"{"prompt":5}"#, "'prompt' must be"),
            (Api::Completions, r#"{"prompt":[]}"#, "must not be empty"),
            (
                Api::Completions,
                r#"{"prompt":["a",1]}"#,
                "'prompt' must be",
            ),
            (
                Api::Completions,
                r#"{"prompt":"a","max_tokens":0}"#,
                "at least 1",
            ),
            (
                Api::Completions,
                r#"{"prompt":"a","max_tokens":-3}"#,
                "at least 1",
            ),
            (
                Api::Completions,
                r#"{"prompt":"a","max_tokens":1.5}"#,
                "integer",
            ),
            (
                Api::Completions,
                r#"{"prompt":"a","max_tokens":"7"}"#,
                "integer",
            ),
            (
                Api::Completions,
                r#"{"prompt":"a","max_tokens":2049}"#,
                "too large",
            ),
            (
                Api::Completions,
                r#"{"prompt":"a","stream":"yes"}"#,
                "boolean",
            ),
            (Api::Completions, r#"{"prompt":"a","model":3}"#, "'model'"),
            (
                Api::Completions,
                r#"{"prompt":"a","stream_options":1}"#,
                "stream_options",
            ),
            (Api::Chat, "{}", "'messages' is required"),
            (Api::Chat, r#"{"messages":"hi"}"#, "must be an array"),
            (Api::Chat, r#"{"messages":[]}"#, "at least one"),
            (Api::Chat, r#"{"messages":[1]}"#, "must be an object"),
            (Api::Chat, r#"{"messages":[{"content":"x"}]}"#, "role"),
            (
                Api::Chat,
                r#"{"messages":[{"role":"user","content":5}]}"#,
                "content",
            ),
            (
                Api::Chat,
                r#"{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":0}"#,
                "at least 1",
            ),
        ];
        for (api, body, needle) in cases {
            match parse(api, body) {
                Err(BadRequest(msg)) => assert!(msg.contains(needle), "{body}: {msg}"),
                Ok(r) => panic!("{body} should fail, got {r:?}"),
            }
        }
    }

    #[test]
    fn error_shape() {
        let v = error_body("nope", "invalid_request_error");
        assert_eq!(v["error"]["message"], "nope");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
        assert!(v["error"]["code"].is_null());
        assert_eq!(error_type_for(429), "rate_limit_error");
        assert_eq!(error_type_for(503), "server_error");
        assert_eq!(error_type_for(404), "invalid_request_error");
    }

    #[test]
    fn full_responses() {
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 5,
        };
        let v = full_response(Api::Completions, "cmpl-1", 10, "m", usage, "length");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"].as_str().unwrap().len(), 20);
        assert_eq!(v["usage"]["total_tokens"], 8);
        let v = full_response(Api::Chat, "chatcmpl-1", 10, "m", usage, "stop");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["completion_tokens"], 5);
    }

    fn data_json(chunk: &Bytes) -> Value {
        let s = std::str::from_utf8(chunk).unwrap();
        assert!(s.starts_with("data: ") && s.ends_with("\n\n"), "{s:?}");
        serde_json::from_str(&s[6..s.len() - 2]).unwrap()
    }

    #[test]
    fn chunks_are_valid_json() {
        let f = ChunkFormatter::new(Api::Chat, "chatcmpl-\"x", 7, "mo\"del");
        let role = data_json(&f.role_chunk().unwrap());
        assert_eq!(role["object"], "chat.completion.chunk");
        assert_eq!(role["model"], "mo\"del");
        assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
        let c = data_json(&f.content_chunk(0, 2));
        assert_eq!(c["choices"][0]["delta"]["content"], " the sim");
        let fin = data_json(&f.final_chunk("length"));
        assert_eq!(fin["choices"][0]["finish_reason"], "length");
        let u = data_json(&f.usage_chunk(Usage {
            prompt_tokens: 1,
            completion_tokens: 2,
        }));
        assert_eq!(u["usage"]["total_tokens"], 3);
        assert_eq!(u["choices"].as_array().unwrap().len(), 0);

        let f = ChunkFormatter::new(Api::Completions, "cmpl-1", 7, "m");
        assert!(f.role_chunk().is_none());
        let c = data_json(&f.content_chunk(1, 1));
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["choices"][0]["text"], " sim");
        let fin = data_json(&f.final_chunk("stop"));
        assert_eq!(fin["choices"][0]["text"], "");
        assert_eq!(&ChunkFormatter::done()[..], b"data: [DONE]\n\n");
    }
}
