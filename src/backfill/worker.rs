//! The backfill worker: runs in the daemon that holds the slot, one backfill and one
//! chunk at a time. For each chunk it opens the watermark window, writes the low
//! watermark, reads the chunk, hands the rows to the source task, writes the high
//! watermark, and waits until ingest stored the chunk's events (and the cursor) before
//! the next chunk. An interrupted backfill (`running` in the store) goes on after its
//! stored cursor when a daemon next holds the slot.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::read::{self, Shape};
use super::window::{ChunkRows, Mark, PREFIX, Watermarks, message};
use crate::pg::{ConnInfo, ErrorChain, TableName};
use crate::store::Store;
use crate::store::backfills::Backfill;
use crate::telemetry::{BACKFILL_ROWS_TOTAL, BACKFILL_RUNNING, label};

/// Rows of a backfill's first chunk; later chunks take as many rows as fit in
/// [`CHUNK_BYTES`] by the sizes read so far, between [`MIN_CHUNK_ROWS`] and
/// [`MAX_CHUNK_ROWS`].
pub const FIRST_CHUNK_ROWS: usize = 5_000;
/// Memory a chunk's rows may take, estimated (see [`next_chunk_rows`]).
const CHUNK_BYTES: usize = 6 << 20;
const MIN_CHUNK_ROWS: usize = 100;
const MAX_CHUNK_ROWS: usize = 20_000;
/// Chunks handed over whose events are not stored yet, at most: the next chunk is read
/// while ingest stores the one before (bounded memory, G6: at most this many chunks of
/// about [`CHUNK_BYTES`], plus the one being read).
const IN_FLIGHT: usize = 2;
/// How often an idle worker looks for a new request.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// Wait before trying again after a lost connection.
const RETRY_WAIT: Duration = Duration::from_secs(1);

/// What stops one backfill.
enum Stop {
    /// The backfill cannot go on: it is marked failed with this reason.
    Refused(String),
    /// A connection was lost or the pipeline went away: try again later.
    Retry(String),
    /// Shutdown, or the term of leadership ended.
    Cancelled,
}

impl From<tokio_postgres::Error> for Stop {
    fn from(e: tokio_postgres::Error) -> Stop {
        if e.is_closed() || e.as_db_error().is_none() {
            Stop::Retry(ErrorChain(&e).to_string())
        } else {
            // The server refused the statement (a bad --where, a dropped table...).
            let db = e.as_db_error().expect("checked above");
            Stop::Refused(format!(
                "PostgreSQL refused the chunk query: {}",
                db.message()
            ))
        }
    }
}

impl From<crate::store::StoreError> for Stop {
    fn from(e: crate::store::StoreError) -> Stop {
        Stop::Retry(ErrorChain(&e).to_string())
    }
}

/// Runs backfills until `stop`. `instance` tags this run's watermarks, so that those
/// of an earlier run the stream replays are ignored.
pub async fn run(
    source: ConnInfo,
    store: ConnInfo,
    schema: String,
    watermarks: Arc<Watermarks>,
    instance: String,
    stop: CancellationToken,
) {
    let mut chunk_no: u64 = 0;
    let mut conns: Option<(Client, Store)> = None;
    loop {
        if conns.is_none() {
            match connect(&source, &store, &schema).await {
                Ok(c) => conns = Some(c),
                Err(why) => {
                    warn!(error = %why, "backfill worker cannot connect; retrying");
                    if sleep_or_stop(RETRY_WAIT, &stop).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let (client, st) = conns.as_ref().expect("connected above");
        let next = match st.next_backfill().await {
            Ok(next) => next,
            Err(e) => {
                warn!(error = %ErrorChain(&e), "backfill worker cannot read requests; retrying");
                conns = None;
                if sleep_or_stop(RETRY_WAIT, &stop).await {
                    return;
                }
                continue;
            }
        };
        let Some(b) = next else {
            if sleep_or_stop(IDLE_POLL, &stop).await {
                return;
            }
            continue;
        };
        gauge!(BACKFILL_RUNNING).set(1.0);
        let outcome = run_one(client, st, &b, &watermarks, &instance, &mut chunk_no, &stop).await;
        gauge!(BACKFILL_RUNNING).set(0.0);
        match outcome {
            Ok(()) => {
                info!(backfill = b.id, table = %b.request.table, "backfill done");
                if let Err(e) = st.finish_backfill(b.id, None).await {
                    warn!(error = %ErrorChain(&e), "cannot record a finished backfill; retrying");
                    conns = None;
                }
            }
            Err(Stop::Refused(why)) => {
                warn!(backfill = b.id, table = %b.request.table, reason = %why, "backfill failed");
                if let Err(e) = st.finish_backfill(b.id, Some(&why)).await {
                    warn!(error = %ErrorChain(&e), "cannot record a failed backfill; retrying");
                    conns = None;
                }
            }
            Err(Stop::Retry(why)) => {
                warn!(backfill = b.id, error = %why, "backfill interrupted; it goes on after its cursor");
                conns = None;
                if sleep_or_stop(RETRY_WAIT, &stop).await {
                    return;
                }
            }
            Err(Stop::Cancelled) => return,
        }
    }
}

async fn connect(
    source: &ConnInfo,
    store: &ConnInfo,
    schema: &str,
) -> Result<(Client, Store), String> {
    let client = source
        .connect_sql()
        .await
        .map_err(|e| ErrorChain(&e).to_string())?;
    let st = Store::connect(store, schema)
        .await
        .map_err(|e| ErrorChain(&e).to_string())?;
    Ok((client, st))
}

/// Sleeps; `true` when `stop` came first.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Parses `schema.name`.
pub fn table_name(qualified: &str) -> Option<TableName> {
    let (schema, name) = qualified.split_once('.')?;
    Some(TableName {
        schema: schema.to_owned(),
        name: name.to_owned(),
    })
}

/// The cursor's key text forms.
fn cursor_of(b: &Backfill) -> Option<Vec<String>> {
    match &b.cursor {
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| p.as_str().map(str::to_owned))
            .collect(),
        _ => None,
    }
}

async fn run_one(
    client: &Client,
    store: &Store,
    b: &Backfill,
    watermarks: &Watermarks,
    instance: &str,
    chunk_no: &mut u64,
    stop: &CancellationToken,
) -> Result<(), Stop> {
    let table = table_name(&b.request.table)
        .ok_or_else(|| Stop::Refused(format!("`{}` is not schema.table", b.request.table)))?;
    let shape: Shape = read::describe(client, &table)
        .await?
        .map_err(Stop::Refused)?;
    let where_sql = b.request.where_sql.as_deref();
    let mut cursor = cursor_of(b);
    if b.rows_total.is_none() {
        // The planner's estimate gives the progress bar its total without a scan of
        // the whole table; a `--where` (or a table never analysed) is counted.
        let estimate = match where_sql {
            None => read::estimated_rows(client, &table).await?,
            Some(_) => None,
        };
        let total = match estimate {
            Some(n) => n.max(b.rows_done),
            None => {
                let sql = read::count_sql(&table, &shape, cursor.as_deref(), where_sql);
                let left: i64 = client.query_one(&sql, &[]).await?.get(0);
                left + b.rows_done
            }
        };
        store.start_backfill(b.id, total).await?;
        info!(backfill = b.id, table = %table, rows = total, "backfill started");
    } else if b.status == crate::store::backfills::BackfillStatus::Pending {
        store
            .start_backfill(b.id, b.rows_total.unwrap_or(0))
            .await?;
    }
    let key = shape.key_names();
    let types = read::column_types(
        client,
        &read::chunk_sql(&table, &shape, cursor.as_deref(), where_sql, 1),
    )
    .await?;
    let rows_total = counter!(BACKFILL_ROWS_TOTAL, label::TABLE => table.to_string());
    let mut limit = FIRST_CHUNK_ROWS;
    let mut in_flight: VecDeque<(oneshot::Receiver<Result<(), String>>, usize)> = VecDeque::new();
    loop {
        if stop.is_cancelled() {
            return Err(Stop::Cancelled);
        }
        if in_flight.len() >= IN_FLIGHT
            && let Some((done, rows)) = in_flight.pop_front()
        {
            stored(done, stop).await?;
            rows_total.increment(rows as u64);
        }
        *chunk_no += 1;
        let tag = format!("{}:{instance}:{chunk_no}", b.id);
        watermarks.open(&tag, table.clone(), key.clone());
        let sql = read::chunk_sql(&table, &shape, cursor.as_deref(), where_sql, limit);
        let result = async {
            emit(client, &message(&tag, Mark::Low)).await?;
            settle(client, &b.request.table, stop).await?;
            chunk(client, b, &sql, &shape, &types, &tag, watermarks).await
        }
        .await;
        let (done, next, read) = match result {
            Ok(Some(handed)) => handed,
            Ok(None) => {
                watermarks.abandon(&tag);
                // Done once every chunk handed over is stored.
                while let Some((done, rows)) = in_flight.pop_front() {
                    stored(done, stop).await?;
                    rows_total.increment(rows as u64);
                }
                return Ok(());
            }
            Err(e) => {
                watermarks.abandon(&tag);
                return Err(e);
            }
        };
        // The next window opens once the source task took this chunk at its high
        // watermark; ingest stores it meanwhile.
        tokio::select! {
            _ = stop.cancelled() => return Err(Stop::Cancelled),
            _ = watermarks.closed(&tag) => {}
        }
        in_flight.push_back((done, read.rows));
        limit = next_chunk_rows(read.rows, read.text_bytes, shape.columns.len());
        cursor = Some(next);
    }
}

/// What a chunk read: its rows and their values' text size.
struct Read {
    rows: usize,
    text_bytes: usize,
}

/// The rows of the next chunk: as many as fit in [`CHUNK_BYTES`] at the average size of
/// the rows read (their text, plus about 64 bytes of JSON map and value per column and
/// per row), between [`MIN_CHUNK_ROWS`] and [`MAX_CHUNK_ROWS`]. Fewer statements and
/// watermark pairs for narrow rows; bounded memory for wide ones.
fn next_chunk_rows(rows: usize, text_bytes: usize, columns: usize) -> usize {
    if rows == 0 {
        return FIRST_CHUNK_ROWS;
    }
    let per_row = text_bytes / rows + 64 * (columns + 1);
    (CHUNK_BYTES / per_row).clamp(MIN_CHUNK_ROWS, MAX_CHUNK_ROWS)
}

/// Waits until a chunk's events are stored.
async fn stored(
    done: oneshot::Receiver<Result<(), String>>,
    stop: &CancellationToken,
) -> Result<(), Stop> {
    let stored = tokio::select! {
        _ = stop.cancelled() => return Err(Stop::Cancelled),
        stored = done => stored,
    };
    match stored {
        Ok(Ok(())) => Ok(()),
        Ok(Err(why)) => Err(Stop::Refused(why)),
        Err(_) => Err(Stop::Cancelled),
    }
}

/// Reads and hands over one chunk (`sql`) after its low watermark, and writes its high
/// watermark; `None` when no row is left.
#[allow(clippy::type_complexity)]
async fn chunk(
    client: &Client,
    b: &Backfill,
    sql: &str,
    shape: &Shape,
    types: &[(u32, String)],
    tag: &str,
    watermarks: &Watermarks,
) -> Result<Option<(oneshot::Receiver<Result<(), String>>, Vec<String>, Read)>, Stop> {
    let chunk = read::read_chunk(client, sql, shape, types).await?;
    let Some(last) = chunk.last_key else {
        return Ok(None);
    };
    let read = Read {
        rows: chunk.rows.len(),
        text_bytes: chunk.text_bytes,
    };
    let (done, rx) = oneshot::channel();
    watermarks.fill(
        tag,
        ChunkRows {
            backfill: b.id,
            event: b.request.event.clone(),
            subscription: b.request.subscription.clone(),
            rows: chunk.rows,
            cursor: Value::from(last.clone()),
            done,
        },
    );
    emit(client, &message(tag, Mark::High)).await?;
    Ok(Some((rx, last, read)))
}

/// Waits until every transaction that was invisible to new snapshots just after the low
/// watermark is visible or known to be still running, so that the chunk's snapshot
/// holds every change the stream hands on before the low watermark.
///
/// A transaction's commit record reaches the WAL (and the stream) before the
/// transaction leaves the proc array and becomes visible; a transaction whose commit
/// record precedes the low watermark but which is still invisible when the chunk is read
/// would leave an older state of its rows in the chunk, sent after the newer one (seen
/// in CI under load). The transactions invisible at the first look are waited for:
/// - one whose session waits for a synchronous standby (`wait_event` `SyncRep`) has
///   committed and stays invisible until the standby answers or the wait is cancelled:
///   waited for as long as that takes (the wait is logged after [`SETTLE_WARN`] and ends
///   with `stop`). The session's wait event is seen by a superuser or a member of
///   `pg_read_all_stats` (see sql/least-privilege.sql); otherwise the next rule applies;
/// - any other for [`SETTLE_RUNNING`] at most: one between its commit record and its
///   visibility leaves within that; a long-running one commits after the low watermark,
///   inside the window, or after the high one.
///
/// [`Stop::Cancelled`] when `stop` came first. (`pg_xact_status` cannot tell these
/// apart: it calls a transaction still in the proc array "in progress" even when it
/// committed.)
async fn settle(client: &Client, table: &str, stop: &CancellationToken) -> Result<(), Stop> {
    let started = tokio::time::Instant::now();
    let mut first: Option<Vec<String>> = None;
    let mut pause = Duration::from_millis(1);
    let mut warned_at: Option<tokio::time::Instant> = None;
    loop {
        let rows = client
            .query(
                "SELECT x::text, EXISTS (
                     SELECT 1 FROM pg_stat_activity a
                     WHERE a.backend_xid::text::bigint = x::text::bigint % 4294967296
                       AND a.wait_event = 'SyncRep')
                 FROM pg_snapshot_xip(pg_current_snapshot()) x",
                &[],
            )
            .await?;
        let invisible: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let first = first.get_or_insert_with(|| invisible.iter().map(|(x, _)| x.clone()).collect());
        // Of the transactions invisible at the first look, those still invisible.
        let still: Vec<&(String, bool)> = invisible
            .iter()
            .filter(|(x, _)| first.contains(x))
            .collect();
        // Of those, the ones committed and waiting for a synchronous standby.
        let committed: Vec<&str> = still
            .iter()
            .filter(|(_, sync_rep)| *sync_rep)
            .map(|(x, _)| x.as_str())
            .collect();
        let elapsed = started.elapsed();
        if committed.is_empty() && (still.is_empty() || elapsed >= SETTLE_RUNNING) {
            return Ok(());
        }
        if !committed.is_empty()
            && elapsed >= SETTLE_WARN
            && warned_at.is_none_or(|at| at.elapsed() >= SETTLE_WARN_EVERY)
        {
            warned_at = Some(tokio::time::Instant::now());
            warn!(
                table,
                transactions = %committed.join(","),
                waited_s = elapsed.as_secs(),
                "backfill waits for transactions that committed but are not visible yet: \
                 their sessions wait for a synchronous standby (synchronous_standby_names); \
                 a chunk read before they are visible could send a row's older state after \
                 its newer one. Bring the standby back or cancel the waits \
                 (pg_cancel_backend) and the backfill goes on"
            );
        }
        if sleep_or_stop(pause, stop).await {
            return Err(Stop::Cancelled);
        }
        pause = (pause * 2).min(SETTLE_POLL_MAX);
    }
}

/// How long [`settle`] waits for a transaction still in progress at the low watermark.
const SETTLE_RUNNING: Duration = Duration::from_millis(500);
/// When [`settle`] first logs a wait for committed, invisible transactions, and how often
/// again.
const SETTLE_WARN: Duration = Duration::from_secs(5);
const SETTLE_WARN_EVERY: Duration = Duration::from_secs(60);
/// The longest pause between two looks of [`settle`].
const SETTLE_POLL_MAX: Duration = Duration::from_millis(100);

/// Writes a watermark into the WAL, in a transaction of its own.
async fn emit(client: &Client, content: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&PREFIX, &content],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_grow_for_narrow_rows_and_shrink_for_wide_ones() {
        // Three short columns: the largest chunks.
        assert_eq!(next_chunk_rows(5_000, 5_000 * 30, 3), MAX_CHUNK_ROWS);
        // 20 KiB rows: a few hundred per chunk, not thousands.
        let wide = next_chunk_rows(5_000, 5_000 * 20_000, 10);
        assert!(wide < 400, "{wide}");
        // 2 MiB rows: the smallest chunk.
        assert_eq!(next_chunk_rows(10, 10 * (2 << 20), 3), MIN_CHUNK_ROWS);
        assert_eq!(next_chunk_rows(0, 0, 3), FIRST_CHUNK_ROWS);
    }
}
