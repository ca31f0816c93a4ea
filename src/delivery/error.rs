//! [`DeliveryError`]: what can fail in the delivery stage itself (not a receiver's
//! answer: that is an [`super::Attempt`] judged by [`super::decide`]).

/// Errors of the delivery stage.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The outbound HTTP client could not be built (TLS backend, root certificates).
    #[error("cannot build the outbound HTTP client")]
    HttpClient(#[source] reqwest::Error),
    /// `[delivery] proxy` was refused by the HTTP client. The cause is not kept: its
    /// text could repeat the proxy URL, password included.
    #[error("delivery.proxy: the HTTP client refuses this proxy URL")]
    Proxy,
    /// An event could not be turned into a request body.
    #[error("cannot serialize the event body")]
    Body(#[source] serde_json::Error),
    /// A `format = "set"` subscription without an ed25519 key (config validation
    /// prevents it).
    #[error("format = \"set\" has no ed25519 key to sign the token with")]
    NoSetKey,
}
