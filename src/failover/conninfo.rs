//! Rewrites a standby's `primary_conninfo` to point at a new primary, keeping everything else
//! (user, password, application_name, SSL settings) as the operator wrote it; or, for a standby
//! whose conninfo names no user, composes one from `[replication]` or adopts a sibling's.

/// `conninfo` (libpq `key=value` form) with `host` and `port` replaced (and `hostaddr`
/// dropped, since it would win over the new host). None if it cannot be parsed.
pub fn repoint(conninfo: &str, host: &str, port: u16) -> Option<String> {
    Some(compose(host, port, parse(conninfo)?))
}

/// Whether `conninfo` can be parsed and names a user: without one, libpq logs in as the
/// operating-system user the server runs as, which is rarely a replication role.
pub fn is_complete(conninfo: &str) -> bool {
    parse(conninfo).is_some_and(|pairs| pairs.iter().any(|(k, v)| k == "user" && !v.is_empty()))
}

/// A sibling standby's complete `conninfo` for the standby called `name`: host and port
/// replaced, and its `application_name`, if it sets one, replaced by `name` (two standbys under
/// one name would confuse `pg_stat_replication` and `synchronous_standby_names`). None if it is
/// not complete.
pub fn adopt(sibling: &str, host: &str, port: u16, name: &str) -> Option<String> {
    if !is_complete(sibling) {
        return None;
    }
    let pairs = parse(sibling)?
        .into_iter()
        .map(|(key, value)| match key.as_str() {
            "application_name" => (key, name.to_owned()),
            _ => (key, value),
        })
        .collect();
    Some(compose(host, port, pairs))
}

/// `host` and `port` followed by `pairs` (less any host, hostaddr or port among them).
pub fn compose(host: &str, port: u16, pairs: Vec<(String, String)>) -> String {
    let mut pairs: Vec<(String, String)> = pairs
        .into_iter()
        .filter(|(key, _)| !matches!(key.as_str(), "host" | "hostaddr" | "port"))
        .collect();
    pairs.insert(0, ("port".into(), port.to_string()));
    pairs.insert(0, ("host".into(), host.into()));
    pairs
        .iter()
        .map(|(key, value)| format!("{key}={}", quote(value)))
        .collect::<Vec<_>>()
        .join(" ")
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
    fn a_conninfo_without_a_user_is_incomplete() {
        assert!(!is_complete(""));
        assert!(!is_complete("host=h port=5432"));
        assert!(!is_complete("user='' host=h"));
        assert!(!is_complete("user='unterminated"));
        assert!(is_complete("host=h user=replicator"));
    }

    #[test]
    fn a_sibling_conninfo_is_adopted_under_the_standbys_own_name() {
        let sibling = "user=postgres password=pw host=127.0.0.1 port=5433 application_name=pg2";
        assert_eq!(
            adopt(sibling, "db", 5434, "pg3").as_deref(),
            Some("host='db' port='5434' user='postgres' password='pw' application_name='pg3'")
        );
        assert_eq!(
            adopt("user=r host=a", "db", 1, "pg3").as_deref(),
            Some("host='db' port='1' user='r'"),
            "no application_name: the standby keeps its default"
        );
        assert_eq!(adopt("host=a port=1", "db", 1, "pg3"), None);
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
