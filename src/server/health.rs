//! Readiness: what `/readyz` answers. The source is ready when its replication
//! connection streams or stands by for a slot another instance holds (G8); the store when
//! the last probe (every [`super::refresh::PROBE_INTERVAL`]) succeeded; ingest unless the
//! store refuses a batch for a reason retrying alone cannot cure (ingest then retries it
//! with backoff until an operator fixes the cause).

use std::sync::Mutex;

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::source::stream::Link;

/// What the store probe last found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreState {
    /// Not probed yet (the daemon is starting).
    Unknown,
    /// `SELECT 1` answered.
    Reachable,
    /// The probe failed; the text says why (connection errors, never credentials).
    Unreachable(String),
}

/// Shared readiness state: written by the daemon and its probes, read by `/readyz`.
pub struct Health {
    source: Mutex<Option<watch::Receiver<Link>>>,
    store: Mutex<StoreState>,
    /// Why the store refuses the batch ingest holds, while it does.
    ingest_refused: Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            source: Mutex::new(None),
            store: Mutex::new(StoreState::Unknown),
            ingest_refused: Mutex::new(None),
        }
    }
}

impl Health {
    /// From now on the source's state is what `link` says.
    pub fn watch_source(&self, link: watch::Receiver<Link>) {
        *self.source.lock().expect("health lock") = Some(link);
    }

    /// Records the result of a store probe.
    pub fn set_store(&self, state: StoreState) {
        *self.store.lock().expect("health lock") = state;
    }

    /// Records that the store refuses ingest's batch (`Some(why)`, naming the table and
    /// the fix, never row values) or accepts batches again (`None`).
    pub fn set_ingest_refused(&self, why: Option<String>) {
        *self.ingest_refused.lock().expect("health lock") = why;
    }

    /// Whether the daemon is ready, and the JSON body saying which part is not and why.
    pub fn readiness(&self) -> (bool, Value) {
        let source = self
            .source
            .lock()
            .expect("health lock")
            .as_ref()
            .map(|l| *l.borrow());
        let (source_ok, source_json) = match source {
            None => (
                false,
                json!({"ok": false, "state": "starting", "reason": "the daemon is starting (config, publication, slot)"}),
            ),
            Some(Link::Streaming) => (true, json!({"ok": true, "state": "streaming"})),
            Some(Link::StandingBy) => (
                true,
                json!({"ok": true, "state": "standby", "reason": "another instance holds the slot; standing by to take over"}),
            ),
            Some(Link::Connecting) => (
                false,
                json!({"ok": false, "state": "connecting", "reason": "the replication connection is not established (connecting or reconnecting)"}),
            ),
            Some(Link::Paused) => (
                false,
                json!({"ok": false, "state": "paused", "reason": "the replication connection was closed on purpose because ingest cannot take or store more; it reconnects after a pause"}),
            ),
        };
        let store = self.store.lock().expect("health lock").clone();
        let (store_ok, store_json) = match store {
            StoreState::Unknown => (
                false,
                json!({"ok": false, "state": "unknown", "reason": "the store has not been probed yet"}),
            ),
            StoreState::Reachable => (true, json!({"ok": true, "state": "reachable"})),
            StoreState::Unreachable(why) => (
                false,
                json!({"ok": false, "state": "unreachable", "reason": format!("the store is unreachable: {why}")}),
            ),
        };
        let refused = self.ingest_refused.lock().expect("health lock").clone();
        let (ingest_ok, ingest_json) = match refused {
            None => (true, json!({"ok": true, "state": "ok"})),
            Some(why) => (
                false,
                json!({"ok": false, "state": "refused", "reason": why}),
            ),
        };
        let ready = source_ok && store_ok && ingest_ok;
        let mut reasons = Vec::new();
        // Causes first: a store or ingest failure pauses the source (G9).
        for (name, ok, part) in [
            ("store", store_ok, &store_json),
            ("ingest", ingest_ok, &ingest_json),
            ("source", source_ok, &source_json),
        ] {
            if !ok {
                reasons.push(format!(
                    "{name}: {}",
                    part["reason"].as_str().unwrap_or("not ready")
                ));
            }
        }
        let mut body = json!({
            "status": if ready { "ready" } else { "not ready" },
            "source": source_json,
            "store": store_json,
            "ingest": ingest_json,
        });
        if !ready {
            body["reason"] = Value::from(reasons.join("; "));
        }
        (ready, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_with_source_up_or_standing_by_and_store_reachable() {
        let health = Health::default();
        let (ready, body) = health.readiness();
        assert!(!ready);
        assert_eq!(body["source"]["state"], "starting");

        let (tx, rx) = watch::channel(Link::Connecting);
        health.watch_source(rx);
        health.set_store(StoreState::Reachable);
        assert!(!health.readiness().0);
        tx.send_replace(Link::StandingBy);
        assert!(health.readiness().0);
        tx.send_replace(Link::Streaming);
        let (ready, body) = health.readiness();
        assert!(ready, "{body}");
        assert_eq!(body["status"], "ready");

        health.set_store(StoreState::Unreachable("connection refused".into()));
        let (ready, body) = health.readiness();
        assert!(!ready);
        let reason = body["reason"].as_str().unwrap();
        assert!(reason.starts_with("store: "), "{reason}");
        assert!(reason.contains("connection refused"), "{reason}");

        health.set_store(StoreState::Reachable);
        health.set_ingest_refused(Some("the store refuses a change to public.users".into()));
        let (ready, body) = health.readiness();
        assert!(!ready);
        let reason = body["reason"].as_str().unwrap();
        assert!(reason.starts_with("ingest: "), "{reason}");
        assert!(reason.contains("public.users"), "{reason}");
        health.set_ingest_refused(None);
        assert!(health.readiness().0);
    }

    #[test]
    fn a_source_paused_by_a_store_outage_names_the_store_first() {
        let health = Health::default();
        let (tx, rx) = watch::channel(Link::Streaming);
        health.watch_source(rx);
        health.set_store(StoreState::Unreachable("connection refused".into()));
        tx.send_replace(Link::Paused);
        let (ready, body) = health.readiness();
        assert!(!ready);
        assert_eq!(body["source"]["state"], "paused", "{body}");
        let reason = body["reason"].as_str().unwrap();
        assert!(reason.starts_with("store: "), "{reason}");
        assert!(reason.contains("; source: "), "{reason}");
        assert!(reason.contains("closed on purpose"), "{reason}");
    }
}
