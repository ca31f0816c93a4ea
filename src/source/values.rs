//! Conversion of column values from their PostgreSQL text form to JSON, by type OID:
//! bool -> bool; integers and floats -> numbers (NaN and infinities -> strings);
//! numeric -> exact string; json/jsonb -> embedded JSON; bytea -> base64; arrays ->
//! JSON arrays; every other type -> its text form unchanged. NULL is the caller's.
//!
//! The text forms assumed are those of a connection with `DateStyle=ISO`,
//! `extra_float_digits=3` and `bytea_output=hex` (the escape form is also read).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Number, Value};

/// Builtin type OIDs (`pg_type.oid`) that conversion treats specially.
pub mod oid {
    /// `bool`
    pub const BOOL: u32 = 16;
    /// `bytea`
    pub const BYTEA: u32 = 17;
    /// `"char"`
    pub const CHAR: u32 = 18;
    /// `name`
    pub const NAME: u32 = 19;
    /// `int8`
    pub const INT8: u32 = 20;
    /// `int2`
    pub const INT2: u32 = 21;
    /// `int4`
    pub const INT4: u32 = 23;
    /// `text`
    pub const TEXT: u32 = 25;
    /// `oid`
    pub const OID: u32 = 26;
    /// `json`
    pub const JSON: u32 = 114;
    /// `box`, whose arrays use `;` between elements
    pub const BOX: u32 = 603;
    /// `float4`
    pub const FLOAT4: u32 = 700;
    /// `float8`
    pub const FLOAT8: u32 = 701;
    /// `bpchar`
    pub const BPCHAR: u32 = 1042;
    /// `varchar`
    pub const VARCHAR: u32 = 1043;
    /// `date`
    pub const DATE: u32 = 1082;
    /// `timestamp`
    pub const TIMESTAMP: u32 = 1114;
    /// `timestamptz`
    pub const TIMESTAMPTZ: u32 = 1184;
    /// `numeric`
    pub const NUMERIC: u32 = 1700;
    /// `uuid`
    pub const UUID: u32 = 2950;
    /// `jsonb`
    pub const JSONB: u32 = 3802;
    /// `int4[]`
    pub const INT4_ARRAY: u32 = 1007;
    /// `text[]`
    pub const TEXT_ARRAY: u32 = 1009;
}

/// Converts one non-NULL column value from its text form to JSON.
///
/// `type_name` is the name a pgoutput Type message gave a non-builtin type; a name
/// starting with `_` marks an array type, converted to an array of strings. A value
/// that does not parse as its type claims is kept as its text.
pub fn to_json(type_oid: u32, type_name: Option<&str>, text: &str) -> Value {
    match kind(type_oid, type_name) {
        Kind::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => string(text),
        },
        Kind::Integer => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| string(text)),
        Kind::Oid => text
            .parse::<u32>()
            .map(Value::from)
            .unwrap_or_else(|_| string(text)),
        Kind::Float => float(text),
        Kind::Json => serde_json::from_str(text).unwrap_or_else(|_| string(text)),
        Kind::Bytea => match bytea(text) {
            Some(raw) => Value::String(BASE64.encode(raw)),
            None => string(text),
        },
        Kind::Array { element, delim } => array(text, element, delim),
        Kind::Text => string(text),
    }
}

/// How a type's text form becomes JSON.
#[derive(Clone, Copy)]
enum Kind {
    Bool,
    Integer,
    Oid,
    Float,
    Json,
    Bytea,
    Array {
        element: u32,
        delim: u8,
    },
    /// The text form unchanged, as a string.
    Text,
}

fn kind(type_oid: u32, type_name: Option<&str>) -> Kind {
    match type_oid {
        oid::BOOL => Kind::Bool,
        oid::INT2 | oid::INT4 | oid::INT8 => Kind::Integer,
        oid::OID => Kind::Oid,
        oid::FLOAT4 | oid::FLOAT8 => Kind::Float,
        oid::JSON | oid::JSONB => Kind::Json,
        oid::BYTEA => Kind::Bytea,
        _ => {
            if let Some(element) = array_element(type_oid) {
                let delim = if element == oid::BOX { b';' } else { b',' };
                Kind::Array { element, delim }
            } else if type_name.is_some_and(|name| name.starts_with('_')) {
                Kind::Array {
                    element: oid::TEXT,
                    delim: b',',
                }
            } else {
                Kind::Text
            }
        }
    }
}

/// One non-NULL column value as [`to_json`] converts it, serialised without building
/// the [`Value`] for booleans, integers and text (a row's JSON written straight from
/// the stream: [`crate::source::decoder::JsonRows`]). Serialises to the same bytes as
/// `to_json`'s value.
pub struct JsonText<'a> {
    pub type_oid: u32,
    pub type_name: Option<&'a str>,
    pub text: &'a str,
}

impl serde::Serialize for JsonText<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = self.text;
        match kind(self.type_oid, self.type_name) {
            Kind::Text => s.serialize_str(text),
            Kind::Bool => match text {
                "t" => s.serialize_bool(true),
                "f" => s.serialize_bool(false),
                _ => s.serialize_str(text),
            },
            Kind::Integer => match text.parse::<i64>() {
                Ok(n) => s.serialize_i64(n),
                Err(_) => s.serialize_str(text),
            },
            _ => to_json(self.type_oid, self.type_name, text).serialize(s),
        }
    }
}

/// Converts a value the server sent in binary format: its bytes as a base64 string
/// (walhook asks for text format, so this is only a fallback).
pub fn binary_column_to_json(raw: &[u8]) -> Value {
    Value::String(BASE64.encode(raw))
}

fn string(text: &str) -> Value {
    Value::String(text.to_owned())
}

/// A float as a JSON number; NaN and the infinities (not JSON numbers) as text.
fn float(text: &str) -> Value {
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() => Number::from_f64(f).map_or_else(|| string(text), Value::Number),
        _ => string(text),
    }
}

/// The bytes of a bytea in hex (`\x0a0b`) or escape (`a\\b\001`) output form.
fn bytea(text: &str) -> Option<Vec<u8>> {
    if let Some(hex) = text.strip_prefix("\\x") {
        let hex = hex.as_bytes();
        if hex.len() % 2 != 0 {
            return None;
        }
        return hex
            .chunks_exact(2)
            .map(|pair| Some((hex_digit(pair[0])? << 4) | hex_digit(pair[1])?))
            .collect();
    }
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
        } else if b.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            let digits = b.get(i + 1..i + 4)?;
            let mut v: u16 = 0;
            for &d in digits {
                if !(b'0'..=b'7').contains(&d) {
                    return None;
                }
                v = v * 8 + u16::from(d - b'0');
            }
            out.push(u8::try_from(v).ok()?);
            i += 4;
        }
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The element type of a builtin array type (`pg_type.typelem` where `typcategory = 'A'`).
pub fn array_element(array_oid: u32) -> Option<u32> {
    Some(match array_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1002 => oid::CHAR,
        1003 => oid::NAME,
        1005 => oid::INT2,
        1006 => 22, // int2vector
        1007 => oid::INT4,
        1008 => 24, // regproc
        1009 => oid::TEXT,
        1028 => oid::OID,
        1010 => 27,  // tid
        1011 => 28,  // xid
        1012 => 29,  // cid
        1013 => 30,  // oidvector
        271 => 5069, // xid8
        199 => oid::JSON,
        143 => 142,  // xml
        1017 => 600, // point
        1018 => 601, // lseg
        1019 => 602, // path
        1020 => oid::BOX,
        1027 => 604, // polygon
        629 => 628,  // line
        719 => 718,  // circle
        651 => 650,  // cidr
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        791 => 790,  // money
        1040 => 829, // macaddr
        775 => 774,  // macaddr8
        1041 => 869, // inet
        1014 => oid::BPCHAR,
        1015 => oid::VARCHAR,
        1182 => oid::DATE,
        1183 => 1083, // time
        1115 => oid::TIMESTAMP,
        1185 => oid::TIMESTAMPTZ,
        1187 => 1186, // interval
        1270 => 1266, // timetz
        1561 => 1560, // bit
        1563 => 1562, // varbit
        1231 => oid::NUMERIC,
        2951 => oid::UUID,
        3807 => oid::JSONB,
        4073 => 4072, // jsonpath
        3221 => 3220, // pg_lsn
        3643 => 3614, // tsvector
        3645 => 3615, // tsquery
        2210 => 2205, // regclass
        2211 => 2206, // regtype
        3905 => 3904, // int4range
        3907 => 3906, // numrange
        3909 => 3908, // tsrange
        3911 => 3910, // tstzrange
        3913 => 3912, // daterange
        3927 => 3926, // int8range
        _ => return None,
    })
}

/// An array literal as a (nested) JSON array; a literal that does not parse stays text.
fn array(text: &str, element: u32, delim: u8) -> Value {
    let mut p = ArrayParser {
        s: text.as_bytes(),
        pos: 0,
        element,
        delim,
    };
    p.literal().unwrap_or_else(|| string(text))
}

/// PostgreSQL's MAXDIM: no array value has more dimensions.
const MAX_DIMENSIONS: usize = 6;

/// A recursive-descent reader of `array_out` output: `{a,"b c",NULL,{1,2}}`, maybe
/// preceded by bounds such as `[0:2]=`.
struct ArrayParser<'a> {
    s: &'a [u8],
    pos: usize,
    element: u32,
    delim: u8,
}

impl ArrayParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn literal(&mut self) -> Option<Value> {
        self.skip_ws();
        if self.peek() == Some(b'[') {
            // Dimension decoration: skip to the `=`; the shape comes from the braces.
            let eq = self.s.iter().position(|&c| c == b'=')?;
            self.pos = eq + 1;
            self.skip_ws();
        }
        let value = self.array(1)?;
        self.skip_ws();
        (self.pos == self.s.len()).then_some(value)
    }

    /// The array starting here, `depth` levels deep (1 for the outermost). Deeper than
    /// PostgreSQL's MAXDIM is no array it sends; refusing it also bounds the recursion.
    fn array(&mut self, depth: usize) -> Option<Value> {
        if self.peek()? != b'{' || depth > MAX_DIMENSIONS {
            return None;
        }
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Some(Value::Array(items));
        }
        loop {
            self.skip_ws();
            let item = match self.peek()? {
                b'{' => self.array(depth + 1)?,
                b'"' => {
                    let s = self.quoted()?;
                    to_json(self.element, None, &s)
                }
                _ => {
                    let (s, escaped) = self.unquoted()?;
                    if !escaped && s.eq_ignore_ascii_case("NULL") {
                        Value::Null
                    } else {
                        to_json(self.element, None, &s)
                    }
                }
            };
            items.push(item);
            self.skip_ws();
            let c = self.peek()?;
            self.pos += 1;
            if c == b'}' {
                return Some(Value::Array(items));
            } else if c != self.delim {
                return None;
            }
        }
    }

    /// A double-quoted element; backslash escapes the next byte.
    fn quoted(&mut self) -> Option<String> {
        self.pos += 1; // opening quote
        let mut out = Vec::new();
        loop {
            let c = self.peek()?;
            self.pos += 1;
            match c {
                b'"' => return String::from_utf8(out).ok(),
                b'\\' => {
                    out.push(self.peek()?);
                    self.pos += 1;
                }
                _ => out.push(c),
            }
        }
    }

    /// An unquoted element up to the delimiter or `}`, trailing blanks trimmed; also
    /// says whether it held an escape (an escaped `NULL` is the string "NULL").
    fn unquoted(&mut self) -> Option<(String, bool)> {
        let mut out = Vec::new();
        let mut escaped = false;
        let mut keep = 0; // length without trailing unescaped whitespace
        loop {
            let c = self.peek()?;
            if c == self.delim || c == b'}' {
                break;
            }
            if c == b'{' || c == b'"' {
                return None;
            }
            self.pos += 1;
            if c == b'\\' {
                out.push(self.peek()?);
                self.pos += 1;
                escaped = true;
                keep = out.len();
            } else {
                out.push(c);
                if !c.is_ascii_whitespace() {
                    keep = out.len();
                }
            }
        }
        out.truncate(keep);
        if out.is_empty() {
            return None;
        }
        Some((String::from_utf8(out).ok()?, escaped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The direct writer gives `to_json`'s bytes for every kind of type, well-formed
    /// or not.
    #[test]
    fn json_text_serialises_as_to_json_does() {
        let cases: &[(u32, Option<&str>, &str)] = &[
            (oid::BOOL, None, "t"),
            (oid::BOOL, None, "f"),
            (oid::BOOL, None, "maybe"),
            (oid::INT2, None, "-32768"),
            (oid::INT4, None, "0"),
            (oid::INT8, None, "9223372036854775807"),
            (oid::INT8, None, "-9223372036854775808"),
            (oid::INT8, None, "12x"),
            (oid::OID, None, "4294967295"),
            (oid::FLOAT8, None, "1.5"),
            (oid::FLOAT4, None, "NaN"),
            (oid::NUMERIC, None, "3.14159265358979323846"),
            (oid::JSON, None, r#"{"a": [1, 2.50, "x\u0041"]}"#),
            (oid::JSONB, None, "not json"),
            (oid::BYTEA, None, "\\x0a0b"),
            (oid::TEXT, None, "a\"b\\c\n\u{7}\u{1F600}<>&"),
            (oid::VARCHAR, None, ""),
            (oid::TIMESTAMPTZ, None, "2026-12-05 06:22:34.571322+00"),
            (oid::UUID, None, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            (oid::TEXT_ARRAY, None, r#"{a,"b,c",NULL}"#),
            (oid::INT4_ARRAY, None, "{1,2,3}"),
            (99_999, Some("_mood"), "{happy,sad}"),
            (99_999, Some("mood"), "happy"),
        ];
        for &(type_oid, type_name, text) in cases {
            let direct = serde_json::to_string(&JsonText {
                type_oid,
                type_name,
                text,
            })
            .unwrap();
            let value = serde_json::to_string(&to_json(type_oid, type_name, text)).unwrap();
            assert_eq!(
                direct, value,
                "type {type_oid} {type_name:?}, text {text:?}"
            );
        }
    }

    fn conv(oid: u32, text: &str) -> Value {
        to_json(oid, None, text)
    }

    #[test]
    fn bools() {
        assert_eq!(conv(oid::BOOL, "t"), json!(true));
        assert_eq!(conv(oid::BOOL, "f"), json!(false));
    }

    #[test]
    fn integers_and_oids() {
        assert_eq!(conv(oid::INT2, "-32768"), json!(-32768));
        assert_eq!(conv(oid::INT4, "42"), json!(42));
        assert_eq!(
            conv(oid::INT8, "9223372036854775807"),
            json!(9_223_372_036_854_775_807_i64)
        );
        assert_eq!(conv(oid::OID, "4294967295"), json!(4_294_967_295_u32));
        assert_eq!(conv(oid::INT4, "junk"), json!("junk"));
    }

    #[test]
    fn floats_with_special_values() {
        assert_eq!(conv(oid::FLOAT8, "1.5"), json!(1.5));
        assert_eq!(conv(oid::FLOAT4, "-0.25"), json!(-0.25));
        assert_eq!(conv(oid::FLOAT8, "1e+300"), json!(1e300));
        assert_eq!(conv(oid::FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(conv(oid::FLOAT4, "Infinity"), json!("Infinity"));
        assert_eq!(conv(oid::FLOAT8, "-Infinity"), json!("-Infinity"));
    }

    #[test]
    fn numeric_is_an_exact_string() {
        assert_eq!(
            conv(oid::NUMERIC, "12345678901234567890.000000000001"),
            json!("12345678901234567890.000000000001")
        );
        assert_eq!(conv(oid::NUMERIC, "NaN"), json!("NaN"));
    }

    #[test]
    fn json_is_embedded_in_order() {
        let v = conv(oid::JSONB, r#"{"b": 1, "a": [true, null]}"#);
        assert_eq!(v, json!({"b": 1, "a": [true, null]}));
        assert_eq!(v.to_string(), r#"{"b":1,"a":[true,null]}"#);
        assert_eq!(conv(oid::JSON, "\"s\""), json!("s"));
        assert_eq!(conv(oid::JSON, "{not json"), json!("{not json"));
    }

    #[test]
    fn bytea_becomes_base64() {
        assert_eq!(conv(oid::BYTEA, "\\x68656c6c6f"), json!("aGVsbG8="));
        assert_eq!(conv(oid::BYTEA, "\\x"), json!(""));
        assert_eq!(conv(oid::BYTEA, "\\xDEADbeef"), json!("3q2+7w=="));
        // Escape output form.
        assert_eq!(conv(oid::BYTEA, "a\\\\b\\001"), json!("YVxiAQ=="));
        assert_eq!(conv(oid::BYTEA, "\\xzz"), json!("\\xzz"));
        assert_eq!(binary_column_to_json(&[1, 2]), json!("AQI="));
    }

    #[test]
    fn passthrough_types_keep_their_text() {
        for (oid, text) in [
            (oid::TEXT, "hello, world"),
            (oid::VARCHAR, ""),
            (oid::TIMESTAMPTZ, "2026-11-25 19:15:30.123456+00"),
            (oid::TIMESTAMP, "2026-11-25 19:15:30"),
            (oid::DATE, "2026-11-25"),
            (oid::UUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            (869, "192.168.0.1/24"),
            (1186, "1 day 02:00:00"),
            (16_500, "happy"), // an enum
        ] {
            assert_eq!(conv(oid, text), json!(text), "oid {oid}");
        }
        assert_eq!(to_json(16_500, Some("mood"), "sad"), json!("sad"));
    }

    #[test]
    fn arrays_of_numbers_with_nulls() {
        assert_eq!(conv(oid::INT4_ARRAY, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(
            conv(1022, "{1.5,NaN,-Infinity}"),
            json!([1.5, "NaN", "-Infinity"])
        );
        assert_eq!(conv(1000, "{t,f}"), json!([true, false]));
        assert_eq!(conv(1231, "{1.10,NaN}"), json!(["1.10", "NaN"]));
        assert_eq!(conv(oid::INT4_ARRAY, "{}"), json!([]));
    }

    #[test]
    fn arrays_of_quoted_strings() {
        assert_eq!(
            conv(
                oid::TEXT_ARRAY,
                r#"{plain,"a,b","say \"hi\"","back\\slash","NULL",null}"#
            ),
            json!(["plain", "a,b", "say \"hi\"", "back\\slash", "NULL", null])
        );
        assert_eq!(
            conv(oid::TEXT_ARRAY, r#"{"","{}"," x "}"#),
            json!(["", "{}", " x "])
        );
        assert_eq!(
            conv(oid::TEXT_ARRAY, "{héllo,wörld}"),
            json!(["héllo", "wörld"])
        );
    }

    #[test]
    fn multidimensional_and_decorated_arrays() {
        assert_eq!(
            conv(oid::INT4_ARRAY, "{{1,2},{3,4}}"),
            json!([[1, 2], [3, 4]])
        );
        assert_eq!(conv(oid::INT4_ARRAY, "[0:2]={7,8,9}"), json!([7, 8, 9]));
        assert_eq!(
            conv(oid::INT4_ARRAY, "[1:1][-1:0]={{1,2}}"),
            json!([[1, 2]])
        );
    }

    #[test]
    fn arrays_of_json_bytea_and_box() {
        assert_eq!(
            conv(3807, r#"{"{\"a\": 1}",NULL,"[2]"}"#),
            json!([{"a": 1}, null, [2]])
        );
        assert_eq!(conv(1001, r#"{"\\x6869"}"#), json!(["aGk="]));
        assert_eq!(
            conv(1020, "{(1,1),(0,0);(3,3),(2,2)}"),
            json!(["(1,1),(0,0)", "(3,3),(2,2)"])
        );
        assert_eq!(
            conv(1185, r#"{"2026-01-01 00:00:00+00"}"#),
            json!(["2026-01-01 00:00:00+00"])
        );
    }

    #[test]
    fn user_defined_arrays_by_type_name() {
        assert_eq!(
            to_json(16_501, Some("_mood"), "{happy,sad}"),
            json!(["happy", "sad"])
        );
        assert_eq!(to_json(16_501, None, "{happy,sad}"), json!("{happy,sad}"));
    }

    #[test]
    fn arrays_deeper_than_maxdim_stay_text_without_overflowing_the_stack() {
        // Found with the pgoutput_message fuzz target's binary: 200k nested braces in an
        // int4[] column overflowed the stack (a crash, not an error).
        let deep = "{".repeat(200_000);
        assert_eq!(conv(1007, &deep), json!(deep));
        let six = "{{{{{{1}}}}}}";
        assert_eq!(conv(1007, six), json!([[[[[[1]]]]]]));
        let seven = "{{{{{{{1}}}}}}}";
        assert_eq!(conv(1007, seven), json!(seven));
    }

    #[test]
    fn malformed_arrays_stay_text() {
        for text in ["{1,2", "{1,,2}", "{\"a}", "1,2", "{1}x", "{a\"b}", "[1:2]"] {
            assert_eq!(conv(oid::INT4_ARRAY, text), json!(text), "{text}");
        }
    }
}
