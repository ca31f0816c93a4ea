//! The backfill worker: runs in the daemon that holds the slot, one backfill and one
//! chunk at a time. For each chunk it opens the watermark window, writes the low
//! watermark, reads the chunk, hands the rows to the source task, writes the high
//! watermark, and waits until ingest stored the chunk's events (and the cursor) before
//! the next chunk. An interrupted backfill (`running` in the store) goes on after its
//! stored cursor when a daemon next holds the slot.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

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

/// Rows per chunk.
pub const CHUNK_ROWS: usize = 5_000;
/// Chunks handed over whose events are not stored yet, at most: the next chunk is read
/// while ingest stores the one before (bounded memory, G6).
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
        let outcome = run_one(client, st, &b, &watermarks, &instance, &mut chunk_no, &stop).await;
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
        let sql = read::count_sql(&table, &shape, cursor.as_deref(), where_sql);
        let total: i64 = client.query_one(&sql, &[]).await?.get(0);
        store.start_backfill(b.id, total + b.rows_done).await?;
        info!(backfill = b.id, table = %table, rows = total, "backfill started");
    } else if b.status == crate::store::backfills::BackfillStatus::Pending {
        store
            .start_backfill(b.id, b.rows_total.unwrap_or(0))
            .await?;
    }
    let key = shape.key_names();
    let mut in_flight: VecDeque<oneshot::Receiver<Result<(), String>>> = VecDeque::new();
    loop {
        if stop.is_cancelled() {
            return Err(Stop::Cancelled);
        }
        if in_flight.len() >= IN_FLIGHT
            && let Some(done) = in_flight.pop_front()
        {
            stored(done, stop).await?;
        }
        *chunk_no += 1;
        let tag = format!("{}:{instance}:{chunk_no}", b.id);
        watermarks.open(&tag, table.clone(), key.clone());
        let result = chunk(
            client,
            b,
            &table,
            &shape,
            cursor.as_deref(),
            &tag,
            watermarks,
        )
        .await;
        let (done, next) = match result {
            Ok(Some(pair)) => pair,
            Ok(None) => {
                watermarks.abandon(&tag);
                // Done once every chunk handed over is stored.
                while let Some(done) = in_flight.pop_front() {
                    stored(done, stop).await?;
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
        in_flight.push_back(done);
        cursor = Some(next);
    }
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

/// Reads and hands over one chunk between its watermarks; `None` when no row is left.
#[allow(clippy::type_complexity)]
async fn chunk(
    client: &Client,
    b: &Backfill,
    table: &TableName,
    shape: &Shape,
    cursor: Option<&[String]>,
    tag: &str,
    watermarks: &Watermarks,
) -> Result<Option<(oneshot::Receiver<Result<(), String>>, Vec<String>)>, Stop> {
    emit(client, &message(tag, Mark::Low)).await?;
    settle(client).await?;
    let sql = read::chunk_sql(
        table,
        shape,
        cursor,
        b.request.where_sql.as_deref(),
        CHUNK_ROWS,
    );
    let read = read::read_chunk(client, &sql, shape).await?;
    let Some(last) = read.last_key else {
        return Ok(None);
    };
    let (done, rx) = oneshot::channel();
    watermarks.fill(
        tag,
        ChunkRows {
            backfill: b.id,
            event: b.request.event.clone(),
            subscription: b.request.subscription.clone(),
            rows: read.rows,
            cursor: Value::from(last.clone()),
            done,
        },
    );
    emit(client, &message(tag, Mark::High)).await?;
    Ok(Some((rx, last)))
}

/// Waits until no transaction that committed before now is still invisible to new
/// snapshots. A commit is written to the WAL (and the commit log) a moment before it
/// becomes visible; a transaction committed just before the low watermark could
/// otherwise be missing from the chunk's snapshot while the stream hands it on before
/// the window opens, and the chunk would carry an older state of its row. Transactions
/// still running are not waited for: they commit after the low watermark, inside the
/// window. Bounded (a commit becomes visible within microseconds).
async fn settle(client: &Client) -> Result<(), tokio_postgres::Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let racing: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_snapshot_xip(pg_current_snapshot()) x
                 WHERE pg_xact_status(x) = 'committed'",
                &[],
            )
            .await?
            .get(0);
        if racing == 0 || tokio::time::Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

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
