//! The password file (`~/.pgpass`, `PGPASSFILE` or `passfile=`), read as libpq reads
//! it: `host:port:database:user:password` lines, `*` matching anything, `\` escaping
//! `:` and `\`, `#` comments, the first matching line winning, and the file ignored
//! (with a warning) when others may read it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::conninfo::{Host, HostSpec};

/// The password for `host`, `dbname` and `user` from the password file at `path`, if
/// the file exists, is private, and has a matching line.
pub(crate) fn lookup(path: &Path, host: &HostSpec, dbname: &str, user: &str) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            "password file has group or world access and is ignored; fix: chmod 0600 it"
        );
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    // A Unix-socket connection matches `localhost` (libpq's rule).
    let host_name = match &host.host {
        Host::Tcp(h) => h.clone(),
        Host::Unix(_) => "localhost".to_owned(),
    };
    let port = host.port.to_string();
    let wanted = [host_name.as_str(), port.as_str(), dbname, user];
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .find_map(|line| {
            let fields = split_fields(line);
            if fields.len() < 5 {
                return None;
            }
            let matches = fields[..4]
                .iter()
                .zip(wanted)
                .all(|(f, w)| f == "*" || f == w);
            matches.then(|| fields[4..].join(":"))
        })
}

/// The `:`-separated fields of a line, `\` escaping the next character.
fn split_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().expect("one field").push(n);
                }
            }
            ':' => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn host(h: &str, port: u16) -> HostSpec {
        HostSpec {
            host: if h.starts_with('/') {
                Host::Unix(PathBuf::from(h))
            } else {
                Host::Tcp(h.to_owned())
            },
            hostaddr: None,
            port,
        }
    }

    fn file(text: &str, mode: u32) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    #[test]
    fn first_matching_line_wins_with_wildcards_and_escapes() {
        let f = file(
            "# comment\n\
             db1:5432:app:walhook:first\n\
             *:*:app:walhook:second\n\
             localhost:6000:*:*:sock\\:et\n\
             db\\:odd:5432:*:u:a:b\n",
            0o600,
        );
        let p = f.path();
        assert_eq!(
            lookup(p, &host("db1", 5432), "app", "walhook").as_deref(),
            Some("first")
        );
        assert_eq!(
            lookup(p, &host("db2", 1), "app", "walhook").as_deref(),
            Some("second")
        );
        assert_eq!(lookup(p, &host("db2", 1), "other", "walhook"), None);
        assert_eq!(
            lookup(p, &host("/tmp", 6000), "x", "y").as_deref(),
            Some("sock:et")
        );
        // An unescaped `:` in the password field belongs to the password.
        assert_eq!(
            lookup(p, &host("db:odd", 5432), "z", "u").as_deref(),
            Some("a:b")
        );
    }

    #[test]
    fn a_file_others_may_read_is_ignored() {
        let f = file("*:*:*:*:secret\n", 0o644);
        assert_eq!(lookup(f.path(), &host("db", 5432), "app", "u"), None);
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            lookup(f.path(), &host("db", 5432), "app", "u").as_deref(),
            Some("secret")
        );
    }
}
