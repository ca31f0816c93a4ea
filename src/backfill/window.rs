//! The watermark window of one backfill chunk (DBLog's method), shared by the backfill
//! worker and the source task. Pure state, no I/O.
//!
//! The worker opens a window, writes the low watermark into the WAL, reads the chunk,
//! hands its rows over ([`Watermarks::fill`]) and writes the high watermark. The source
//! task, reading the stream in commit order, starts recording the keys of the table's
//! changed rows when it reaches the low watermark ([`Watermarks::observe`]), and at the
//! high watermark takes the chunk minus every row whose key changed in between
//! ([`Watermarks::on_message`]). A row changed between the watermarks may have been
//! read before or after that change; the stream carries its newer state right there,
//! so dropping it from the chunk never delivers an older state after a newer one. A
//! row not changed between them was the same at the read as at the high watermark,
//! where its event is emitted.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use tokio::sync::{oneshot, watch};

use crate::source::decoder::{Change, Row, TableName};

/// The logical message prefix of watermarks.
pub const PREFIX: &str = "walhook";

/// Which watermark a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    Low,
    High,
}

/// The content of a watermark message: `backfill:<tag>:low` or `backfill:<tag>:high`.
pub fn message(tag: &str, mark: Mark) -> String {
    let end = match mark {
        Mark::Low => "low",
        Mark::High => "high",
    };
    format!("backfill:{tag}:{end}")
}

/// Parses a watermark message's content into its tag and mark.
pub fn parse(content: &[u8]) -> Option<(&str, Mark)> {
    let text = std::str::from_utf8(content).ok()?;
    let rest = text.strip_prefix("backfill:")?;
    let (tag, end) = rest.rsplit_once(':')?;
    let mark = match end {
        "low" => Mark::Low,
        "high" => Mark::High,
        _ => return None,
    };
    Some((tag, mark))
}

/// The key of a row: its key columns' values, as JSON text; `None` when one is absent.
pub fn row_key(row: &Row, key: &[String]) -> Option<String> {
    let values: Option<Vec<&Value>> = key.iter().map(|c| row.get(c)).collect();
    serde_json::to_string(&values?).ok()
}

/// A chunk's rows and where they take the backfill, handed over before the high
/// watermark is written.
#[derive(Debug)]
pub struct ChunkRows {
    pub backfill: i64,
    /// Event name (default `{entity}.snapshot`).
    pub event: Option<String>,
    /// The only subscription to deliver to.
    pub subscription: Option<String>,
    pub rows: Vec<Row>,
    /// Key of the chunk's last row (text forms), the backfill's next cursor.
    pub cursor: Value,
    /// Told once the chunk's events are stored, or why they will not be.
    pub done: oneshot::Sender<Result<(), String>>,
}

/// A chunk at its high watermark: the rows to emit.
#[derive(Debug)]
pub struct Closed {
    pub table: TableName,
    /// Rows read, including those dropped.
    pub read: usize,
    pub chunk: ChunkRows,
}

#[derive(Debug)]
struct Window {
    tag: String,
    table: TableName,
    key: Vec<String>,
    recording: bool,
    changed: HashSet<String>,
    chunk: Option<ChunkRows>,
}

/// The open window, if any (one chunk at a time). See the module docs.
#[derive(Debug)]
pub struct Watermarks {
    window: Mutex<Option<Window>>,
    /// Whether a window records changes (checked without the lock on every change).
    recording: AtomicBool,
    /// Counts windows closed, for a worker waiting to open the next one.
    closed: watch::Sender<u64>,
}

impl Default for Watermarks {
    fn default() -> Watermarks {
        Watermarks {
            window: Mutex::default(),
            recording: AtomicBool::new(false),
            closed: watch::Sender::new(0),
        }
    }
}

impl Watermarks {
    /// Opens the window of chunk `tag` of `table`, keyed by `key` (the primary key),
    /// replacing any other.
    pub fn open(&self, tag: &str, table: TableName, key: Vec<String>) {
        let mut w = self.lock();
        *w = Some(Window {
            tag: tag.to_owned(),
            table,
            key,
            recording: false,
            changed: HashSet::new(),
            chunk: None,
        });
        self.recording.store(false, Ordering::Release);
    }

    /// Hands the chunk's rows over (before its high watermark is written).
    pub fn fill(&self, tag: &str, chunk: ChunkRows) {
        if let Some(w) = self.lock().as_mut().filter(|w| w.tag == tag) {
            w.chunk = Some(chunk);
        }
    }

    /// Closes the window of `tag` without a chunk (nothing read, or the read failed).
    pub fn abandon(&self, tag: &str) {
        let mut w = self.lock();
        if w.as_ref().is_some_and(|w| w.tag == tag) {
            *w = None;
            self.recording.store(false, Ordering::Release);
            drop(w);
            self.closed.send_modify(|n| *n += 1);
        }
    }

    /// Waits until the window of `tag` is closed (the source task reached its high
    /// watermark and took the chunk). Its events may not be stored yet.
    pub async fn closed(&self, tag: &str) {
        let mut rx = self.closed.subscribe();
        let _ = rx
            .wait_for(|_| self.lock().as_ref().is_none_or(|w| w.tag != tag))
            .await;
    }

    /// Notes a change seen by the stream (in commit order).
    pub fn observe(&self, change: &Change) {
        if !self.recording.load(Ordering::Acquire) {
            return;
        }
        let mut guard = self.lock();
        let Some(w) = guard.as_mut().filter(|w| w.recording) else {
            return;
        };
        if *change.table != w.table {
            return;
        }
        for row in [&change.new, &change.old].into_iter().flatten() {
            if let Some(k) = row_key(row, &w.key) {
                w.changed.insert(k);
            }
        }
    }

    /// Handles a `walhook` logical message seen by the stream: the low watermark of
    /// the open window starts recording; its high watermark closes it and returns
    /// the chunk without the rows changed in between. Other messages (a watermark of
    /// an earlier run, replayed) return `None`.
    pub fn on_message(&self, content: &[u8]) -> Option<Closed> {
        let (tag, mark) = parse(content)?;
        let mut guard = self.lock();
        let w = guard.as_mut().filter(|w| w.tag == tag)?;
        match mark {
            Mark::Low => {
                w.recording = true;
                self.recording.store(true, Ordering::Release);
                None
            }
            Mark::High => {
                let w = guard.take()?;
                drop(guard);
                self.recording.store(false, Ordering::Release);
                self.closed.send_modify(|n| *n += 1);
                let mut chunk = w.chunk?;
                if !w.recording {
                    // The low watermark was not seen: nothing is known about the
                    // changes in between. Not expected; the chunk is read again.
                    let _ = chunk
                        .done
                        .send(Err("the low watermark was not seen".into()));
                    return None;
                }
                let read = chunk.rows.len();
                chunk
                    .rows
                    .retain(|row| row_key(row, &w.key).is_some_and(|k| !w.changed.contains(&k)));
                Some(Closed {
                    table: w.table,
                    read,
                    chunk,
                })
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Window>> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::decoder::Op;
    use serde_json::json;
    use std::sync::Arc;

    fn users() -> TableName {
        TableName {
            schema: "public".into(),
            name: "users".into(),
        }
    }

    fn row(v: Value) -> Row {
        v.as_object().unwrap().clone()
    }

    fn change(table: TableName, op: Op, new: Option<Value>, old: Option<Value>) -> Change {
        Change {
            relation_id: 1,
            table: Arc::new(table),
            op,
            new: new.map(row),
            new_json: None,
            old: old.map(row),
            old_is_full: false,
            unchanged_toast: Vec::new(),
            key_columns: Arc::from(vec!["id".to_owned()]),
        }
    }

    fn chunk(ids: &[i64]) -> (ChunkRows, oneshot::Receiver<Result<(), String>>) {
        let (done, rx) = oneshot::channel();
        let rows = ids
            .iter()
            .map(|i| row(json!({"id": i, "v": "x"})))
            .collect();
        let chunk = ChunkRows {
            backfill: 1,
            event: None,
            subscription: None,
            rows,
            cursor: json!([ids.last().unwrap().to_string()]),
            done,
        };
        (chunk, rx)
    }

    fn ids(closed: &Closed) -> Vec<i64> {
        closed
            .chunk
            .rows
            .iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect()
    }

    #[test]
    fn watermark_messages_round_trip() {
        assert_eq!(
            parse(message("3:ab:7", Mark::Low).as_bytes()),
            Some(("3:ab:7", Mark::Low))
        );
        assert_eq!(
            parse(message("3:ab:7", Mark::High).as_bytes()),
            Some(("3:ab:7", Mark::High))
        );
        assert_eq!(parse(b"backfill:3:mid"), None);
        assert_eq!(parse(b"other"), None);
    }

    #[test]
    fn rows_changed_between_the_watermarks_are_dropped_and_others_kept() {
        let w = Watermarks::default();
        w.open("t1", users(), vec!["id".into()]);
        // Before the low watermark: the read saw it; not dropped.
        let before = change(users(), Op::Update, Some(json!({"id": 1})), None);
        w.observe(&before);
        assert!(w.on_message(message("t1", Mark::Low).as_bytes()).is_none());
        let (c, _rx) = chunk(&[1, 2, 3, 4, 5]);
        w.fill("t1", c);
        w.observe(&change(users(), Op::Update, Some(json!({"id": 2})), None));
        w.observe(&change(users(), Op::Delete, None, Some(json!({"id": 4}))));
        // A key change: both the old and the new key are dropped.
        w.observe(&change(
            users(),
            Op::Update,
            Some(json!({"id": 9})),
            Some(json!({"id": 5})),
        ));
        // Another table with the same key is not this table's row.
        let other = TableName {
            schema: "public".into(),
            name: "orders".into(),
        };
        w.observe(&change(other, Op::Update, Some(json!({"id": 3})), None));
        let closed = w.on_message(message("t1", Mark::High).as_bytes()).unwrap();
        assert_eq!(ids(&closed), [1, 3]);
        assert_eq!(closed.read, 5);
        // After the high watermark nothing is recorded any more.
        assert!(!w.recording.load(Ordering::Acquire));
    }

    #[test]
    fn a_replayed_watermark_of_another_window_does_nothing() {
        let w = Watermarks::default();
        w.open("new", users(), vec!["id".into()]);
        assert!(w.on_message(message("old", Mark::Low).as_bytes()).is_none());
        assert!(!w.recording.load(Ordering::Acquire));
        let (c, _rx) = chunk(&[1]);
        w.fill("new", c);
        assert!(
            w.on_message(message("old", Mark::High).as_bytes())
                .is_none()
        );
        // The open window is intact.
        assert!(w.on_message(message("new", Mark::Low).as_bytes()).is_none());
        assert!(
            w.on_message(message("new", Mark::High).as_bytes())
                .is_some()
        );
    }

    #[test]
    fn a_high_watermark_without_its_low_one_fails_the_chunk() {
        let w = Watermarks::default();
        w.open("t", users(), vec!["id".into()]);
        let (c, mut rx) = chunk(&[1]);
        w.fill("t", c);
        assert!(w.on_message(message("t", Mark::High).as_bytes()).is_none());
        assert!(rx.try_recv().unwrap().is_err());
    }

    #[test]
    fn an_abandoned_window_stops_recording() {
        let w = Watermarks::default();
        w.open("t", users(), vec!["id".into()]);
        w.on_message(message("t", Mark::Low).as_bytes());
        w.abandon("t");
        assert!(!w.recording.load(Ordering::Acquire));
        assert!(w.on_message(message("t", Mark::High).as_bytes()).is_none());
    }
}
