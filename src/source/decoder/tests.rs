//! Unit tests of the decoder: relation and type caches, rows, TOAST, key tuples.

use super::*;
use crate::source::pgoutput::parse;
use crate::source::pgoutput::tests::{Buf, TOAST};
use serde_json::json;

const USERS: u32 = 16_385;

fn relation(replident: u8, cols: &[(&str, u32, bool)]) -> Message {
    let mut b = Buf::new(b'R')
        .u32(USERS)
        .str("public")
        .str("users")
        .u8(replident)
        .u16(cols.len() as u16);
    for (name, oid, key) in cols {
        b = b.u8(u8::from(*key)).str(name).u32(*oid).i32(-1);
    }
    parse(b.bytes()).unwrap()
}

fn decoder(replident: u8, cols: &[(&str, u32, bool)]) -> Decoder {
    let mut d = Decoder::new();
    assert_eq!(d.decode(relation(replident, cols)).unwrap(), None);
    d
}

fn users(replident: u8) -> Decoder {
    decoder(
        replident,
        &[("id", 23, true), ("email", 25, false), ("bio", 25, false)],
    )
}

fn change_of(d: &mut Decoder, buf: Buf) -> Change {
    match d.decode(parse(buf.bytes()).unwrap()).unwrap() {
        Some(Decoded::Change(c)) => c,
        other => panic!("not a change: {other:?}"),
    }
}

fn row(v: Value) -> Row {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

#[test]
fn insert_converts_values_in_column_order() {
    let mut d = decoder(
        b'd',
        &[("id", 23, true), ("active", 16, false), ("note", 25, false)],
    );
    let c = change_of(
        &mut d,
        Buf::new(b'I')
            .u32(USERS)
            .u8(b'N')
            .tuple(&[Some("7"), Some("t"), None]),
    );
    assert_eq!(c.op, Op::Insert);
    assert_eq!(c.op.as_str(), "insert");
    assert_eq!(c.table.to_string(), "public.users");
    let new = c.new.unwrap();
    assert_eq!(new, row(json!({"id": 7, "active": true, "note": null})));
    assert_eq!(new.keys().collect::<Vec<_>>(), ["id", "active", "note"]);
    assert_eq!(c.old, None);
    assert!(c.unchanged_toast.is_empty());
    assert_eq!(&*c.key_columns, ["id".to_owned()]);
}

#[test]
fn relation_cache_follows_alter_table() {
    let mut d = decoder(b'd', &[("id", 23, true), ("email", 25, false)]);
    let c1 = change_of(
        &mut d,
        Buf::new(b'I')
            .u32(USERS)
            .u8(b'N')
            .tuple(&[Some("1"), Some("a@x")]),
    );
    let c2 = change_of(
        &mut d,
        Buf::new(b'I')
            .u32(USERS)
            .u8(b'N')
            .tuple(&[Some("2"), Some("b@x")]),
    );
    assert!(Arc::ptr_eq(&c1.table, &c2.table), "table name is shared");
    // ALTER TABLE users ADD COLUMN age int: a new Relation message for the same id.
    d.decode(relation(
        b'd',
        &[("id", 23, true), ("email", 25, false), ("age", 21, false)],
    ))
    .unwrap();
    let c = change_of(
        &mut d,
        Buf::new(b'I')
            .u32(USERS)
            .u8(b'N')
            .tuple(&[Some("3"), Some("c@x"), Some("40")]),
    );
    assert_eq!(
        c.new.unwrap(),
        row(json!({"id": 3, "email": "c@x", "age": 40}))
    );
    // A tuple of the old width no longer fits.
    let err = d
        .decode(
            parse(
                Buf::new(b'I')
                    .u32(USERS)
                    .u8(b'N')
                    .tuple(&[Some("4"), None])
                    .bytes(),
            )
            .unwrap(),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::ColumnCount {
                expected: 3,
                found: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn unchanged_toast_is_filled_from_a_full_old_row() {
    let mut d = users(b'f');
    let c = change_of(
        &mut d,
        Buf::new(b'U')
            .u32(USERS)
            .u8(b'O')
            .tuple(&[Some("1"), Some("old@x"), Some("long bio")])
            .u8(b'N')
            .tuple(&[Some("1"), Some("new@x"), Some(TOAST)]),
    );
    assert!(c.old_is_full);
    assert_eq!(
        c.new.unwrap(),
        row(json!({"id": 1, "email": "new@x", "bio": "long bio"}))
    );
    assert_eq!(
        c.old.unwrap(),
        row(json!({"id": 1, "email": "old@x", "bio": "long bio"}))
    );
    assert!(c.unchanged_toast.is_empty());
}

#[test]
fn unchanged_toast_is_left_out_without_a_full_old_row() {
    let mut d = users(b'd');
    let c = change_of(
        &mut d,
        Buf::new(b'U')
            .u32(USERS)
            .u8(b'N')
            .tuple(&[Some("1"), Some("new@x"), Some(TOAST)]),
    );
    let new = c.new.unwrap();
    assert_eq!(new, row(json!({"id": 1, "email": "new@x"})));
    assert!(!new.contains_key("bio"));
    assert_eq!(c.unchanged_toast, ["bio"]);
    assert_eq!(c.old, None);
    assert!(!c.old_is_full);

    // The key changed: a 'K' old tuple, which must not be used to fill.
    let c = change_of(
        &mut d,
        Buf::new(b'U')
            .u32(USERS)
            .u8(b'K')
            .tuple(&[Some("1"), None, None])
            .u8(b'N')
            .tuple(&[Some("2"), Some("new@x"), Some(TOAST)]),
    );
    assert_eq!(c.old.unwrap(), row(json!({"id": 1})));
    assert!(!c.old_is_full);
    assert_eq!(c.new.unwrap(), row(json!({"id": 2, "email": "new@x"})));
    assert_eq!(c.unchanged_toast, ["bio"]);
}

#[test]
fn key_only_old_tuple_omits_non_key_columns() {
    let mut d = users(b'd');
    let c = change_of(
        &mut d,
        Buf::new(b'D')
            .u32(USERS)
            .u8(b'K')
            .tuple(&[Some("5"), None, None]),
    );
    assert_eq!(c.op, Op::Delete);
    assert_eq!(c.new, None);
    let old = c.old.unwrap();
    assert_eq!(old, row(json!({"id": 5})));
    assert!(
        !old.contains_key("email"),
        "unknown values are left out, not null"
    );
    assert!(!c.old_is_full);
}

#[test]
fn replica_identity_index_keys_several_columns() {
    let mut d = decoder(
        b'i',
        &[("org", 25, true), ("id", 20, true), ("name", 25, false)],
    );
    let c = change_of(
        &mut d,
        Buf::new(b'D')
            .u32(USERS)
            .u8(b'K')
            .tuple(&[Some("acme"), Some("9"), None]),
    );
    assert_eq!(c.old.unwrap(), row(json!({"org": "acme", "id": 9})));
    assert_eq!(&*c.key_columns, ["org".to_owned(), "id".to_owned()]);
    assert_eq!(d.relation(USERS).unwrap().replica_identity, b'i');
}

#[test]
fn full_old_tuple_keeps_real_nulls() {
    let mut d = users(b'f');
    let c = change_of(
        &mut d,
        Buf::new(b'D')
            .u32(USERS)
            .u8(b'O')
            .tuple(&[Some("5"), None, Some("x")]),
    );
    assert!(c.old_is_full);
    assert_eq!(
        c.old.unwrap(),
        row(json!({"id": 5, "email": null, "bio": "x"}))
    );
}

#[test]
fn unknown_relation_is_an_error() {
    let mut d = Decoder::new();
    let msg = parse(Buf::new(b'I').u32(99).u8(b'N').tuple(&[Some("1")]).bytes()).unwrap();
    let err = d.decode(msg).unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnknownRelation {
            op: "insert",
            relation_id: 99
        }
    );
    assert!(err.to_string().contains("99"));
    let msg = parse(Buf::new(b'T').u32(1).u8(0).u32(99).bytes()).unwrap();
    assert!(d.decode(msg).is_err());
}

#[test]
fn type_messages_name_user_defined_arrays() {
    let mut d = Decoder::new();
    let ty = parse(
        Buf::new(b'Y')
            .u32(16_600)
            .str("public")
            .str("_mood")
            .bytes(),
    )
    .unwrap();
    assert_eq!(d.decode(ty).unwrap(), None);
    d.decode(relation(
        b'd',
        &[("id", 23, true), ("moods", 16_600, false)],
    ))
    .unwrap();
    let c = change_of(
        &mut d,
        Buf::new(b'I')
            .u32(USERS)
            .u8(b'N')
            .tuple(&[Some("1"), Some("{happy,sad}")]),
    );
    assert_eq!(c.new.unwrap()["moods"], json!(["happy", "sad"]));
}

#[test]
fn transaction_messages_pass_through() {
    let mut d = users(b'd');
    let begin = parse(Buf::new(b'B').u64(100).u64(5).u32(42).bytes()).unwrap();
    assert_eq!(
        d.decode(begin).unwrap(),
        Some(Decoded::Begin {
            xid: 42,
            final_lsn: Lsn(100),
            commit_time: 5
        })
    );
    let origin = parse(Buf::new(b'O').u64(1).str("node").bytes()).unwrap();
    assert_eq!(d.decode(origin).unwrap(), None);
    assert_eq!(d.origin(), Some("node"));
    let truncate = parse(Buf::new(b'T').u32(1).u8(3).u32(USERS).bytes()).unwrap();
    let Some(Decoded::Truncate {
        tables,
        cascade,
        restart_identity,
    }) = d.decode(truncate).unwrap()
    else {
        panic!("not a truncate")
    };
    assert_eq!(tables[0].to_string(), "public.users");
    assert!(cascade && restart_identity);
    let msg = parse(
        Buf::new(b'M')
            .u8(0)
            .u64(7)
            .str("p")
            .i32(1)
            .raw(b"x")
            .bytes(),
    )
    .unwrap();
    assert!(matches!(
        d.decode(msg).unwrap(),
        Some(Decoded::LogicalMessage {
            transactional: false,
            ..
        })
    ));
    let commit = parse(Buf::new(b'C').u8(0).u64(100).u64(108).u64(5).bytes()).unwrap();
    assert_eq!(
        d.decode(commit).unwrap(),
        Some(Decoded::Commit {
            commit_lsn: Lsn(100),
            end_lsn: Lsn(108),
            commit_time: 5
        })
    );
    assert_eq!(d.origin(), None);
}

#[test]
fn non_utf8_text_is_an_error_without_the_value() {
    let mut d = users(b'd');
    let mut buf = Buf::new(b'I').u32(USERS).u8(b'N').u16(3);
    buf = buf
        .u8(b't')
        .i32(1)
        .raw(b"1")
        .u8(b't')
        .i32(2)
        .raw(&[0xc3, 0x28])
        .u8(b'n');
    let err = d.decode(parse(buf.bytes()).unwrap()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pgoutput insert on public.users: value of column email is not valid UTF-8"
    );
}

#[test]
fn a_renamed_relation_takes_its_new_name() {
    let mut d = users(b'd');
    let renamed = Buf::new(b'R')
        .u32(USERS)
        .str("app")
        .str("members")
        .u8(b'd')
        .u16(1)
        .u8(1)
        .str("id")
        .u32(23)
        .i32(-1);
    assert_eq!(d.decode(parse(renamed.bytes()).unwrap()).unwrap(), None);
    let insert = Buf::new(b'I')
        .u32(USERS)
        .u8(b'N')
        .u16(1)
        .u8(b't')
        .i32(1)
        .raw(b"7");
    let c = change_of(&mut d, insert);
    assert_eq!(c.table.to_string(), "app.members");
    assert_eq!(c.new, Some(json!({"id": 7}).as_object().unwrap().clone()));
}

/// `public.users` written as JSON, keeping `org` as a value besides the key, without
/// the columns `columns` leaves out.
fn json_rows(columns: Columns) -> JsonRows {
    let spec = JsonRowSpec {
        read: vec!["org".to_owned()],
        columns,
    };
    let table = TableName {
        schema: "public".to_owned(),
        name: "users".to_owned(),
    };
    JsonRows {
        tables: HashMap::from([(table, spec)]),
    }
}

const WIDE: &[(&str, u32, bool)] = &[
    ("id", 23, true),
    ("org", 20, false),
    ("email", 25, false),
    ("active", 16, false),
    ("tags", 1009, false),
    ("doc", 3802, false),
    ("score", 701, false),
    ("bio", 25, false),
    ("note", 25, false),
];

/// The rows written as JSON are the bytes the store got from the rows as values
/// (`raw_json` of the redacted row), and the change keeps the key and read columns.
#[test]
fn json_rows_are_the_rows_as_values_serialised() {
    let tuple = [
        Some("7"),
        Some("-12"),
        Some("a\"b\\c\n\u{1F600}<&>"),
        Some("t"),
        Some(r#"{x,"y z",NULL}"#),
        Some(r#"{"k": [1, 2.50]}"#),
        Some("NaN"),
        Some(TOAST),
        None,
    ];
    for columns in [
        Columns::All,
        Columns::Exclude(vec!["email".to_owned(), "doc".to_owned()]),
        Columns::Include(vec!["id".to_owned(), "tags".to_owned()]),
    ] {
        let mut plain = decoder(b'd', WIDE);
        let mut json = decoder(b'd', WIDE);
        json.set_json_rows(json_rows(columns.clone()));
        for op in [b'I', b'U'] {
            let buf = || Buf::new(op).u32(USERS).u8(b'N').tuple(&tuple);
            let expected = change_of(&mut plain, buf());
            let c = change_of(&mut json, buf());
            let redacted = crate::mapping::rows::redact(expected.new.clone().unwrap(), &columns);
            let text = serde_json::to_string(&redacted).unwrap();
            assert_eq!(c.new_json.as_ref().unwrap().0.get(), text, "{columns:?}");
            assert_eq!(c.new.unwrap(), row(json!({"id": 7, "org": -12})));
            assert_eq!(c.unchanged_toast, ["bio"]);
            assert_eq!(expected.new_json, None);
        }
    }
}

#[test]
fn json_rows_follow_the_setting_and_skip_full_old_rows() {
    let mut d = users(b'f');
    let insert = || {
        Buf::new(b'I')
            .u32(USERS)
            .u8(b'N')
            .tuple(&[Some("1"), Some("e"), None])
    };
    assert_eq!(change_of(&mut d, insert()).new_json, None);
    d.set_json_rows(json_rows(Columns::All));
    assert_eq!(
        change_of(&mut d, insert()).new_json.unwrap().0.get(),
        r#"{"id":1,"email":"e","bio":null}"#
    );
    // With the full old row the mapping compares rows: values, no text.
    let c = change_of(
        &mut d,
        Buf::new(b'U')
            .u32(USERS)
            .u8(b'O')
            .tuple(&[Some("1"), Some("old"), Some("long bio")])
            .u8(b'N')
            .tuple(&[Some("1"), Some("new"), Some(TOAST)]),
    );
    assert_eq!(c.new_json, None);
    assert_eq!(
        c.new.unwrap(),
        row(json!({"id": 1, "email": "new", "bio": "long bio"}))
    );
    // Kept across a reconnect, and for a relation announced after the setting.
    let mut d = d.fresh();
    assert_eq!(d.decode(relation(b'd', &[("id", 23, true)])).unwrap(), None);
    let c = change_of(
        &mut d,
        Buf::new(b'I').u32(USERS).u8(b'N').tuple(&[Some("3")]),
    );
    assert_eq!(c.new_json.unwrap().0.get(), r#"{"id":3}"#);
    d.set_json_rows(JsonRows::default());
    let c = change_of(
        &mut d,
        Buf::new(b'I').u32(USERS).u8(b'N').tuple(&[Some("3")]),
    );
    assert_eq!(c.new_json, None);
}

#[test]
fn json_rows_refuse_non_utf8_text_like_values_do() {
    let mut d = users(b'd');
    d.set_json_rows(json_rows(Columns::All));
    let buf = Buf::new(b'I')
        .u32(USERS)
        .u8(b'N')
        .u16(3)
        .u8(b't')
        .i32(1)
        .raw(b"1")
        .u8(b'n')
        .u8(b't')
        .i32(2)
        .raw(&[0xc3, 0x28]);
    let err = d.decode(parse(buf.bytes()).unwrap()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pgoutput insert on public.users: value of column bio is not valid UTF-8"
    );
}
