//! The [`Router`]: which subscriptions an event is due to (event patterns, then the
//! optional CEL filter).

use crate::config::{CelProgram, EventPatterns, SubscriptionConfig, SubscriptionName};
use crate::mapping::{FailureCount, eval_bool, scope};

use super::envelope::Envelope;

/// The subscriptions of one event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// Indices (in config order) of the subscriptions the event is due to, ascending.
    pub subscriptions: Vec<usize>,
    /// Indices of subscriptions whose filter failed at run time (counted as false).
    pub filter_errors: Vec<usize>,
}

#[derive(Debug)]
struct Route {
    name: SubscriptionName,
    events: EventPatterns,
    filter: Option<(CelProgram, FailureCount)>,
}

/// Subscription matching, built once from the config.
///
/// A filter that fails at run time (a missing key, a type mismatch) or returns a
/// non-bool counts as false; the failure is reported in [`Routes::filter_errors`] and
/// logged with the subscription and event type only, never values.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// A router over `subscriptions`; [`Routes`] indices refer to this slice.
    pub fn new(subscriptions: &[SubscriptionConfig]) -> Router {
        let routes = subscriptions
            .iter()
            .map(|s| Route {
                name: s.name.clone(),
                events: s.events.clone(),
                filter: s
                    .filter
                    .as_ref()
                    .map(|f| (f.program.clone(), FailureCount::default())),
            })
            .collect();
        Router { routes }
    }

    /// The subscriptions `envelope` is due to. The CEL `event` value is built only
    /// when a subscription with a filter matches the event type.
    pub fn route(&self, envelope: &Envelope) -> Routes {
        let mut routes = Routes::default();
        let mut ctx = None;
        for (i, route) in self.routes.iter().enumerate() {
            if !route.events.matches(&envelope.event_type) {
                continue;
            }
            let Some((program, failures)) = &route.filter else {
                routes.subscriptions.push(i);
                continue;
            };
            let ctx = ctx.get_or_insert_with(|| {
                let mut ctx = scope();
                ctx.add_variable_from_value("event", envelope.to_cel());
                ctx
            });
            match eval_bool(program, ctx) {
                Ok(true) => routes.subscriptions.push(i),
                Ok(false) => {}
                Err(e) => {
                    routes.filter_errors.push(i);
                    let (failures, log) = failures.record();
                    if log {
                        tracing::warn!(
                            subscription = %route.name,
                            event = %envelope.event_type,
                            error = e.kind,
                            failures,
                            "subscription filter failed; counted as false"
                        );
                    }
                }
            }
        }
        routes
    }

    /// The name of subscription `index`.
    pub fn name(&self, index: usize) -> Option<&SubscriptionName> {
        self.routes.get(index).map(|r| &r.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::test_support::config;
    use crate::routing::envelope::tests::example;
    use serde_json::json;

    fn router(subs: &str) -> Router {
        Router::new(&config(subs).subscriptions)
    }

    fn sub(name: &str, events: &str, filter: Option<&str>) -> String {
        let filter = filter
            .map(|f| format!("filter = \"{f}\"\n"))
            .unwrap_or_default();
        format!(
            "[[subscriptions]]\nname = \"{name}\"\nurl = \"https://r.example/{name}\"\nevents = {events}\n{filter}"
        )
    }

    fn typed(event_type: &str) -> Envelope {
        Envelope {
            event_type: event_type.into(),
            ..example()
        }
    }

    #[test]
    fn globs_match_across_dots() {
        let r = router(
            &[
                sub("all", "[\"*\"]", None),
                sub("users", "[\"user.*\", \"organisation.created\"]", None),
                sub("orgs", "[\"organisation.*\"]", None),
                sub("exact", "[\"user.updated\"]", None),
            ]
            .concat(),
        );
        assert_eq!(r.route(&typed("user.role.assigned")).subscriptions, [0, 1]);
        assert_eq!(r.route(&typed("user.updated")).subscriptions, [0, 1, 3]);
        assert_eq!(
            r.route(&typed("organisation.created")).subscriptions,
            [0, 1, 2]
        );
        assert_eq!(r.route(&typed("users.created")).subscriptions, [0]);
        assert_eq!(r.name(2).unwrap().as_str(), "orgs");
    }

    #[test]
    fn filters_see_the_envelope() {
        let r = router(&[
            sub("yes", "[\"user.*\"]", Some("event.data.email.endsWith('@example.com') && event.revision == 7 && event.source.table == 'public.users' && 'email' in event.changed")),
            sub("no", "[\"user.*\"]", Some("event.data.status == 'suspended'")),
            sub("prev", "[\"*\"]", Some("has(event.previous) && event.previous.email != event.data.email")),
        ]
        .concat());
        let routes = r.route(&example());
        assert_eq!(
            routes,
            Routes {
                subscriptions: vec![0, 2],
                filter_errors: vec![]
            }
        );
    }

    #[test]
    fn filter_errors_count_as_false() {
        let r = router(
            &[
                sub("missing", "[\"*\"]", Some("event.data.org_id == 'acme'")),
                sub("types", "[\"*\"]", Some("event.data.email > 5")),
                sub("notbool", "[\"*\"]", Some("event.revision")),
                sub("plain", "[\"*\"]", None),
            ]
            .concat(),
        );
        let routes = r.route(&example());
        assert_eq!(routes.subscriptions, [3]);
        assert_eq!(routes.filter_errors, [0, 1, 2]);

        let mut e = example();
        e.data.insert("org_id".into(), json!("acme"));
        assert_eq!(r.route(&e).subscriptions, [0, 3]);
    }

    #[test]
    fn filters_are_skipped_for_non_matching_types() {
        let r = router(&sub("f", "[\"order.*\"]", Some("event.data.nope == 1")));
        assert_eq!(r.route(&example()), Routes::default());
    }
}
