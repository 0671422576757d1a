//! How the world talks to the coordinator: commands with a reply each, the per-node view it
//! publishes for status, and fences recorded in the event log.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use super::Coordinator;
use crate::admin::api::{Command, Done, EventKind, Refusal};
use crate::events::Events;
use crate::health::NodeHealth;
use crate::topology::NodeId;

/// Commands waiting for the coordinator; senders beyond it wait for room.
const QUEUE: usize = 16;

/// The coordinator's answer to one command.
pub type Reply = Result<Done, Refusal>;

/// One request and where its answer goes.
pub(super) enum Request {
    /// An operator's command.
    Command {
        command: Command,
        reply: oneshot::Sender<Reply>,
    },
    /// A reloaded configuration whose node list changed (see `membership`).
    Nodes {
        change: Box<super::membership::NodeChange>,
        reply: oneshot::Sender<Result<(), String>>,
    },
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
    /// Whether a reload removed it (it is leaving, or gone).
    pub removed: bool,
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

/// A connected handle and inbox for `nodes` nodes, both recording into `events`.
pub fn channel(nodes: usize, events: Arc<Events>) -> (Handle, Inbox) {
    let (commands, received) = mpsc::channel(QUEUE);
    let (view, watched) = watch::channel(Arc::new(vec![NodeView::default(); nodes]));
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
            .send(Request::Command { command, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Hands a reloaded configuration whose node list changed to the coordinator, which puts
    /// it in force with the nodes added and removed, or refuses it (the reason is returned and
    /// the running configuration stays). Waits for a failover in progress to finish first.
    pub async fn change_nodes(&self, change: super::membership::NodeChange) -> Result<(), String> {
        let gone = || "pgvigil is shutting down".to_owned();
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Request::Nodes {
                change: Box::new(change),
                reply,
            })
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
            self.events.push(
                EventKind::Fence,
                Some(self.name(node).as_str()),
                format!("fenced: {reason}"),
            );
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
                detached: self.memory.detached[node] && self.is_member(node),
                removed: !self.is_member(node),
            })
            .collect();
        self.view.send_replace(Arc::new(view));
    }
}
