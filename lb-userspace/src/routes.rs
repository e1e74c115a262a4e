//! The kernel's routes to the targets, for interface roles: which attached interfaces face
//! targets when `agent.target_interfaces` is not set. A lookup asks for one destination
//! (RTM_GETROUTE, as `ip route get` does) and reads the egress interface (RTA_OIF) of the
//! answer. The agent runs in the balancer's network namespace, so a plain netlink socket asks
//! the right kernel tables.
//!
//! `RouteLookup` is the seam: `NetlinkRoutes` asks the kernel, tests answer from a table.
//! `RouteAnswers` keeps the answers the desired state is computed from, and says once what is
//! worth a log line.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::{
    route::{RouteAddress, RouteAttribute, RouteMessage},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Asks where the kernel sends packets for an address.
pub trait RouteLookup {
    /// The ifindex the kernel routes `addr` out of; None when it has no route.
    fn egress(&mut self, addr: IpAddr) -> Result<Option<u32>>;
}

/// What the kernel said about one target address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Routed out of this ifindex.
    Via(u32),
    NoRoute,
    Failed(String),
}

impl From<Result<Option<u32>>> for Answer {
    fn from(r: Result<Option<u32>>) -> Self {
        match r {
            Ok(Some(i)) => Self::Via(i),
            Ok(None) => Self::NoRoute,
            Err(e) => Self::Failed(format!("{e:#}")),
        }
    }
}

/// Something about a target's route worth a log line (each said once, until it changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteNote {
    /// The address contributes no interface: no route, a failed lookup, or a route out of an
    /// interface XDP is not attached to (`Answer::Via` then).
    Useless { addr: IpAddr, answer: Answer },
    /// The address is routed out of an attached interface after it was not, or out of
    /// another one than before.
    Routed { addr: IpAddr, ifindex: u32 },
}

/// The route answers for the registered targets' addresses.
#[derive(Clone, Debug, Default)]
pub struct RouteAnswers {
    answers: BTreeMap<IpAddr, Answer>,
}

impl RouteAnswers {
    /// Target address → egress ifindex: the input of `state::interface_roles`.
    pub fn egress(&self) -> BTreeMap<IpAddr, u32> {
        self.answers
            .iter()
            .filter_map(|(&a, r)| match r {
                Answer::Via(i) => Some((a, *i)),
                _ => None,
            })
            .collect()
    }

    pub fn get(&self, addr: &IpAddr) -> Option<&Answer> {
        self.answers.get(addr)
    }

    /// Addresses of `current` with no answer yet.
    pub fn missing(&self, current: &BTreeSet<IpAddr>) -> Vec<IpAddr> {
        current
            .iter()
            .filter(|a| !self.answers.contains_key(a))
            .copied()
            .collect()
    }

    pub fn clear(&mut self) {
        self.answers.clear();
    }

    /// Takes `answers`, forgets addresses no longer in `current`, and returns what is worth
    /// saying: an address that contributes no interface (routes out of no interface of
    /// `attached`) when it did before or had no answer, and one whose useful route changed.
    pub fn record(
        &mut self,
        answers: impl IntoIterator<Item = (IpAddr, Answer)>,
        current: &BTreeSet<IpAddr>,
        attached: &BTreeSet<u32>,
    ) -> Vec<RouteNote> {
        let useful = |a: &Answer| matches!(a, Answer::Via(i) if attached.contains(i));
        let mut notes = Vec::new();
        for (addr, answer) in answers {
            if !current.contains(&addr) {
                continue; // deregistered while the lookup ran
            }
            let before = self.answers.insert(addr, answer.clone());
            match (before, &answer) {
                (Some(b), _) if b == answer => {}                     // unchanged
                (Some(b), _) if !useful(&b) && !useful(&answer) => {} // said already
                (Some(_), &Answer::Via(ifindex)) if useful(&answer) => {
                    notes.push(RouteNote::Routed { addr, ifindex });
                }
                (None, _) if useful(&answer) => {} // a first answer, and a usable one
                _ => notes.push(RouteNote::Useless { addr, answer }),
            }
        }
        self.answers.retain(|a, _| current.contains(a));
        notes
    }
}

/// Bytes of a netlink message header.
pub(crate) const NLMSG_HDRLEN: usize = 16;

/// The netlink messages of a datagram, each with its header, and whether a part of it could
/// not be read (a length that is too short or runs past the end: the rest is skipped).
pub(crate) fn split_messages(datagram: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut messages = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let len = match rest.get(..4) {
            Some(b) => u32::from_ne_bytes(b.try_into().expect("4 bytes")) as usize,
            None => 0,
        };
        if len < NLMSG_HDRLEN || len > rest.len() {
            return (messages, true);
        }
        messages.push(&rest[..len]);
        // Messages are 4-byte aligned.
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    (messages, false)
}

/// How long the kernel has to answer one lookup.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Route lookups over an rtnetlink socket (opened on first use, and again after a failure).
#[derive(Default)]
pub struct NetlinkRoutes {
    socket: Option<Socket>,
    sequence: u32,
}

impl RouteLookup for NetlinkRoutes {
    fn egress(&mut self, addr: IpAddr) -> Result<Option<u32>> {
        let answer = self.ask(addr);
        if answer.is_err() {
            self.socket = None; // no stale answer can meet the next question
        }
        answer.with_context(|| format!("looking up the route to {addr}"))
    }
}

impl NetlinkRoutes {
    pub(crate) fn open() -> Result<Socket> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
        socket.bind_auto().context("binding the netlink socket")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("connecting the netlink socket")?;
        let timeout = libc::timeval {
            tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: a valid socket and a timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("setting SO_RCVTIMEO");
        }
        Ok(socket)
    }

    /// Sends one request (`NLM_F_REQUEST` plus `flags`) numbered `sequence`; `what` names it
    /// in the error.
    pub(crate) fn send(
        socket: &Socket,
        request: RouteNetlinkMessage,
        flags: u16,
        sequence: u32,
        what: &str,
    ) -> Result<()> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = sequence;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::from(request));
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        socket
            .send(&buf, 0)
            .with_context(|| format!("sending {what}"))?;
        Ok(())
    }

    fn ask(&mut self, addr: IpAddr) -> Result<Option<u32>> {
        if self.socket.is_none() {
            self.socket = Some(Self::open()?);
        }
        let socket = self.socket.as_ref().expect("opened above");
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;

        let mut route = RouteMessage::default();
        (
            route.header.address_family,
            route.header.destination_prefix_length,
        ) = match addr {
            IpAddr::V4(_) => (AddressFamily::Inet, 32),
            IpAddr::V6(_) => (AddressFamily::Inet6, 128),
        };
        route
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(addr)));
        Self::send(
            socket,
            RouteNetlinkMessage::GetRoute(route),
            0,
            sequence,
            "RTM_GETROUTE",
        )?;

        loop {
            let (datagram, _) = socket
                .recv_from_full()
                .context("reading the RTM_GETROUTE answer")?;
            let (messages, unreadable) = split_messages(&datagram);
            if unreadable {
                bail!(
                    "parsing the RTM_GETROUTE answer: a message's length does not fit the datagram"
                );
            }
            for message in messages {
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(message)
                    .context("parsing the RTM_GETROUTE answer")?;
                if message.header.sequence_number != sequence {
                    continue; // an answer to an earlier question
                }
                match message.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => {
                        let oif = r.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Oif(i) => Some(*i),
                            _ => None,
                        });
                        return Ok(oif);
                    }
                    NetlinkPayload::Error(e) => match e.code.map(|c| -c.get()) {
                        None => bail!("the kernel acknowledged without a route"),
                        Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => return Ok(None),
                        Some(errno) => {
                            return Err(std::io::Error::from_raw_os_error(errno))
                                .context("the kernel refused RTM_GETROUTE")
                        }
                    },
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_useless_answer_is_said_once() {
        let attached: BTreeSet<u32> = [2, 3].into();
        let (a, b, c) = (ip("10.2.0.11"), ip("10.2.0.12"), ip("10.2.0.13"));
        let current: BTreeSet<IpAddr> = [a, b, c].into();
        let mut r = RouteAnswers::default();
        let notes = r.record(
            [
                (a, Answer::Via(3)),
                (b, Answer::NoRoute),
                (c, Answer::Via(1)), // lo: not attached
            ],
            &current,
            &attached,
        );
        assert_eq!(
            notes,
            [
                RouteNote::Useless {
                    addr: b,
                    answer: Answer::NoRoute
                },
                RouteNote::Useless {
                    addr: c,
                    answer: Answer::Via(1)
                },
            ]
        );
        assert_eq!(r.egress(), [(a, 3), (c, 1)].into());
        // The periodic re-check: the same answers (or another useless one) say nothing.
        let notes = r.record(
            [
                (a, Answer::Via(3)),
                (b, Answer::Failed("timed out".into())),
                (c, Answer::Via(1)),
            ],
            &current,
            &attached,
        );
        assert!(notes.is_empty(), "{notes:?}");
        // A route appears, another moves, one goes away.
        let notes = r.record(
            [
                (a, Answer::NoRoute),
                (b, Answer::Via(2)),
                (c, Answer::Via(3)),
            ],
            &current,
            &attached,
        );
        assert_eq!(
            notes,
            [
                RouteNote::Useless {
                    addr: a,
                    answer: Answer::NoRoute
                },
                RouteNote::Routed {
                    addr: b,
                    ifindex: 2
                },
                RouteNote::Routed {
                    addr: c,
                    ifindex: 3
                },
            ]
        );
        // A deregistered address is forgotten, and a late answer for it ignored.
        let current: BTreeSet<IpAddr> = [b, c].into();
        assert!(r
            .record([(a, Answer::Via(2))], &current, &attached)
            .is_empty());
        assert_eq!(r.egress(), [(b, 2), (c, 3)].into());
        assert_eq!(r.missing(&[a, b].into()), [a]);
    }

    /// The real lookup needs no privileges: every network namespace routes its loopback
    /// addresses out of `lo`.
    #[test]
    fn netlink_lookup_finds_loopback_out_of_lo() {
        let lo = {
            let name = std::ffi::CString::new("lo").unwrap();
            // SAFETY: a NUL-terminated name.
            unsafe { libc::if_nametoindex(name.as_ptr()) }
        };
        assert_ne!(lo, 0, "no lo");
        let mut routes = NetlinkRoutes::default();
        assert_eq!(routes.egress(ip("127.0.0.1")).unwrap(), Some(lo));
        // The same socket serves the next question.
        assert_eq!(routes.egress(ip("127.0.0.2")).unwrap(), Some(lo));
        if std::path::Path::new("/proc/sys/net/ipv6/conf/lo").exists() {
            assert_eq!(routes.egress(ip("::1")).unwrap(), Some(lo));
        }
    }
}
