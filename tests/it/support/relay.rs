//! A TCP relay in front of one node that can be cut, to simulate a partition between pgvigil and
//! that node.
//!
//! A cut keeps every socket open but forwards nothing, and leaves new connections in the kernel's
//! accept queue: the peers see hangs, never resets, as with a host that vanished silently.
//! Plain threads, so that the relay keeps working whatever the test's runtime is doing; dropping
//! the relay stops and joins every one of them.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
#[cfg(test)]
use std::os::fd::AsRawFd;
#[cfg(test)]
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a blocked relay thread looks whether it must stop.
const POLL: Duration = Duration::from_millis(20);

/// Bound on connecting to the target for one relayed connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Bytes read in one go.
const CHUNK: usize = 16 * 1024;

/// A relay on a free loopback port, forwarding to one target until cut or dropped.
pub struct Relay {
    port: u16,
    /// The listening socket as `/proc/self/fd` names it (`socket:[inode]`): unique while it is
    /// open, unlike the port, which another test may bind once it is free.
    #[cfg(test)]
    listener_socket: PathBuf,
    switch: Arc<Switch>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying connections made to [`port`](Self::port) to `target`.
    pub fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        // Non-blocking, so that the acceptor can notice a stop between two connections.
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        #[cfg(test)]
        let listener_socket =
            std::fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
        let switch = Arc::new(Switch::default());
        let acceptor = {
            let switch = Arc::clone(&switch);
            std::thread::spawn(move || accept_loop(&listener, target, &switch))
        };
        Relay {
            port,
            #[cfg(test)]
            listener_socket,
            switch,
            acceptor: Some(acceptor),
        }
    }

    /// The loopback port the relay listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops forwarding in both directions and serving new connections; every socket stays open.
    pub fn cut(&self) {
        self.switch.set(|flags| flags.cut = true);
    }

    /// Forwards again, held bytes and queued connections included.
    pub fn heal(&self) {
        self.switch.set(|flags| flags.cut = false);
    }

    /// Closes every connection relayed so far, both ends, as the death of the target process
    /// would for its clients; new connections are relayed as before.
    pub fn reset(&self) {
        self.switch.set(|flags| flags.epoch += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.switch.set(|flags| flags.stopping = true);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

#[derive(Debug, Default)]
struct Flags {
    cut: bool,
    stopping: bool,
    /// Connections accepted before the last [`Relay::reset`] belong to an older epoch.
    epoch: u64,
}

/// The relay's state, shared by its threads.
#[derive(Debug, Default)]
struct Switch {
    flags: Mutex<Flags>,
    changed: Condvar,
}

impl Switch {
    fn set(&self, change: impl FnOnce(&mut Flags)) {
        change(&mut self.flags.lock().unwrap());
        self.changed.notify_all();
    }

    fn epoch(&self) -> u64 {
        self.flags.lock().unwrap().epoch
    }

    /// Blocks while the relay is cut; false once it is stopping.
    fn wait_open(&self) -> bool {
        let mut flags = self.flags.lock().unwrap();
        while flags.cut && !flags.stopping {
            flags = self.changed.wait(flags).unwrap();
        }
        !flags.stopping
    }
}

/// Accepts connections while the relay is open, two pump threads each; joins them on stop.
fn accept_loop(listener: &TcpListener, target: SocketAddr, switch: &Arc<Switch>) {
    let mut pumps: Vec<JoinHandle<()>> = Vec::new();
    // While cut, accept() is not called: the kernel completes handshakes into the backlog, and
    // those clients wait for a server that never speaks.
    while switch.wait_open() {
        match listener.accept() {
            Ok((client, _)) => pumps.extend(relay_connection(client, target, switch)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => panic!("the relay cannot accept: {e}"),
        }
        pumps.retain(|pump| !pump.is_finished());
    }
    for pump in pumps {
        let _ = pump.join();
    }
}

/// Connects `client` to `target` and starts one pump per direction; a refused target closes
/// `client`, as the target itself would have.
fn relay_connection(
    client: TcpStream,
    target: SocketAddr,
    switch: &Arc<Switch>,
) -> Vec<JoinHandle<()>> {
    let Ok(server) = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) else {
        return Vec::new();
    };
    let epoch = switch.epoch();
    let ends = [(&client, &server), (&server, &client)].map(|(from, to)| {
        let (from, to) = (prepare(from), prepare(to));
        let switch = Arc::clone(switch);
        std::thread::spawn(move || pump(from, to, &switch, epoch))
    });
    ends.into()
}

/// A handle of `stream` for one pump: blocking, no Nagle delay, short timeouts to check the switch.
fn prepare(stream: &TcpStream) -> TcpStream {
    let stream = stream.try_clone().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(POLL)).unwrap();
    stream.set_write_timeout(Some(POLL)).unwrap();
    stream
}

/// Copies `from` to `to` while the relay is open; an end of stream is passed on as a half-close,
/// a broken socket or a reset since `epoch` closes both.
fn pump(mut from: TcpStream, mut to: TcpStream, switch: &Switch, epoch: u64) {
    let mut buf = vec![0; CHUNK];
    loop {
        // On stop, returning drops this pump's handles; the sockets close with the last one.
        if !switch.wait_open() {
            return;
        }
        if switch.epoch() != epoch {
            break;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if timed_out(&e) => continue,
            Err(_) => break,
        };
        match forward(&mut to, &buf[..n], switch) {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => break,
        }
    }
    // A broken socket: close both, so that the other pump and both peers notice.
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Writes all of `bytes` to `to`, holding them while the relay is cut; false if it stops first.
fn forward(to: &mut TcpStream, mut bytes: &[u8], switch: &Switch) -> io::Result<bool> {
    while !bytes.is_empty() {
        if !switch.wait_open() {
            return Ok(false);
        }
        match to.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if timed_out(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Socket timeouts show as `WouldBlock` on Unix and `TimedOut` elsewhere.
fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Instant;

    use super::*;

    /// Longer than a relayed echo takes, short enough to keep the tests quick.
    const PATIENCE: Duration = Duration::from_millis(300);

    /// An echo server that serves `connections` connections, announcing each, then ends.
    fn echo_server(connections: usize) -> (SocketAddr, mpsc::Receiver<()>, JoinHandle<()>) {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, announced) = mpsc::channel();
        let server = std::thread::spawn(move || {
            let echoes: Vec<_> = (0..connections)
                .map(|_| {
                    let (mut conn, _) = listener.accept().unwrap();
                    // Tests that do not count connections drop the receiver.
                    let _ = accepted.send(());
                    std::thread::spawn(move || {
                        let mut reader = conn.try_clone().unwrap();
                        let _ = io::copy(&mut reader, &mut conn);
                    })
                })
                .collect();
            for echo in echoes {
                echo.join().unwrap();
            }
        });
        (addr, announced, server)
    }

    fn connect(relay: &Relay) -> TcpStream {
        let stream = TcpStream::connect(("127.0.0.1", relay.port())).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream
    }

    fn echo(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<Vec<u8>> {
        stream.write_all(bytes)?;
        read_n(stream, bytes.len())
    }

    fn read_n(stream: &mut TcpStream, n: usize) -> io::Result<Vec<u8>> {
        let mut back = vec![0; n];
        stream.read_exact(&mut back)?;
        Ok(back)
    }

    #[test]
    fn bytes_flow_both_ways_and_a_close_is_passed_on() {
        let (addr, _, server) = echo_server(1);
        let relay = Relay::start(addr);
        let mut client = connect(&relay);
        assert_eq!(echo(&mut client, b"ping").unwrap(), b"ping");
        let big = vec![7u8; 3 * CHUNK + 5];
        assert_eq!(echo(&mut client, &big).unwrap(), big);
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(client.read(&mut [0; 1]).unwrap(), 0, "the echo's close");
        server.join().unwrap();
    }

    #[test]
    fn a_cut_makes_reads_time_out_and_a_heal_delivers_what_was_held() {
        let (addr, accepted, server) = echo_server(2);
        let relay = Relay::start(addr);
        let mut before = connect(&relay);
        assert_eq!(echo(&mut before, b"one").unwrap(), b"one");
        accepted.recv().unwrap();

        relay.cut();
        let err = echo(&mut before, b"held").unwrap_err();
        assert!(timed_out(&err), "a hang, not a failure: {err}");
        // A new connection is accepted by the kernel, yet nobody serves it.
        let mut during = connect(&relay);
        let err = echo(&mut during, b"queued").unwrap_err();
        assert!(timed_out(&err), "a hang, not a failure: {err}");
        assert!(
            accepted.recv_timeout(PATIENCE).is_err(),
            "reached the target"
        );

        relay.heal();
        assert_eq!(read_n(&mut before, 4).unwrap(), b"held");
        assert_eq!(read_n(&mut during, 6).unwrap(), b"queued");
        drop((before, during));
        server.join().unwrap();
    }

    #[test]
    fn a_reset_closes_the_connections_it_found_and_relays_new_ones() {
        let (addr, _, server) = echo_server(2);
        let relay = Relay::start(addr);
        let mut old = connect(&relay);
        assert_eq!(echo(&mut old, b"a").unwrap(), b"a");
        relay.reset();
        assert_eq!(
            old.read(&mut [0; 1]).unwrap(),
            0,
            "the old client sees a close"
        );
        let mut new = connect(&relay);
        assert_eq!(echo(&mut new, b"b").unwrap(), b"b");
        drop((old, new));
        server.join().unwrap();
    }

    #[test]
    fn dropping_a_cut_relay_returns_at_once_and_closes_its_sockets() {
        let (addr, _, server) = echo_server(1);
        let relay = Relay::start(addr);
        let mut client = connect(&relay);
        assert_eq!(echo(&mut client, b"x").unwrap(), b"x");
        relay.cut();
        let listener = relay.listener_socket.clone();
        assert!(open_in_this_process(&listener), "{listener:?} not found");
        let started = Instant::now();
        drop(relay);
        assert!(started.elapsed() < Duration::from_secs(1), "drop hung");
        assert_eq!(
            client.read(&mut [0; 1]).unwrap(),
            0,
            "the client sees a close"
        );
        assert!(
            !open_in_this_process(&listener),
            "the listening socket is still open"
        );
        server.join().unwrap();
    }

    /// Whether a file descriptor of this process refers to `socket` (`socket:[inode]`).
    fn open_in_this_process(socket: &std::path::Path) -> bool {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(Result::ok)
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|link| link == socket))
    }
}
