//! A random, seeded write workload for lifecycle tests, and the exactly-once check
//! against it. A background writer commits small transactions (inserts, updates,
//! deletes, several rows at a time) on watched tables and keeps its own log of what
//! committed, with the row values it set, so a test can derive every event the store
//! must hold. It survives PostgreSQL restarts: a transaction whose COMMIT got no answer
//! is looked up (each one also inserts its number into an unwatched table) before it
//! goes into the log.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::pg::connect;

/// How long the writer keeps trying to reconnect before it gives up (and panics).
const RECONNECT_FOR: Duration = Duration::from_secs(90);
/// The unwatched table in which every workload transaction records its number.
const TXLOG: &str = "workload_txlog";

/// A deterministic pseudo-random sequence (xorshift64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded by `seed` (0 is replaced: xorshift needs a non-zero state).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// A seed from `env` if set, else from the clock; printed, so a run can be repeated.
    pub fn seed_from_env(env: &str) -> u64 {
        let seed = std::env::var(env)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("workload seed {seed} (repeat with {env}={seed})");
        seed
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Uniform in `low..high` (milliseconds granularity).
    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = high.saturating_sub(low).as_millis() as u64;
        low + Duration::from_millis(self.below(span.max(1)))
    }
}

/// A watched table of the workload: `(id int PRIMARY KEY, v text, n int)`, or with a
/// composite key `(a int, b int, v text, n int, PRIMARY KEY (a, b))`.
#[derive(Clone, Copy, Debug)]
pub struct Table {
    pub name: &'static str,
    pub entity: &'static str,
    pub composite: bool,
}

/// Three watched tables, one with a composite key.
pub const TABLES: &[Table] = &[
    Table {
        name: "accounts",
        entity: "account",
        composite: false,
    },
    Table {
        name: "orders",
        entity: "order",
        composite: false,
    },
    Table {
        name: "items",
        entity: "item",
        composite: true,
    },
];

/// One watched table only.
pub const ONE_TABLE: &[Table] = &[Table {
    name: "accounts",
    entity: "account",
    composite: false,
}];

/// SQL creating `tables` and the writer's unwatched transaction log.
pub fn create_sql(tables: &[Table]) -> String {
    let mut sql = format!("CREATE TABLE {TXLOG} (n bigint PRIMARY KEY);");
    for t in tables {
        if t.composite {
            sql.push_str(&format!(
                "CREATE TABLE {} (a int, b int, v text, n int, PRIMARY KEY (a, b));",
                t.name
            ));
        } else {
            sql.push_str(&format!(
                "CREATE TABLE {} (id int PRIMARY KEY, v text, n int);",
                t.name
            ));
        }
    }
    sql
}

/// The `[[tables]]` entries watching `tables`.
pub fn tables_toml(tables: &[Table]) -> String {
    tables
        .iter()
        .map(|t| {
            format!(
                "[[tables]]\ntable = \"public.{}\"\nentity = \"{}\"\n\n",
                t.name, t.entity
            )
        })
        .collect()
}

/// One committed row change: the event it must produce.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub entity: &'static str,
    pub entity_id: String,
    /// `{entity}.created`, `.updated` or `.deleted`.
    pub event_type: String,
    /// The event's `data`: the whole row, or the key columns of a delete.
    pub data: Value,
}

/// What the writer committed, in commit order.
#[derive(Debug, Default)]
pub struct Log {
    pub changes: Vec<Change>,
    pub transactions: u64,
    /// Transactions whose COMMIT got no answer (resolved by looking them up).
    pub unanswered_commits: u64,
}

/// A writer running in the background until [`Writer::stop`].
pub struct Writer {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    task: JoinHandle<Log>,
}

impl Writer {
    /// Starts committing random transactions on `entities` rows of each of `tables`
    /// in the database at `url`, one every `pace` (plus the time it takes).
    pub fn spawn(
        url: String,
        tables: &'static [Table],
        entities: usize,
        seed: u64,
        pace: Duration,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let state = State {
            url,
            tables,
            rows: vec![vec![None; entities]; tables.len()],
            rng: Rng::new(seed),
            log: Log::default(),
            client: None,
        };
        let task = tokio::spawn(state.run(stop.clone(), committed.clone(), pace));
        Writer {
            stop,
            committed,
            task,
        }
    }

    /// Row changes committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Stops after the transaction in progress and returns the log.
    pub async fn stop(self) -> Log {
        self.stop.store(true, Ordering::Relaxed);
        match self.task.await {
            Ok(log) => log,
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }
}

/// A live row's non-key values.
#[derive(Clone, Debug)]
struct Row {
    v: String,
    n: Option<i32>,
}

struct State {
    url: String,
    tables: &'static [Table],
    /// Per table, per entity index: the row as committed, `None` when absent.
    rows: Vec<Vec<Option<Row>>>,
    rng: Rng,
    log: Log,
    client: Option<Client>,
}

/// A planned row change: the SQL, and the row afterwards.
struct Op {
    after: Option<Row>,
    sql: String,
    change: Change,
}

impl State {
    async fn run(
        mut self,
        stop: Arc<AtomicBool>,
        committed: Arc<AtomicU64>,
        pace: Duration,
    ) -> Log {
        while !stop.load(Ordering::Relaxed) {
            self.transaction().await;
            committed.store(self.log.changes.len() as u64, Ordering::Relaxed);
            tokio::time::sleep(pace).await;
        }
        self.log
    }

    /// Commits one random transaction (or learns that it did not commit) and logs it.
    async fn transaction(&mut self) {
        let number = self.log.transactions as i64 + self.log.unanswered_commits as i64 + 1;
        // The rows as this transaction sees them: several changes may hit one row.
        let mut rows = self.rows.clone();
        let mut ops = Vec::new();
        let count = if self.rng.chance(10) {
            5 + self.rng.below(20)
        } else {
            1 + self.rng.below(4)
        };
        for _ in 0..count {
            let table = self.rng.below(self.tables.len() as u64) as usize;
            let index = self.rng.below(rows[table].len() as u64) as usize;
            let op = self.plan(table, index, rows[table][index].as_ref());
            rows[table][index] = op.after.clone();
            ops.push(op);
        }
        let mut sql = String::from("BEGIN;");
        for op in &ops {
            sql.push_str(&op.sql);
        }
        sql.push_str(&format!("INSERT INTO {TXLOG} VALUES ({number}); COMMIT;"));

        let client = self.connected().await;
        let committed = match client.batch_execute(&sql).await {
            Ok(()) => true,
            Err(err) => {
                // Connection lost (a PostgreSQL restart): did the COMMIT happen?
                self.client = None;
                self.log.unanswered_commits += 1;
                if let Some(db) = err.as_db_error()
                    && db.code().code().starts_with("23")
                {
                    panic!(
                        "workload transaction {number} broke a constraint: the writer's model is wrong: {err}"
                    );
                }
                let client = self.connected().await;
                client
                    .query_opt(&format!("SELECT 1 FROM {TXLOG} WHERE n = $1"), &[&number])
                    .await
                    .unwrap_or_else(|err| panic!("look up workload transaction {number}: {err}"))
                    .is_some()
            }
        };
        if committed {
            self.log.transactions += 1;
            self.rows = rows;
            self.log.changes.extend(ops.into_iter().map(|op| op.change));
        }
    }

    /// A connected client, reconnecting (with synchronous commit, whatever the server
    /// default: the log must only hold what the server keeps) for at most
    /// [`RECONNECT_FOR`].
    async fn connected(&mut self) -> &Client {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            let deadline = Instant::now() + RECONNECT_FOR;
            loop {
                if let Ok(client) = connect(&self.url).await
                    && client
                        .batch_execute("SET synchronous_commit = on")
                        .await
                        .is_ok()
                {
                    self.client = Some(client);
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the workload writer could not reconnect for {RECONNECT_FOR:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.client.as_ref().expect("connected")
    }

    /// Plans one change of row `index` of table `table`, currently `row`.
    fn plan(&mut self, table: usize, index: usize, row: Option<&Row>) -> Op {
        let t = self.tables[table];
        let (key_cond, key_cols, key_json, entity_id) = if t.composite {
            let (a, b) = (index as i32 / 10, index as i32 % 10);
            (
                format!("a = {a} AND b = {b}"),
                format!("{a}, {b}"),
                json!({"a": a, "b": b}),
                format!("{a}:{b}"),
            )
        } else {
            let id = index as i32;
            (
                format!("id = {id}"),
                id.to_string(),
                json!({"id": id}),
                id.to_string(),
            )
        };
        let new_row = Row {
            v: format!("v{}", self.rng.below(1_000_000)),
            n: (!self.rng.chance(10)).then(|| self.rng.below(1_000_000) as i32),
        };
        let n_sql = new_row.n.map_or("NULL".to_owned(), |n| n.to_string());
        let full = |row: &Row| {
            let mut data = key_json.clone();
            data["v"] = json!(row.v);
            data["n"] = json!(row.n);
            data
        };
        let (kind, sql, after, data) = match row {
            None => (
                "created",
                format!(
                    "INSERT INTO {} VALUES ({key_cols}, '{}', {n_sql});",
                    t.name, new_row.v
                ),
                Some(new_row.clone()),
                full(&new_row),
            ),
            Some(_) if self.rng.chance(20) => (
                "deleted",
                format!("DELETE FROM {} WHERE {key_cond};", t.name),
                None,
                key_json.clone(),
            ),
            Some(_) => (
                "updated",
                format!(
                    "UPDATE {} SET v = '{}', n = {n_sql} WHERE {key_cond};",
                    t.name, new_row.v
                ),
                Some(new_row.clone()),
                full(&new_row),
            ),
        };
        Op {
            after,
            sql,
            change: Change {
                entity: t.entity,
                entity_id,
                event_type: format!("{}.{kind}", t.entity),
                data,
            },
        }
    }
}

/// An event as stored: type, revision, data, seq.
type StoredEvent = (String, i64, Value, i64);

/// Store events whose count a test waits for.
pub async fn stored_events(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM walhook.events", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// Checks the store against `changes` and returns every problem found (empty when
/// all hold): each change has exactly its event (type and data), revisions per entity
/// are 1..n in commit order (G1-G3), seq is gap-free from 1, and the events are in
/// commit order (source LSN never goes back along seq; the workload has one writer, so
/// commit order is WAL order).
pub async fn check_exactly_once(client: &Client, changes: &[Change]) -> Vec<String> {
    let rows = client
        .query(
            "SELECT seq, entity, entity_id, type, revision, data::text, source_lsn::text, \
             pg_wal_lsn_diff(source_lsn, '0/0')::text FROM walhook.events ORDER BY seq",
            &[],
        )
        .await
        .expect("read the event log");
    let mut problems = Vec::new();
    if rows.len() != changes.len() {
        problems.push(format!(
            "{} events in the store, {} committed changes",
            rows.len(),
            changes.len()
        ));
    }
    let mut previous_lsn: Option<(f64, String)> = None;
    let mut stored: HashMap<(String, String), Vec<StoredEvent>> = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        let seq: i64 = r.get(0);
        if seq != i as i64 + 1 && problems.iter().all(|p| !p.starts_with("seq")) {
            problems.push(format!(
                "seq is not gap-free from 1: position {} holds seq {seq}",
                i + 1
            ));
        }
        let lsn: f64 = r.get::<_, String>(7).parse().unwrap_or(0.0);
        let lsn_text: String = r.get(6);
        if let Some((before, before_text)) = &previous_lsn
            && lsn < *before
            && problems.iter().all(|p| !p.starts_with("commit order"))
        {
            problems.push(format!(
                "commit order: seq {seq} has source LSN {lsn_text}, before the previous event's {before_text}"
            ));
        }
        previous_lsn = Some((lsn, lsn_text));
        let data: Value = serde_json::from_str(&r.get::<_, String>(5)).expect("event data is JSON");
        stored
            .entry((r.get(1), r.get(2)))
            .or_default()
            .push((r.get(3), r.get(4), data, seq));
    }
    let mut expected: HashMap<(String, String), Vec<&Change>> = HashMap::new();
    for c in changes {
        expected
            .entry((c.entity.to_owned(), c.entity_id.clone()))
            .or_default()
            .push(c);
    }
    let mut bad_entities = 0;
    for (key, want) in &expected {
        let have = stored.remove(key).unwrap_or_default();
        let mismatch = have.len() != want.len()
            || have
                .iter()
                .zip(want.iter())
                .enumerate()
                .any(|(i, (h, w))| h.0 != w.event_type || h.1 != i as i64 + 1 || h.2 != w.data);
        if mismatch {
            bad_entities += 1;
            if bad_entities <= 5 {
                let have: Vec<String> = have
                    .iter()
                    .map(|(t, rev, _, seq)| format!("{t}@rev{rev}(seq {seq})"))
                    .collect();
                let want: Vec<&str> = want.iter().map(|w| w.event_type.as_str()).collect();
                problems.push(format!(
                    "entity {}:{}: stored {have:?}, committed {want:?} (or data differs)",
                    key.0, key.1
                ));
            }
        }
    }
    if bad_entities > 5 {
        problems.push(format!("... {bad_entities} entities differ in all"));
    }
    if !stored.is_empty() {
        let some: Vec<String> = stored
            .keys()
            .take(5)
            .map(|(e, id)| format!("{e}:{id}"))
            .collect();
        problems.push(format!(
            "{} entities have events but no committed change, e.g. {some:?}",
            stored.len()
        ));
    }
    problems
}

/// Panics listing the problems [`check_exactly_once`] finds.
pub async fn assert_exactly_once(client: &Client, changes: &[Change]) {
    let problems = check_exactly_once(client, changes).await;
    assert!(
        problems.is_empty(),
        "the store does not hold each committed change exactly once:\n{}",
        problems.join("\n")
    );
}
