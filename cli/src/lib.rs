//! `kubectl ferry`: the parts of the plugin beyond argument parsing, unit-tested.
//!
//! - [`console`]: the VNC console on a local port, bridged to the API server's stream.
//! - [`objects`]: arguments → the objects and patches it sends.
//! - [`render`]: a migration's status → the progress line and the outcome; which
//!   migration a name designates.
//! - [`evac`]: where an evacuation stands.

pub mod console;
pub mod evac;
pub mod objects;
pub mod render;
