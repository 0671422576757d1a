//! pgvigil: a PostgreSQL high-availability proxy.
//!
//! Clients connect to pgvigil as if it were PostgreSQL; pgvigil authenticates them, pools server
//! connections, and sends their work to the node the topology says is right.

pub mod admin;
pub mod agent;
pub mod auth;
pub mod balance;
pub mod cancel;
pub mod classifier;
pub mod cluster;
pub mod config;
pub mod console;
pub mod data_plane;
pub mod demo;
pub mod events;
pub mod failover;
pub mod health;
pub mod http_client;
pub mod http_server;
pub mod listener;
pub mod local_cluster;
pub mod metrics;
pub mod node_control;
pub mod pause;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod replication;
pub mod router;
pub mod server;
pub mod session;
pub mod signals;
pub mod state;
pub mod statements;
pub mod stream;
pub mod tls;
pub mod topology;
