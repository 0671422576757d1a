//! The client's startup parameters as SQL: a server connection logs in without them, so they
//! reach it as `SET` statements (`options` split into its settings as PostgreSQL splits it).

use pgvigil_proto::sqlstate;

use super::SessionError;

/// One `(name, value)` run-time setting, as raw bytes from the startup packet.
type Setting = (Vec<u8>, Vec<u8>);

/// Builds `SET name TO 'value';` for every parameter that differs from what the server reports.
/// `options` is split into its `-c name=value` / `--name=value` settings like PostgreSQL does.
pub(super) fn set_commands<'a>(
    params: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    reported: impl Fn(&[u8]) -> Option<&'a [u8]>,
) -> Result<Option<String>, SessionError> {
    let mut sql = String::new();
    for (name, value) in &startup_settings(params)? {
        if reported(name) == Some(value.as_slice()) {
            continue;
        }
        push_set(&mut sql, name, value);
    }
    Ok((!sql.is_empty()).then_some(sql))
}

/// The run-time settings of startup parameters `params`, `options` split into its settings.
pub(super) fn startup_settings<'a>(
    params: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Vec<Setting>, SessionError> {
    let mut settings: Vec<Setting> = Vec::new();
    for (name, value) in params {
        if name == b"options" {
            settings.extend(parse_options(value)?);
        } else {
            settings.push((name.to_vec(), value.to_vec()));
        }
    }
    Ok(settings)
}

/// Appends `SET "name" TO E'value';` to `sql`.
pub(super) fn push_set(sql: &mut String, name: &[u8], value: &[u8]) {
    push_assignment(sql, "SET", name, value);
}

/// Appends `SET LOCAL "name" TO E'value';` to `sql`.
pub(super) fn push_set_local(sql: &mut String, name: &[u8], value: &[u8]) {
    push_assignment(sql, "SET LOCAL", name, value);
}

fn push_assignment(sql: &mut String, command: &str, name: &[u8], value: &[u8]) {
    let name = String::from_utf8_lossy(name);
    let value = String::from_utf8_lossy(value);
    sql.push_str(&format!(
        "{command} \"{}\" TO E'{}';",
        name.replace('"', "\"\""),
        value.replace('\\', "\\\\").replace('\'', "\\'")
    ));
}

/// Splits a startup `options` value into settings; backslash escapes a space (libpq's rule).
fn parse_options(value: &[u8]) -> Result<Vec<Setting>, SessionError> {
    let mut words: Vec<Vec<u8>> = Vec::new();
    let mut current = Vec::new();
    let mut bytes = value.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => current.extend(bytes.next()),
            b' ' | b'\t' => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(b),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    let mut settings = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let setting = if word == b"-c" {
            words.next()
        } else {
            word.strip_prefix(b"--").map(<[u8]>::to_vec)
        };
        let setting = setting.ok_or_else(|| SessionError::Refused {
            code: sqlstate::FEATURE_NOT_SUPPORTED,
            message: format!(
                "unsupported startup option {:?}: only -c name=value and --name=value are supported",
                String::from_utf8_lossy(&word)
            ),
        })?;
        let eq = setting
            .iter()
            .position(|b| *b == b'=')
            .ok_or_else(|| SessionError::Refused {
                code: sqlstate::PROTOCOL_VIOLATION,
                message: format!(
                    "invalid startup option {:?}: expected name=value",
                    String::from_utf8_lossy(&setting)
                ),
            })?;
        let name = setting[..eq]
            .iter()
            .map(|b| if *b == b'-' { b'_' } else { *b })
            .collect();
        settings.push((name, setting[eq + 1..].to_vec()));
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_settings() {
        let parsed =
            parse_options(b"-c search_path=a,b --statement-timeout=5s -c x=a\\ b").unwrap();
        let as_text: Vec<(String, String)> = parsed
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect();
        assert_eq!(
            as_text,
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("x".into(), "a b".into()),
            ]
        );
        assert!(parse_options(b"-X").is_err());
    }

    #[test]
    fn only_differing_parameters_are_set_and_values_are_escaped() {
        let params: Vec<(&[u8], &[u8])> = vec![
            (b"client_encoding", b"UTF8"),
            (b"application_name", b"it's \\ me"),
        ];
        let sql = set_commands(params.iter().copied(), |name| {
            (name == b"client_encoding").then_some(b"UTF8".as_slice())
        })
        .unwrap()
        .unwrap();
        assert_eq!(sql, "SET \"application_name\" TO E'it\\'s \\\\ me';");
        let none = set_commands(params[..1].iter().copied(), |_| Some(b"UTF8".as_slice())).unwrap();
        assert!(none.is_none());
    }
}
