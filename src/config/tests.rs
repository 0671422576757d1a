//! The configuration's parsing, defaults and validation, and the shipped example file.

use super::*;

const MINIMAL: &str = r#"
listen = "0.0.0.0:9999"
[[nodes]]
name = "pg1"
host = "127.0.0.1"
port = 5432
[[nodes]]
name = "pg2"
host = "127.0.0.1"
port = 5433
[[users]]
name = "app"
password = "app-secret"
"#;

const EXAMPLE: &str = include_str!("../../pgvigil.example.toml");

fn node(name: &str, port: u16) -> NodeConfig {
    NodeConfig {
        name: name.to_owned(),
        host: "127.0.0.1".to_owned(),
        port,
        ..NodeConfig::default()
    }
}

fn app_user() -> UserConfig {
    UserConfig {
        name: "app".to_owned(),
        password: Some("app-secret".to_owned()),
        auth: AuthMethod::ScramSha256,
        admin: false,
    }
}

#[test]
fn minimal_file_parses_with_defaults() -> Result<(), ConfigError> {
    let config = Config::parse(MINIMAL)?;
    let expected = Config {
        nodes: vec![node("pg1", 5432), node("pg2", 5433)],
        users: vec![app_user()],
        ..Config::default()
    };
    assert_eq!(config, expected);
    assert_eq!(config.max_client_conn, 1000);
    assert_eq!(config.max_message_size, 1_073_741_824);
    assert_eq!(config.client.startup_timeout, Duration::from_secs(10));
    assert_eq!(config.tls.mode, TlsMode::Allow);
    assert_eq!(config.backend.tls, BackendTlsMode::Disable);
    assert_eq!(config.pool.idle_timeout, Duration::from_secs(600));
    assert_eq!(config.routing.balance, Balance::LeastConnections);
    assert!(config.routing.read_your_writes);
    assert_eq!(config.routing.max_lag_bytes, 16_777_216);
    assert_eq!(config.routing.max_lag, Duration::from_secs(10));
    assert!(config.routing.read_functions.is_empty());
    assert!(config.routing.write_functions.is_empty());
    assert_eq!(config.node("pg2").map(|n| n.port), Some(5433));
    assert_eq!(config.node("pg2").map(|n| n.weight), Some(1));
    assert!(config.node("pg3").is_none());
    assert_eq!(
        config.user("app").map(|u| u.auth),
        Some(AuthMethod::ScramSha256)
    );
    Ok(())
}

#[test]
fn durations_and_enums_use_their_written_forms() -> Result<(), ConfigError> {
    let text = format!(
        "{MINIMAL}auth = \"md5\"\n[pool]\ncheckout_timeout = \"500ms\"\n\
         [backend]\ntls = \"prefer\"\n[tls]\nmode = \"disable\"\n"
    );
    let config = Config::parse(&text)?;
    assert_eq!(config.pool.checkout_timeout, Duration::from_millis(500));
    assert_eq!(config.backend.tls, BackendTlsMode::Prefer);
    assert_eq!(config.tls.mode, TlsMode::Disable);
    assert_eq!(config.user("app").map(|u| u.auth), Some(AuthMethod::Md5));
    Ok(())
}

#[test]
fn routing_table_and_node_weights_parse() -> Result<(), ConfigError> {
    let nodes = MINIMAL.replace("port = 5433\n", "port = 5433\nweight = 0\n");
    let text = format!(
        r#"{nodes}
[routing]
balance = "round_robin"
read_your_writes = false
max_lag_bytes = 0
max_lag = "250ms"
primary_reads = "share"
read_affinity = "session"
read_functions = ["report", "stats.daily"]
write_functions = ["audit"]
"#
    );
    let config = Config::parse(&text)?;
    let expected = RoutingConfig {
        balance: Balance::RoundRobin,
        read_your_writes: false,
        max_lag_bytes: 0,
        max_lag: Duration::from_millis(250),
        primary_reads: PrimaryReads::Share,
        read_affinity: ReadAffinity::Session,
        read_functions: vec!["report".into(), "stats.daily".into()],
        write_functions: vec!["audit".into()],
    };
    assert_eq!(config.routing, expected);
    let weights: Vec<u32> = config.nodes.iter().map(|n| n.weight).collect();
    assert_eq!(weights, [1, 0]);
    Ok(())
}

#[test]
fn balance_modes_are_spelled_in_snake_case() {
    for (text, mode) in [
        ("least_connections", Balance::LeastConnections),
        ("round_robin", Balance::RoundRobin),
        ("random", Balance::Random),
    ] {
        let parsed = toml::from_str::<RoutingConfig>(&format!("balance = {text:?}"));
        assert_eq!(parsed.map(|r| r.balance).ok(), Some(mode), "{text}");
    }
}

#[test]
fn function_lists_steer_the_classifier() -> Result<(), ConfigError> {
    use pgvigil_proto::classify::classify;
    let read_only =
        |config: &Config, sql: &str| classify(sql.as_bytes(), &config.function_lists()).read_only;
    let plain = Config::parse(MINIMAL)?;
    assert!(!read_only(&plain, "SELECT report(1)"), "unknown is a write");
    assert!(read_only(&plain, "SELECT lower('A')"));
    let text = format!(
        r#"{MINIMAL}
[routing]
read_functions = ["Report", "stats.daily"]
write_functions = ["lower"]
"#
    );
    let listed = Config::parse(&text)?;
    assert!(read_only(&listed, "SELECT report(1)"));
    assert!(read_only(&listed, "SELECT stats.daily()"));
    assert!(!read_only(&listed, "SELECT other.daily()"));
    assert!(!read_only(&listed, "SELECT lower('A')"));
    Ok(())
}

#[test]
fn auth_methods_are_spelled_as_in_pg_hba() {
    for (text, method) in [
        ("scram-sha-256", AuthMethod::ScramSha256),
        ("md5", AuthMethod::Md5),
        ("trust", AuthMethod::Trust),
    ] {
        let parsed = toml::from_str::<UserConfig>(&format!("auth = {text:?}"));
        assert_eq!(parsed.map(|u| u.auth).ok(), Some(method), "{text}");
    }
}

/// Each case replaces or extends the minimal file; the error must mention every listed text.
#[test]
fn syntax_errors_name_the_key() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown top-level key",
            "lisen = \"x\"\n",
            &["unknown field `lisen`"],
        ),
        (
            "bad listen address",
            "listen = \"nowhere\"\n",
            &["listen: invalid socket address \"nowhere\""],
        ),
        (
            "negative duration",
            "[pool]\nidle_timeout = \"-1s\"\n",
            &["idle_timeout"],
        ),
        (
            "duration without unit",
            "[client]\nstartup_timeout = 10\n",
            &["startup_timeout"],
        ),
        (
            "unknown tls mode",
            "[tls]\nmode = \"on\"\n",
            &["mode", "unknown variant `on`"],
        ),
        (
            "unknown balance mode",
            "[routing]\nbalance = \"weighted\"\n",
            &["balance", "unknown variant `weighted`"],
        ),
        (
            "unknown key in [routing]",
            "[routing]\nmax_lag_seconds = 3\n",
            &["unknown field `max_lag_seconds`"],
        ),
        (
            "negative weight",
            "[[nodes]]\nname = \"pg1\"\nweight = -1\n",
            &["weight = -1"],
        ),
        (
            "unknown key in [[nodes]]",
            "[[nodes]]\nname = \"pg1\"\nhots = \"h\"\n",
            &["unknown field `hots`"],
        ),
        (
            "wrong type for port",
            "[[nodes]]\nname = \"pg1\"\nport = \"5432\"\n",
            &["port = \"5432\"", "expected u16"],
        ),
        (
            "port out of range",
            "[[nodes]]\nname = \"pg1\"\nport = 70000\n",
            &["port = 70000"],
        ),
    ];
    for (what, text, wanted) in cases {
        let message = match Config::parse(text) {
            Err(ConfigError::Syntax(message)) => message,
            other => panic!("{what}: expected a syntax error, got {other:?}"),
        };
        assert!(message.contains("line"), "{what}: no line in {message}");
        for want in *wanted {
            assert!(message.contains(want), "{what}: {want:?} not in {message}");
        }
    }
}

#[test]
fn load_names_a_missing_file() {
    let err = Config::load(Path::new("/nonexistent/pgvigil.toml"));
    let message = err.map_err(|e| e.to_string()).err();
    assert_eq!(
        message.as_deref(),
        Some("cannot read config file /nonexistent/pgvigil.toml: No such file or directory (os error 2)")
    );
}

#[test]
fn debug_never_shows_passwords() -> Result<(), ConfigError> {
    let shown = format!("{:?}", Config::parse(MINIMAL)?);
    assert!(!shown.contains("app-secret"), "{shown}");
    assert!(shown.contains("\"***\""), "{shown}");
    Ok(())
}

#[test]
fn example_file_is_valid_and_matches_the_defaults() -> Result<(), ConfigError> {
    let example = Config::parse(EXAMPLE)?;
    let mut pg1 = node("pg1", 5432);
    pg1.control = Some(NodeControlConfig {
        data_dir: PathBuf::from("/var/lib/postgresql/16/main"),
        ..NodeControlConfig::default()
    });
    let expected = Config {
        nodes: vec![pg1, node("pg2", 5433), node("pg3", 5434)],
        users: vec![app_user()],
        ..Config::default()
    };
    assert_eq!(example, expected);
    Ok(())
}

/// Every key the structs know, with optional ones filled in so that serde emits them.
fn keys_of_full_config() -> Vec<String> {
    let mut full = Config {
        nodes: vec![node("pg1", 5432)],
        users: vec![app_user()],
        ..Config::default()
    };
    full.tls.cert = Some(PathBuf::from("cert.pem"));
    full.tls.key = Some(PathBuf::from("key.pem"));
    full.backend.ca = Some(PathBuf::from("ca.pem"));
    full.failover.state_dir = Some(PathBuf::from("state"));
    full.replication = ReplicationConfig {
        user: Some("replicator".into()),
        password: Some("secret".into()),
        sslmode: Some(SslMode::Prefer),
        application_name: Some("pg1".into()),
        conninfo: [("keepalives_idle".to_owned(), "30".to_owned())].into(),
    };
    full.cluster.etcd.endpoints = vec!["http://127.0.0.1:2379".into()];
    full.cluster.etcd.user = Some("pgvigil".into());
    full.cluster.etcd.password = Some("secret".into());
    full.cluster.instance.name = Some("app1".into());
    full.admin.token = Some("secret".into());
    // Every driver's keys at once (validation would refuse it; serde does not care).
    full.nodes[0].control = Some(NodeControlConfig {
        bin_dir: Some(PathBuf::from("/usr/lib/postgresql/16/bin")),
        url: Some("http://db1:9997".into()),
        token_file: Some(PathBuf::from("/etc/pgvigil/agent.token")),
        stop: Some("stop".into()),
        start: Some("start".into()),
        status: Some("status".into()),
        rewind: Some("rewind".into()),
        reclone: Some("reclone".into()),
        make_standby: Some("make_standby".into()),
        ..NodeControlConfig::default()
    });
    let mut keys = Vec::new();
    match toml::Value::try_from(&full) {
        Ok(toml::Value::Table(table)) => collect_keys("", &table, &mut keys),
        other => panic!("Config does not serialize to a table: {other:?}"),
    }
    keys
}

fn collect_keys(prefix: &str, table: &toml::Table, keys: &mut Vec<String>) {
    for (name, value) in table {
        let path = format!("{prefix}{name}");
        match value {
            toml::Value::Table(inner) => collect_keys(&format!("{path}."), inner, keys),
            toml::Value::Array(items) => {
                for item in items {
                    if let toml::Value::Table(inner) = item {
                        collect_keys(&format!("{path}[]."), inner, keys);
                    }
                }
            }
            _ => {}
        }
        keys.push(path);
    }
    keys.sort();
    keys.dedup();
}

/// The section a line opens: `[pool]` gives `pool.`, `[[nodes]]` gives `nodes[].`.
fn section_prefix(line: &str) -> Option<String> {
    if let Some(name) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
        return Some(format!("{name}[]."));
    }
    let name = line.strip_prefix('[').and_then(|l| l.strip_suffix(']'))?;
    Some(format!("{name}."))
}

/// Keys the example sets or shows commented out (`# cert = ...`), as full paths.
fn keys_in_example() -> Vec<String> {
    let mut keys = Vec::new();
    let mut prefix = String::new();
    for line in EXAMPLE.lines() {
        let line = line.trim();
        let uncommented = line.trim_start_matches('#').trim();
        if let Some(section) = section_prefix(line) {
            // A sub-table of the array entry just opened: `[nodes.control]` after `[[nodes]]`.
            let section = match prefix.strip_suffix("[].") {
                Some(array) if section.starts_with(&format!("{array}.")) => {
                    format!("{array}[].{}", &section[array.len() + 1..])
                }
                _ => section,
            };
            keys.push(
                section
                    .trim_end_matches('.')
                    .trim_end_matches("[]")
                    .to_owned(),
            );
            prefix = section;
        } else if let Some((key, _)) = uncommented.split_once(" = ") {
            if key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                keys.push(format!("{prefix}{key}"));
            }
        }
    }
    keys
}

#[test]
fn example_file_shows_every_key() {
    let shown = keys_in_example();
    let missing: Vec<String> = keys_of_full_config()
        .into_iter()
        .filter(|key| !shown.contains(key))
        .collect();
    assert!(
        missing.is_empty(),
        "keys missing from pgvigil.example.toml: {missing:?}"
    );
}
