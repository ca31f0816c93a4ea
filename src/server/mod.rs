//! The operations HTTP server on `[server] listen`: `/metrics` (Prometheus text),
//! `/healthz` (200 while the process runs), `/readyz` (200 when the source streams or
//! stands by and the store answers; 503 with a JSON body saying which part is not and
//! why) and `/.well-known/jwks.json` (the public keys of `format = "set"`
//! subscriptions, from the live config: a reload updates it).

pub mod exporter;
pub mod health;
pub mod refresh;
pub mod systemd;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::pg::ErrorChain;

pub use exporter::Exporter;
pub use health::Health;

/// Failures of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "cannot listen on {addr} (server.listen, env WALHOOK_SERVER__LISTEN); choose a free address, e.g. listen = \"127.0.0.1:9188\""
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A bound, not yet serving, server.
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    exporter: Exporter,
}

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    exporter: Exporter,
    /// The live config (replaced by each reload), for the JWKS.
    config: watch::Receiver<Arc<Config>>,
}

impl Server {
    /// Binds `addr` (`server.listen`); a failure names the address and the key.
    /// Installs the process's metrics recorder first, so that every stage started after
    /// the server records into it.
    pub async fn bind(addr: SocketAddr) -> Result<Server, ServerError> {
        let exporter = Exporter::install();
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Server {
            listener,
            addr,
            exporter,
        })
    }

    /// The address actually bound (port 0 picks one).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The exporter `/metrics` renders, for the refreshers that publish figures to it.
    pub fn exporter(&self) -> Exporter {
        self.exporter.clone()
    }

    /// Serves until `stop`; `/.well-known/jwks.json` reads the keys of `config`'s
    /// current value on each request.
    pub async fn serve(
        self,
        health: Arc<Health>,
        config: watch::Receiver<Arc<Config>>,
        stop: CancellationToken,
    ) {
        info!(addr = %self.addr, "serving /metrics, /healthz, /readyz and /.well-known/jwks.json");
        tokio::spawn(self.exporter.clone().upkeep(stop.clone()));
        let app = Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route(JWKS_PATH, get(jwks))
            .with_state(AppState {
                health,
                exporter: self.exporter,
                config,
            });
        if let Err(e) = axum::serve(self.listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            warn!(error = %ErrorChain(&e), "the metrics server stopped");
        }
    }
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, exporter::CONTENT_TYPE)],
        state.exporter.render(),
    )
        .into_response()
}

/// Where the JWKS is served (RFC 8615 well-known URI, as identity providers use it).
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// The JWK Set of the live config ([`crate::delivery::set::jwks`]): public keys only,
/// `{"keys": []}` when no subscription sends tokens.
async fn jwks(State(state): State<AppState>) -> Response {
    let set = crate::delivery::set::jwks(&state.config.borrow());
    axum::Json(set).into_response()
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let (ready, body) = state.health.readiness();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}
