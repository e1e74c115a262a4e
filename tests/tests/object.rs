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

/// Successive publishes (which write only the slots that differ from what the inactive half
/// holds) always leave exactly the new table live, whatever the sizes.
#[test]
fn published_tables_read_back_exactly() {
    let mut ebpf = dataplane::load(MapSizes {
        flow_table: 1024,
        table_slots: 4096,
    })
    .expect("load");
    let mut maps = lb_userspace::maps::KernelMaps::new(&mut ebpf).expect("maps");
    let tables: Vec<Vec<u32>> = vec![
        (0..97).map(|i| i % 3).collect(),
        (0..97).map(|i| i % 4).collect(),
        (0..97).map(|i| if i == 50 { 9 } else { i % 3 }).collect(),
        (0..97).map(|i| i % 4).collect(),
        (0..31).map(|i| i % 2).collect(),
        vec![],
        (0..97).map(|i| i % 5).collect(),
    ];
    for (n, t) in tables.iter().enumerate() {
        maps.publish_table(7, 0, t).expect("publish");
        assert_eq!(&maps.active_table(7).expect("read"), t, "publish {n}");
    }
}
