//! Bulk events per source transaction (`[[tables.aggregate]]`): one event listing the
//! ids and revisions of the rows one transaction changed, instead of or besides the
//! row events, split at `max_rows`, exactly once across a SIGKILL in the middle of a
//! transaction (G2), revisions still gap-free (G3).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Client;

use crate::support::daemon::{Workdir, users_config, wait_leading};
use crate::support::pg::users_db;
use crate::support::receiver::Receiver;
use crate::support::wait_for;

const WAIT: Duration = Duration::from_secs(60);

/// The stored events of `type`, in log order: (entity_id, revision, data).
async fn stored(client: &Client, event_type: &str) -> Vec<(String, i64, Value)> {
    client
        .query(
            "SELECT entity_id, revision, data FROM walhook.events WHERE type = $1 ORDER BY seq",
            &[&event_type],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Every stored revision of entity `user`, by id, is 1..=n (G3).
async fn assert_gap_free(client: &Client) {
    let rows = client
        .query(
            "SELECT entity_id, array_agg(revision ORDER BY seq) FROM walhook.events WHERE entity = 'user' GROUP BY 1",
            &[],
        )
        .await
        .unwrap();
    let max: HashMap<String, i64> = client
        .query(
            "SELECT entity_id, revision FROM walhook.revisions WHERE entity = 'user'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for r in rows {
        let id: String = r.get(0);
        let mut revs: Vec<i64> = r.get(1);
        revs.dedup();
        assert!(
            revs.windows(2).all(|w| w[1] == w[0] + 1),
            "user {id}: {revs:?}"
        );
        assert!(
            revs.last() <= max.get(&id),
            "user {id}: {revs:?} past the stored revision"
        );
    }
}

/// The (id, revision) pairs a bulk event lists.
fn items(data: &Value) -> Vec<(String, i64)> {
    data["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_owned(),
                i["revision"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// `replace = true`: a bulk delete of 500 users is one event listing 500 id/revision
/// pairs and no row events; a transaction below `min_rows` gives row events only.
#[tokio::test]
async fn bulk_delete_of_500_users_is_one_event_instead_of_500() {
    let db = users_db().await;
    let receiver = Receiver::start(|_| 200).await;
    let rest = format!(
        "[[tables.aggregate]]\nevent = \"user.bulk_deleted\"\nop = \"delete\"\nreplace = true\n\n[[subscriptions]]\nname = \"s\"\nurl = \"{}\"\nevents = [\"user.bulk_deleted\", \"user.deleted\"]\n",
        receiver.url
    );
    let work = Workdir::new(&users_config(&db, &rest));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users SELECT g, 'u' || g, 0 FROM generate_series(1, 501) g")
        .await;
    db.batch("DELETE FROM users WHERE id <= 500").await;
    // One row: below min_rows (2), a row event.
    db.batch("DELETE FROM users WHERE id = 501").await;
    wait_for("the bulk event and the row event", WAIT, || async {
        receiver.received().len() >= 2
    })
    .await;
    let client = db.client().await;
    let bulk = stored(&client, "user.bulk_deleted").await;
    assert_eq!(bulk.len(), 1, "one bulk event");
    let (bulk_id, bulk_rev, data) = &bulk[0];
    assert_eq!(
        *bulk_rev, 1,
        "the bulk event is revision 1 of an entity of its own"
    );
    assert!(bulk_id.starts_with("public.users/delete/"), "{bulk_id}");
    assert_eq!(data["count"], 500);
    assert_eq!(data["op"], "delete");
    let expected: Vec<(String, i64)> = (1..=500).map(|i| (i.to_string(), 2)).collect();
    assert_eq!(
        items(data),
        expected,
        "every id, with its delete's revision"
    );
    let rows = stored(&client, "user.deleted").await;
    assert_eq!(rows.len(), 1, "no row events for the bulk delete");
    assert_eq!((rows[0].0.as_str(), rows[0].1), ("501", 2));
    // What the receiver got is what is stored.
    let got: Vec<Value> = receiver.received().iter().map(|r| r.json()).collect();
    let b = got
        .iter()
        .find(|e| e["type"] == "user.bulk_deleted")
        .unwrap();
    assert_eq!(b["data"], *data);
    assert_eq!(b["entity"], "user");
    assert_gap_free(&client).await;
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}

/// `replace = false` and `max_rows = 200`: 500 deletes give their 500 row events and
/// three bulk events (200, 200, 100) whose pairs carry the row events' revisions.
#[tokio::test]
async fn bulk_events_split_at_max_rows_and_share_the_row_events_revisions() {
    let db = users_db().await;
    let receiver = Receiver::start(|_| 200).await;
    let rest = format!(
        "[[tables.aggregate]]\nevent = \"user.bulk_deleted\"\nop = \"delete\"\nmax_rows = 200\n\n[[subscriptions]]\nname = \"s\"\nurl = \"{}\"\nevents = [\"user.bulk_deleted\"]\n",
        receiver.url
    );
    let work = Workdir::new(&users_config(&db, &rest));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users SELECT g, 'u' || g, 0 FROM generate_series(1, 500) g")
        .await;
    db.batch("UPDATE users SET n = 1 WHERE id % 2 = 0; DELETE FROM users")
        .await;
    wait_for("three bulk events", WAIT, || async {
        receiver.received().len() >= 3
    })
    .await;
    let client = db.client().await;
    let bulk = stored(&client, "user.bulk_deleted").await;
    let counts: Vec<i64> = bulk
        .iter()
        .map(|b| b.2["count"].as_i64().unwrap())
        .collect();
    assert_eq!(counts, [200, 200, 100]);
    let parts: Vec<i64> = bulk.iter().map(|b| b.2["part"].as_i64().unwrap()).collect();
    assert_eq!(parts, [1, 2, 3]);
    let listed: Vec<(String, i64)> = bulk.iter().flat_map(|b| items(&b.2)).collect();
    let rows: Vec<(String, i64)> = stored(&client, "user.deleted")
        .await
        .into_iter()
        .map(|(id, rev, _)| (id, rev))
        .collect();
    assert_eq!(rows.len(), 500, "the row events too");
    assert_eq!(
        listed, rows,
        "the same ids, in order, with the row events' revisions"
    );
    // Even ids were updated first: their delete is revision 3, odd ones' revision 2.
    for (id, rev) in &rows {
        let even = id.parse::<i64>().unwrap() % 2 == 0;
        assert_eq!(*rev, if even { 3 } else { 2 }, "user {id}");
    }
    assert_gap_free(&client).await;
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}

/// A SIGKILL while part of a 200,000-row transaction is stored: after the restart
/// every row is listed by exactly one bulk event, once, and the parts are numbered
/// 1..=200 without a repeat (the restart rebuilt the held rows from the stored ones).
#[tokio::test]
async fn crash_inside_a_bulk_transaction_lists_every_row_exactly_once() {
    let db = users_db().await;
    let rest =
        "[[tables.aggregate]]\nevent = \"user.bulk_imported\"\nop = \"insert\"\nreplace = true\n";
    let work = Workdir::new(&users_config(&db, rest));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users SELECT g, 'u' || g, g FROM generate_series(1, 200000) g")
        .await;
    let client = db.client().await;
    wait_for("part of the transaction stored", WAIT * 2, || async {
        client
            .query_one(
                "SELECT NOT complete AND rows_done > 20000 FROM walhook.checkpoints",
                &[],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
    })
    .await;
    daemon.kill9();
    let mut daemon = work.spawn_run(1);
    wait_for("the transaction stored", WAIT * 2, || async {
        client
            .query_one("SELECT complete FROM walhook.checkpoints", &[])
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
    })
    .await;
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
    let bulk = stored(&client, "user.bulk_imported").await;
    let parts: Vec<i64> = bulk.iter().map(|b| b.2["part"].as_i64().unwrap()).collect();
    assert_eq!(
        parts,
        (1..=200).collect::<Vec<i64>>(),
        "each part once, in order"
    );
    let listed: Vec<(String, i64)> = bulk.iter().flat_map(|b| items(&b.2)).collect();
    let expected: Vec<(String, i64)> = (1..=200000).map(|i| (i.to_string(), 1)).collect();
    assert!(listed == expected, "every row listed once, with revision 1");
    assert!(
        bulk.iter().all(|b| b.1 == 1),
        "every part is revision 1 of its own id"
    );
    let (events, max_rev): (i64, Option<i64>) = client
        .query_one(
            "SELECT (SELECT count(*) FROM walhook.events), (SELECT max(revision) FROM walhook.revisions WHERE entity = 'user')",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(events, 200, "no row events, no repeated part");
    assert_eq!(max_rev, Some(1), "each row took one revision once");
}
