//! The two textual forms of a libpq connection string, read into `(key, value)` pairs:
//! the key/value form and the `postgresql://` URL. What the pairs mean is
//! [`conninfo`](super::conninfo)'s business.

use super::PgError;

/// `key=value` pairs of the key/value form: values may be single-quoted, and `\`
/// escapes the next character in either form.
pub(super) fn parse_key_values(s: &str) -> Result<Vec<(String, String)>, PgError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(PgError::Syntax(format!(
                "missing `=` after `{key}` (expected key=value settings such as `host=db dbname=app`, or a postgresql:// URL)"
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => break,
                    },
                    Some('\'') => {
                        out.push((key, value));
                        break;
                    }
                    Some(c) => value.push(c),
                    None => {
                        return Err(PgError::Syntax(format!(
                            "unterminated quoted value of `{key}`"
                        )));
                    }
                }
            }
            continue;
        }
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            if c == '\\' {
                if let Some(n) = chars.next() {
                    value.push(n);
                }
            } else {
                value.push(c);
            }
        }
        out.push((key, value));
    }
}

/// The settings of a `postgresql://[user[:password]@][host[:port][,...]][/dbname][?k=v&...]`
/// URL, percent-decoded.
pub(super) fn parse_url(s: &str) -> Result<Vec<(String, String)>, PgError> {
    let rest = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
        .expect("caller checked the scheme");
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    let mut out = Vec::new();
    let (userinfo, hostlist) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        if !user.is_empty() {
            out.push(("user".to_owned(), decode(user)?));
        }
        if let Some(p) = password {
            out.push(("password".to_owned(), decode(p)?));
        }
    }
    if !hostlist.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for entry in hostlist.split(',') {
            let (host, port) = if let Some(bracketed) = entry.strip_prefix('[') {
                let (h, after) = bracketed.split_once(']').ok_or_else(|| {
                    PgError::Syntax(format!("unterminated `[` in the URL's host `{entry}`"))
                })?;
                (h.to_owned(), after.strip_prefix(':').unwrap_or(""))
            } else {
                match entry.rsplit_once(':') {
                    Some((h, p)) => (decode(h)?, p),
                    None => (decode(entry)?, ""),
                }
            };
            hosts.push(host);
            ports.push(port.to_owned());
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            out.push(("host".to_owned(), hosts.join(",")));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            out.push(("port".to_owned(), ports.join(",")));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.push(("dbname".to_owned(), decode(db)?));
    }
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| PgError::Syntax(format!("URL parameter `{pair}` has no `=value`")))?;
        let (k, v) = (decode(k)?, decode(v)?);
        // libpq accepts the JDBC-style `ssl=true` as sslmode=require.
        if k == "ssl" && v == "true" {
            out.push(("sslmode".to_owned(), "require".to_owned()));
        } else {
            out.push((k, v));
        }
    }
    Ok(out)
}

fn decode(s: &str) -> Result<String, PgError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| PgError::Syntax("the URL is not valid UTF-8 once percent-decoded".into()))
}
