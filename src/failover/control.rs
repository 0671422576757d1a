//! How the world talks to the coordinator: commands with a reply each, the per-node view it
//! publishes for status, and the short list of recent events.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};

use super::Coordinator;
use crate::admin::api::{Command, Done, Event, Refusal};
use crate::health::NodeHealth;
use crate::topology::NodeId;

/// Events kept for `GET /status`; older ones are dropped (issue 12 keeps them in a log).
const EVENTS_KEPT: usize = 200;

/// Commands waiting for the coordinator; senders beyond it wait for room.
const QUEUE: usize = 16;

/// The coordinator's answer to one command.
pub type Reply = Result<Done, Refusal>;

/// One command and where its answer goes.
pub(super) struct Request {
    pub(super) command: Command,
    pub(super) reply: oneshot::Sender<Reply>,
}

/// What the coordinator knows of one node beyond its role, for status.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// The latest probes.
    pub health: NodeHealth,
    /// Why it is fenced, when it is.
    pub fenced: Option<String>,
    /// Whether an operator detached it.
    pub detached: bool,
}

/// The recent events, newest last.
#[derive(Debug, Default)]
pub struct Events(Mutex<VecDeque<Event>>);

impl Events {
    /// Records `message` (about `node`, if any), dropping the oldest beyond `EVENTS_KEPT`.
    pub fn push(&self, node: Option<&str>, message: impl Into<String>) {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut events = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if events.len() == EVENTS_KEPT {
            events.pop_front();
        }
        events.push_back(Event {
            at_ms,
            node: node.map(str::to_owned),
            message: message.into(),
        });
    }

    /// A copy of the events, oldest first.
    pub fn list(&self) -> Vec<Event> {
        let events = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        events.iter().cloned().collect()
    }
}

/// The admin side: sends commands, reads the coordinator's view and the events.
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::Sender<Request>,
    view: watch::Receiver<Arc<Vec<NodeView>>>,
    /// The recent events.
    pub events: Arc<Events>,
}

/// The coordinator's side of a [`Handle`].
pub struct Inbox {
    pub(super) commands: mpsc::Receiver<Request>,
    pub(super) view: watch::Sender<Arc<Vec<NodeView>>>,
    pub(super) events: Arc<Events>,
}

/// A connected handle and inbox for `nodes` nodes.
pub fn channel(nodes: usize) -> (Handle, Inbox) {
    let (commands, received) = mpsc::channel(QUEUE);
    let (view, watched) = watch::channel(Arc::new(vec![NodeView::default(); nodes]));
    let events = Arc::new(Events::default());
    (
        Handle {
            commands,
            view: watched,
            events: events.clone(),
        },
        Inbox {
            commands: received,
            view,
            events,
        },
    )
}

impl Handle {
    /// Sends `command` to the coordinator and waits for its answer. The coordinator takes one
    /// command at a time, between its own steps: a command sent during a failover waits for it.
    pub async fn send(&self, command: Command) -> Reply {
        let gone = || {
            Refusal::new(
                "pgvigil is shutting down",
                "start pgvigil again and retry the command",
            )
        };
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Request { command, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// The coordinator's latest view of every node.
    pub fn view(&self) -> Arc<Vec<NodeView>> {
        self.view.borrow().clone()
    }
}

/// What the coordinator records for status: fences with their reasons, and its view.
impl Coordinator {
    /// Fences `node` (remembered and saved with the next topology), recording why.
    pub(super) fn fence(&mut self, node: NodeId, reason: String) {
        if !self.memory.fenced[node] || self.fence_reasons[node].is_none() {
            self.events
                .push(Some(self.name(node)), format!("fenced: {reason}"));
            self.fence_reasons[node] = Some(reason);
        }
        self.memory.fenced[node] = true;
    }

    /// Publishes what status shows of each node beyond its role.
    pub(super) fn publish_view(&self) {
        let view = (0..self.board.len())
            .map(|node| NodeView {
                health: self.board[node].clone(),
                fenced: self.memory.fenced[node].then(|| {
                    self.fence_reasons[node]
                        .clone()
                        .unwrap_or_else(|| "fenced before pgvigil restarted (state file)".into())
                }),
                detached: self.memory.detached[node],
            })
            .collect();
        self.view.send_replace(Arc::new(view));
    }
}
