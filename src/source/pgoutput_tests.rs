//! Unit tests of the pgoutput parser, and message builders other tests use.

use super::*;

/// Builds pgoutput messages by hand, big-endian like the server.
#[derive(Default)]
pub(crate) struct Buf(pub Vec<u8>);

impl Buf {
    pub(crate) fn new(tag: u8) -> Self {
        Buf(vec![tag])
    }
    pub(crate) fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub(crate) fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn str(mut self, s: &str) -> Self {
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self
    }
    pub(crate) fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A TupleData; `None` is NULL, `Some("\u{0}u")` is unchanged TOAST.
    pub(crate) fn tuple(mut self, cols: &[Option<&str>]) -> Self {
        self = self.u16(cols.len() as u16);
        for col in cols {
            match col {
                None => self = self.u8(b'n'),
                Some(TOAST) => self = self.u8(b'u'),
                Some(v) => {
                    self = self.u8(b't').i32(v.len() as i32).raw(v.as_bytes());
                }
            }
        }
        self
    }
    pub(crate) fn bytes(self) -> Bytes {
        Bytes::from(self.0)
    }
}

/// Marker for an unchanged TOAST column in [`Buf::tuple`].
pub(crate) const TOAST: &str = "\u{0}u";

pub(crate) fn relation_msg(id: u32, cols: &[(&str, u32, bool)]) -> Bytes {
    let mut b = Buf::new(b'R')
        .u32(id)
        .str("public")
        .str("users")
        .u8(b'd')
        .u16(cols.len() as u16);
    for (name, oid, key) in cols {
        b = b.u8(u8::from(*key)).str(name).u32(*oid).i32(-1);
    }
    b.bytes()
}

fn text(s: &str) -> ColumnData {
    ColumnData::Text(Bytes::copy_from_slice(s.as_bytes()))
}

#[test]
fn parses_begin_and_commit() {
    let b = Buf::new(b'B').u64(0x16_B374_D848).u64(1234).u32(7345);
    assert_eq!(
        parse(b.bytes()).unwrap(),
        Message::Begin(Begin {
            final_lsn: Lsn(0x16_B374_D848),
            commit_time: 1234,
            xid: 7345
        })
    );
    let b = Buf::new(b'C').u8(0).u64(10).u64(20).u64(99);
    assert_eq!(
        parse(b.bytes()).unwrap(),
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_time: 99
        })
    );
}

#[test]
fn parses_origin_type_and_message() {
    let b = Buf::new(b'O').u64(5).str("node_a");
    assert_eq!(
        parse(b.bytes()).unwrap(),
        Message::Origin {
            commit_lsn: Lsn(5),
            name: "node_a".into()
        }
    );
    let b = Buf::new(b'Y').u32(16400).str("public").str("_mood");
    assert_eq!(
        parse(b.bytes()).unwrap(),
        Message::Type(TypeInfo {
            id: 16400,
            namespace: "public".into(),
            name: "_mood".into()
        })
    );
    let b = Buf::new(b'M').u8(1).u64(77).str("app").i32(3).raw(b"x\0y");
    assert_eq!(
        parse(b.bytes()).unwrap(),
        Message::Message {
            transactional: true,
            lsn: Lsn(77),
            prefix: "app".into(),
            content: Bytes::from_static(b"x\0y")
        }
    );
}

#[test]
fn parses_relation() {
    let msg = parse(relation_msg(
        16385,
        &[("id", 23, true), ("email", 25, false)],
    ))
    .unwrap();
    let Message::Relation(rel) = msg else {
        panic!("not a relation: {msg:?}")
    };
    assert_eq!(rel.id, 16385);
    assert_eq!(rel.namespace, "public");
    assert_eq!(rel.name, "users");
    assert_eq!(rel.replica_identity, b'd');
    assert_eq!(
        rel.columns,
        vec![
            RelationColumn {
                is_key: true,
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1
            },
            RelationColumn {
                is_key: false,
                name: "email".into(),
                type_oid: 25,
                type_modifier: -1
            },
        ]
    );
}

#[test]
fn parses_insert_with_every_column_kind() {
    let b = Buf::new(b'I')
        .u32(1)
        .u8(b'N')
        .tuple(&[Some("42"), None, Some(TOAST)])
        .u8(b'b')
        .i32(2)
        .raw(&[0xde, 0xad]);
    // Patch the column count: the binary column was appended by hand.
    let mut v = b.0;
    v[7] = 4;
    let msg = parse(Bytes::from(v)).unwrap();
    assert_eq!(
        msg,
        Message::Insert {
            relation_id: 1,
            new: TupleData(vec![
                text("42"),
                ColumnData::Null,
                ColumnData::UnchangedToast,
                ColumnData::Binary(Bytes::from_static(&[0xde, 0xad])),
            ])
        }
    );
}

#[test]
fn parses_updates_with_and_without_old() {
    let b = Buf::new(b'U').u32(9).u8(b'N').tuple(&[Some("1")]);
    assert_eq!(
        parse(b.bytes()).unwrap(),
        Message::Update {
            relation_id: 9,
            old: None,
            new: TupleData(vec![text("1")])
        }
    );
    let b = Buf::new(b'U')
        .u32(9)
        .u8(b'K')
        .tuple(&[Some("1"), None])
        .u8(b'N')
        .tuple(&[Some("2"), Some("x")]);
    let Message::Update { old, new, .. } = parse(b.bytes()).unwrap() else {
        panic!("not an update")
    };
    assert_eq!(
        old,
        Some(OldTuple {
            kind: OldKind::Key,
            tuple: TupleData(vec![text("1"), ColumnData::Null])
        })
    );
    assert_eq!(new, TupleData(vec![text("2"), text("x")]));
    let b = Buf::new(b'U')
        .u32(9)
        .u8(b'O')
        .tuple(&[Some("1")])
        .u8(b'N')
        .tuple(&[Some("1")]);
    let Message::Update { old, .. } = parse(b.bytes()).unwrap() else {
        panic!("not an update")
    };
    assert_eq!(old.unwrap().kind, OldKind::Full);
}

#[test]
fn parses_delete_and_truncate() {
    let b = Buf::new(b'D').u32(3).u8(b'O').tuple(&[Some("1"), None]);
    assert_eq!(
        parse(b.bytes()).unwrap(),
        Message::Delete {
            relation_id: 3,
            old: OldTuple {
                kind: OldKind::Full,
                tuple: TupleData(vec![text("1"), ColumnData::Null])
            }
        }
    );
    let b = Buf::new(b'T').u32(2).u8(1).u32(10).u32(11);
    assert_eq!(
        parse(b.bytes()).unwrap(),
        Message::Truncate {
            options: 1,
            relation_ids: vec![10, 11]
        }
    );
}

#[test]
fn every_truncation_is_an_error() {
    let whole = [
        Buf::new(b'B').u64(1).u64(2).u32(3).bytes(),
        Buf::new(b'C').u8(0).u64(1).u64(2).u64(3).bytes(),
        Buf::new(b'O').u64(5).str("n").bytes(),
        relation_msg(1, &[("id", 23, true), ("b", 25, false)]),
        Buf::new(b'Y').u32(1).str("s").str("t").bytes(),
        Buf::new(b'I')
            .u32(1)
            .u8(b'N')
            .tuple(&[Some("ab"), None])
            .bytes(),
        Buf::new(b'U')
            .u32(1)
            .u8(b'O')
            .tuple(&[Some("a")])
            .u8(b'N')
            .tuple(&[Some("b")])
            .bytes(),
        Buf::new(b'D').u32(1).u8(b'K').tuple(&[Some("a")]).bytes(),
        Buf::new(b'T').u32(1).u8(0).u32(5).bytes(),
        Buf::new(b'M')
            .u8(0)
            .u64(1)
            .str("p")
            .i32(2)
            .raw(b"hi")
            .bytes(),
    ];
    for msg in whole {
        assert!(parse(msg.clone()).is_ok(), "whole message parses: {msg:?}");
        for cut in 0..msg.len() {
            assert!(
                parse(msg.slice(..cut)).is_err(),
                "cut at {cut} of {msg:?} must fail"
            );
        }
    }
}

#[test]
fn garbage_is_an_error_naming_tag_and_offset() {
    assert_eq!(parse(Bytes::new()), Err(DecodeError::Empty));
    assert_eq!(
        parse(Bytes::from_static(b"Z")),
        Err(DecodeError::UnknownTag { tag: Tag(b'Z') })
    );
    let err = parse(Buf::new(b'I').u32(1).u8(b'X').bytes()).unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnexpectedByte {
            tag: Tag(b'I'),
            field: "new tuple marker 'N'",
            offset: 5,
            found: Tag(b'X')
        }
    );
    assert!(err.to_string().contains("'I'"), "{err}");
    let err = parse(Buf::new(b'I').u32(1).u8(b'N').u16(1).u8(b'q').bytes()).unwrap_err();
    assert!(matches!(err, DecodeError::UnexpectedByte { offset: 8, .. }));
    let err = parse(
        Buf::new(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .i32(-1)
            .bytes(),
    );
    assert!(matches!(err, Err(DecodeError::NegativeLength { .. })));
    let err = parse(Buf::new(b'B').u64(1).u64(2).u32(3).u8(0).bytes());
    assert!(matches!(
        err,
        Err(DecodeError::TrailingBytes { offset: 21, .. })
    ));
    // A huge count must not allocate or panic.
    let err = parse(Buf::new(b'T').u32(u32::MAX).u8(0).bytes());
    assert!(matches!(err, Err(DecodeError::Truncated { .. })));
    let err = parse(Buf::new(b'I').u32(1).u8(b'N').u16(u16::MAX).bytes());
    assert!(matches!(err, Err(DecodeError::Truncated { .. })));
    let err = parse(Buf::new(b'Y').u32(1).raw(&[0xff, 0]).str("t").bytes());
    assert!(matches!(err, Err(DecodeError::InvalidUtf8 { .. })));
    assert_eq!(Tag(0x01).to_string(), "0x01");
}

#[test]
fn random_input_never_panics() {
    // A small xorshift generator: deterministic, no dependency.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let tags = b"BCORYIUDTMNKOntub";
    for _ in 0..20_000 {
        let len = (next() % 48) as usize;
        let mut v = Vec::with_capacity(len + 1);
        v.push(tags[(next() % tags.len() as u64) as usize]);
        for _ in 0..len {
            // Bias towards small numbers and protocol bytes so parsing gets deep.
            let r = next();
            v.push(match r % 4 {
                0 => 0,
                1 => tags[(r >> 8) as usize % tags.len()],
                2 => (r >> 8) as u8 % 4,
                _ => (r >> 8) as u8,
            });
        }
        let _ = parse(Bytes::from(v));
    }
}

#[test]
fn timestamps_count_from_2000() {
    assert_eq!(
        crate::pg::pg_micros_to_utc(0).unwrap().to_rfc3339(),
        "2000-01-01T00:00:00+00:00"
    );
    assert_eq!(
        crate::pg::pg_micros_to_utc(1_500_000)
            .unwrap()
            .timestamp_micros(),
        946_684_801_500_000
    );
    assert_eq!(crate::pg::pg_micros_to_utc(i64::MAX), None);
}

#[test]
fn tuple_values_share_the_input_buffer() {
    let buf = Buf::new(b'I')
        .u32(1)
        .u8(b'N')
        .tuple(&[Some("hello")])
        .bytes();
    let Message::Insert { new, .. } = parse(buf.clone()).unwrap() else {
        panic!("not an insert")
    };
    let ColumnData::Text(v) = &new.0[0] else {
        panic!("not text")
    };
    assert_eq!(v.as_ptr(), buf[buf.len() - 5..].as_ptr());
}
