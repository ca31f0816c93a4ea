//! The replication connection: PostgreSQL's wire protocol spoken directly (start-up with
//! `replication=database`, authentication, TLS, simple queries, CopyBoth streaming),
//! built on `postgres-protocol` because tokio-postgres has no replication support.

use std::io;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::Lsn;
use crate::pg::conninfo::SESSION_SETTINGS;
use crate::pg::{ConnInfo, Host, HostSpec, PgError, SslMode, now_pg_micros};

/// An error reported by the server (ErrorResponse), with its SQLSTATE.
#[derive(Debug, Clone)]
pub struct ServerError {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(detail) = &self.detail {
            write!(f, "; {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

/// What can go wrong on the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Config(#[from] PgError),
    #[error("cannot reach PostgreSQL at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {addr} failed")]
    Tls {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("the server at {0} does not accept TLS, but sslmode requires it")]
    TlsRefused(String),
    #[error(
        "the server asked for a password, but none is given (add it to the connection string, set PGPASSWORD, or add a line to the password file ~/.pgpass)"
    )]
    NoPassword,
    #[error("the server asked for an authentication method walhook does not support ({0})")]
    UnsupportedAuth(&'static str),
    #[error("SCRAM authentication failed")]
    Scram(#[source] io::Error),
    #[error("{0}")]
    Server(ServerError),
    #[error("I/O error on the replication connection")]
    Io(#[from] io::Error),
    #[error("the server closed the replication connection")]
    Closed,
    #[error("unexpected message from the server: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The SQLSTATE when the server reported the error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Server(e) => Some(&e.code),
            _ => None,
        }
    }

    /// Whether trying again later may succeed (the connection broke, the server is
    /// restarting, the slot is in use), as opposed to a setup error.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Io(_) | ClientError::Closed => true,
            ClientError::Server(e) => {
                // 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now,
                // 08xxx connection exceptions, 55006 object in use (slot active), 53300 too many connections.
                e.code.starts_with("08")
                    || matches!(
                        e.code.as_str(),
                        "57P01" | "57P02" | "57P03" | "55006" | "53300" | "53400"
                    )
            }
            _ => false,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// One message of the replication stream.
#[derive(Debug)]
pub enum ReplicationMessage {
    /// A chunk of WAL data: one pgoutput message.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        data: Bytes,
    },
    /// The server's keepalive.
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

/// One column of a simple-query result row, as text.
pub type TextRow = Vec<Option<String>>;

/// A replication connection (`replication=database`).
pub struct ReplicationClient {
    stream: Pin<Box<dyn Stream>>,
    read: BytesMut,
    write: BytesMut,
    addr: String,
    /// Server parameters reported at start-up (server_version, ...).
    pub server_version: Option<String>,
}

impl ReplicationClient {
    /// Opens a replication connection: TLS as `sslmode` says, start-up with
    /// `replication=database` and walhook's session settings, then authentication.
    pub async fn connect(info: &ConnInfo, application_name: &str) -> Result<Self, ClientError> {
        let mut last_err = None;
        for host in info.hosts_in_order() {
            match Self::connect_one(info, host, application_name).await {
                Ok(client) => return Ok(client),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("a ConnInfo has a host"))
    }

    async fn connect_one(
        info: &ConnInfo,
        spec: &HostSpec,
        application_name: &str,
    ) -> Result<Self, ClientError> {
        let timeout = info.connect_timeout;
        let port = spec.port;
        let failed = |addr: &String, source: io::Error| ClientError::Connect {
            addr: addr.clone(),
            source,
        };
        let timed_out = |addr: &String| {
            failed(
                addr,
                io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
            )
        };
        let (stream, addr, host_name): (Pin<Box<dyn Stream>>, String, Option<String>) =
            match &spec.host {
                Host::Tcp(h) => {
                    // `hostaddr` picks the address; `host` stays the name TLS verifies.
                    let addr = match spec.hostaddr {
                        Some(ip) => format!("{ip}:{port} ({h})"),
                        None => format!("{h}:{port}"),
                    };
                    let connect = async {
                        match spec.hostaddr {
                            Some(ip) => TcpStream::connect((ip, port)).await,
                            None => TcpStream::connect((h.as_str(), port)).await,
                        }
                    };
                    let tcp = tokio::time::timeout(timeout, connect)
                        .await
                        .map_err(|_| timed_out(&addr))?
                        .map_err(|source| failed(&addr, source))?;
                    tcp.set_nodelay(true)?;
                    set_tcp_options(&tcp, info)?;
                    (Box::pin(tcp), addr, Some(h.clone()))
                }
                Host::Unix(dir) => {
                    let path = dir.join(format!(".s.PGSQL.{port}"));
                    let addr = path.display().to_string();
                    let unix = tokio::time::timeout(timeout, UnixStream::connect(&path))
                        .await
                        .map_err(|_| timed_out(&addr))?
                        .map_err(|source| failed(&addr, source))?;
                    (Box::pin(unix), addr, None)
                }
            };
        let stream = match (info.tls.mode, host_name) {
            (SslMode::Disable, _) | (_, None) => stream,
            (mode, Some(host_name)) => {
                let tls = Self::start_tls(stream, info, mode, &host_name, &addr);
                tokio::time::timeout(timeout, tls)
                    .await
                    .map_err(|_| timed_out(&addr))??
            }
        };
        let mut client = ReplicationClient {
            stream,
            read: BytesMut::with_capacity(128 * 1024),
            write: BytesMut::with_capacity(1024),
            addr,
            server_version: None,
        };
        tokio::time::timeout(
            timeout,
            client.startup(info, spec, info.application_name_or(application_name)),
        )
        .await
        .map_err(|_| timed_out(&client.addr))??;
        Ok(client)
    }

    async fn start_tls(
        mut stream: Pin<Box<dyn Stream>>,
        info: &ConnInfo,
        mode: SslMode,
        host_name: &str,
        addr: &str,
    ) -> Result<Pin<Box<dyn Stream>>, ClientError> {
        let mut buf = BytesMut::new();
        frontend::ssl_request(&mut buf);
        stream.write_all(&buf).await?;
        let answer = stream.read_u8().await?;
        if answer != b'S' {
            if mode == SslMode::Prefer {
                return Ok(stream);
            }
            return Err(ClientError::TlsRefused(addr.to_owned()));
        }
        let config: Arc<rustls::ClientConfig> = crate::pg::tls::client_config(&info.tls)?
            .expect("sslmode other than disable has a TLS config");
        let name = ServerName::try_from(host_name.to_owned()).map_err(|e| ClientError::Tls {
            addr: addr.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|source| ClientError::Tls {
                addr: addr.to_owned(),
                source,
            })?;
        Ok(Box::pin(tls))
    }

    async fn startup(
        &mut self,
        info: &ConnInfo,
        spec: &HostSpec,
        application_name: &str,
    ) -> Result<(), ClientError> {
        let user = info.user.as_str();
        let mut startup: Vec<(&str, &str)> = vec![
            ("user", user),
            ("database", &info.dbname),
            ("replication", "database"),
            ("application_name", application_name),
            ("client_encoding", "UTF8"),
        ];
        startup.extend(SESSION_SETTINGS);
        if let Some(options) = &info.options {
            startup.push(("options", options));
        }
        frontend::startup_message(startup.iter().copied(), &mut self.write)?;
        self.flush().await?;

        let password = info.password_for(spec).map(String::into_bytes);
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.read_message().await? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    let pw = password.as_deref().ok_or(ClientError::NoPassword)?;
                    frontend::password_message(pw, &mut self.write)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let pw = password.as_deref().ok_or(ClientError::NoPassword)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        pw,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let pw = password.as_deref().ok_or(ClientError::NoPassword)?;
                    let mut has_scram = false;
                    let mut mechanisms = body.mechanisms();
                    while let Some(m) = mechanisms.next()? {
                        has_scram |= m == sasl::SCRAM_SHA_256;
                    }
                    if !has_scram {
                        return Err(ClientError::UnsupportedAuth("SASL without SCRAM-SHA-256"));
                    }
                    // Channel binding is not offered: 'n' is valid over TLS and plain TCP alike, and
                    // verify-full already ties the session to the server's certificate.
                    let state = ScramSha256::new(pw, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        state.message(),
                        &mut self.write,
                    )?;
                    self.flush().await?;
                    scram = Some(state);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let state = scram.as_mut().ok_or_else(|| {
                        ClientError::Protocol("SASL continue before SASL start".into())
                    })?;
                    state.update(body.data()).map_err(ClientError::Scram)?;
                    frontend::sasl_response(state.message(), &mut self.write)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let state = scram.as_mut().ok_or_else(|| {
                        ClientError::Protocol("SASL final before SASL start".into())
                    })?;
                    state.finish(body.data()).map_err(ClientError::Scram)?;
                }
                backend::Message::AuthenticationKerberosV5
                | backend::Message::AuthenticationScmCredential
                | backend::Message::AuthenticationGss
                | backend::Message::AuthenticationSspi
                | backend::Message::AuthenticationGssContinue(_) => {
                    return Err(ClientError::UnsupportedAuth("Kerberos/GSSAPI/SSPI"));
                }
                backend::Message::ParameterStatus(body) => {
                    if body.name()? == "server_version" {
                        self.server_version = Some(body.value()?.to_owned());
                    }
                }
                backend::Message::BackendKeyData(_) | backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(_) => return Ok(()),
                backend::Message::ErrorResponse(body) => {
                    return Err(ClientError::Server(server_error(&body)?));
                }
                _ => {
                    return Err(ClientError::Protocol(
                        "unexpected message during start-up".into(),
                    ));
                }
            }
        }
    }

    /// Where this connection goes, for messages.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Runs a simple-protocol query (a replication command or SQL) and returns the
    /// rows of its last result as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<TextRow>, ClientError> {
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await? {
                backend::Message::RowDescription(_) => rows.clear(),
                backend::Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(range) = ranges.next()? {
                        row.push(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(row);
                }
                backend::Message::ErrorResponse(body) => error = Some(server_error(&body)?),
                backend::Message::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(ClientError::Server(e)),
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }

    /// Sends `START_REPLICATION` and waits until the server enters CopyBoth mode.
    pub async fn start_replication(&mut self, command: &str) -> Result<(), ClientError> {
        frontend::query(command, &mut self.write)?;
        self.flush().await?;
        loop {
            self.fill_frame().await?;
            if self.read[0] == b'W' {
                let len = frame_len(&self.read).expect("fill_frame ensured a whole frame");
                self.read.advance(len);
                return Ok(());
            }
            match self.parse_message()? {
                backend::Message::ErrorResponse(body) => {
                    let err = server_error(&body)?;
                    // Drain up to ReadyForQuery so the connection could be reused.
                    return Err(ClientError::Server(err));
                }
                backend::Message::NoticeResponse(_) | backend::Message::ParameterStatus(_) => {}
                _ => {
                    return Err(ClientError::Protocol(
                        "expected CopyBothResponse after START_REPLICATION".into(),
                    ));
                }
            }
        }
    }

    /// The next replication message. Cancel-safe: a frame is consumed only when whole,
    /// so this can be raced in `select!` against timers and shutdown.
    pub async fn next_message(&mut self) -> Result<ReplicationMessage, ClientError> {
        loop {
            self.fill_frame().await?;
            match self.read[0] {
                b'd' => {
                    let len = frame_len(&self.read).expect("whole frame");
                    let mut frame = self.read.split_to(len).freeze();
                    frame.advance(5);
                    return parse_copy_data(frame);
                }
                _ => match self.parse_message()? {
                    backend::Message::ErrorResponse(body) => {
                        return Err(ClientError::Server(server_error(&body)?));
                    }
                    backend::Message::CopyDone => return Err(ClientError::Closed),
                    backend::Message::NoticeResponse(_)
                    | backend::Message::ParameterStatus(_)
                    | backend::Message::CommandComplete(_)
                    | backend::Message::ReadyForQuery(_) => {}
                    _ => {
                        return Err(ClientError::Protocol(
                            "unexpected message in the replication stream".into(),
                        ));
                    }
                },
            }
        }
    }

    /// Sends a Standby Status Update. `flush` is what the slot may confirm; pass
    /// `Lsn::INVALID` to never move `confirmed_flush_lsn`.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply: bool,
    ) -> Result<(), ClientError> {
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(write.0);
        body.put_u64(flush.0);
        body.put_u64(apply.0);
        body.put_i64(now_pg_micros());
        body.put_u8(u8::from(reply));
        frontend::CopyData::new(&body[..])?.write(&mut self.write);
        self.flush().await
    }

    /// Ends the session politely.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }

    async fn flush(&mut self) -> Result<(), ClientError> {
        self.stream.write_all(&self.write).await?;
        self.stream.flush().await?;
        self.write.clear();
        Ok(())
    }

    /// Reads until `self.read` holds at least one whole frame.
    async fn fill_frame(&mut self) -> Result<(), ClientError> {
        loop {
            if let Some(len) = frame_len(&self.read) {
                if self.read.len() >= len {
                    return Ok(());
                }
                self.read.reserve(len - self.read.len());
            } else {
                self.read.reserve(64 * 1024);
            }
            if self.read.capacity() - self.read.len() < 8 * 1024 {
                self.read.reserve(64 * 1024);
            }
            let n = self.stream.read_buf(&mut self.read).await?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    async fn read_message(&mut self) -> Result<backend::Message, ClientError> {
        self.fill_frame().await?;
        self.parse_message()
    }

    fn parse_message(&mut self) -> Result<backend::Message, ClientError> {
        backend::Message::parse(&mut self.read)?
            .ok_or_else(|| ClientError::Protocol("incomplete frame".into()))
    }
}

/// The total length (tag included) of the frame at the start of `buf`, once known.
fn frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    Some(len + 1)
}

fn parse_copy_data(mut data: Bytes) -> Result<ReplicationMessage, ClientError> {
    let short = || ClientError::Protocol("truncated replication message".into());
    if data.is_empty() {
        return Err(short());
    }
    match data.get_u8() {
        b'w' => {
            if data.len() < 24 {
                return Err(short());
            }
            let wal_start = Lsn(data.get_u64());
            let wal_end = Lsn(data.get_u64());
            let _send_time = data.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data,
            })
        }
        b'k' => {
            if data.len() < 17 {
                return Err(short());
            }
            let wal_end = Lsn(data.get_u64());
            let _send_time = data.get_i64();
            let reply_requested = data.get_u8() == 1;
            Ok(ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
            })
        }
        tag => Err(ClientError::Protocol(format!(
            "unknown replication message tag {:?}",
            tag as char
        ))),
    }
}

fn server_error(body: &backend::ErrorResponseBody) -> Result<ServerError, io::Error> {
    let mut err = ServerError {
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    let mut fields = body.fields();
    while let Some(field) = fields.next()? {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'C' => err.code = value,
            b'M' => err.message = value,
            b'D' => err.detail = Some(value),
            b'H' => err.hint = Some(value),
            _ => {}
        }
    }
    Ok(err)
}

/// TCP keepalives and `tcp_user_timeout` as the connection string sets them (the SQL
/// connections get the same through tokio-postgres).
fn set_tcp_options(tcp: &TcpStream, info: &ConnInfo) -> io::Result<()> {
    let sock = socket2::SockRef::from(tcp);
    if let Some(k) = &info.keepalives {
        let mut ka = socket2::TcpKeepalive::new().with_time(k.idle);
        if let Some(i) = k.interval {
            ka = ka.with_interval(i);
        }
        if let Some(n) = k.count {
            ka = ka.with_retries(n);
        }
        sock.set_tcp_keepalive(&ka)?;
    }
    if let Some(t) = info.tcp_user_timeout {
        sock.set_tcp_user_timeout(Some(t))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut buf = BytesMut::new();
        buf.put_u8(b'w');
        buf.put_u64(0x10);
        buf.put_u64(0x20);
        buf.put_i64(0);
        buf.put_slice(b"Bpayload");
        match parse_copy_data(buf.freeze()).unwrap() {
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data,
            } => {
                assert_eq!((wal_start, wal_end), (Lsn(0x10), Lsn(0x20)));
                assert_eq!(&data[..], b"Bpayload");
            }
            other => panic!("{other:?}"),
        }
        let mut buf = BytesMut::new();
        buf.put_u8(b'k');
        buf.put_u64(0x30);
        buf.put_i64(0);
        buf.put_u8(1);
        assert!(matches!(
            parse_copy_data(buf.freeze()).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(0x30),
                reply_requested: true
            }
        ));
        assert!(parse_copy_data(Bytes::from_static(b"w\0\0")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"x")).is_err());
    }
}
