//! Ordinary SQL sessions (tokio-postgres) opened from a [`ConnInfo`]: each host in
//! turn, with the same TLS, keepalive, timeout and start-up settings as the
//! replication connection.

use tokio::sync::mpsc;

use super::PgError;
use super::conninfo::{ConnInfo, Host, HostSpec, SslMode, TargetSession};

/// The application name SQL sessions report when the string sets none.
const APPLICATION_NAME: &str = "walhook";
/// How long [`ConnInfo::connect_sql`] waits for a server that says it cannot take
/// connections yet (starting up, shutting down, in recovery: SQLSTATE 57P03).
const NOT_READY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl ConnInfo {
    /// The tokio-postgres settings for one host.
    fn tokio_config(&self, h: &HostSpec) -> tokio_postgres::Config {
        use tokio_postgres::config;
        let mut pg = tokio_postgres::Config::new();
        match &h.host {
            Host::Tcp(name) => pg.host(name),
            Host::Unix(dir) => pg.host_path(dir),
        };
        if let Some(addr) = h.hostaddr {
            pg.hostaddr(addr);
        }
        pg.port(h.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .options(self.startup_options())
            .application_name(self.application_name_or(APPLICATION_NAME))
            .connect_timeout(self.connect_timeout)
            .channel_binding(config::ChannelBinding::Disable)
            .ssl_mode(match self.tls.mode {
                SslMode::Disable => config::SslMode::Disable,
                SslMode::Prefer => config::SslMode::Prefer,
                _ => config::SslMode::Require,
            })
            .target_session_attrs(match self.target_session {
                TargetSession::Any => config::TargetSessionAttrs::Any,
                TargetSession::ReadWrite => config::TargetSessionAttrs::ReadWrite,
                TargetSession::ReadOnly => config::TargetSessionAttrs::ReadOnly,
            });
        if let Some(pw) = self.password_for(h) {
            pg.password(pw);
        }
        match &self.keepalives {
            None => {
                pg.keepalives(false);
            }
            Some(k) => {
                pg.keepalives(true).keepalives_idle(k.idle);
                if let Some(i) = k.interval {
                    pg.keepalives_interval(i);
                }
                if let Some(n) = k.count {
                    pg.keepalives_retries(n);
                }
            }
        }
        if let Some(t) = self.tcp_user_timeout {
            pg.tcp_user_timeout(t);
        }
        pg
    }

    /// Connects an ordinary SQL session, trying each host in turn, and drives its
    /// connection on a background task. A server that is starting up or shutting down
    /// (SQLSTATE 57P03) is waited for, up to 30 s, and so is the refused connection
    /// that follows it while the server restarts: a walhook started during a
    /// PostgreSQL restart must not exit for it (found by the long chaos run). A refused
    /// connection with no such sign first fails at once.
    pub async fn connect_sql(&self) -> Result<tokio_postgres::Client, PgError> {
        let deadline = tokio::time::Instant::now() + NOT_READY_WAIT;
        // Once the server said it is shutting down, a refused connection is the gap of
        // a restart, not a wrong address: wait through it too.
        let mut restarting = false;
        loop {
            match self.connect_sql_once().await {
                Err(PgError::Refused { source, .. })
                    if tokio::time::Instant::now() < deadline
                        && source.code()
                            == Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW) =>
                {
                    if !restarting {
                        tracing::info!(server = %self, "PostgreSQL is starting up or shutting down; waiting for it");
                        restarting = true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                Err(PgError::Unreachable { .. })
                    if restarting && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                other => return other,
            }
        }
    }

    async fn connect_sql_once(&self) -> Result<tokio_postgres::Client, PgError> {
        let tls = super::tls::client_config(&self.tls)?;
        let mut last = None;
        for h in self.hosts_in_order() {
            let pg = self.tokio_config(h);
            let result = match &tls {
                None => pg
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map(|(client, conn)| {
                        tokio::spawn(async move {
                            let _ = conn.await;
                        });
                        client
                    }),
                Some(tls) => {
                    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                    pg.connect(tls).await.map(|(client, conn)| {
                        tokio::spawn(async move {
                            let _ = conn.await;
                        });
                        client
                    })
                }
            };
            match result {
                Ok(client) => return Ok(client),
                Err(e) => last = Some(e),
            }
        }
        Err(self.connect_error(last.expect("a ConnInfo has a host")))
    }

    /// Like [`ConnInfo::connect_sql`], for a connection that `LISTEN`s: every
    /// notification it receives sends `()` on the returned channel, which closes when
    /// the connection does.
    pub async fn connect_listen(
        &self,
    ) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<()>), PgError> {
        let tls = super::tls::client_config(&self.tls)?;
        let mut last = None;
        for h in self.hosts_in_order() {
            let pg = self.tokio_config(h);
            let (tx, rx) = mpsc::unbounded_channel();
            let result = match &tls {
                None => pg
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map(|(client, conn)| {
                        tokio::spawn(forward_notifications(conn, tx));
                        client
                    }),
                Some(tls) => {
                    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                    pg.connect(tls).await.map(|(client, conn)| {
                        tokio::spawn(forward_notifications(conn, tx));
                        client
                    })
                }
            };
            match result {
                Ok(client) => return Ok((client, rx)),
                Err(e) => last = Some(e),
            }
        }
        Err(self.connect_error(last.expect("a ConnInfo has a host")))
    }

    /// The error of a failed connection: the server refused it, or none answered.
    fn connect_error(&self, source: tokio_postgres::Error) -> PgError {
        let server = self.to_string();
        if source.as_db_error().is_some() {
            PgError::Refused { server, source }
        } else {
            PgError::Unreachable { server, source }
        }
    }
}

/// Drives `conn`, sending `()` on `tx` for each notification.
async fn forward_notifications<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    tx: mpsc::UnboundedSender<()>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(message)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
        if matches!(message, tokio_postgres::AsyncMessage::Notification(_)) && tx.send(()).is_err()
        {
            return;
        }
    }
}
