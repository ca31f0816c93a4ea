//! Parser for pgoutput logical replication messages (protocol version 1): the payload
//! of one XLogData frame in, one [`Message`] out. Tuple values are zero-copy slices of
//! the input buffer. Malformed input is an error naming the message and offset, never
//! a panic.

use std::fmt;

use bytes::Bytes;

use super::Lsn;

/// One logical replication message, as pgoutput sends it.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// Start of a transaction.
    Begin(Begin),
    /// End of a transaction.
    Commit(Commit),
    /// The transaction came from another node (replication origin).
    Origin {
        /// The commit LSN on the origin server.
        commit_lsn: Lsn,
        /// The origin's name.
        name: String,
    },
    /// A table's shape; sent before the first change to it in a session and again
    /// whenever it changed (ALTER TABLE).
    Relation(Relation),
    /// A non-builtin data type used by a following Relation.
    Type(TypeInfo),
    /// A new row.
    Insert {
        /// The relation, as announced by a Relation message.
        relation_id: u32,
        /// The new row.
        new: TupleData,
    },
    /// A changed row.
    Update {
        /// The relation, as announced by a Relation message.
        relation_id: u32,
        /// The old key ('K') or the whole old row ('O', REPLICA IDENTITY FULL); absent
        /// when the key did not change and the identity is not FULL.
        old: Option<OldTuple>,
        /// The new row; unchanged TOASTed values are [`ColumnData::UnchangedToast`].
        new: TupleData,
    },
    /// A deleted row.
    Delete {
        /// The relation, as announced by a Relation message.
        relation_id: u32,
        /// The old key ('K') or the whole old row ('O').
        old: OldTuple,
    },
    /// TRUNCATE of one or more tables.
    Truncate {
        /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
        options: u8,
        /// The truncated relations.
        relation_ids: Vec<u32>,
    },
    /// A message written with `pg_logical_emit_message`.
    Message {
        /// Whether the message was emitted inside a transaction.
        transactional: bool,
        /// The LSN of the message.
        lsn: Lsn,
        /// The message's prefix.
        prefix: String,
        /// The message's content.
        content: Bytes,
    },
}

/// The Begin message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 00:00 UTC.
    pub commit_time: i64,
    /// The transaction id.
    pub xid: u32,
}

/// The Commit message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Flags; currently unused (0).
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The LSN just past the commit record.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 00:00 UTC.
    pub commit_time: i64,
}

/// The Relation message: a table's identity and columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    /// The relation's OID.
    pub id: u32,
    /// The schema (empty for pg_catalog).
    pub namespace: String,
    /// The table name.
    pub name: String,
    /// `relreplident`: b'd' default, b'n' nothing, b'f' full, b'i' index.
    pub replica_identity: u8,
    /// The published columns, in order.
    pub columns: Vec<RelationColumn>,
}

/// One column of a [`Relation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key.
    pub is_key: bool,
    /// The column name.
    pub name: String,
    /// The column's type OID.
    pub type_oid: u32,
    /// `atttypmod`.
    pub type_modifier: i32,
}

/// The Type message: names a non-builtin type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeInfo {
    /// The type's OID.
    pub id: u32,
    /// The type's schema (empty for pg_catalog).
    pub namespace: String,
    /// The type's name (`_name` for an array type).
    pub name: String,
}

/// The columns of one row, in relation column order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TupleData(pub Vec<ColumnData>);

/// One column value inside a [`TupleData`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnData {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change and was not sent.
    UnchangedToast,
    /// The value in text format.
    Text(Bytes),
    /// The value in binary format.
    Binary(Bytes),
}

/// The old row of an Update or Delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OldTuple {
    /// Whether the tuple holds only the key or the whole row.
    pub kind: OldKind,
    /// The values; in a key tuple non-key columns are sent as NULL.
    pub tuple: TupleData,
}

/// What an [`OldTuple`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldKind {
    /// 'K': the replica identity key columns only.
    Key,
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// A message tag byte, printed as a character when it is printable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag(pub u8);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", self.0 as char)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// A pgoutput message that could not be parsed or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload was empty.
    #[error("empty pgoutput message")]
    Empty,
    /// The first byte is no known message type.
    #[error("unknown pgoutput message tag {tag}")]
    UnknownTag {
        /// The tag byte.
        tag: Tag,
    },
    /// The message ended before a field.
    #[error(
        "truncated pgoutput message {tag}: {field} at offset {offset} needs {needed} bytes, {remaining} left"
    )]
    Truncated {
        /// The message tag.
        tag: Tag,
        /// The field being read.
        field: &'static str,
        /// Where the field starts.
        offset: usize,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the message.
        remaining: usize,
    },
    /// A string field has no terminating NUL.
    #[error("pgoutput message {tag}: {field} at offset {offset} is not NUL-terminated")]
    UnterminatedString {
        /// The message tag.
        tag: Tag,
        /// The field being read.
        field: &'static str,
        /// Where the field starts.
        offset: usize,
    },
    /// A string field is not UTF-8.
    #[error("pgoutput message {tag}: {field} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// The message tag.
        tag: Tag,
        /// The field being read.
        field: &'static str,
        /// Where the field starts.
        offset: usize,
    },
    /// A length field is negative.
    #[error("pgoutput message {tag}: {field} at offset {offset} has negative length {len}")]
    NegativeLength {
        /// The message tag.
        tag: Tag,
        /// The field being read.
        field: &'static str,
        /// Where the length starts.
        offset: usize,
        /// The length read.
        len: i64,
    },
    /// A sub-message or column kind byte is not one the protocol allows there.
    #[error("pgoutput message {tag}: unexpected {field} byte {found} at offset {offset}")]
    UnexpectedByte {
        /// The message tag.
        tag: Tag,
        /// What was expected.
        field: &'static str,
        /// Where the byte is.
        offset: usize,
        /// The byte found.
        found: Tag,
    },
    /// Bytes are left after the last field.
    #[error("pgoutput message {tag}: {remaining} unexpected trailing bytes at offset {offset}")]
    TrailingBytes {
        /// The message tag.
        tag: Tag,
        /// Where the trailing bytes start.
        offset: usize,
        /// How many there are.
        remaining: usize,
    },
    /// A row change names a relation no Relation message announced.
    #[error("pgoutput {op} for relation {relation_id}, which no Relation message announced")]
    UnknownRelation {
        /// The message kind ("insert", "update", "delete", "truncate").
        op: &'static str,
        /// The relation OID.
        relation_id: u32,
    },
    /// A tuple's column count differs from its relation's.
    #[error("pgoutput {op} on {table}: tuple has {found} columns, relation has {expected}")]
    ColumnCount {
        /// The message kind.
        op: &'static str,
        /// The table, `schema.name`.
        table: String,
        /// Columns in the cached Relation.
        expected: usize,
        /// Columns in the tuple.
        found: usize,
    },
    /// A text-format column value is not UTF-8 (the value itself is not reported).
    #[error("pgoutput {op} on {table}: value of column {column} is not valid UTF-8")]
    InvalidUtf8Value {
        /// The message kind.
        op: &'static str,
        /// The table, `schema.name`.
        table: String,
        /// The column name.
        column: String,
    },
}

/// Parses one pgoutput message (protocol version 1; also accepts binary column values).
pub fn parse(buf: Bytes) -> Result<Message, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError::Empty);
    };
    let mut r = Reader {
        buf,
        pos: 1,
        tag: Tag(tag),
    };
    let msg = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: Lsn(r.u64("final_lsn")?),
            commit_time: r.i64("commit_time")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: Lsn(r.u64("commit_lsn")?),
            end_lsn: Lsn(r.u64("end_lsn")?),
            commit_time: r.i64("commit_time")?,
        }),
        b'O' => Message::Origin {
            commit_lsn: Lsn(r.u64("commit_lsn")?),
            name: r.string("origin name")?,
        },
        b'R' => parse_relation(&mut r)?,
        b'Y' => Message::Type(TypeInfo {
            id: r.u32("type oid")?,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        }),
        b'I' => {
            let relation_id = r.u32("relation id")?;
            r.expect(b'N', "new tuple marker 'N'")?;
            let new = r.tuple()?;
            Message::Insert { relation_id, new }
        }
        b'U' => {
            let relation_id = r.u32("relation id")?;
            let offset = r.pos;
            let (old, new) = match r.u8("tuple marker")? {
                b'N' => (None, r.tuple()?),
                b @ (b'K' | b'O') => {
                    let old = OldTuple {
                        kind: if b == b'K' {
                            OldKind::Key
                        } else {
                            OldKind::Full
                        },
                        tuple: r.tuple()?,
                    };
                    r.expect(b'N', "new tuple marker 'N'")?;
                    (Some(old), r.tuple()?)
                }
                found => return Err(r.unexpected("tuple marker 'K', 'O' or 'N'", offset, found)),
            };
            Message::Update {
                relation_id,
                old,
                new,
            }
        }
        b'D' => {
            let relation_id = r.u32("relation id")?;
            let offset = r.pos;
            let kind = match r.u8("tuple marker")? {
                b'K' => OldKind::Key,
                b'O' => OldKind::Full,
                found => return Err(r.unexpected("tuple marker 'K' or 'O'", offset, found)),
            };
            let tuple = r.tuple()?;
            Message::Delete {
                relation_id,
                old: OldTuple { kind, tuple },
            }
        }
        b'T' => {
            let count = r.u32("relation count")? as usize;
            let options = r.u8("options")?;
            // Each id is 4 bytes: check before allocating so a bogus count cannot.
            r.need(count.saturating_mul(4), "relation ids")?;
            let relation_ids = (0..count)
                .map(|_| r.u32("relation id"))
                .collect::<Result<_, _>>()?;
            Message::Truncate {
                options,
                relation_ids,
            }
        }
        b'M' => {
            let flags = r.u8("flags")?;
            let lsn = Lsn(r.u64("lsn")?);
            let prefix = r.string("prefix")?;
            let len = r.len32("content length")?;
            let content = r.bytes(len, "content")?;
            Message::Message {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content,
            }
        }
        _ => return Err(DecodeError::UnknownTag { tag: Tag(tag) }),
    };
    r.finish()?;
    Ok(msg)
}

fn parse_relation(r: &mut Reader) -> Result<Message, DecodeError> {
    let id = r.u32("relation id")?;
    let namespace = r.string("namespace")?;
    let name = r.string("relation name")?;
    let replica_identity = r.u8("replica identity")?;
    let count = r.u16("column count")?;
    let mut columns = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let flags = r.u8("column flags")?;
        columns.push(RelationColumn {
            is_key: flags & 1 == 1,
            name: r.string("column name")?,
            type_oid: r.u32("column type oid")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Message::Relation(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    }))
}

/// A cursor over one message; every read checks bounds.
struct Reader {
    buf: Bytes,
    pos: usize,
    tag: Tag,
}

impl Reader {
    fn need(&self, n: usize, field: &'static str) -> Result<(), DecodeError> {
        let remaining = self.buf.len() - self.pos;
        if n > remaining {
            return Err(DecodeError::Truncated {
                tag: self.tag,
                field,
                offset: self.pos,
                needed: n,
                remaining,
            });
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        self.need(N, field)?;
        let mut out = [0; N];
        out.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.array(field).map(u64::from_be_bytes)
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    /// An Int32 length that must not be negative.
    fn len32(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let len = self.i32(field)?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength {
            tag: self.tag,
            field,
            offset,
            len: i64::from(len),
        })
    }

    fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, field)?;
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let offset = self.pos;
        let rest = &self.buf[self.pos..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::UnterminatedString {
                tag: self.tag,
                field,
                offset,
            });
        };
        let s = std::str::from_utf8(&rest[..nul]).map_err(|_| DecodeError::InvalidUtf8 {
            tag: self.tag,
            field,
            offset,
        })?;
        let s = s.to_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    fn expect(&mut self, want: u8, field: &'static str) -> Result<(), DecodeError> {
        let offset = self.pos;
        let found = self.u8(field)?;
        if found != want {
            return Err(self.unexpected(field, offset, found));
        }
        Ok(())
    }

    fn unexpected(&self, field: &'static str, offset: usize, found: u8) -> DecodeError {
        DecodeError::UnexpectedByte {
            tag: self.tag,
            field,
            offset,
            found: Tag(found),
        }
    }

    /// TupleData: Int16 column count, then per column a kind byte and maybe a value.
    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let count = self.u16("tuple column count")?;
        // Every column takes at least one byte: bound the allocation by what is left.
        self.need(usize::from(count), "tuple columns")?;
        let mut columns = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let offset = self.pos;
            let column = match self.u8("column kind")? {
                b'n' => ColumnData::Null,
                b'u' => ColumnData::UnchangedToast,
                b't' => {
                    let len = self.len32("text value length")?;
                    ColumnData::Text(self.bytes(len, "text value")?)
                }
                b'b' => {
                    let len = self.len32("binary value length")?;
                    ColumnData::Binary(self.bytes(len, "binary value")?)
                }
                found => {
                    return Err(self.unexpected("column kind 'n', 'u', 't' or 'b'", offset, found));
                }
            };
            columns.push(column);
        }
        Ok(TupleData(columns))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        let remaining = self.buf.len() - self.pos;
        if remaining != 0 {
            return Err(DecodeError::TrailingBytes {
                tag: self.tag,
                offset: self.pos,
                remaining,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "pgoutput_tests.rs"]
pub(crate) mod tests;
