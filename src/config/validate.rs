//! Checks a parsed `Config` as a whole, collecting every problem so the operator fixes them in one go.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::Hash;
use std::path::Path;
use std::time::Duration;

use super::{Config, Problem, TlsMode};

/// Largest `nodes[i].weight`.
const MAX_WEIGHT: u32 = 1000;

/// Every problem in `config`, in the order of the structs' fields; empty when it is usable.
pub(super) fn problems(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    check_limits(config, &mut problems);
    check_positive(
        "client.startup_timeout",
        config.client.startup_timeout,
        &mut problems,
    );
    check_tls(config, &mut problems);
    check_backend(config, &mut problems);
    check_pool(config, &mut problems);
    check_health(config, &mut problems);
    check_routing(config, &mut problems);
    check_failover(config, &mut problems);
    super::replication::check(&config.replication, &mut problems);
    super::cluster::check(&config.cluster, &mut problems);
    super::admin::check(&config.admin, &mut problems);
    check_nodes(config, &mut problems);
    check_users(config, &mut problems);
    problems
}

/// Most data-plane threads: each holds a listener, a runtime and its own idle connections, so
/// far more threads than cores only costs memory and hand-offs.
const MAX_THREADS: usize = 1024;

fn check_limits(config: &Config, problems: &mut Vec<Problem>) {
    if config.max_client_conn == 0 {
        problems.push(Problem::new("max_client_conn", "must be at least 1"));
    }
    if config.threads > MAX_THREADS {
        problems.push(Problem::new(
            "threads",
            format!(
                "{} is more than {MAX_THREADS}; 0 means one per available core",
                config.threads
            ),
        ));
    }
    // Below 1 KiB ordinary startup packets and queries would already be refused.
    if config.max_message_size < 1024 {
        problems.push(Problem::new(
            "max_message_size",
            format!(
                "{} bytes is too small, must be at least 1024",
                config.max_message_size
            ),
        ));
    }
}

/// Every configured duration is a timeout or an age: zero would fail or close everything at once.
fn check_positive(key: &str, duration: Duration, problems: &mut Vec<Problem>) {
    if duration.is_zero() {
        problems.push(Problem::new(key, "must be greater than 0"));
    }
}

fn check_tls(config: &Config, problems: &mut Vec<Problem>) {
    let tls = &config.tls;
    match (&tls.cert, &tls.key) {
        (Some(_), None) => problems.push(Problem::new(
            "tls.key",
            "missing: tls.cert is set, give both or neither",
        )),
        (None, Some(_)) => problems.push(Problem::new(
            "tls.cert",
            "missing: tls.key is set, give both or neither",
        )),
        (None, None) if tls.mode == TlsMode::Require => {
            problems.push(Problem::new(
                "tls.mode",
                "\"require\" needs tls.cert and tls.key",
            ));
        }
        _ => {}
    }
    if let Some(cert) = &tls.cert {
        check_readable_file("tls.cert", cert, problems);
    }
    if let Some(key) = &tls.key {
        check_readable_file("tls.key", key, problems);
    }
}

fn check_backend(config: &Config, problems: &mut Vec<Problem>) {
    let backend = &config.backend;
    check_positive("backend.connect_timeout", backend.connect_timeout, problems);
    if let Some(ca) = &backend.ca {
        check_readable_file("backend.ca", ca, problems);
    }
}

fn check_failover(config: &Config, problems: &mut Vec<Problem>) {
    let failover = &config.failover;
    check_positive("failover.wait_timeout", failover.wait_timeout, problems);
    check_positive(
        "failover.promote_timeout",
        failover.promote_timeout,
        problems,
    );
    // PostgreSQL keeps wal_receiver_timeout as whole milliseconds in an int.
    let receiver_ms = failover.receiver_timeout.as_millis();
    if !failover.receiver_timeout.is_zero() && (receiver_ms == 0 || receiver_ms > i32::MAX as u128)
    {
        problems.push(Problem::new(
            "failover.receiver_timeout",
            "must be 0s (leave the standbys alone) or between 1ms and about 24 days",
        ));
    }
    if let Some(dir) = &failover.state_dir {
        if dir.as_os_str().is_empty() {
            problems.push(Problem::new("failover.state_dir", "must not be empty"));
        } else if dir.exists() && !dir.is_dir() {
            problems.push(Problem::new(
                "failover.state_dir",
                format!("{} is not a directory", dir.display()),
            ));
        }
    }
}

fn check_readable_file(key: &str, path: &Path, problems: &mut Vec<Problem>) {
    // Opening (not just stat-ing) catches permission problems before the listener needs the file.
    match std::fs::File::open(path).and_then(|file| file.metadata()) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => problems.push(Problem::new(
            key,
            format!("{} is not a regular file", path.display()),
        )),
        Err(e) => problems.push(Problem::new(
            key,
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}

fn check_health(config: &Config, problems: &mut Vec<Problem>) {
    let health = &config.health;
    check_positive("health.interval", health.interval, problems);
    check_positive("health.timeout", health.timeout, problems);
    if health.failures == 0 {
        problems.push(Problem::new("health.failures", "must be at least 1"));
    }
    if health.database.is_empty() {
        problems.push(Problem::new("health.database", "missing"));
    }
    if let Some(user) = &health.user {
        if health.password.is_none() && config.user(user).is_none() {
            problems.push(Problem::new(
                "health.password",
                format!("missing: health.user {user:?} is not in [[users]], so its password must be given here"),
            ));
        }
    }
}

fn check_routing(config: &Config, problems: &mut Vec<Problem>) {
    let routing = &config.routing;
    check_positive("routing.max_lag", routing.max_lag, problems);
    check_function_names("routing.read_functions", &routing.read_functions, problems);
    check_function_names(
        "routing.write_functions",
        &routing.write_functions,
        problems,
    );
}

fn check_function_names(key: &str, names: &[String], problems: &mut Vec<Problem>) {
    for (i, name) in names.iter().enumerate() {
        if !is_function_name(name) {
            problems.push(Problem::new(
                format!("{key}[{i}]"),
                format!("{name:?} is not a function name: use name or schema.name, of letters, digits, '_' and '$', not starting with a digit or '$'"),
            ));
        }
    }
}

/// `name` or `schema.name`, each part an identifier as SQL writes it unquoted: the classifier
/// compares the configured names with the calls it reads, and a call has at most one qualifier.
fn is_function_name(name: &str) -> bool {
    match name.split_once('.') {
        Some((schema, function)) => is_identifier(schema) && is_identifier(function),
        None => is_identifier(name),
    }
}

/// PostgreSQL's unquoted identifier (scan.l `ident_start ident_cont*`); non-ASCII letters count as
/// letters there too.
fn is_identifier(word: &str) -> bool {
    let mut chars = word.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || !c.is_ascii())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$' || !c.is_ascii())
}

fn check_pool(config: &Config, problems: &mut Vec<Problem>) {
    let pool = &config.pool;
    if pool.max_size == 0 {
        problems.push(Problem::new("pool.max_size", "must be at least 1"));
    }
    if pool.max_prepared_statements == 0 {
        problems.push(Problem::new(
            "pool.max_prepared_statements",
            "must be at least 1",
        ));
    }
    if pool.min_idle > pool.max_size {
        problems.push(Problem::new(
            "pool.min_idle",
            format!(
                "{} is more than pool.max_size ({})",
                pool.min_idle, pool.max_size
            ),
        ));
    }
    check_positive("pool.idle_timeout", pool.idle_timeout, problems);
    check_positive("pool.max_lifetime", pool.max_lifetime, problems);
    check_positive("pool.checkout_timeout", pool.checkout_timeout, problems);
    check_positive("pool.drain_timeout", pool.drain_timeout, problems);
}

/// Records `value` as seen at index `i`, or returns the index where it was first seen.
fn earlier<K: Hash + Eq>(seen: &mut HashMap<K, usize>, value: K, i: usize) -> Option<usize> {
    match seen.entry(value) {
        Entry::Occupied(first) => Some(*first.get()),
        Entry::Vacant(slot) => {
            slot.insert(i);
            None
        }
    }
}

fn check_nodes(config: &Config, problems: &mut Vec<Problem>) {
    if config.nodes.is_empty() {
        problems.push(Problem::new(
            "nodes",
            "at least one [[nodes]] entry is required",
        ));
    }
    if config.nodes.len() > crate::router::MAX_NODES {
        problems.push(Problem::new(
            "nodes",
            format!(
                "{} nodes configured; pgvigil supports at most {}",
                config.nodes.len(),
                crate::router::MAX_NODES
            ),
        ));
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut addresses: HashMap<(&str, u16), usize> = HashMap::new();
    for (i, node) in config.nodes.iter().enumerate() {
        let key = |field: &str| format!("nodes[{i}].{field}");
        if let Some(control) = &node.control {
            super::node_control::check(i, &node.name, control, problems);
        }
        if node.name.is_empty() {
            problems.push(Problem::new(key("name"), "missing"));
        } else if !node
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            problems.push(Problem::new(
                key("name"),
                format!(
                    "{:?} may contain only letters, digits, '_' and '-'",
                    node.name
                ),
            ));
        } else if let Some(first) = earlier(&mut names, &node.name, i) {
            problems.push(Problem::new(
                key("name"),
                format!("duplicate node name {:?} (also nodes[{first}])", node.name),
            ));
        }
        if node.host.is_empty() {
            problems.push(Problem::new(key("host"), "missing"));
        }
        if node.port == 0 {
            problems.push(Problem::new(key("port"), "must not be 0"));
        } else if let Some(first) = earlier(&mut addresses, (&node.host, node.port), i) {
            problems.push(Problem::new(
                format!("nodes[{i}]"),
                format!(
                    "duplicate address {}:{} (also nodes[{first}])",
                    node.host, node.port
                ),
            ));
        }
        // Weights are ratios, so 1 to 1000 is plenty; the cap keeps the balancer's sums small.
        if node.weight > MAX_WEIGHT {
            problems.push(Problem::new(
                key("weight"),
                format!("{} is more than the maximum, {MAX_WEIGHT}", node.weight),
            ));
        }
    }
}

fn check_users(config: &Config, problems: &mut Vec<Problem>) {
    if config.users.is_empty() {
        problems.push(Problem::new(
            "users",
            "at least one [[users]] entry is required",
        ));
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, user) in config.users.iter().enumerate() {
        let key = |field: &str| format!("users[{i}].{field}");
        if user.name.is_empty() {
            problems.push(Problem::new(key("name"), "missing"));
        } else if let Some(first) = earlier(&mut names, &user.name, i) {
            problems.push(Problem::new(
                key("name"),
                format!("duplicate user name {:?} (also users[{first}])", user.name),
            ));
        }
        // Even with `auth = "trust"` the password is what pgvigil logs in to the nodes with.
        match user.password.as_deref() {
            None => problems.push(Problem::new(key("password"), "missing")),
            Some("") => problems.push(Problem::new(key("password"), "must not be empty")),
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError, Problem};

    const NODES_AND_USERS: &str = r#"
[[nodes]]
name = "pg1"
host = "127.0.0.1"
[[nodes]]
name = "pg2"
host = "127.0.0.1"
port = 5433
[[users]]
name = "app"
password = "app-secret"
"#;

    fn problems_of(text: &str) -> Vec<Problem> {
        match Config::parse(text) {
            Err(ConfigError::Invalid(problems)) => problems,
            other => panic!("expected validation problems for\n{text}\ngot {other:?}"),
        }
    }

    fn shown(problems: &[Problem]) -> Vec<String> {
        problems.iter().map(Problem::to_string).collect()
    }

    /// Each case is added to valid nodes and users; exactly the listed problems must come back.
    #[test]
    fn each_invalid_value_is_named_by_its_key() {
        let cases: &[(&str, &[&str])] = &[
            ("max_client_conn = 0", &["max_client_conn: must be at least 1"]),
            ("threads = 5000", &["threads: 5000 is more than 1024; 0 means one per available core"]),
            ("max_message_size = 100", &["max_message_size: 100 bytes is too small, must be at least 1024"]),
            ("[client]\nstartup_timeout = \"0s\"", &["client.startup_timeout: must be greater than 0"]),
            ("[backend]\nconnect_timeout = \"0ms\"", &["backend.connect_timeout: must be greater than 0"]),
            ("[pool]\nidle_timeout = \"0s\"", &["pool.idle_timeout: must be greater than 0"]),
            ("[pool]\nmax_lifetime = \"0s\"", &["pool.max_lifetime: must be greater than 0"]),
            ("[pool]\ncheckout_timeout = \"0s\"", &["pool.checkout_timeout: must be greater than 0"]),
            ("[pool]\nmin_idle = 30", &["pool.min_idle: 30 is more than pool.max_size (20)"]),
            ("[pool]\nmax_size = 0", &["pool.max_size: must be at least 1"]),
            ("[tls]\nmode = \"require\"", &["tls.mode: \"require\" needs tls.cert and tls.key"]),
            ("[tls]\ncert = \"/dev/null\"", &["tls.key: missing: tls.cert is set, give both or neither", "tls.cert: /dev/null is not a regular file"]),
            ("[tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\nmode = \"require\"", &[
                "tls.cert: cannot read /nonexistent/c.pem: No such file or directory (os error 2)",
                "tls.key: cannot read /nonexistent/k.pem: No such file or directory (os error 2)",
            ]),
            ("[backend]\nca = \"/nonexistent/ca.pem\"", &["backend.ca: cannot read /nonexistent/ca.pem: No such file or directory (os error 2)"]),
            ("[[nodes]]\nname = \"pg1\"\nhost = \"other\"", &["nodes[2].name: duplicate node name \"pg1\" (also nodes[0])"]),
            ("[[nodes]]\nname = \"pg 3\"\nhost = \"other\"", &["nodes[2].name: \"pg 3\" may contain only letters, digits, '_' and '-'"]),
            ("[[nodes]]\nhost = \"other\"", &["nodes[2].name: missing"]),
            ("[[nodes]]\nname = \"pg3\"", &["nodes[2].host: missing"]),
            ("[[nodes]]\nname = \"pg3\"\nhost = \"other\"\nport = 0", &["nodes[2].port: must not be 0"]),
            ("[[nodes]]\nname = \"pg3\"\nhost = \"127.0.0.1\"\nport = 5433", &["nodes[2]: duplicate address 127.0.0.1:5433 (also nodes[1])"]),
            ("[routing]\nmax_lag = \"0s\"", &["routing.max_lag: must be greater than 0"]),
            ("[failover]\nreceiver_timeout = \"500us\"", &["failover.receiver_timeout: must be 0s (leave the standbys alone) or between 1ms and about 24 days"]),
            ("[routing]\nread_functions = [\"report\", \"Stats.daily_2\", \"_f$\", \"bad name\", \"\", \"a.b.c\"]", &[
                "routing.read_functions[3]: \"bad name\" is not a function name: use name or schema.name, of letters, digits, '_' and '$', not starting with a digit or '$'",
                "routing.read_functions[4]: \"\" is not a function name: use name or schema.name, of letters, digits, '_' and '$', not starting with a digit or '$'",
                "routing.read_functions[5]: \"a.b.c\" is not a function name: use name or schema.name, of letters, digits, '_' and '$', not starting with a digit or '$'",
            ]),
            ("[routing]\nwrite_functions = [\"1st\", \"s.\", \"\\\"Quoted\\\"\", \"émettre\"]", &[
                "routing.write_functions[0]: \"1st\" is not a function name: use name or schema.name, of letters, digits, '_' and '$', not starting with a digit or '$'",
                "routing.write_functions[1]: \"s.\" is not a function name: use name or schema.name, of letters, digits, '_' and '$', not starting with a digit or '$'",
                "routing.write_functions[2]: \"\\\"Quoted\\\"\" is not a function name: use name or schema.name, of letters, digits, '_' and '$', not starting with a digit or '$'",
            ]),
            ("[replication]\nuser = \"\"\napplication_name = \"\"", &["replication.user: must not be empty", "replication.application_name: must not be empty"]),
            ("[replication]\npassword = \"x\"", &["replication.user: missing: the other [replication] keys are used only with a user"]),
            ("[replication]\nuser = \"r\"\n[replication.conninfo]\nport = \"1\"\nKeep-Alive = \"1\"", &[
                "replication.conninfo.Keep-Alive: is not a libpq keyword (lowercase letters and '_')",
                "replication.conninfo.port: set by pgvigil or by its own [replication] key, not here",
            ]),
            ("[cluster]\nttl = \"1s\"\n[cluster.etcd]\nendpoints = [\"https://e1:2379\", \"e2\"]\nprefix = \"pgvigil/\"\nuser = \"u\"\n[cluster.instance]\nname = \"app 1\"", &[
                "cluster.etcd.endpoints[1]: \"e2\" is not http://host:port, https://host:port or host:port",
                "cluster.etcd.ca_file: missing: https:// endpoints need the certificate authority that signs etcd's",
                "cluster.etcd.prefix: must start with '/' and not end with one, e.g. \"/pgvigil/main\"",
                "cluster.etcd.password: missing: cluster.etcd.user is set, give both or neither",
                "cluster.instance.name: must be letters, digits, '_', '-' or '.'",
                "cluster.ttl: 1s is too short, must be at least 2s",
            ]),
            ("[[nodes]]\nname = \"pg3\"\nhost = \"other\"\nweight = 1001", &["nodes[2].weight: 1001 is more than the maximum, 1000"]),
            ("[[users]]\nname = \"app\"\npassword = \"x\"", &["users[1].name: duplicate user name \"app\" (also users[0])"]),
            ("[[users]]\nname = \"reporting\"", &["users[1].password: missing"]),
            ("[[users]]\nname = \"reporting\"\npassword = \"\"", &["users[1].password: must not be empty"]),
            ("[[users]]\npassword = \"x\"", &["users[1].name: missing"]),
        ];
        for (extra, wanted) in cases {
            // A top-level key must come before the first table; a table must come after the shared
            // part so that `[[nodes]]`/`[[users]]` append to the same arrays.
            let text = if extra.starts_with('[') {
                format!("{NODES_AND_USERS}{extra}\n")
            } else {
                format!("{extra}\n{NODES_AND_USERS}")
            };
            assert_eq!(shown(&problems_of(&text)), *wanted, "case {extra:?}");
        }
    }

    #[test]
    fn weights_from_0_to_1000_are_valid() {
        let text = format!(
            "{NODES_AND_USERS}[[nodes]]\nname = \"pg3\"\nhost = \"other\"\nweight = 0\n\
             [[nodes]]\nname = \"pg4\"\nhost = \"another\"\nweight = 1000\n"
        );
        assert!(Config::parse(&text).is_ok(), "{:?}", Config::parse(&text));
    }

    #[test]
    fn readable_cert_and_key_satisfy_tls_require() {
        // Only readability is checked here; the listener parses the PEM contents.
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let text = format!(
            "{NODES_AND_USERS}[tls]\ncert = {file:?}\nkey = {file:?}\nmode = \"require\"\n"
        );
        assert!(Config::parse(&text).is_ok(), "{:?}", Config::parse(&text));
    }

    #[test]
    fn empty_file_needs_nodes_and_users() {
        assert_eq!(
            shown(&problems_of("")),
            [
                "nodes: at least one [[nodes]] entry is required",
                "users: at least one [[users]] entry is required"
            ]
        );
    }

    #[test]
    fn all_problems_are_reported_at_once_one_per_line() {
        let text = r#"
max_client_conn = 0
[pool]
min_idle = 21
[tls]
mode = "require"
[[nodes]]
name = "pg1"
host = "h"
[[nodes]]
name = "pg1"
host = "h"
port = 5433
[[users]]
name = "app"
"#;
        let err = Config::parse(text).map_err(|e| e.to_string()).err();
        let expected = "max_client_conn: must be at least 1\n\
                        tls.mode: \"require\" needs tls.cert and tls.key\n\
                        pool.min_idle: 21 is more than pool.max_size (20)\n\
                        nodes[1].name: duplicate node name \"pg1\" (also nodes[0])\n\
                        users[0].password: missing";
        assert_eq!(err.as_deref(), Some(expected));
    }
}
