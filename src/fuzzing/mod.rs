//! Fuzz target bodies: the code the `fuzz/` crate's cargo-fuzz targets run, kept in the
//! library so ordinary unit tests can replay the committed corpus (`fuzz/corpus/`) and
//! run a short seeded mutation loop over it without cargo-fuzz or a sanitizer build.
//! Each body must never panic, whatever the bytes; errors are the expected outcome of
//! most inputs. Not part of walhook's API.

use bytes::Bytes;

use crate::source::decoder::{Decoded, Decoder};
use crate::source::pgoutput::{self, Message, Relation, RelationColumn};
use crate::source::values::oid;

#[cfg(test)]
mod tests;

/// OIDs the capture cluster gave the user-defined enum `mood` and its array type.
const MOOD: u32 = 16_385;
const MOOD_ARRAY: u32 = 16_384;

/// The columns of `users` in the capture workload (fuzz/README.md). They cover every
/// conversion path of `values::to_json`: scalars, json, bytea, builtin arrays, a box
/// array, a user-defined enum and its array (named by Type messages).
const USERS_COLUMNS: &[(&str, u32)] = &[
    ("id", oid::INT4),
    ("email", oid::TEXT),
    ("status", oid::TEXT),
    ("bio", oid::TEXT),
    ("tags", oid::TEXT_ARRAY),
    ("meta", oid::JSONB),
    ("pic", oid::BYTEA),
    ("mood", MOOD),
    ("moods", MOOD_ARRAY),
    ("score", oid::FLOAT8),
    ("amount", oid::NUMERIC),
    ("born", oid::TIMESTAMPTZ),
    ("grid", oid::INT4_ARRAY),
    ("boxes", 1020), // box[]
];

/// One table [`pgoutput_message`] announces before decoding its input.
pub struct FuzzTable {
    /// The relation id the capture script gives this table's row changes.
    pub relation_id: u32,
    /// The table's name in the capture workload.
    pub name: &'static str,
    /// How many columns its row changes carry.
    pub columns: usize,
    replica_identity: u8,
    key: &'static [&'static str],
}

/// The capture workload's tables, as `fuzz/scripts/capture_pgoutput.py` renumbers the
/// row changes it writes to `fuzz/corpus/pgoutput_message/`: `users` before and after
/// its `ADD COLUMN extra text`, `audit` (REPLICA IDENTITY FULL, no key) and `roles`.
pub const FUZZ_TABLES: &[FuzzTable] = &[
    FuzzTable {
        relation_id: 1,
        name: "users",
        columns: USERS_COLUMNS.len(),
        replica_identity: b'd',
        key: &["id"],
    },
    FuzzTable {
        relation_id: 2,
        name: "users",
        columns: USERS_COLUMNS.len() + 1,
        replica_identity: b'd',
        key: &["id"],
    },
    FuzzTable {
        relation_id: 3,
        name: "audit",
        columns: 2,
        replica_identity: b'f',
        key: &[],
    },
    FuzzTable {
        relation_id: 4,
        name: "roles",
        columns: 2,
        replica_identity: b'd',
        key: &["user_id", "role"],
    },
];

impl FuzzTable {
    fn relation(&self) -> Relation {
        let columns: &[(&str, u32)] = match self.name {
            "users" => &[USERS_COLUMNS, &[("extra", oid::TEXT)]].concat(),
            "audit" => &[("a", oid::INT4), ("b", oid::TEXT)],
            _ => &[("user_id", oid::INT4), ("role", oid::TEXT)],
        };
        Relation {
            id: self.relation_id,
            namespace: "public".into(),
            name: self.name.into(),
            replica_identity: self.replica_identity,
            columns: columns[..self.columns]
                .iter()
                .map(|&(name, type_oid)| RelationColumn {
                    is_key: self.key.contains(&name),
                    name: name.to_string(),
                    type_oid,
                    type_modifier: -1,
                })
                .collect(),
        }
    }
}

/// Parses one pgoutput message from arbitrary bytes and decodes it with a decoder that
/// knows the tables of [`FUZZ_TABLES`], so row changes reach the value conversion. Returns how many row changes it decoded (0 or 1).
pub fn pgoutput_message(data: &[u8]) -> usize {
    let mut decoder = fuzz_decoder();
    feed(&mut decoder, data)
}

/// Splits `data` into messages, each a big-endian u32 length then that many bytes (the
/// last one takes what is left), and feeds them in order through one [`Decoder`], as a
/// replication session would. `fuzz/corpus/pgoutput_stream/` holds real sessions in
/// this framing ([`frame_stream`] writes it). Returns how many row changes it decoded.
pub fn pgoutput_stream(data: &[u8]) -> usize {
    let mut decoder = Decoder::new();
    split_stream(data)
        .into_iter()
        .map(|message| feed(&mut decoder, message))
        .sum()
}

/// Loads a config from arbitrary text (lossily made UTF-8) with a fixed environment, so
/// runs never depend on the real one. Returns whether the config is valid.
pub fn config(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    match crate::config::load_str(&text, "walhook.toml", &fixed_env) {
        Ok(_) => true,
        Err(errors) => {
            // Every error must render (messages, lines, causes).
            let _ = errors.to_string();
            false
        }
    }
}

/// For the cargo-fuzz `config` target: libFuzzer's panic hook aborts on every panic,
/// even one the code catches. Config validation runs the third-party CEL parser inside
/// `catch_unwind` (its panics become a config error), so panics raised under
/// `compile_cel` are let through to be caught; every other panic still aborts.
pub fn allow_caught_third_party_panics() {
    let abort = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let trace = std::backtrace::Backtrace::force_capture().to_string();
        if !trace.contains("compile_cel") {
            abort(info);
        }
    }));
}

/// The environment [`config`] sees: the variables the example configs reference.
fn fixed_env(name: &str) -> Option<String> {
    let value = match name {
        "DATABASE_URL" => "postgres://walhook:pw@db.internal:5432/app",
        "STORE_URL" => "postgres://walhook:pw@store.internal/walhook",
        "CRM_TOKEN" => "token-123",
        "CRM_SECRET" | "SECRET" => "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "EMPTY" => "",
        "WALHOOK_LOG__LEVEL" => "debug",
        _ => return None,
    };
    Some(value.to_string())
}

/// The messages of a length-prefixed stream (see [`pgoutput_stream`]).
pub fn split_stream(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let Some((len, rest)) = data.split_first_chunk::<4>() else {
            out.push(data);
            break;
        };
        let len = (u32::from_be_bytes(*len) as usize).min(rest.len());
        let (message, rest) = rest.split_at(len);
        out.push(message);
        data = rest;
    }
    out
}

/// Frames messages as [`pgoutput_stream`] reads them.
pub fn frame_stream<'a>(messages: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}

/// Parses and decodes one message; errors are rendered (their Display must not panic)
/// and otherwise ignored, so later messages still run. Returns 1 for a row change.
fn feed(decoder: &mut Decoder, data: &[u8]) -> usize {
    let result = pgoutput::parse(Bytes::copy_from_slice(data)).and_then(|m| decoder.decode(m));
    match result {
        Ok(Some(decoded)) => {
            let _ = format!("{decoded:?}");
            usize::from(matches!(decoded, Decoded::Change(_)))
        }
        Ok(None) => 0,
        Err(e) => {
            let _ = e.to_string();
            0
        }
    }
}

fn fuzz_decoder() -> Decoder {
    let mut decoder = Decoder::new();
    let ty = |id, name: &str| {
        Message::Type(pgoutput::TypeInfo {
            id,
            namespace: "public".into(),
            name: name.into(),
        })
    };
    let announce = [ty(MOOD, "mood"), ty(MOOD_ARRAY, "_mood")]
        .into_iter()
        .chain(FUZZ_TABLES.iter().map(|t| Message::Relation(t.relation())));
    for m in announce {
        decoder
            .decode(m)
            .expect("announcing a relation or type cannot fail");
    }
    decoder
}
