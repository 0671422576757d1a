//! The floor of `RUNS=floor` in benches/pgbench.sh: a relay that knows nothing of PostgreSQL's
//! protocol. Each client connection gets its own server connection, and bytes are copied both
//! ways as they arrive (a read, then a write of what was read), on one thread, with tokio's
//! event loop as pgvigil uses it. It makes the same socket calls per round trip as PgBouncer
//! and pgvigil (one receive and one send per direction) and does nothing else, so its CPU time
//! per transaction is what the kernel charges any proxy on this path: a lower bound that no
//! proxy making those calls can go under.

use std::net::SocketAddr;

use clap::Parser;
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Parser)]
#[command(about = "Copies bytes between each client and its own server connection, nothing else")]
struct Args {
    /// Address to accept clients on.
    #[arg(long)]
    listen: SocketAddr,
    /// The server each client's bytes go to.
    #[arg(long)]
    server: SocketAddr,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(serve(args))
}

/// Accepts clients until killed; a client whose server cannot be reached is closed.
async fn serve(args: Args) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(error) = relay(client, args.server).await {
                eprintln!("floor_relay: {error}");
            }
        });
    }
}

/// Copies both ways until either side closes.
async fn relay(mut client: TcpStream, server: SocketAddr) -> std::io::Result<()> {
    let mut server = TcpStream::connect(server).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}
