//! The agent's library: loading the data plane and writing its maps. The `lb-agent` binary and
//! the tests use the same code.

pub mod dataplane;
pub mod maps;
