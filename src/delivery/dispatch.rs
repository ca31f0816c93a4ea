//! The dispatcher of one subscription: holds the subscription's lease in the store (one
//! instance at a time sends its deliveries), sends due retries and new events past its
//! cursor, keeps per-entity order (G5) and records what needs another attempt (G4).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Attempt, Decision, HttpClients, body, decide, request_headers};
use crate::config::{Ordering, SubscriptionConfig};
use crate::routing::{Envelope, EventSource, Router};
use crate::source::decoder::TableName;
use crate::store::deliveries::{AttemptRecord, DueEvent};
use crate::store::{Store, StoreError};

/// How long a lease lasts without renewal; another instance takes over after it.
const LEASE_SECONDS: f64 = 15.0;
/// Events fetched per round.
const BATCH: i64 = 500;
/// How often an idle dispatcher looks for work written by other processes.
const POLL: Duration = Duration::from_millis(250);

/// What happened to one event in a round.
pub enum Handled {
    /// Delivered, filtered out, or recorded for a later attempt or as dead.
    Done,
    /// A retry is pending: later events of the entity must queue behind it.
    Pending,
    /// 410 Gone: the subscription is now disabled.
    Disabled,
}

/// Runs the dispatcher of `sub` until `shutdown`.
pub async fn run(
    sub: SubscriptionConfig,
    mut store: Store,
    clients: Arc<HttpClients>,
    owner: String,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let name = sub.name.as_str().to_owned();
    let sub = Arc::new(sub);
    let router = Arc::new(Router::new(std::slice::from_ref(&*sub)));
    let mut leased = false;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        match round(&sub, &store, &clients, &router, &owner, &mut leased).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                warn!(subscription = %name, error = %e, "dispatch round failed; retrying");
                if store.is_closed() {
                    let _ = store.reconnect().await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
    if leased {
        let _ = store.release_subscription(&name, &owner).await;
    }
}

/// One round: due retries, then new events. Returns whether there may be more work now.
async fn round(
    sub: &Arc<SubscriptionConfig>,
    store: &Store,
    clients: &Arc<HttpClients>,
    router: &Arc<Router>,
    owner: &str,
    leased: &mut bool,
) -> Result<bool, StoreError> {
    let name = sub.name.as_str();
    let Some(lease) = store.lease_subscription(name, owner, LEASE_SECONDS).await? else {
        *leased = false;
        return Ok(false);
    };
    if !*leased {
        info!(subscription = %name, "dispatching this subscription");
        *leased = true;
    }
    if !lease.enabled || lease.paused {
        return Ok(false);
    }
    let ordered = sub.ordering == Ordering::Entity;

    // Due retries: with ordering, at most the oldest pending row per entity.
    let retries = store.due_retries(name, ordered, BATCH).await?;
    let retried = retries.len();
    let groups: Vec<Vec<DueEvent>> = retries.into_iter().map(|e| vec![e]).collect();
    if send_groups(sub, store, clients, router, groups, ordered).await? {
        return Ok(false);
    }

    // New events past the cursor.
    let events = store.new_events(name, lease.cursor, BATCH).await?;
    let Some(last) = events.last().map(|e| e.seq) else {
        return Ok(retried as i64 == BATCH);
    };
    let fetched = events.len();
    let groups = if ordered {
        let mut by_entity: HashMap<(String, String), Vec<DueEvent>> = HashMap::new();
        let mut order = Vec::new();
        for e in events {
            let key = (e.entity.clone(), e.entity_id.clone());
            if !by_entity.contains_key(&key) {
                order.push(key.clone());
            }
            by_entity.entry(key).or_default().push(e);
        }
        let blocked = store.blocked_entities(name, &order).await?;
        let mut groups = Vec::with_capacity(order.len());
        for key in order {
            let group = by_entity.remove(&key).expect("grouped above");
            if blocked.contains(&key) {
                store
                    .queue_behind(name, &group.iter().collect::<Vec<_>>())
                    .await?;
            } else {
                groups.push(group);
            }
        }
        groups
    } else {
        events.into_iter().map(|e| vec![e]).collect()
    };
    let disabled = send_groups(sub, store, clients, router, groups, ordered).await?;
    store.advance_cursor(name, owner, last, true).await?;
    Ok(!disabled && fetched as i64 == BATCH)
}

/// Sends each group's events in order (groups in parallel, at most `max_in_flight`
/// requests at once); when an event needs a retry and order matters, the rest of its
/// group queues behind it. Returns whether the subscription got disabled (410).
async fn send_groups(
    sub: &Arc<SubscriptionConfig>,
    store: &Store,
    clients: &Arc<HttpClients>,
    router: &Arc<Router>,
    groups: Vec<Vec<DueEvent>>,
    ordered: bool,
) -> Result<bool, StoreError> {
    type Sent = Vec<(DueEvent, Option<(Attempt, Decision)>)>;
    if groups.is_empty() {
        return Ok(false);
    }
    let limit = Arc::new(Semaphore::new(sub.max_in_flight.max(1) as usize));
    let mut tasks: JoinSet<(Sent, Vec<DueEvent>)> = JoinSet::new();
    for group in groups {
        let (sub, clients, router, limit) =
            (sub.clone(), clients.clone(), router.clone(), limit.clone());
        tasks.spawn(async move {
            let mut sent = Vec::new();
            let mut rest = group.into_iter();
            for event in rest.by_ref() {
                let result = {
                    let _permit = limit.acquire().await.expect("semaphore never closed");
                    attempt(&sub, &clients, &router, &event).await
                };
                let blocks = ordered && matches!(result, Some((_, Decision::Retry { .. })));
                sent.push((event, result));
                if blocks {
                    break;
                }
            }
            (sent, rest.collect())
        });
    }
    let mut disabled = false;
    while let Some(joined) = tasks.join_next().await {
        let (sent, queued) = joined.expect("delivery task panicked");
        for (event, result) in &sent {
            if let Some((attempt, decision)) = result {
                disabled |= matches!(
                    record(store, sub, event, attempt, decision).await?,
                    Handled::Disabled
                );
            }
        }
        store
            .queue_behind(sub.name.as_str(), &queued.iter().collect::<Vec<_>>())
            .await?;
    }
    Ok(disabled)
}

/// One HTTP attempt of `event`; `None` when the subscription's filter rejects it.
async fn attempt(
    sub: &SubscriptionConfig,
    clients: &HttpClients,
    router: &Router,
    event: &DueEvent,
) -> Option<(Attempt, Decision)> {
    let envelope = envelope(event);
    if sub.filter.is_some() && router.route(&envelope).subscriptions.is_empty() {
        return None;
    }
    let body = match body::render(&envelope, sub) {
        Ok(b) => b,
        Err(e) => {
            warn!(subscription = %sub.name, event = %event.id, error = %e, "cannot render the body");
            return None;
        }
    };
    let now = SystemTime::now();
    let timestamp = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let headers = request_headers(sub, &event.id, timestamp, &body);
    let result = clients
        .for_subscription(sub)
        .post(sub.url.expose(), &headers, body, sub.timeout)
        .await;
    let age = now.duration_since(event.first_due_at).unwrap_or_default();
    let decision = decide(
        result.outcome(),
        event.attempts as u32 + 1,
        age,
        &sub.retry,
        now,
        fastrand::f64(),
    );
    debug!(subscription = %sub.name, event = %event.id, attempt = event.attempts + 1, elapsed_ms = result.elapsed.as_millis() as u64, "attempt");
    Some((result, decision))
}

/// The envelope of a stored event.
pub(crate) fn envelope(e: &DueEvent) -> Envelope {
    let (schema, name) = e.table.split_once('.').unwrap_or(("", &e.table));
    let as_row = |v: &serde_json::Value| match v {
        serde_json::Value::Object(m) => m.clone(),
        _ => serde_json::Map::new(),
    };
    Envelope {
        id: e.id.clone(),
        event_type: e.event_type.clone(),
        entity: Arc::from(e.entity.as_str()),
        entity_id: e.entity_id.clone(),
        revision: e.revision,
        occurred_at: DateTime::<Utc>::from(e.occurred_at),
        data: as_row(&e.data),
        previous: e.previous.as_ref().map(as_row),
        changed: e.changed.clone(),
        source: EventSource {
            table: Arc::new(TableName {
                schema: schema.to_owned(),
                name: name.to_owned(),
            }),
            lsn: e.lsn.parse().unwrap_or_default(),
            xid: e.xid as u32,
        },
    }
}

/// Records an attempt's result; returns how it was handled.
pub async fn record(
    store: &Store,
    sub: &SubscriptionConfig,
    event: &DueEvent,
    attempt: &Attempt,
    decision: &Decision,
) -> Result<Handled, StoreError> {
    let name = sub.name.as_str();
    let status = match &attempt.outcome {
        super::AttemptOutcome::Status { code, .. } => Some(i32::from(*code)),
        _ => None,
    };
    let now = SystemTime::now();
    let (state, next, error, handled) = match decision {
        Decision::Delivered => {
            if event.attempts == 0 {
                return Ok(Handled::Done);
            }
            ("delivered", now, None, Handled::Done)
        }
        Decision::Retry { at, reason } => ("pending", *at, Some(reason.as_str()), Handled::Pending),
        Decision::Dead { reason } => ("dead", now, Some(reason.as_str()), Handled::Done),
        Decision::DeadAndDisable { reason } => {
            store.disable_subscription(name, reason).await?;
            warn!(subscription = %name, "receiver answered 410 Gone: subscription disabled until resumed");
            ("dead", now, Some(reason.as_str()), Handled::Disabled)
        }
    };
    let last_error = attempt.error.as_deref().or(error);
    if let Some(location) = &attempt.location {
        warn!(subscription = %name, event = %event.id, location = %location, "receiver redirected; redirects are not followed");
    }
    store
        .record_attempt(
            name,
            event,
            &AttemptRecord {
                status: state,
                attempts: event.attempts + 1,
                next_attempt_at: next,
                last_status: status,
                last_error,
                last_response: Some(attempt.response_head.as_str()).filter(|s| !s.is_empty()),
            },
        )
        .await?;
    Ok(handled)
}
