//! The delivery stage: request bodies (Security Event Tokens and their JWKS among
//! them), Standard Webhooks signatures, the shared outbound HTTP client and the retry
//! decision.
//!
//! One attempt, as a dispatcher runs it:
//! 1. [`body::render`] the envelope for the subscription (same bytes on every retry);
//! 2. [`request_headers`] for this attempt (signs with the current unix time);
//! 3. [`HttpClients::for_subscription`] then [`HttpClient::post`] gives an [`Attempt`];
//! 4. [`decide`] on [`Attempt::outcome`] says delivered, retry at, dead, or disable.

pub mod body;
pub mod dispatch;
mod error;
mod http;
pub mod measure;
mod policy;
pub mod set;
mod signing;
pub mod slack;
pub mod supervise;

pub use error::DeliveryError;
pub use http::{
    Attempt, AttemptOutcome, HEAD_KEPT, HttpClient, HttpClients, MAX_BODY_READ, Target, USER_AGENT,
    request_headers,
};
pub use policy::{Decision, ErrorKind, Outcome, decide};
pub use signing::{sign, sign_v1, sign_v1a};
