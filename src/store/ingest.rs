//! Group-committed ingest: one store transaction per batch writes the revisions, the
//! events (binary COPY) and the checkpoint, with `synchronous_commit = on`.

use std::sync::Arc;
use std::time::SystemTime;

use foldhash::{HashMap, HashMapExt, HashSet};
use futures_util::pin_mut;
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, PgLsn, ToSql, Type};
use tokio_postgres::{Client, Row, Statement, Transaction};

use super::deliveries::RawJson;
use super::{Store, StoreError};
use crate::source::Lsn;
use crate::source::stream::Position;

/// One event of a row change, before it has a revision and a sequence number.
#[derive(Clone, Debug)]
pub struct PendingEvent {
    /// The event id (`evt_` and a ULID), kept when a batch is written again; shared
    /// with the live log's copy of the event.
    pub id: Arc<str>,
    pub event_type: String,
    /// The row values; moved into [`PendingEvent::json`] by [`PendingEvent::render`].
    pub data: Map<String, Value>,
    pub previous: Option<Map<String, Value>>,
    pub changed: Option<Vec<String>>,
    /// The subscriptions the event is due to (shared by all events of one type).
    pub subscriptions: Arc<[String]>,
    /// `data` and `previous` as JSON text, once rendered: the store's COPY and the live
    /// log both take this text, so a row is serialised once, and outside the store
    /// transaction.
    pub json: Option<EventJson>,
}

/// The JSON text of an event's `data` and `previous` (see [`PendingEvent::render`]).
#[derive(Clone, Debug)]
pub struct EventJson {
    pub data: RawJson,
    pub previous: Option<RawJson>,
}

impl PendingEvent {
    /// Serialises `data` and `previous` into [`PendingEvent::json`], leaving the maps
    /// empty. Not for a bulk event, whose `data` the store fills in with revisions.
    pub fn render(&mut self) {
        if self.json.is_none() {
            self.json = Some(EventJson {
                data: raw_json(&std::mem::take(&mut self.data)),
                previous: self.previous.take().map(|p| raw_json(&p)),
            });
        }
    }

    /// `data` as JSON text.
    pub fn data_json(&self) -> RawJson {
        match &self.json {
            Some(j) => j.data.clone(),
            None => raw_json(&self.data),
        }
    }

    /// `previous` as JSON text.
    pub fn previous_json(&self) -> Option<RawJson> {
        match &self.json {
            Some(j) => j.previous.clone(),
            None => self.previous.as_ref().map(raw_json),
        }
    }
}

/// A row as JSON text, as the store keeps it.
pub(crate) fn raw_json(row: &Map<String, Value>) -> RawJson {
    Arc::from(serde_json::value::to_raw_value(row).expect("a map with string keys serialises"))
}

/// The events of one source row change: they share one revision of their entity (G3).
#[derive(Clone, Debug)]
pub struct ChangeEvents {
    pub entity: Arc<str>,
    pub entity_id: String,
    pub table: Arc<str>,
    pub commit_lsn: Lsn,
    pub xid: u32,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    pub events: Vec<PendingEvent>,
    /// Its part in a bulk (`[[tables.aggregate]]`); `None` for a plain row change.
    pub bulk: Option<BulkRole>,
    /// What the context lookup stage reads for this change (`[[tables.context]]`);
    /// `None` when its table has no context.
    pub context_keys: Option<crate::mapping::ContextKeys>,
    /// The change's context, filled by the lookup stage before the batch is stored;
    /// every event of the change carries it.
    pub context: Option<Arc<Map<String, Value>>>,
}

/// What a change is in a bulk part, whose rows and bulk event are in one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BulkRole {
    /// A row of the part: it consumes a revision of its entity even without events.
    Row,
    /// The bulk event, after its `rows` rows: `data.items[i].revision` is filled in
    /// with the revision of the i-th of them when the batch is written.
    Event { rows: usize },
}

impl ChangeEvents {
    /// Whether the change consumes a revision of its entity: it has events, or is a
    /// row of a bulk part.
    pub fn takes_revision(&self) -> bool {
        !self.events.is_empty() || self.bulk == Some(BulkRole::Row)
    }
}

/// Fills `data.items[i].revision` of a bulk event with `revisions[i]`, the revisions
/// its rows got (the last `rows` before it).
pub(crate) fn fill_bulk(data: &mut Map<String, Value>, revisions: &[i64]) {
    if let Some(Value::Array(items)) = data.get_mut("items") {
        for (item, rev) in items.iter_mut().zip(revisions) {
            if let Value::Object(item) = item {
                item.insert("revision".into(), Value::from(*rev));
            }
        }
    }
}

/// A batch: the events of many source changes, and the source position it reaches.
#[derive(Debug, Default)]
pub struct IngestBatch {
    pub changes: Vec<ChangeEvents>,
    /// The stream position after the last change of the batch.
    pub position: Position,
    /// Backfill chunks among `changes`: their cursors move in the same transaction.
    pub backfills: Vec<super::backfills::BackfillProgress>,
}

impl IngestBatch {
    /// Number of events in the batch.
    pub fn event_count(&self) -> usize {
        self.changes.iter().map(|c| c.events.len()).sum()
    }
}

/// A new event id: `evt_` and a ULID.
pub fn new_event_id() -> Arc<str> {
    let mut id = *b"evt_00000000000000000000000000";
    let ulid: &mut [u8; ulid::ULID_LEN] = (&mut id[4..]).try_into().expect("26 bytes");
    ulid::Ulid::new().array_to_str(ulid);
    Arc::from(std::str::from_utf8(&id).expect("base32 is ASCII"))
}

/// What one ingest wrote.
#[derive(Clone, Debug, Default)]
pub struct IngestOutcome {
    pub events: u64,
    /// The revision of each row change with events, in order (empty when
    /// `already_stored`).
    pub revisions: Vec<i64>,
    /// The sequence number of the last event in the log.
    pub last_seq: i64,
    /// The batch was at or below the stored checkpoint: committed before, not written
    /// again.
    pub already_stored: bool,
}

const EVENT_COLUMNS: &str = "seq, id, type, entity, entity_id, revision, occurred_at, data, previous, changed, source_table, source_lsn, source_xid, subscriptions, context";
const EVENT_TYPES: [Type; 15] = [
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::JSON,
    Type::JSON,
    Type::TEXT_ARRAY,
    Type::TEXT,
    Type::PG_LSN,
    Type::INT8,
    Type::TEXT_ARRAY,
    Type::JSON,
];

/// Awaits statements sent together on one connection (one round trip), binding each
/// `name` to its result, or returns the first error in the order they were sent: in a
/// transaction, the statements after a failed one only answer that the transaction is
/// aborted, so the first is the cause (`try_join!` returns whichever error it polls
/// first, and a refused batch was then named "current transaction is aborted").
macro_rules! sent_together {
    ($($name:ident = $statement:expr),+ $(,)?) => {
        let ($($name,)+) = tokio::join!($($statement),+);
        $(let $name = $name?;)+
    };
}

/// The statements of a batch's transaction, prepared on a connection when it first
/// ingests: each runs once per batch, and preparing it every time cost a round trip
/// and a parse in the store session every batch waits for.
#[derive(Clone)]
pub(super) struct IngestStatements {
    /// Locks the slot's checkpoint row and reads it.
    lock: Statement,
    /// Adds each entity's change count to its revision and returns the new one.
    revisions: Statement,
    /// Moves the checkpoint.
    checkpoint: Statement,
    /// The events' binary COPY.
    copy: Statement,
}

impl IngestStatements {
    pub(super) async fn prepare(
        client: &Client,
        s: &str,
    ) -> Result<IngestStatements, tokio_postgres::Error> {
        let lock = format!(
            "SELECT leader_epoch, last_seq, commit_lsn::text, rows_done, complete
             FROM {s}.checkpoints WHERE slot = $1 FOR UPDATE"
        );
        let revisions = format!(
            "INSERT INTO {s}.revisions AS r (entity, entity_id, revision)
             SELECT * FROM unnest($1::text[], $2::text[], $3::int8[])
             ON CONFLICT (entity, entity_id) DO UPDATE SET revision = r.revision + excluded.revision
             RETURNING entity, entity_id, revision"
        );
        let checkpoint = format!(
            "UPDATE {s}.checkpoints SET commit_lsn = $2::text::pg_lsn, rows_done = $3, complete = $4, last_seq = $5, updated_at = now()
             WHERE slot = $1"
        );
        let copy = format!("COPY {s}.events ({EVENT_COLUMNS}) FROM STDIN BINARY");
        // Sent together: one round trip.
        let (lock, revisions, checkpoint, copy) = tokio::try_join!(
            client.prepare(&lock),
            client.prepare(&revisions),
            client.prepare(&checkpoint),
            client.prepare(&copy),
        )?;
        Ok(IngestStatements {
            lock,
            revisions,
            checkpoint,
            copy,
        })
    }
}

impl Store {
    /// The ingest statements of this connection, prepared when first asked for.
    async fn ingest_statements(&self) -> Result<IngestStatements, StoreError> {
        let st = self
            .ingest_sql
            .get_or_try_init(|| IngestStatements::prepare(&self.client, &self.s))
            .await?;
        Ok(st.clone())
    }

    /// Writes `batch` and moves the checkpoint of `slot` to `batch.position`, in one
    /// transaction, provided this instance still holds leader epoch `epoch` (G8).
    ///
    /// The transaction first locks the checkpoint row, so only one ingest writes at a
    /// time and a takeover waits for it. It is idempotent on the batch's source
    /// position: a batch at or below the stored checkpoint was committed before (its
    /// COMMIT acknowledgement was lost and the caller retries it) and is not written
    /// again; the outcome then says so and carries the stored `last_seq` (G2, G3).
    ///
    /// Statements that do not wait for each other's answers are sent together (five
    /// round trips in all): the store session is what ingest waits for.
    pub async fn ingest(
        &mut self,
        slot: &str,
        epoch: i64,
        batch: &IngestBatch,
    ) -> Result<IngestOutcome, StoreError> {
        self.ingest_after(slot, epoch, batch, None).await
    }

    /// [`Store::ingest`], on a connection of its own while the batch before is still
    /// being written on another (`after`): the revisions of entities that batch does not
    /// have are upserted at once (that batch holds its own entities' rows until it
    /// commits; these it never touches), and the rest (the checkpoint lock, the shared
    /// entities' revisions, the events) once it committed. So two store sessions work
    /// at once, and batches still commit in order, each under the checkpoint lock.
    /// When the batch before fails, this one is rolled back
    /// ([`StoreError::EarlierFailed`]).
    pub async fn ingest_after(
        &mut self,
        slot: &str,
        epoch: i64,
        batch: &IngestBatch,
        after: Option<After>,
    ) -> Result<IngestOutcome, StoreError> {
        let st = self.ingest_statements().await?;
        let s = self.s.clone();
        // The notification goes out at commit: dispatchers of other processes wake.
        let setup = format!(
            "SET LOCAL synchronous_commit = on; NOTIFY {}",
            crate::store::wake::channel(&self.schema)
        );
        let counts = count_keys(&batch.changes);
        let mut keys: Vec<((&str, &str), i64)> = counts.iter().map(|(k, n)| (*k, *n)).collect();
        keys.sort_unstable();
        let tx = self.client.transaction().await?;
        let lock_args: [&(dyn ToSql + Sync); 1] = [&slot];
        let mut last = Vec::new();
        let row = match after {
            None => {
                sent_together!(
                    _setup = tx.batch_execute(&setup),
                    row = tx.query_opt(&st.lock, &lock_args),
                );
                row
            }
            Some(after) => {
                let (own, shared) = keys
                    .iter()
                    .copied()
                    .partition::<Vec<_>, _>(|((e, i), _)| !after.keys.contains(&key_hash(e, i)));
                sent_together!(
                    _setup = tx.batch_execute(&setup),
                    own = upsert_revisions(&tx, &st, &own),
                );
                last = own;
                keys = shared;
                if !after.committed.await.unwrap_or(false) {
                    // Rolled back on drop.
                    return Err(StoreError::EarlierFailed);
                }
                tx.query_opt(&st.lock, &lock_args).await?
            }
        };
        let row = row.ok_or_else(|| StoreError::NoCheckpoint(slot.to_owned()))?;
        let (current, seq_base): (i64, i64) = (row.get(0), row.get(1));
        if current != epoch {
            return Err(StoreError::Deposed {
                slot: slot.to_owned(),
                ours: epoch,
                current,
            });
        }
        let stored = Position {
            commit_lsn: row.get::<_, String>(2).parse().unwrap_or(Lsn::INVALID),
            rows_done: row.get::<_, i64>(3) as u64,
            complete: row.get(4),
        };
        if covers(stored, batch.position) {
            // Rolled back on drop: nothing to write.
            return Ok(IngestOutcome {
                events: 0,
                revisions: Vec::new(),
                last_seq: seq_base,
                already_stored: true,
            });
        }
        // Every event of the batch is written, numbered from seq_base on: the
        // checkpoint's last_seq is known before the COPY, and moves with the revisions.
        let last_seq = seq_base + batch.event_count() as i64;
        let p = batch.position;
        let lsn = p.commit_lsn.to_string();
        let rows_done = p.rows_done as i64;
        let checkpoint_args: [&(dyn ToSql + Sync); 5] =
            [&slot, &lsn, &rows_done, &p.complete, &last_seq];
        sent_together!(
            rest = upsert_revisions(&tx, &st, &keys),
            _checkpoint = tx.execute(&st.checkpoint, &checkpoint_args),
            _backfills = super::backfills::advance(&tx, &s, &batch.backfills),
        );
        last.extend(rest);
        let next_rev = next_revisions(&counts, &last);
        let (written, seq, revisions) =
            copy_events(&tx, &st, &batch.changes, seq_base, next_rev).await?;
        debug_assert_eq!(
            seq, last_seq,
            "the checkpoint's last_seq is the last event's"
        );
        tx.commit().await?;
        Ok(IngestOutcome {
            events: written,
            revisions,
            last_seq: seq,
            already_stored: false,
        })
    }

    /// Finds which change of `batch` the store refuses on its own, after the batch as a
    /// whole failed with an error retrying cannot cure: writes each change alone in a
    /// transaction that is always rolled back. Returns the index of the first refused
    /// change and the store's error, or `None` when each change passes alone.
    pub async fn find_refused(
        &mut self,
        slot: &str,
        batch: &IngestBatch,
    ) -> Result<Option<(usize, StoreError)>, StoreError> {
        let s = self.s.clone();
        let st = self.ingest_statements().await?;
        for (i, change) in batch.changes.iter().enumerate() {
            if change.events.is_empty() {
                continue;
            }
            let tx = self.client.transaction().await?;
            let seq_base: i64 = tx
                .query_opt(
                    &format!("SELECT last_seq FROM {s}.checkpoints WHERE slot = $1"),
                    &[&slot],
                )
                .await?
                .ok_or_else(|| StoreError::NoCheckpoint(slot.to_owned()))?
                .get(0);
            let changes = std::slice::from_ref(change);
            let written = async {
                let counts = count_keys(changes);
                let keys: Vec<_> = counts.iter().map(|(k, n)| (*k, *n)).collect();
                let last = upsert_revisions(&tx, &st, &keys).await?;
                let next_rev = next_revisions(&counts, &last);
                copy_events(&tx, &st, changes, seq_base, next_rev).await
            }
            .await;
            // Rolled back on drop, whatever happened.
            drop(tx);
            match written {
                Ok(_) => {}
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => return Ok(Some((i, e))),
            }
        }
        Ok(None)
    }
}

/// Whether the stored checkpoint `stored` is at or past `p`: everything up to `p` is
/// in the store already.
pub fn covers(stored: Position, p: Position) -> bool {
    use std::cmp::Ordering;
    match stored.commit_lsn.cmp(&p.commit_lsn) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => stored.complete || (!p.complete && stored.rows_done >= p.rows_done),
    }
}

/// What a batch written while the one before it is still on its way waits for (see
/// [`Store::ingest_after`]).
pub struct After {
    /// The entity keys of the batch before, hashed ([`key_hash`]).
    pub keys: Arc<HashSet<u64>>,
    /// `true` once the batch before committed; `false` (or dropped) when it failed.
    pub committed: oneshot::Receiver<bool>,
}

/// The hash of an entity key in [`After::keys`]; two keys with one hash only make a
/// revision wait for the batch before (never a wrong revision).
pub fn key_hash(entity: &str, id: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0).hash_one((entity, id))
}

/// The entity keys of `batch`, hashed, for the batch after it ([`After::keys`]).
pub fn batch_keys(batch: &IngestBatch) -> HashSet<u64> {
    batch
        .changes
        .iter()
        .filter(|c| c.takes_revision())
        .map(|c| key_hash(&c.entity, &c.entity_id))
        .collect()
}

/// How many revisions each entity of `changes` takes.
fn count_keys(changes: &[ChangeEvents]) -> HashMap<(&str, &str), i64> {
    let mut counts: HashMap<(&str, &str), i64> = HashMap::new();
    for c in changes.iter().filter(|c| c.takes_revision()) {
        *counts.entry((&c.entity, &c.entity_id)).or_default() += 1;
    }
    counts
}

/// Adds each entity's count in `keys` (sorted: two transactions take rows in one
/// order) to its revision; returns the rows `(entity, entity_id, revision)` of each
/// entity's revision now.
async fn upsert_revisions(
    tx: &Transaction<'_>,
    st: &IngestStatements,
    keys: &[((&str, &str), i64)],
) -> Result<Vec<Row>, StoreError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let entities: Vec<&str> = keys.iter().map(|((e, _), _)| *e).collect();
    let ids: Vec<&str> = keys.iter().map(|((_, i), _)| *i).collect();
    let ns: Vec<i64> = keys.iter().map(|(_, n)| *n).collect();
    Ok(tx.query(&st.revisions, &[&entities, &ids, &ns]).await?)
}

/// The first revision of each entity's changes: its revision now (in `last`, the rows
/// [`upsert_revisions`] returned) less its count, plus one. The rows' texts are read in
/// place, not copied.
fn next_revisions<'a>(
    counts: &HashMap<(&'a str, &'a str), i64>,
    last: &[Row],
) -> HashMap<(&'a str, &'a str), i64> {
    let now: HashMap<(&str, &str), i64> = last
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let mut next_rev = HashMap::with_capacity(counts.len());
    for (key, n) in counts {
        if let Some(last) = now.get(key) {
            next_rev.insert(*key, last - n + 1);
        }
    }
    next_rev
}

/// Writes the events of `changes` in `tx` by binary COPY, in commit order, numbering
/// them after `seq_base`, each change's events with the next revision of its entity
/// from `next_rev`; returns how many events it wrote, the last sequence number and the
/// revision of each change that took one.
async fn copy_events(
    tx: &Transaction<'_>,
    st: &IngestStatements,
    changes: &[ChangeEvents],
    seq_base: i64,
    mut next_rev: HashMap<(&str, &str), i64>,
) -> Result<(u64, i64, Vec<i64>), StoreError> {
    let mut seq = seq_base;
    let mut revisions = Vec::new();
    // Events, by binary COPY, in commit order.
    let mut written = 0u64;
    if !next_rev.is_empty() {
        let sink = tx.copy_in(&st.copy).await?;
        let writer = BinaryCopyInWriter::new(sink, &EVENT_TYPES);
        pin_mut!(writer);
        for change in changes.iter().filter(|c| c.takes_revision()) {
            let key = (&*change.entity, change.entity_id.as_str());
            let revision = next_rev.get_mut(&key).expect("every entity got a revision");
            let rev = *revision;
            *revision += 1;
            let bulk_data = match change.bulk {
                Some(BulkRole::Event { rows }) => change.events.first().map(|e| {
                    let mut data = e.data.clone();
                    fill_bulk(
                        &mut data,
                        &revisions[revisions.len().saturating_sub(rows)..],
                    );
                    data
                }),
                _ => None,
            };
            revisions.push(rev);
            let occurred = pg_time(change.commit_time);
            let lsn = PgLsn::from(change.commit_lsn.0);
            let xid = i64::from(change.xid);
            let context = change.context.as_deref().map(Json);
            for event in &change.events {
                seq += 1;
                // Rendered before the transaction (PendingEvent::render), but for a bulk
                // event's data, completed above.
                let data = bulk_data
                    .as_ref()
                    .map_or_else(|| event.data_json(), raw_json);
                let data = Json(&*data);
                let previous = event.previous_json();
                let previous = previous.as_deref().map(Json);
                let subscriptions: &[String] = &event.subscriptions;
                let values: [&(dyn ToSql + Sync); 15] = [
                    &seq,
                    &&*event.id,
                    &event.event_type,
                    &&*change.entity,
                    &change.entity_id,
                    &rev,
                    &occurred,
                    &data,
                    &previous,
                    &event.changed,
                    &&*change.table,
                    &lsn,
                    &xid,
                    &subscriptions,
                    &context,
                ];
                writer.as_mut().write(&values).await?;
                written += 1;
            }
        }
        writer.finish().await?;
    }
    Ok((written, seq, revisions))
}

pub(super) fn pg_time(pg_micros: i64) -> SystemTime {
    crate::pg::pg_micros_to_system_time(pg_micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lsn: u64, rows_done: u64, complete: bool) -> Position {
        Position {
            commit_lsn: Lsn(lsn),
            rows_done,
            complete,
        }
    }

    #[test]
    fn event_ids_are_evt_and_a_ulid() {
        let (a, b) = (new_event_id(), new_event_id());
        for id in [&a, &b] {
            let ulid = id.strip_prefix("evt_").expect("evt_ prefix");
            assert_eq!(ulid::Ulid::from_string(ulid).unwrap().to_string(), ulid);
        }
        assert_ne!(a, b);
    }

    #[test]
    fn a_rendered_event_keeps_its_data_and_previous_text() {
        let row = |v: Value| match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let mut e = PendingEvent {
            id: new_event_id(),
            event_type: "user.updated".into(),
            data: row(serde_json::json!({"id": 1, "email": "a\"b", "n": null})),
            previous: Some(row(serde_json::json!({"id": 1, "email": "x"}))),
            changed: Some(vec!["email".into()]),
            subscriptions: Arc::from(Vec::<String>::new()),
            json: None,
        };
        let (data, previous) = (e.data_json(), e.previous_json());
        e.render();
        assert!(
            e.data.is_empty() && e.previous.is_none(),
            "the maps moved out"
        );
        assert_eq!(e.data_json().get(), data.get());
        assert_eq!(e.data_json().get(), r#"{"id":1,"email":"a\"b","n":null}"#);
        assert_eq!(
            e.previous_json().map(|p| p.get().to_owned()),
            previous.map(|p| p.get().to_owned())
        );
        // Rendering again changes nothing.
        e.render();
        assert_eq!(e.data_json().get(), data.get());
    }

    #[test]
    fn a_checkpoint_covers_positions_at_or_below_it() {
        // A later transaction, or the same one complete, covers everything before.
        assert!(covers(at(20, 0, true), at(10, 5, true)));
        assert!(covers(at(10, 5, true), at(10, 5, true)));
        assert!(covers(at(10, 5, true), at(10, 9, false)));
        // Part of a transaction covers its first rows only.
        assert!(covers(at(10, 5, false), at(10, 5, false)));
        assert!(covers(at(10, 5, false), at(10, 3, false)));
        assert!(!covers(at(10, 5, false), at(10, 6, false)));
        assert!(!covers(at(10, 5, false), at(10, 5, true)));
        // A reset checkpoint covers nothing a new slot sends.
        assert!(!covers(at(0, 0, true), at(10, 1, false)));
        assert!(!covers(at(10, 0, true), at(20, 1, true)));
    }
}
