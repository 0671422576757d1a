//! The `command` driver's templates: shell commands with `{name}` placeholders, each replaced by
//! its value shell-quoted (so never quote a placeholder yourself); `{{` and `}}` are literal
//! braces. Secrets are never placeholders: they travel in the environment.

/// One action of the `command` driver, named as its key in `[nodes.control]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `stop`.
    Stop,
    /// `start`.
    Start,
    /// `status`.
    Status,
    /// `rewind`.
    Rewind,
    /// `reclone`.
    Reclone,
    /// `make_standby`.
    MakeStandby,
}

/// Placeholders every template knows.
const COMMON: [&str; 4] = ["node", "host", "port", "data_dir"];
/// Placeholders of `rewind` and `reclone`, beyond the common ones.
const SOURCE: [&str; 4] = [
    "source_host",
    "source_port",
    "source_user",
    "source_conninfo",
];
/// Placeholders of `make_standby`, beyond the common ones.
const STANDBY: [&str; 1] = ["slot"];

impl Action {
    /// Every action, in the order of the configuration keys.
    pub const ALL: [Action; 6] = [
        Action::Stop,
        Action::Start,
        Action::Status,
        Action::Rewind,
        Action::Reclone,
        Action::MakeStandby,
    ];

    /// Its key in `[nodes.control]`.
    pub fn key(self) -> &'static str {
        match self {
            Action::Stop => "stop",
            Action::Start => "start",
            Action::Status => "status",
            Action::Rewind => "rewind",
            Action::Reclone => "reclone",
            Action::MakeStandby => "make_standby",
        }
    }

    /// Whether the `command` driver needs it in every configuration.
    pub fn required(self) -> bool {
        matches!(self, Action::Stop | Action::Start | Action::Status)
    }

    /// The placeholders its template may use.
    pub fn placeholders(self) -> Vec<&'static str> {
        let extra: &[&str] = match self {
            Action::Rewind | Action::Reclone => &SOURCE,
            Action::MakeStandby => &STANDBY,
            Action::Stop | Action::Start | Action::Status => &[],
        };
        COMMON.iter().chain(extra).copied().collect()
    }
}

/// A piece of a template.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    /// Text kept as it is.
    Text(&'a str),
    /// `{name}`.
    Placeholder(&'a str),
}

/// Splits `template` into text and placeholders; why not, when a brace is not doubled or a
/// placeholder is not closed.
fn pieces(template: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find(['{', '}']) {
        if at > 0 {
            pieces.push(Piece::Text(&rest[..at]));
        }
        let brace = &rest[at..at + 1];
        let after = &rest[at + 1..];
        if after.starts_with(brace) {
            pieces.push(Piece::Text(brace));
            rest = &after[1..];
        } else if brace == "}" {
            return Err("a lone } : write }} for a literal brace".into());
        } else {
            let end = after
                .find('}')
                .ok_or("a { without its }: write {{ for a literal brace")?;
            let name = &after[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                return Err(format!(
                    "{{{name}}} is not a placeholder: write {{{{ and }}}} for literal braces"
                ));
            }
            pieces.push(Piece::Placeholder(name));
            rest = &after[end + 1..];
        }
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    Ok(pieces)
}

/// Checks that `template` parses and uses only the placeholders `action` knows (`{data_dir}`
/// only when the node's `data_dir` is set); the problem otherwise.
pub fn check(template: &str, action: Action, has_data_dir: bool) -> Result<(), String> {
    if template.trim().is_empty() {
        return Err("must not be empty".into());
    }
    let known = action.placeholders();
    for piece in pieces(template)? {
        let Piece::Placeholder(name) = piece else {
            continue;
        };
        if !known.contains(&name) {
            let known: Vec<String> = known.iter().map(|k| format!("{{{k}}}")).collect();
            return Err(format!(
                "unknown placeholder {{{name}}}: {} knows {}",
                action.key(),
                known.join(", ")
            ));
        }
        if name == "data_dir" && !has_data_dir {
            return Err("{data_dir} is used but data_dir is not set".into());
        }
    }
    Ok(())
}

/// `template` with every placeholder replaced by its shell-quoted value from `values`; the
/// problem when it does not parse or a value is missing.
pub fn render(template: &str, values: &[(&str, String)]) -> Result<String, String> {
    let mut text = String::with_capacity(template.len());
    for piece in pieces(template)? {
        match piece {
            Piece::Text(t) => text.push_str(t),
            Piece::Placeholder(name) => {
                let value = values
                    .iter()
                    .find(|(n, _)| *n == name)
                    .ok_or_else(|| format!("no value for {{{name}}} here"))?;
                text.push_str(&shell_quote(&value.1));
            }
        }
    }
    Ok(text)
}

/// `value` as one POSIX shell word: single quotes, each `'` written `'\''`.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_shell_quoted_and_doubled_braces_kept() {
        let values = [
            ("data_dir", "/var/lib/it's".to_owned()),
            ("port", "5432".to_owned()),
        ];
        let text = render(
            "pg_ctl -D {data_dir} -o '-p '{port} && awk '{{print}}'",
            &values,
        );
        assert_eq!(
            text.as_deref(),
            Ok(r"pg_ctl -D '/var/lib/it'\''s' -o '-p ''5432' && awk '{print}'")
        );
    }

    #[test]
    fn unknown_misplaced_and_malformed_placeholders_are_named() {
        let unknown = check("stop {dir}", Action::Stop, true);
        assert!(matches!(&unknown, Err(e) if e.contains("{dir}") && e.contains("{data_dir}")));
        let misplaced = check("x {source_host}", Action::Start, true);
        assert!(matches!(&misplaced, Err(e) if e.contains("{source_host}")));
        assert!(check(
            "pg_rewind --source-server=host={source_host}",
            Action::Rewind,
            false
        )
        .is_ok());
        assert!(check("x {data_dir}", Action::Stop, false).is_err());
        assert!(check("echo ${HOME}", Action::Stop, false).is_err());
        assert!(check("echo ${{HOME}}", Action::Stop, false).is_ok());
        assert!(check("echo }", Action::Stop, false).is_err());
        assert!(check("echo {", Action::Stop, false).is_err());
        assert!(check("  ", Action::Stop, false).is_err());
    }
}
