//! Decoding request lines (SPEC §6), once, straight into the request types.
//!
//! The fast path reads the line's top-level object key by key: `op` names the request type, and
//! the keys after it are handed to that type's own `Deserialize` as they come (through
//! [`BodyMap`]), so a line is parsed once, with no intermediate `Value`. `req` may sit anywhere.
//! Lines the fast path cannot take (a body key before `op`) and lines it refuses take the slow
//! path: a `Value` tree (refusing duplicate keys at any depth, with their path), then the op's
//! type through `serde_path_to_error`, which names the failing field. The slow path is only
//! the price of an error (or of an unusual key order), and it is the one that words errors.
//!
//! Duplicate keys are refused everywhere (SPEC §6): structs by serde's derive (`duplicate
//! field`), maps through [`unique_map`], `req` and the top level here.

use crate::wire::{ErrorCode, Request, RequestLine, WireError, MAX_LINE_BYTES};
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;

/// Decode one request line (without its trailing newline).
///
/// The `req` value, when it could be read, is returned with the error so the caller can echo it.
pub fn decode_request(line: &[u8]) -> Result<RequestLine, (WireError, Option<Value>)> {
    if line.len() > MAX_LINE_BYTES {
        return Err((
            WireError::new(
                ErrorCode::TooLarge,
                format!(
                    "line is {} bytes; the limit is {MAX_LINE_BYTES}",
                    line.len()
                ),
            ),
            None,
        ));
    }
    let text = std::str::from_utf8(line).map_err(|e| {
        (
            WireError::new(
                ErrorCode::BadRequest,
                format!("line is not valid UTF-8 (at byte {})", e.valid_up_to()),
            ),
            None,
        )
    })?;
    match fast(text) {
        Ok(Some(decoded)) => Ok(decoded),
        // Refused, or not decodable in one pass: the slow path words the error (or decodes).
        Ok(None) | Err(_) => slow(text),
    }
}

/// The fast path: `Ok(None)` when a body key comes before `op` (the slow path takes it).
fn fast(text: &str) -> Result<Option<RequestLine>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let out = de::Deserializer::deserialize_map(&mut de, LineVisitor)?;
    de.end()?;
    Ok(out)
}

struct LineVisitor;

impl<'de> Visitor<'de> for LineVisitor {
    type Value = Option<RequestLine>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut req: Option<Value> = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "req" => {
                    if req.is_some() {
                        return Err(de::Error::custom("duplicate key `req`"));
                    }
                    req = Some(map.next_value_seed(UniqueValue)?);
                }
                "op" => {
                    let op: Cow<'de, str> = map.next_value()?;
                    let mut body = BodyMap {
                        inner: &mut map,
                        req: &mut req,
                    };
                    let request = body_of(&op, &mut body)?;
                    // Every key was consumed by the body (or refused there).
                    return Ok(request.map(|request| RequestLine { request, req }));
                }
                // A body key before `op`: its type is not known yet.
                _ => return Ok(None),
            }
        }
        Ok(None)
    }
}

/// The request of type `op` from the rest of the top-level map; `None` for an unknown op (the
/// slow path words it).
fn body_of<'de, A: MapAccess<'de>>(
    op: &str,
    body: &mut BodyMap<'_, A>,
) -> Result<Option<Request>, A::Error> {
    fn read<'de, T: Deserialize<'de>, A: MapAccess<'de>>(
        body: &mut BodyMap<'_, A>,
    ) -> Result<T, A::Error> {
        T::deserialize(de::value::MapAccessDeserializer::new(body))
    }
    Ok(Some(match op {
        "hello" => Request::Hello(read(body)?),
        "record" => Request::Record(read(body)?),
        "reserve" => Request::Reserve(read(body)?),
        "check" => Request::Check(read(body)?),
        "commit" => Request::Commit(read(body)?),
        "release" => Request::Release(read(body)?),
        "extend" => Request::Extend(read(body)?),
        "status" => Request::Status(read(body)?),
        "tail" => Request::Tail(read(body)?),
        "export" => Request::Export(read(body)?),
        "replay" => Request::Replay(read(body)?),
        "report" => Request::Report(read(body)?),
        "observe" => Request::Observe(read(body)?),
        "verify" | "reload" | "cluster_status" => {
            let Empty = read(body)?;
            match op {
                "verify" => Request::Verify,
                "reload" => Request::Reload,
                _ => Request::ClusterStatus,
            }
        }
        _ => return Ok(None),
    }))
}

/// A body without fields (`verify`, `reload`): any key is refused.
struct Empty;

impl<'de> Deserialize<'de> for Empty {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Empty;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("no fields")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Empty, A::Error> {
                match map.next_key::<de::IgnoredAny>()? {
                    Some(_) => Err(de::Error::custom("unknown field")),
                    None => Ok(Empty),
                }
            }
        }
        d.deserialize_map(V)
    }
}

/// The top-level map after `op`, as the request type sees it: `req` is taken out (once), a
/// second `op` is refused.
struct BodyMap<'a, A> {
    inner: &'a mut A,
    req: &'a mut Option<Value>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for &mut BodyMap<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        loop {
            let Some(key) = self.inner.next_key::<Cow<'de, str>>()? else {
                return Ok(None);
            };
            match key.as_ref() {
                "req" => {
                    if self.req.is_some() {
                        return Err(de::Error::custom("duplicate key `req`"));
                    }
                    *self.req = Some(self.inner.next_value_seed(UniqueValue)?);
                }
                "op" => return Err(de::Error::custom("duplicate key `op`")),
                _ => {
                    let k: de::value::CowStrDeserializer<'de, A::Error> = key.into_deserializer();
                    return seed.deserialize(k).map(Some);
                }
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        self.inner.next_value_seed(seed)
    }
}

/// A JSON value of which no object names a key twice.
struct UniqueValue;

impl<'de> DeserializeSeed<'de> for UniqueValue {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        let dup = RefCell::new(None);
        ValueAt {
            path: String::new(),
            dup: &dup,
        }
        .deserialize(d)
    }
}

/// Builds a `Value`, refusing a key an object already has; records the first duplicate's
/// dotted path in `dup`.
struct ValueAt<'a> {
    path: String,
    dup: &'a RefCell<Option<String>>,
}

impl ValueAt<'_> {
    fn child(&self, seg: &str) -> String {
        if self.path.is_empty() {
            seg.to_string()
        } else {
            format!("{}.{seg}", self.path)
        }
    }
}

impl<'de> DeserializeSeed<'de> for ValueAt<'_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueAt<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        let mut i = 0usize;
        loop {
            let seed = ValueAt {
                path: self.child(&i.to_string()),
                dup: self.dup,
            };
            match seq.next_element_seed(seed)? {
                Some(v) => out.push(v),
                None => break,
            }
            i += 1;
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = self.child(&key);
            if out.contains_key(&key) {
                *self.dup.borrow_mut() = Some(path);
                return Err(de::Error::custom(format!("duplicate key `{key}`")));
            }
            let v = map.next_value_seed(ValueAt {
                path,
                dup: self.dup,
            })?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// The slow path: a `Value` tree without duplicate keys, then the op's type with the failing
/// field named.
fn slow(text: &str) -> Result<RequestLine, (WireError, Option<Value>)> {
    let dup = RefCell::new(None);
    let parsed = {
        let mut de = serde_json::Deserializer::from_str(text);
        ValueAt {
            path: String::new(),
            dup: &dup,
        }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
    };
    let value = match parsed {
        Ok(v) => v,
        Err(e) => {
            return Err(match dup.into_inner() {
                Some(path) => {
                    // Echo `req` unless it is what was named twice (or holds the duplicate).
                    let req = if path == "req" || path.starts_with("req.") {
                        None
                    } else {
                        match serde_json::from_str::<Value>(text) {
                            Ok(Value::Object(mut m)) => m.remove("req"),
                            _ => None,
                        }
                    };
                    let err = WireError::bad_field(
                        path.clone(),
                        format!("{path}: the key appears more than once in its object"),
                    );
                    (err, req)
                }
                None => (
                    WireError::new(
                        ErrorCode::BadRequest,
                        format!("line is not valid JSON: {e}"),
                    ),
                    None,
                ),
            });
        }
    };
    let Value::Object(mut map) = value else {
        return Err((
            WireError::new(ErrorCode::BadRequest, "a request must be a JSON object"),
            None,
        ));
    };
    let req = map.remove("req");
    let op = match map.remove("op") {
        Some(Value::String(op)) => op,
        Some(_) => return Err((WireError::bad_field("op", "`op` must be a string"), req)),
        None => return Err((WireError::bad_field("op", "missing field `op`"), req)),
    };
    let body = Value::Object(map);
    let request = match op.as_str() {
        "hello" => Request::Hello(body_as(body).map_err(|e| (e, req.clone()))?),
        "record" => Request::Record(body_as(body).map_err(|e| (e, req.clone()))?),
        "reserve" => Request::Reserve(body_as(body).map_err(|e| (e, req.clone()))?),
        "check" => Request::Check(body_as(body).map_err(|e| (e, req.clone()))?),
        "commit" => Request::Commit(body_as(body).map_err(|e| (e, req.clone()))?),
        "release" => Request::Release(body_as(body).map_err(|e| (e, req.clone()))?),
        "extend" => Request::Extend(body_as(body).map_err(|e| (e, req.clone()))?),
        "status" => Request::Status(body_as(body).map_err(|e| (e, req.clone()))?),
        "tail" => Request::Tail(body_as(body).map_err(|e| (e, req.clone()))?),
        "export" => Request::Export(body_as(body).map_err(|e| (e, req.clone()))?),
        "replay" => Request::Replay(body_as(body).map_err(|e| (e, req.clone()))?),
        "report" => Request::Report(body_as(body).map_err(|e| (e, req.clone()))?),
        "observe" => Request::Observe(body_as(body).map_err(|e| (e, req.clone()))?),
        "verify" => {
            empty_body(&body).map_err(|e| (e, req.clone()))?;
            Request::Verify
        }
        "reload" => {
            empty_body(&body).map_err(|e| (e, req.clone()))?;
            Request::Reload
        }
        "cluster_status" => {
            empty_body(&body).map_err(|e| (e, req.clone()))?;
            Request::ClusterStatus
        }
        other => {
            let mut shown: String = other.chars().take(64).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            return Err((
                WireError {
                    code: ErrorCode::UnknownOp,
                    message: format!("unknown op `{shown}`"),
                    field: Some("op".into()),
                },
                req,
            ));
        }
    };
    Ok(RequestLine { request, req })
}

fn empty_body(body: &Value) -> Result<(), WireError> {
    if let Value::Object(m) = body {
        if let Some(k) = m.keys().next() {
            let message = format!("unknown field `{k}`");
            // An empty key cannot be named as a field (as in `body_as`): the message says it.
            return Err(if k.is_empty() {
                WireError::new(ErrorCode::BadRequest, message)
            } else {
                WireError::bad_field(k.clone(), message)
            });
        }
    }
    Ok(())
}

/// Decode a JSON value into `T`, naming the failing field on error.
pub fn body_as<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, WireError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let inner = e.inner().to_string();
        let mut path = e.path().to_string();
        // For an unknown or missing field, serde reports the parent path; name the field itself.
        if let Some(name) = backticked_field(&inner) {
            let named = path == name || path.ends_with(&format!(".{name}"));
            if !named && (inner.starts_with("unknown field") || inner.starts_with("missing field"))
            {
                path = if path == "." || path.is_empty() {
                    name
                } else {
                    format!("{path}.{name}")
                };
            }
        }
        let field = if path == "." || path.is_empty() {
            None
        } else {
            Some(path)
        };
        WireError {
            code: ErrorCode::BadRequest,
            message: match &field {
                Some(f) => format!("{f}: {inner}"),
                None => inner,
            },
            field,
        }
    })
}

fn backticked_field(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let len = msg.get(start..)?.find('`')?;
    msg.get(start..start + len).map(str::to_string)
}

/// `deserialize_with` for a map that must not name a key twice (serde's own maps keep the last
/// value): labels, price tables.
pub fn unique_map<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: de::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Visit<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> Visitor<'de> for Visit<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(k) = map.next_key::<String>()? {
                if out.contains_key(&k) {
                    return Err(de::Error::custom(format!("duplicate key `{k}`")));
                }
                let v = map.next_value()?;
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Visit(std::marker::PhantomData))
}

/// A field that takes its default when absent takes it when `null` too, in JSON
/// (docs/protocol.md: "`null` and an absent optional field mean the same"). Other formats (the
/// log's bincode, where `Usage` is stored) read the value as it is, so their encoding is
/// unchanged.
pub fn or_default_if_null<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: de::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    if d.is_human_readable() {
        Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
    } else {
        T::deserialize(d)
    }
}

/// `usage.requests`: 1 when `null`, as when absent ([`or_default_if_null`]).
pub fn requests_or_one<'de, D: de::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    if d.is_human_readable() {
        Ok(Option::<u64>::deserialize(d)?.unwrap_or(1))
    } else {
        u64::deserialize(d)
    }
}

/// [`unique_map`], empty when `null` in JSON ([`or_default_if_null`]).
pub fn unique_map_or_null<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: de::Deserializer<'de>,
    V: Deserialize<'de>,
{
    if d.is_human_readable() {
        Ok(unique_map_opt(d)?.unwrap_or_default())
    } else {
        unique_map(d)
    }
}

/// [`unique_map`] of an optional map.
pub fn unique_map_opt<'de, D, V>(d: D) -> Result<Option<BTreeMap<String, V>>, D::Error>
where
    D: de::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Wrap<V>(BTreeMap<String, V>);
    impl<'de, V: Deserialize<'de>> Deserialize<'de> for Wrap<V> {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            unique_map(d).map(Wrap)
        }
    }
    Ok(Option::<Wrap<V>>::deserialize(d)?.map(|w| w.0))
}
