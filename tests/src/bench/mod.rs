//! The pieces of `cargo xtask bench` (the `lb-bench` binary): end to end against nftables DNAT
//! and HAProxy, control-plane figures, map-writing figures, and the failover picture.

pub mod control;
pub mod e2e;
pub mod forward;
pub mod maps;
pub mod packet;
pub mod plot;

/// A consistent-hash table spec as the agent makes one (`state::desired`): targets `ids` at
/// `addr(id)`:8080, weight 1, sorted by identity, `size` slots, seed 0. The agent's
/// `reconcile::build_table` builds it.
pub(crate) fn table_spec(
    ids: impl IntoIterator<Item = u32>,
    addr: impl Fn(u32) -> std::net::IpAddr,
    size: u32,
) -> lb_userspace::state::TableSpec {
    let mut members: Vec<lb_userspace::state::Member> = ids
        .into_iter()
        .map(|id| lb_userspace::state::Member {
            target_id: id,
            identity: lb_userspace::state::identity(addr(id), 8080),
            weight: 1,
        })
        .collect();
    members.sort_by(|a, b| a.identity.cmp(&b.identity));
    lb_userspace::state::TableSpec {
        flags: 0,
        size,
        seed: 0,
        members,
    }
}
