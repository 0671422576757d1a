//! Rewrites a standby's `primary_conninfo` to point at a new primary, keeping everything else
//! (user, password, application_name, SSL settings) as the operator wrote it.

/// `conninfo` (libpq `key=value` form) with `host` and `port` replaced (and `hostaddr`
/// dropped, since it would win over the new host). None if it cannot be parsed.
pub fn repoint(conninfo: &str, host: &str, port: u16) -> Option<String> {
    let mut pairs: Vec<(String, String)> = parse(conninfo)?
        .into_iter()
        .filter(|(key, _)| !matches!(key.as_str(), "host" | "hostaddr" | "port"))
        .collect();
    pairs.insert(0, ("port".into(), port.to_string()));
    pairs.insert(0, ("host".into(), host.into()));
    Some(
        pairs
            .iter()
            .map(|(key, value)| format!("{key}={}", quote(value)))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Splits libpq's `key = value` pairs; values may be single-quoted with `\'` and `\\` escapes.
fn parse(conninfo: &str) -> Option<Vec<(String, String)>> {
    let mut chars = conninfo.chars().peekable();
    let mut pairs = Vec::new();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        chars.next_if_eq(&'=')?;
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\\' => value.push(chars.next()?),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        if key.is_empty() {
            return None;
        }
        pairs.push((key, value));
    }
}

/// A conninfo value: single-quoted, with `\` and `'` escaped.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_change_and_the_rest_stays() {
        let before = "user=postgres passfile='/var/lib/postgresql/.pgpass' channel_binding=prefer \
                      host=127.0.0.1 port=5432 application_name=pg2 sslmode=prefer";
        let after = repoint(before, "10.0.0.3", 5433).unwrap();
        assert_eq!(
            after,
            "host='10.0.0.3' port='5433' user='postgres' \
             passfile='/var/lib/postgresql/.pgpass' channel_binding='prefer' \
             application_name='pg2' sslmode='prefer'"
        );
    }

    #[test]
    fn quoted_values_and_escapes_survive() {
        let after = repoint("password='it\\'s a \\\\ secret' hostaddr=1.2.3.4", "db", 1).unwrap();
        assert_eq!(after, "host='db' port='1' password='it\\'s a \\\\ secret'");
        assert_eq!(parse(&after).unwrap()[2].1, "it's a \\ secret");
    }

    #[test]
    fn spaces_around_equals_are_allowed_and_garbage_is_refused() {
        assert_eq!(
            repoint("user = a", "h", 2).as_deref(),
            Some("host='h' port='2' user='a'")
        );
        assert_eq!(repoint("user", "h", 2), None);
        assert_eq!(repoint("user='unterminated", "h", 2), None);
        assert_eq!(repoint("", "h", 2).as_deref(), Some("host='h' port='2'"));
    }
}
