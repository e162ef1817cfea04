use super::*;

const LEN: usize = 1_024;

fn key_of(body: &[u8]) -> Result<Key, NoKey> {
    key_in_chunks(body, body.len().max(1))
}

fn key_in_chunks(body: &[u8], chunk: usize) -> Result<Key, NoKey> {
    let mut scanner = KeyScanner::new(LEN);
    for piece in body.chunks(chunk) {
        if let Scan::Done(result) = scanner.feed(piece) {
            return result;
        }
    }
    scanner.finish()
}

fn chat(messages: &str, extra: &str) -> String {
    format!(r#"{{"model": "m", {extra} "messages": {messages}, "stream": true}}"#)
}

#[test]
fn field_order_and_formatting_do_not_change_the_key() {
    let a = chat(
        r#"[{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}]"#,
        "",
    );
    let b = r#"{"messages":[{"content":"You are helpful.","role":"system"},{"content":"Hi","role":"user"}],"temperature":0.7,"model":"other"}"#;
    let c = r#"{"stream":false,"messages":[{"role":"system","content":"You are \u0068elpful."},{"role":"user","content":[{"type":"text","text":"Hi"}]}]}"#;
    let ka = key_of(a.as_bytes()).unwrap();
    assert_eq!(ka.source, KeySource::Messages);
    assert_eq!(key_of(b.as_bytes()).unwrap(), ka);
    assert_eq!(key_of(c.as_bytes()).unwrap(), ka);
    // Any chunking gives the same answer.
    for chunk in [1, 2, 3, 7, 64] {
        assert_eq!(
            key_in_chunks(a.as_bytes(), chunk).unwrap(),
            ka,
            "chunk {chunk}"
        );
    }
}

#[test]
fn conversations_that_share_a_long_prefix_share_a_key_and_others_do_not() {
    let system = "S".repeat(3_000);
    let turn = |user: &str| {
        chat(
            &format!(
                r#"[{{"role": "system", "content": "{system}"}}, {{"role": "user", "content": "{user}"}}]"#
            ),
            "",
        )
    };
    // Only the first 1,024 characters count: both share them.
    assert_eq!(
        key_of(turn("first question").as_bytes()),
        key_of(turn("a different question").as_bytes())
    );
    let other_system = chat(
        r#"[{"role": "system", "content": "T"}, {"role": "user", "content": "first question"}]"#,
        "",
    );
    assert_ne!(
        key_of(turn("first question").as_bytes()),
        key_of(other_system.as_bytes())
    );
    // Roles are part of the text.
    assert_ne!(
        key_of(chat(r#"[{"role": "user", "content": "x"}]"#, "").as_bytes()),
        key_of(chat(r#"[{"role": "system", "content": "x"}]"#, "").as_bytes())
    );
}

#[test]
fn the_scanner_stops_as_soon_as_the_key_is_complete() {
    let long = "w".repeat(1 << 20);
    let body = chat(&format!(r#"[{{"role": "user", "content": "{long}"}}]"#), "");
    let mut scanner = KeyScanner::new(LEN);
    let mut result = None;
    for piece in body.as_bytes().chunks(16 * 1024) {
        if let Scan::Done(r) = scanner.feed(piece) {
            result = Some(r);
            break;
        }
    }
    // The role came first, so the content goes straight into the key: done after 1,024
    // characters, not after the megabyte.
    assert_eq!(
        result.map(|r| r.map(|k| k.source)),
        Some(Ok(KeySource::Messages))
    );
    assert!(
        scanner.scanned() < 2 * LEN,
        "read {} bytes",
        scanner.scanned()
    );
    // With the role after a huge content, the message cannot end within the scan limit.
    let body = format!(r#"{{"messages": [{{"content": "{long}", "role": "user"}}]}}"#);
    let mut scanner = KeyScanner::new(LEN);
    let mut result = None;
    for piece in body.as_bytes().chunks(16 * 1024) {
        if let Scan::Done(r) = scanner.feed(piece) {
            result = Some(r);
            break;
        }
    }
    assert_eq!(result, Some(Err(NoKey::ScanLimit)));
    assert_eq!(scanner.scanned(), MAX_SCAN_BYTES);
    // ...while a prompt is complete after its first 1,024 characters.
    let body = format!(r#"{{"prompt": "{long}", "max_tokens": 5}}"#);
    let mut scanner = KeyScanner::new(LEN);
    match scanner.feed(body.as_bytes()) {
        Scan::Done(Ok(key)) => assert_eq!(key.source, KeySource::Prompt),
        other => panic!("{other:?}"),
    }
    assert!(
        scanner.scanned() < 2 * LEN,
        "read {} bytes",
        scanner.scanned()
    );
}

#[test]
fn messages_after_a_hundred_kilobytes_of_other_fields_are_found() {
    let filler = "f".repeat(100 * 1024);
    let late = format!(
        r#"{{"metadata": {{"note": "{filler}", "list": [1, 2, {{"x": "]"}}]}}, "messages": [{{"role": "user", "content": "hello"}}]}}"#
    );
    let early = r#"{"messages": [{"role": "user", "content": "hello"}]}"#;
    assert_eq!(
        key_in_chunks(late.as_bytes(), 8 * 1024),
        key_of(early.as_bytes())
    );
}

#[test]
fn completions_prompts_strings_lists_and_token_ids() {
    let one = key_of(br#"{"prompt": "Once upon a time", "model": "m"}"#).unwrap();
    assert_eq!(one.source, KeySource::Prompt);
    assert_eq!(
        key_of(br#"{"model": "x", "prompt": "Once upon a time"}"#).unwrap(),
        one
    );
    let list = key_of(br#"{"prompt": ["Once upon", "a time"]}"#).unwrap();
    assert_ne!(list, one);
    let ids = key_of(br#"{"prompt": [101, 2023, 2003]}"#).unwrap();
    assert_eq!(ids, key_of(br#"{"prompt": [101,2023, 2003]}"#).unwrap());
    assert_ne!(ids, key_of(br#"{"prompt": [101, 2023, 2004]}"#).unwrap());
}

#[test]
fn multimodal_parts_use_their_text_and_image_urls() {
    let with_image = |url: &str| {
        chat(
            &format!(
                r#"[{{"role": "user", "content": [{{"type": "image_url", "image_url": {{"url": "{url}", "detail": "low"}}}}, {{"type": "text", "text": "what is this?"}}]}}]"#
            ),
            "",
        )
    };
    let a = key_of(with_image("https://x/cat.png").as_bytes()).unwrap();
    assert_eq!(a.source, KeySource::Messages);
    assert_eq!(
        key_of(with_image("https://x/cat.png").as_bytes()).unwrap(),
        a
    );
    assert_ne!(
        key_of(with_image("https://x/dog.png").as_bytes()).unwrap(),
        a
    );
}

#[test]
fn bodies_that_are_not_chat_or_completions() {
    // Not JSON: the first bytes of the body.
    let text = key_of(b"plain text prompt").unwrap();
    assert_eq!(text.source, KeySource::RawBody);
    assert_eq!(key_of(b"plain text prompt").unwrap(), text);
    assert_ne!(key_of(b"plain text prompT").unwrap(), text);
    // JSON without messages or prompt (embeddings): also the raw body.
    let embed = key_of(br#"{"input": "embed me", "model": "e"}"#).unwrap();
    assert_eq!(embed.source, KeySource::RawBody);
    // Nothing, or a document that ends early: no key.
    assert_eq!(key_of(b""), Err(NoKey::NoBody));
    assert_eq!(key_of(b"   "), Err(NoKey::NoBody));
    assert_eq!(
        key_of(br#"{"messages": [{"role": "user", "content": "hel"#),
        Err(NoKey::Truncated)
    );
    assert_eq!(key_of(br#"{"messages": [}"#), Err(NoKey::Truncated));
    assert_eq!(key_of(br#"{"a": "\x"}"#), Err(NoKey::Truncated));
}

#[test]
fn hostile_bodies_are_bounded_and_never_panic() {
    let deep = "[".repeat(10_000);
    let body = format!(r#"{{"x": {deep}"#);
    assert_eq!(key_of(body.as_bytes()), Err(NoKey::Truncated));
    let mut rng = crate::rng::SplitMix64::new(7);
    use crate::rng::RandomSource;
    for _ in 0..2_000 {
        let len = rng.below(300);
        let alphabet = b"{}[]\":,\\u0aZ \xff\xc3";
        let body: Vec<u8> = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        let _ = key_in_chunks(&body, 1 + rng.below(9));
    }
    // Broken UTF-8 and lone surrogates become replacement characters, not errors.
    let key = key_of(b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff \\ud800 x\"}]}");
    assert!(key.is_ok(), "{key:?}");
}

#[test]
fn rendezvous_scores_are_stable_and_spread() {
    let endpoints: Vec<u64> = (0..10)
        .map(|i| endpoint_hash(&format!("10.0.0.{i}:8000")))
        .collect();
    let mut wins = [0u32; 10];
    for k in 0..10_000u64 {
        let key = mix(k);
        let best = (0..10).max_by_key(|&e| score(key, endpoints[e])).unwrap();
        wins[best] += 1;
    }
    assert!(wins.iter().all(|&w| (800..1_200).contains(&w)), "{wins:?}");
    // Removing one endpoint moves only the keys it owned.
    let mut moved = 0;
    for k in 0..10_000u64 {
        let key = mix(k);
        let before = (0..10).max_by_key(|&e| score(key, endpoints[e])).unwrap();
        let after = (0..9).max_by_key(|&e| score(key, endpoints[e])).unwrap();
        if before != after {
            assert_eq!(before, 9, "a key moved between surviving endpoints");
            moved += 1;
        }
    }
    assert_eq!(moved, wins[9]);
}
