//! Recovery keeps the log: after a lost slot, `walhook setup --reset-slot` replaces the
//! slot and the source position only, and the next `walhook run` appends after the
//! stored event log (sequence, revisions, cursors and retry rows kept) and delivers
//! the new changes (G1).

use std::time::Duration;

use crate::support::daemon::{Workdir, users_config, wait_leading};
use crate::support::pg::{TestDb, users_db};
use crate::support::receiver::Receiver;
use crate::support::wait_for;

const WAIT: Duration = Duration::from_secs(60);

/// (seq, entity_id, revision) of every stored event, in log order.
async fn events(db: &TestDb) -> Vec<(i64, String, i64)> {
    db.query(
        "SELECT seq, entity_id, revision FROM walhook.events ORDER BY seq",
        &[],
    )
    .await
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Per subscription: its cursor, and its retry rows as (seq, status).
async fn delivery_state(db: &TestDb) -> (Vec<(String, i64)>, Vec<(String, i64, String)>) {
    let cursors = db
        .query(
            "SELECT subscription, cursor FROM walhook.subscription_state ORDER BY 1",
            &[],
        )
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let retries = db
        .query(
            "SELECT subscription, seq, status FROM walhook.delivery_retries ORDER BY 1, 2",
            &[],
        )
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    (cursors, retries)
}

#[tokio::test]
async fn reset_slot_appends_after_the_old_log_and_delivers_the_new_changes() {
    let db = users_db().await;
    let ok = Receiver::start(|_| 200).await;
    // A receiver that fails: its deliveries become retry rows the reset must keep.
    let failing = Receiver::start(|_| 500).await;
    let work = Workdir::new(&users_config(
        &db,
        &format!(
            r#"
[[subscriptions]]
name = "ok"
url = "{}"
events = ["user.*"]

[[subscriptions]]
name = "failing"
url = "{}"
events = ["user.*"]

[subscriptions.retry]
backoff = ["1h"]
"#,
            ok.url, failing.url
        ),
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (1, 'a', 0); INSERT INTO users VALUES (2, 'b', 0)")
        .await;
    db.batch("UPDATE users SET n = 1 WHERE id = 1").await;
    wait_for("three deliveries to `ok`", WAIT, || async {
        ok.count() >= 3
    })
    .await;
    wait_for("three retry rows of `failing`", WAIT, || async {
        delivery_state(&db).await.1.len() == 3
    })
    .await;
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
    let old_log = events(&db).await;
    assert_eq!(
        old_log,
        [(1, "1".into(), 1), (2, "2".into(), 1), (3, "1".into(), 2)]
    );
    let old_state = delivery_state(&db).await;

    // The slot is lost (dropped here; invalidated or lost in a failover in real life).
    db.batch(&format!("SELECT pg_drop_replication_slot('{}')", db.name))
        .await;
    let (status, _, stderr) = work.run_to_end(&["run"], WAIT);
    assert_eq!(status.code(), Some(1), "run refuses a lost slot: {stderr}");
    assert!(stderr.contains("walhook setup --reset-slot"), "{stderr}");
    let (status, stdout, _) = work.run_to_end(&["check"], WAIT);
    assert_eq!(status.code(), Some(1), "check refuses it too:\n{stdout}");

    let (status, _, stderr) = work.run_to_end(&["setup", "--reset-slot"], WAIT);
    assert!(status.success(), "{stderr}");
    assert_eq!(events(&db).await, old_log, "the reset keeps the event log");
    assert_eq!(
        delivery_state(&db).await,
        old_state,
        "the reset keeps cursors and retry rows"
    );

    let mut daemon = work.spawn_run(1);
    wait_leading(&db, &mut daemon).await;
    db.batch("UPDATE users SET n = 2 WHERE id = 1").await;
    db.batch("INSERT INTO users VALUES (3, 'c', 0)").await;
    wait_for("the two new changes delivered to `ok`", WAIT, || async {
        ok.count() >= 5
    })
    .await;
    assert!(daemon.is_running(), "{}", daemon.log());
    assert_eq!(
        events(&db).await,
        [
            (1, "1".into(), 1),
            (2, "2".into(), 1),
            (3, "1".into(), 2),
            (4, "1".into(), 3),
            (5, "3".into(), 1),
        ],
        "appended after the old log, revisions continuing; {}",
        daemon.log()
    );
    // Per entity order is guaranteed, not the order across entities.
    let mut new: Vec<(String, i64)> = ok.received()[3..]
        .iter()
        .map(|r| {
            let body = r.json();
            (
                body["entity_id"].as_str().unwrap().to_owned(),
                body["revision"].as_i64().unwrap(),
            )
        })
        .collect();
    new.sort();
    assert_eq!(new, [("1".into(), 3), ("3".into(), 1)]);
    // The failing subscription's old retry rows are still there, now with the new ones.
    wait_for(
        "retry rows for the new events of `failing`",
        WAIT,
        || async { delivery_state(&db).await.1.len() == 5 },
    )
    .await;
    let (_, retries) = delivery_state(&db).await;
    let kept: Vec<_> = old_state.1.iter().collect();
    assert_eq!(retries.iter().take(3).collect::<Vec<_>>(), kept);
}
