//! The built object: it passes the verifier on this kernel and defines every map lb-common names.

use lb_common::maps::ALL_MAPS;
use lb_userspace::dataplane::{self, MapSizes};

#[test]
fn every_map_name_resolves_in_the_loaded_object() {
    let ebpf = dataplane::load(MapSizes {
        flow_table: 1024,
        table_slots: 4096,
    })
    .expect("load");
    for name in ALL_MAPS {
        assert!(ebpf.map(name).is_some(), "map {name} not in the object");
    }
    let in_object: Vec<&str> = ebpf
        .maps()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("LB_"))
        .collect();
    for name in &in_object {
        assert!(
            ALL_MAPS.contains(name),
            "object map {name} not named in lb-common"
        );
    }
}
