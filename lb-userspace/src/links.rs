//! Watching the interfaces XDP is attached to: the kernel's link notifications (rtnetlink
//! group `RTNLGRP_LINK`: RTM_NEWLINK, RTM_DELLINK) say when an interface of
//! `agent.interfaces` appears, changes or goes away. An interface deleted and made again
//! has a new ifindex and no XDP program, and the link pinned for the old one is detached for
//! good; the agent then attaches afresh (`Datapath::ensure_attached`) and the maps follow the
//! new ifindex.
//!
//! The notifications only say *which* interfaces to check: `due` picks them, and the check
//! itself asks the kernel (the ifindex of the name, the pinned link's interface and program).
//! A lost notification (the socket's buffer overflowed) or one that does not parse makes the
//! agent check every interface (`Watch::Resync`), as it does once when the watcher starts.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::{Context, Result};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp},
    RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use tokio::io::unix::AsyncFd;
use tracing::warn;

/// One link notification, as far as the agent cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkEvent {
    /// RTM_DELLINK (else RTM_NEWLINK: created or changed).
    pub deleted: bool,
    pub ifindex: u32,
    pub name: Option<String>,
    /// The XDP programs attached to it (any mode), by id.
    pub xdp_programs: Vec<u32>,
}

impl LinkEvent {
    fn from_message(deleted: bool, m: &LinkMessage) -> Self {
        let mut event = Self {
            deleted,
            ifindex: m.header.index,
            name: None,
            xdp_programs: Vec::new(),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => event.name = Some(n.clone()),
                LinkAttribute::Xdp(xdp) => {
                    for x in xdp {
                        if let LinkXdp::ProgId(id)
                        | LinkXdp::DrvProgId(id)
                        | LinkXdp::SkbProgId(id)
                        | LinkXdp::HwProgId(id) = x
                        {
                            if *id != 0 && !event.xdp_programs.contains(id) {
                                event.xdp_programs.push(*id);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        event
    }
}

/// The link notifications of one datagram.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub events: Vec<LinkEvent>,
    /// Some part did not parse: what it said is unknown.
    pub unreadable: bool,
}

/// Is interface `ifindex` a veth (link kind "veth", RTM_GETLINK)?
pub fn is_veth(ifindex: u32) -> Result<bool> {
    let socket = crate::routes::NetlinkRoutes::open()?;
    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    crate::routes::NetlinkRoutes::send(
        &socket,
        RouteNetlinkMessage::GetLink(link),
        0,
        1,
        "RTM_GETLINK",
    )?;
    let (datagram, _) = socket
        .recv_from_full()
        .context("reading the RTM_GETLINK answer")?;
    let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram)
        .context("parsing the RTM_GETLINK answer")?;
    match message.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
            Ok(l.attributes.iter().any(|a| {
                matches!(a, LinkAttribute::LinkInfo(infos)
                    if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
            }))
        }
        NetlinkPayload::Error(e) => Err(anyhow::anyhow!("RTM_GETLINK for ifindex {ifindex}: {e}")),
        _ => anyhow::bail!("RTM_GETLINK for ifindex {ifindex}: an answer of another kind"),
    }
}

/// Splits a datagram into its netlink messages and reads the link notifications among them.
pub fn parse(datagram: &[u8]) -> Parsed {
    let (messages, unreadable) = crate::routes::split_messages(datagram);
    let mut parsed = Parsed {
        unreadable,
        ..Parsed::default()
    };
    for message in messages {
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message) {
            Ok(m) => match m.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    parsed.events.push(LinkEvent::from_message(false, &l))
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                    parsed.events.push(LinkEvent::from_message(true, &l))
                }
                _ => {}
            },
            Err(_) => parsed.unreadable = true,
        }
    }
    parsed
}

/// The interfaces of `attached` (name → the ifindex the agent knows) the notifications give
/// reason to check: one that appears or changes under its name with another ifindex or
/// without `program` (ours) among its XDP programs, one deleted, and one whose ifindex now
/// carries another name (renamed away). A notification about an attached interface that
/// still runs `program` under the same name and ifindex (most are: up, down, carrier, MTU, our
/// own attach) gives none.
pub fn due(
    events: &[LinkEvent],
    attached: &BTreeMap<String, u32>,
    program: u32,
) -> BTreeSet<String> {
    let mut due = BTreeSet::new();
    for e in events {
        let named = e.name.as_ref().filter(|n| attached.contains_key(*n));
        if let Some(name) = named {
            let same = attached[name] == e.ifindex;
            if e.deleted || !same || !e.xdp_programs.contains(&program) {
                due.insert(name.clone());
            }
        }
        // Its old ifindex under another name (or a deletion without a name).
        for (name, &i) in attached {
            if i == e.ifindex && e.name.as_ref() != Some(name) {
                due.insert(name.clone());
            }
        }
    }
    due
}

/// Does any notification concern an interface of `attached` (by name or ifindex)? Such a
/// change (up, down, carrier, made again) can move the routes to the targets.
pub fn touches(events: &[LinkEvent], attached: &BTreeMap<String, u32>) -> bool {
    events.iter().any(|e| {
        e.name.as_ref().is_some_and(|n| attached.contains_key(n))
            || attached.values().any(|&i| i == e.ifindex)
    })
}

/// What the watcher has for the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Watch {
    Events(Vec<LinkEvent>),
    /// Check every interface: at the start, after lost or unreadable notifications, or when a
    /// failed re-attach is due again.
    Resync(&'static str),
}

/// The kernel's receive buffer for notifications: room for bursts (many interfaces changing).
const RECEIVE_BUFFER: libc::c_int = 1 << 20;
/// After a failed read, the next.
const READ_BACKOFF: Duration = Duration::from_secs(1);

/// An rtnetlink socket in `RTNLGRP_LINK`, read on the agent's task.
pub struct LinkWatcher {
    socket: AsyncFd<Socket>,
    resync: Option<&'static str>,
    recheck_at: Option<tokio::time::Instant>,
    /// Interfaces found missing (said once, until they come back).
    gone: BTreeSet<String>,
}

impl LinkWatcher {
    /// Joins `RTNLGRP_LINK`; the first `next` asks for a check of every interface (what changed
    /// before the socket listened).
    pub fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
        socket.bind_auto().context("binding the netlink socket")?;
        socket
            .add_membership(libc::RTNLGRP_LINK)
            .context("joining the rtnetlink link group")?;
        if let Err(e) = socket.set_rx_buf_sz(RECEIVE_BUFFER) {
            warn!(error = %e, "could not enlarge the link watcher's receive buffer");
        }
        socket
            .set_non_blocking(true)
            .context("making the netlink socket non-blocking")?;
        // SAFETY: the socket owns its descriptor, which nothing closes or replaces while the
        // AsyncFd holds it.
        let socket =
            unsafe { AsyncFd::register(socket) }.context("registering the netlink socket")?;
        Ok(Self {
            socket,
            resync: Some("start"),
            recheck_at: None,
            gone: BTreeSet::new(),
        })
    }

    /// Asks for a check of every interface after `after` (a failed re-attach).
    pub fn recheck_after(&mut self, after: Duration) {
        let at = tokio::time::Instant::now() + after;
        self.recheck_at = Some(self.recheck_at.map_or(at, |t| t.min(at)));
    }

    /// Notes that `name` is missing; true the first time (until `back`).
    pub fn gone(&mut self, name: &str) -> bool {
        self.gone.insert(name.to_string())
    }

    /// Notes that `name` is there; true when it was missing.
    pub fn back(&mut self, name: &str) -> bool {
        self.gone.remove(name)
    }

    /// The next notifications that concern links, or a resync. Cancel-safe: nothing is read
    /// that is not returned.
    pub async fn next(&mut self) -> Watch {
        if let Some(why) = self.resync.take() {
            return Watch::Resync(why);
        }
        loop {
            let recheck = self.recheck_at;
            let due = async move {
                match recheck {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let mut guard = tokio::select! {
                _ = due => {
                    self.recheck_at = None;
                    return Watch::Resync("retry");
                }
                ready = self.socket.readable() => match ready {
                    Ok(g) => g,
                    Err(e) => {
                        warn!(error = %e, "link watcher: waiting on the netlink socket failed");
                        self.recheck_after(READ_BACKOFF);
                        continue;
                    }
                },
            };
            match guard.try_io(|s| s.get_ref().recv_from_full()) {
                Err(_would_block) => continue,
                Ok(Ok((datagram, _))) => {
                    let parsed = parse(&datagram);
                    if parsed.unreadable {
                        return Watch::Resync("unreadable notification");
                    }
                    if !parsed.events.is_empty() {
                        return Watch::Events(parsed.events);
                    }
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Watch::Resync("notifications lost (receive buffer overflowed)");
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "link watcher: reading the netlink socket failed");
                    drop(guard);
                    tokio::time::sleep(READ_BACKOFF).await;
                    return Watch::Resync("read error");
                }
            }
        }
    }
}

/// The next `Watch` of `watcher`; never, without one (the agent runs without a watcher when
/// the socket could not be opened).
pub async fn next(watcher: Option<&mut LinkWatcher>) -> Watch {
    match watcher {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::NetlinkHeader;
    use netlink_packet_route::link::XdpAttached;

    use super::*;

    fn message(deleted: bool, ifindex: u32, name: &str, xdp: Vec<LinkXdp>) -> Vec<u8> {
        let mut link = LinkMessage::default();
        link.header.index = ifindex;
        link.attributes.push(LinkAttribute::IfName(name.into()));
        if !xdp.is_empty() {
            link.attributes.push(LinkAttribute::Xdp(xdp));
        }
        let inner = if deleted {
            RouteNetlinkMessage::DelLink(link)
        } else {
            RouteNetlinkMessage::NewLink(link)
        };
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(inner));
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    fn event(deleted: bool, ifindex: u32, name: &str, xdp_programs: Vec<u32>) -> LinkEvent {
        LinkEvent {
            deleted,
            ifindex,
            name: Some(name.into()),
            xdp_programs,
        }
    }

    #[test]
    fn a_datagram_of_several_notifications_parses_into_events() {
        let mut datagram = message(
            false,
            7,
            "l1",
            vec![
                LinkXdp::Attached(XdpAttached::Driver),
                LinkXdp::ProgId(42),
                LinkXdp::DrvProgId(42),
            ],
        );
        datagram.extend(message(true, 5, "l0", vec![]));
        // Two programs (generic and native): each id once.
        datagram.extend(message(
            false,
            9,
            "l2",
            vec![
                LinkXdp::Attached(XdpAttached::Multiple),
                LinkXdp::SkbProgId(3),
                LinkXdp::DrvProgId(4),
            ],
        ));
        let parsed = parse(&datagram);
        assert!(!parsed.unreadable);
        assert_eq!(
            parsed.events,
            [
                event(false, 7, "l1", vec![42]),
                event(true, 5, "l0", vec![]),
                event(false, 9, "l2", vec![3, 4]),
            ]
        );
    }

    #[test]
    fn a_cut_or_garbled_datagram_is_unreadable() {
        let whole = message(false, 7, "l1", vec![]);
        // Cut: the header promises more than there is.
        let parsed = parse(&whole[..whole.len() - 4]);
        assert!(parsed.unreadable);
        assert!(parsed.events.is_empty());
        // A length below a header's.
        assert!(parse(&[8, 0, 0, 0, 0, 0, 0, 0]).unreadable);
        // What parsed before the bad part is kept.
        let mut two = whole.clone();
        two.extend([3, 0, 0]);
        let parsed = parse(&two);
        assert!(parsed.unreadable);
        assert_eq!(parsed.events, [event(false, 7, "l1", vec![])]);
        // Other rtnetlink messages are no events.
        assert_eq!(parse(&[]), Parsed::default());
    }

    #[test]
    fn only_interfaces_that_lost_our_program_or_their_ifindex_are_due_a_check() {
        let ours = 42;
        let attached: BTreeMap<String, u32> = [("l0".into(), 5), ("l1".into(), 7)].into();
        let due = |events: &[LinkEvent]| -> Vec<String> {
            due(events, &attached, ours).into_iter().collect()
        };
        // Up, down, carrier, our own attach: still ours, same ifindex.
        assert!(due(&[event(false, 7, "l1", vec![ours])]).is_empty());
        // Someone else's interface.
        assert!(due(&[event(false, 9, "eth9", vec![])]).is_empty());
        assert!(due(&[event(true, 9, "eth9", vec![])]).is_empty());
        // Deleted.
        assert_eq!(due(&[event(true, 7, "l1", vec![ours])]), ["l1"]);
        // Made again: a new ifindex, no program.
        assert_eq!(due(&[event(false, 11, "l1", vec![])]), ["l1"]);
        // Made again with the old ifindex (moved in from another namespace), no program.
        assert_eq!(due(&[event(false, 7, "l1", vec![])]), ["l1"]);
        // Another program (ours was replaced).
        assert_eq!(due(&[event(false, 5, "l0", vec![99])]), ["l0"]);
        // Renamed away: its ifindex under another name.
        assert_eq!(due(&[event(false, 7, "old-l1", vec![ours])]), ["l1"]);
        // Whether routes may have moved: any change of an attached interface.
        assert!(touches(&[event(false, 7, "l1", vec![ours])], &attached));
        assert!(touches(&[event(false, 7, "old-l1", vec![ours])], &attached));
        assert!(!touches(&[event(false, 9, "eth9", vec![])], &attached));
        // A burst: each due interface once.
        assert_eq!(
            due(&[
                event(true, 7, "l1", vec![ours]),
                event(false, 11, "l1", vec![]),
                event(false, 5, "l0", vec![ours]),
                event(false, 11, "l1", vec![]),
            ]),
            ["l1"]
        );
    }
}
