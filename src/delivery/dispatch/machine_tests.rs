use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::*;
use crate::delivery::{Attempt, AttemptOutcome, Decision, ErrorKind};

fn event(seq: i64, entity_id: &str) -> DueEvent {
    DueEvent {
        seq,
        id: format!("evt_{seq}").into(),
        event_type: "user.updated".into(),
        entity: "user".into(),
        entity_id: entity_id.into(),
        revision: seq,
        occurred_at: UNIX_EPOCH,
        data: Arc::from(serde_json::value::to_raw_value(&serde_json::json!({})).unwrap()),
        previous: None,
        changed: None,
        table: "public.users".into(),
        lsn: "0/1".into(),
        xid: 7,
        context: None,
        attempts: 0,
        first_due_at: UNIX_EPOCH,
        batch: None,
    }
}

/// A retry row of `seq` after `attempts` attempts.
fn retry_row(seq: i64, entity_id: &str, attempts: i32) -> DueEvent {
    DueEvent {
        attempts,
        ..event(seq, entity_id)
    }
}

fn fetched(events: Vec<DueEvent>, read_upto: i64, more: bool) -> NewEvents {
    NewEvents {
        events,
        read_upto,
        more,
    }
}

fn status(code: u16) -> Attempt {
    Attempt {
        outcome: AttemptOutcome::Status {
            code,
            retry_after: None,
        },
        response_head: String::new(),
        body_read: 0,
        location: None,
        error: None,
        elapsed: Duration::ZERO,
    }
}

fn delivered(e: DueEvent) -> (DueEvent, Sent) {
    (e, Sent::Attempted(status(204), Decision::Delivered))
}

fn retry_at() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_000)
}

fn retried(e: DueEvent) -> (DueEvent, Sent) {
    let decision = Decision::Retry {
        at: retry_at(),
        reason: "http 500".into(),
    };
    let mut answer = status(500);
    answer.response_head = "busy".into();
    (e, Sent::Attempted(answer, decision))
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(500)
}

/// Starts attempts of one event each up to `limit` in flight; their events.
fn start(m: &mut Machine, limit: usize) -> Vec<DueEvent> {
    std::iter::from_fn(|| m.next_start(limit, 1))
        .flatten()
        .collect()
}

/// Answers requests of one event each.
fn answer_each(m: &mut Machine, done: Vec<(DueEvent, Sent)>, now: SystemTime) -> Settlement {
    let done = done
        .into_iter()
        .map(|e| Answer {
            events: vec![e],
            batch: None,
        })
        .collect();
    m.answered(done, now)
}

fn seqs(events: &[DueEvent]) -> Vec<i64> {
    events.iter().map(|e| e.seq).collect()
}

/// A machine past `cursor` that fetched `events` (read up to the last of them).
fn with_new(cursor: i64, ordered: bool, events: Vec<DueEvent>) -> Machine {
    let mut m = Machine::new(cursor, ordered, Instant::now());
    assert_eq!(m.wants_new(), Some(cursor));
    let upto = events.last().map_or(cursor, |e| e.seq);
    let queued = m.new_fetched(fetched(events, upto, false), &HashSet::new());
    assert!(queued.is_empty());
    m
}

#[test]
fn unordered_attempts_start_up_to_the_limit_and_the_cursor_stops_before_the_oldest_unsettled() {
    let mut m = Machine::new(10, false, Instant::now());
    m.new_fetched(
        fetched(
            vec![event(11, "a"), event(12, "a"), event(13, "b")],
            15,
            false,
        ),
        &HashSet::new(),
    );
    assert_eq!(m.wants_new(), None, "the log had no more");
    assert_eq!(seqs(&start(&mut m, 2)), [11, 12]);
    assert!(m.next_start(2, 1).is_none(), "two in flight is the limit");

    let s = answer_each(&mut m, vec![delivered(event(12, "a"))], now());
    assert!(s.rows.is_empty(), "delivered at once needs no row");
    assert_eq!(m.settled_upto(), 10, "11 is still in flight");
    assert_eq!(seqs(&start(&mut m, 2)), [13]);

    answer_each(&mut m, vec![delivered(event(11, "a"))], now());
    assert_eq!(m.settled_upto(), 12, "13 is in flight");
    answer_each(&mut m, vec![delivered(event(13, "b"))], now());
    assert_eq!(
        m.settled_upto(),
        15,
        "the positions read past 13 hold nothing due"
    );
    assert_eq!(m.cursor_due(Instant::now(), false), Some(15));
}

#[test]
fn the_cursor_is_written_every_interval_while_attempts_are_in_flight() {
    let t0 = Instant::now();
    let mut m = Machine::new(0, false, t0);
    m.new_fetched(
        fetched(vec![event(1, "a"), event(2, "b")], 2, false),
        &HashSet::new(),
    );
    start(&mut m, 10);
    answer_each(&mut m, vec![delivered(event(1, "a"))], now());
    assert_eq!(m.cursor_due(t0, false), None, "2 is in flight: wait");
    assert_eq!(m.cursor_deadline(), Some(t0 + CURSOR_EVERY));
    assert_eq!(m.cursor_due(t0 + CURSOR_EVERY, false), Some(1));
    assert_eq!(m.cursor_due(t0, true), Some(1), "forced");
    m.cursor_written(1, t0 + CURSOR_EVERY);
    assert_eq!(m.cursor_due(t0 + CURSOR_EVERY * 3, true), None);
    assert_eq!(m.cursor_deadline(), None);
}

#[test]
fn with_ordering_an_entity_has_one_attempt_at_a_time_in_order() {
    let mut m = with_new(
        0,
        true,
        vec![event(1, "a"), event(2, "a"), event(3, "b"), event(4, "a")],
    );
    assert_eq!(seqs(&start(&mut m, 10)), [1, 3], "one head per entity");
    answer_each(&mut m, vec![delivered(event(1, "a"))], now());
    assert_eq!(seqs(&start(&mut m, 10)), [2]);
    answer_each(&mut m, vec![delivered(event(3, "b"))], now());
    assert!(start(&mut m, 10).is_empty(), "b's chain ended");
    answer_each(&mut m, vec![delivered(event(2, "a"))], now());
    assert_eq!(seqs(&start(&mut m, 10)), [4]);

    // A later fetch appends to a chain in memory.
    m.woken();
    m.new_fetched(
        fetched(vec![event(5, "a"), event(6, "c")], 6, false),
        &HashSet::new(),
    );
    assert_eq!(seqs(&start(&mut m, 10)), [6], "5 waits behind 4");
    answer_each(&mut m, vec![delivered(event(4, "a"))], now());
    assert_eq!(seqs(&start(&mut m, 10)), [5]);
}

#[test]
fn with_ordering_a_retry_queues_the_rest_of_its_chain_and_later_events_behind_it() {
    let mut m = with_new(
        0,
        true,
        vec![event(1, "a"), event(2, "a"), event(3, "a"), event(4, "b")],
    );
    assert_eq!(seqs(&start(&mut m, 10)), [1, 4]);
    let s = answer_each(&mut m, vec![retried(event(1, "a"))], now());
    let row = &s.rows[0];
    assert_eq!(
        (row.event.seq, row.status, row.attempts),
        (1, "pending", 1),
        "{row:?}"
    );
    assert_eq!(row.next_attempt_at, retry_at());
    assert_eq!(row.last_status, Some(500));
    assert_eq!(row.last_error.as_deref(), Some("http 500"));
    assert_eq!(row.last_response.as_deref(), Some("busy"));
    assert_eq!(seqs(&s.queue_behind), [2, 3]);
    assert_eq!(
        m.settled_upto(),
        3,
        "queued events are settled; 4 is in flight"
    );
    assert!(start(&mut m, 10).is_empty(), "nothing of a starts");

    // a now has a pending row in the store: its next new event queues behind it.
    m.woken();
    let new = vec![event(5, "a"), event(6, "c")];
    let entities = m.unchained(&new);
    assert_eq!(
        entities,
        [("user".into(), "a".into()), ("user".into(), "c".into())]
    );
    let blocked = HashSet::from([("user".into(), "a".into())]);
    let queued = m.new_fetched(fetched(new, 6, false), &blocked);
    assert_eq!(seqs(&queued), [5]);
    assert_eq!(seqs(&start(&mut m, 10)), [6]);
    assert_eq!(
        m.unchained(&[event(7, "c"), event(8, "d")]).len(),
        1,
        "c has a chain"
    );
}

#[test]
fn without_ordering_a_retry_holds_nothing_back() {
    let mut m = with_new(0, false, vec![event(1, "a"), event(2, "a")]);
    assert_eq!(seqs(&start(&mut m, 1)), [1]);
    let s = answer_each(&mut m, vec![retried(event(1, "a"))], now());
    assert_eq!(s.rows.len(), 1);
    assert!(s.queue_behind.is_empty());
    assert_eq!(seqs(&start(&mut m, 1)), [2]);
    assert!(m.unchained(&[event(3, "a")]).is_empty(), "no store lookup");
}

#[test]
fn retry_rows_go_first_and_are_not_fetched_again_while_out() {
    let mut m = with_new(0, false, vec![event(1, "x")]);
    assert!(m.wants_retries());
    m.retries_fetched(vec![retry_row(-5, "a", 2), retry_row(-3, "b", 4)], false);
    assert!(!m.wants_retries(), "two rows are out");
    assert_eq!(
        seqs(&start(&mut m, 10)),
        [-5, -3, 1],
        "retries first, oldest first"
    );

    let s = answer_each(&mut m, vec![delivered(retry_row(-5, "a", 2))], now());
    let row = &s.rows[0];
    assert_eq!((row.status, row.attempts), ("delivered", 3), "{row:?}");
    assert!(!m.wants_retries(), "-3 is still out");
    let s = answer_each(&mut m, vec![retried(retry_row(-3, "b", 4))], now());
    assert_eq!((s.rows[0].status, s.rows[0].attempts), ("pending", 5));
    assert!(!m.wants_retries(), "until the next poll");
    m.poll();
    assert!(m.wants_retries());
    assert_eq!(
        m.settled_upto(),
        0,
        "retries do not move the cursor; 1 is out"
    );
}

#[test]
fn a_full_batch_of_retries_is_followed_by_the_next_without_waiting_for_a_poll() {
    let mut m = Machine::new(0, false, Instant::now());
    m.retries_fetched(vec![retry_row(-1, "a", 1)], true);
    start(&mut m, 10);
    assert!(!m.wants_retries());
    answer_each(&mut m, vec![retried(retry_row(-1, "a", 1))], now());
    assert!(m.wants_retries(), "the last query filled its batch");
}

#[test]
fn a_retry_row_of_an_unsettled_new_event_or_of_an_entity_with_a_chain_waits() {
    let mut m = with_new(0, true, vec![event(1, "a"), event(2, "b")]);
    start(&mut m, 10);
    // 1 is in flight as new (a replay made a row for it); b has a chain (2 in flight).
    m.retries_fetched(
        vec![retry_row(1, "a", 0), event(-9, "b"), retry_row(-8, "c", 1)],
        true,
    );
    assert_eq!(seqs(&start(&mut m, 10)), [-8]);
    answer_each(&mut m, vec![delivered(retry_row(-8, "c", 1))], now());
    assert!(
        !m.wants_retries(),
        "a skipped row means the batch's end is not the table's"
    );
}

#[test]
fn a_dead_delivery_lets_its_entity_go_on() {
    let mut m = with_new(0, true, vec![event(1, "a"), event(2, "a")]);
    start(&mut m, 10);
    let mut answer = status(400);
    answer.error = None;
    let dead = Decision::Dead {
        reason: "http 400 is not retried".into(),
    };
    let s = answer_each(
        &mut m,
        vec![(event(1, "a"), Sent::Attempted(answer, dead))],
        now(),
    );
    let row = &s.rows[0];
    assert_eq!(
        (row.status, row.attempts, row.last_status),
        ("dead", 1, Some(400))
    );
    assert_eq!(row.last_error.as_deref(), Some("http 400 is not retried"));
    assert!(s.disable.is_none());
    assert_eq!(
        seqs(&start(&mut m, 10)),
        [2],
        "order is kept, not blocked for ever"
    );
}

#[test]
fn a_failure_without_an_answer_records_its_error_before_the_policy_reason() {
    let mut m = with_new(0, false, vec![event(1, "a")]);
    start(&mut m, 10);
    let attempt = Attempt {
        outcome: AttemptOutcome::Error {
            kind: ErrorKind::Timeout,
        },
        error: Some("timeout after 10s".into()),
        ..status(0)
    };
    let decision = Decision::Retry {
        at: retry_at(),
        reason: "timeout".into(),
    };
    let s = answer_each(
        &mut m,
        vec![(event(1, "a"), Sent::Attempted(attempt, decision))],
        now(),
    );
    assert_eq!(s.rows[0].last_status, None);
    assert_eq!(s.rows[0].last_error.as_deref(), Some("timeout after 10s"));
    assert_eq!(s.rows[0].last_response, None);
}

#[test]
fn gone_410_disables_the_subscription_and_stops_the_session() {
    let mut m = with_new(
        0,
        true,
        vec![event(1, "a"), event(2, "b"), event(3, "c"), event(4, "a")],
    );
    assert_eq!(seqs(&start(&mut m, 2)), [1, 2]);
    let gone = Decision::DeadAndDisable {
        reason: "http 410".into(),
    };
    let s = answer_each(
        &mut m,
        vec![(event(1, "a"), Sent::Attempted(status(410), gone))],
        now(),
    );
    assert_eq!(s.disable.as_deref(), Some("http 410"));
    assert_eq!((s.rows[0].status, s.rows[0].event.seq), ("dead", 1));
    assert!(m.is_stopping());
    assert!(m.next_start(10, 1).is_none(), "3 and 4 are not attempted");
    assert_eq!(m.wants_new(), None);
    assert!(!m.wants_retries());

    // The attempt in flight is still recorded; the cursor stops before 3.
    answer_each(&mut m, vec![delivered(event(2, "b"))], now());
    assert_eq!(m.settled_upto(), 2);
}

#[test]
fn a_paused_session_starts_nothing_and_leaves_what_waited_past_the_cursor() {
    let mut m = with_new(0, false, vec![event(1, "a"), event(2, "b"), event(3, "c")]);
    m.retries_fetched(vec![retry_row(-1, "d", 1)], false);
    assert_eq!(seqs(&start(&mut m, 2)), [-1, 1]);
    m.stop();
    assert!(m.next_start(10, 1).is_none());
    let s = answer_each(
        &mut m,
        vec![delivered(event(1, "a")), retried(retry_row(-1, "d", 1))],
        now(),
    );
    assert_eq!(s.rows.len(), 1, "the retry's answer is recorded");
    assert_eq!(m.settled_upto(), 1, "2 and 3 wait for the next session");
    assert_eq!(m.cursor_due(Instant::now(), true), Some(1));
}

#[test]
fn filtered_events_need_no_row_and_filtered_retry_rows_are_forgotten() {
    let mut m = with_new(0, true, vec![event(1, "a"), event(2, "a")]);
    m.retries_fetched(vec![retry_row(-4, "b", 0)], false);
    assert_eq!(seqs(&start(&mut m, 10)), [-4, 1]);
    let s = answer_each(
        &mut m,
        vec![
            (event(1, "a"), Sent::Filtered),
            (retry_row(-4, "b", 0), Sent::Filtered),
        ],
        now(),
    );
    assert!(s.rows.is_empty());
    assert_eq!(s.forget, [-4]);
    assert_eq!(m.settled_upto(), 1);
    assert_eq!(seqs(&start(&mut m, 10)), [2], "a's chain goes on");
}

#[test]
fn an_unsendable_event_is_dead_without_an_attempt() {
    let mut m = Machine::new(0, false, Instant::now());
    m.retries_fetched(vec![retry_row(-2, "a", 3)], false);
    start(&mut m, 10);
    let s = answer_each(
        &mut m,
        vec![(
            retry_row(-2, "a", 3),
            Sent::Unsendable("cannot render the body: x".into()),
        )],
        now(),
    );
    let row = &s.rows[0];
    assert_eq!(
        (row.status, row.attempts),
        ("dead", 3),
        "no attempt was made"
    );
    assert_eq!(row.next_attempt_at, now());
    assert_eq!(row.last_error.as_deref(), Some("cannot render the body: x"));
}

#[test]
fn a_lapsed_attempt_stays_unsettled_and_is_reported_once() {
    let mut m = with_new(0, true, vec![event(1, "a"), event(2, "a")]);
    start(&mut m, 10);
    let s = answer_each(&mut m, vec![(event(1, "a"), Sent::Lapsed)], now());
    assert!(s.rows.is_empty());
    assert!(m.take_lapsed());
    assert!(!m.take_lapsed());
    assert_eq!(m.settled_upto(), 0, "the next session sends 1 again");
    assert!(start(&mut m, 10).is_empty(), "2 stays behind 1");
}

#[test]
fn fetching_stops_while_the_waiting_events_fill_memory() {
    let events: Vec<DueEvent> = (1..=WAITING_MAX as i64).map(|s| event(s, "a")).collect();
    let mut m = Machine::new(0, false, Instant::now());
    m.new_fetched(fetched(events, WAITING_MAX as i64, true), &HashSet::new());
    assert_eq!(m.wants_new(), None, "full, though the log has more");
    m.next_start(1, 1);
    assert_eq!(m.wants_new(), Some(WAITING_MAX as i64));

    let mut m = with_new(0, false, vec![event(1, "a")]);
    assert_eq!(m.wants_new(), None);
    m.woken();
    assert_eq!(m.wants_new(), Some(1));
}

/// A stored batch of `id` (its body does not matter to the machine).
fn stored(id: &str) -> Arc<StoredBatch> {
    Arc::new(StoredBatch {
        id: id.into(),
        content_type: "application/json".into(),
        body: bytes::Bytes::from_static(b"[]"),
    })
}

/// The answer to one request of `events`, all with `sent`, sent as `batch`.
fn batch_answer(events: Vec<DueEvent>, sent: &Sent, batch: Option<Arc<StoredBatch>>) -> Answer {
    Answer {
        events: events.into_iter().map(|e| (e, sent.clone())).collect(),
        batch,
    }
}

#[test]
fn batches_take_up_to_batch_size_new_events_and_count_as_one_request() {
    let mut m = with_new(0, false, (1..=7).map(|s| event(s, "a")).collect());
    let first = m.next_start(2, 3).expect("a batch");
    assert_eq!(seqs(&first), [1, 2, 3]);
    let second = m.next_start(2, 3).expect("a second batch");
    assert_eq!(seqs(&second), [4, 5, 6]);
    assert!(m.next_start(2, 3).is_none(), "two requests in flight");
    let (_, ok) = delivered(event(0, "a"));
    let s = m.answered(vec![batch_answer(first, &ok, Some(stored("bat_1")))], now());
    assert!(
        s.rows.is_empty() && s.batches.is_empty(),
        "a delivered batch writes nothing"
    );
    assert_eq!(m.settled_upto(), 3);
    assert_eq!(seqs(&m.next_start(2, 3).expect("the rest")), [7]);
}

#[test]
fn with_ordering_a_batch_holds_one_event_per_entity_and_the_next_revision_waits() {
    let mut m = with_new(
        0,
        true,
        vec![
            event(1, "a"),
            event(2, "a"),
            event(3, "b"),
            event(4, "c"),
            event(5, "b"),
        ],
    );
    let batch = m.next_start(10, 100).expect("a batch");
    assert_eq!(seqs(&batch), [1, 3, 4], "the heads of a, b and c only");
    assert!(m.next_start(10, 100).is_none(), "2 and 5 wait for 1 and 3");
    let (_, ok) = delivered(event(0, "a"));
    m.answered(vec![batch_answer(batch, &ok, Some(stored("bat_1")))], now());
    assert_eq!(
        seqs(&m.next_start(10, 100).expect("the next revisions")),
        [2, 5]
    );
}

#[test]
fn a_failed_batch_is_kept_its_rows_name_it_and_the_entities_queue_behind() {
    let mut m = with_new(
        0,
        true,
        vec![event(1, "a"), event(2, "b"), event(3, "a"), event(4, "b")],
    );
    let batch = m.next_start(10, 100).expect("a batch");
    assert_eq!(seqs(&batch), [1, 2]);
    let (_, failed) = retried(event(0, "a"));
    let s = m.answered(
        vec![batch_answer(batch, &failed, Some(stored("bat_1")))],
        now(),
    );
    assert_eq!(s.batches, vec![stored("bat_1")], "kept for its retries");
    let rows: Vec<(i64, &str, Option<&str>)> = s
        .rows
        .iter()
        .map(|r| (r.event.seq, r.status, r.record().1.batch_id))
        .collect();
    assert_eq!(
        rows,
        [(1, "pending", Some("bat_1")), (2, "pending", Some("bat_1"))]
    );
    assert_eq!(
        seqs(&s.queue_behind),
        [3, 4],
        "later revisions wait behind it"
    );
    assert!(m.next_start(10, 100).is_none());
    assert_eq!(m.settled_upto(), 4);
}

#[test]
fn a_stored_batch_is_retried_alone_and_its_answer_names_it() {
    let mut m = Machine::new(10, true, Instant::now());
    let mut row = retry_row(3, "a", 1);
    row.batch = Some(stored("bat_1"));
    m.retries_fetched(vec![row], false);
    let new = vec![event(11, "x"), event(12, "y")];
    m.new_fetched(fetched(new, 12, false), &HashSet::new());
    let retry = m.next_start(10, 100).expect("the retry first");
    assert_eq!(seqs(&retry), [3], "a retry is not batched with new events");
    assert_eq!(
        seqs(&m.next_start(10, 100).expect("then new ones")),
        [11, 12]
    );
    let (_, ok) = delivered(event(0, "a"));
    let s = m.answered(vec![batch_answer(retry, &ok, None)], now());
    assert!(s.batches.is_empty(), "already kept");
    assert_eq!(s.rows.len(), 1);
    let (_, record) = s.rows[0].record();
    assert_eq!(
        (record.status, record.batch_id),
        ("delivered", Some("bat_1"))
    );
}

#[test]
fn one_query_of_new_events_at_a_time_and_a_wake_during_it_asks_again() {
    let mut m = Machine::new(10, true, Instant::now());
    assert_eq!(m.wants_new(), Some(10));
    m.fetch_started();
    assert_eq!(m.wants_new(), None, "the first query is on its way");
    m.woken();
    m.poll();
    assert_eq!(m.wants_new(), None, "still on its way");
    m.new_fetched(fetched(vec![event(11, "a")], 11, false), &HashSet::new());
    assert_eq!(
        m.wants_new(),
        Some(11),
        "woken while the query ran: events written after it read may be missed"
    );
    m.fetch_started();
    m.new_fetched(fetched(vec![], 11, false), &HashSet::new());
    assert_eq!(m.wants_new(), None, "read to the head, nobody woke it");
}

#[test]
fn the_next_query_starts_before_an_answer_is_taken_only_when_the_log_has_more_and_it_fits() {
    let m = Machine::new(0, false, Instant::now());
    let page = |from: i64, n: i64, more: bool| {
        fetched(
            (from + 1..=from + n).map(|s| event(s, "a")).collect(),
            from + n,
            more,
        )
    };
    // The log has more and the answer fits: the next query reads past it.
    assert_eq!(m.room_after(&page(0, 100, true)), Some(100));
    // Read to the head: nothing to read past it yet.
    assert_eq!(m.room_after(&page(0, 100, false)), None);
    // The answer alone would fill memory.
    assert_eq!(m.room_after(&page(0, WAITING_MAX as i64, true)), None);

    // What waits counts too: with WAITING_MAX - 10 events waiting, a page of 9 fits
    // and a page of 10 does not.
    let waiting: Vec<DueEvent> = (1..=WAITING_MAX as i64 - 10)
        .map(|s| event(s, "b"))
        .collect();
    let mut m = with_new(0, false, waiting);
    let head = WAITING_MAX as i64 - 10;
    assert_eq!(m.room_after(&page(head, 9, true)), Some(head + 9));
    assert_eq!(m.room_after(&page(head, 10, true)), None);

    // A stopping machine asks for nothing more.
    m.stop();
    assert_eq!(m.room_after(&page(head, 1, true)), None);
}
