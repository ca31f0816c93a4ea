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

/// An ordinary SQL connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SqlConnectError {
    #[error(transparent)]
    Config(#[from] PgError),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

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
    pub async fn connect_sql(&self) -> Result<tokio_postgres::Client, SqlConnectError> {
        let deadline = tokio::time::Instant::now() + NOT_READY_WAIT;
        // Once the server said it is shutting down, a refused connection is the gap of
        // a restart, not a wrong address: wait through it too.
        let mut restarting = false;
        loop {
            match self.connect_sql_once().await {
                Err(SqlConnectError::Postgres(e))
                    if tokio::time::Instant::now() < deadline
                        && (e.code()
                            == Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW)
                            || (restarting && e.as_db_error().is_none())) =>
                {
                    if !restarting {
                        tracing::info!(server = %self, "PostgreSQL is starting up or shutting down; waiting for it");
                        restarting = true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                other => return other,
            }
        }
    }

    async fn connect_sql_once(&self) -> Result<tokio_postgres::Client, SqlConnectError> {
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
        Err(SqlConnectError::Postgres(
            last.expect("a ConnInfo has a host"),
        ))
    }

    /// Like [`ConnInfo::connect_sql`], for a connection that `LISTEN`s: every
    /// notification it receives sends `()` on the returned channel, which closes when
    /// the connection does.
    pub async fn connect_listen(
        &self,
    ) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<()>), SqlConnectError> {
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
        Err(SqlConnectError::Postgres(
            last.expect("a ConnInfo has a host"),
        ))
    }

    /// A one-paragraph explanation of why an ordinary SQL connection failed, naming
    /// the fix (never the password).
    pub fn describe_sql_error(&self, err: SqlConnectError) -> String {
        let SqlConnectError::Postgres(pg) = err else {
            return format!("cannot connect to PostgreSQL at {self}: {err}");
        };
        if let Some(db) = pg.as_db_error() {
            let fix = match db.code().code() {
                "28P01" => {
                    "Fix: check the user and password in the connection string, PGPASSWORD or the password file (~/.pgpass)"
                }
                "28000" => {
                    "Fix: allow this user, database and host in pg_hba.conf, or use another role"
                }
                "3D000" => "Fix: correct the database name in the connection string",
                "53300" => "Fix: free connections or raise max_connections",
                _ => "",
            };
            return format!(
                "PostgreSQL at {self} refused the connection: {}. {fix}",
                db.message()
            );
        }
        let cause = std::error::Error::source(&pg)
            .map(|c| c.to_string())
            .unwrap_or_else(|| pg.to_string());
        format!(
            "cannot reach PostgreSQL at {self}: {cause}. Fix: check the host and port in the connection string, and that the server is running and accepts connections from here"
        )
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
