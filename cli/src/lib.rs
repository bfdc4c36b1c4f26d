//! `kubectl ferry`: the pure parts of the plugin, unit-tested.
//!
//! - [`objects`]: arguments → the objects and patches it sends.
//! - [`render`]: a migration's status → the progress line and the outcome; which
//!   migration a name designates.
//! - [`evac`]: where an evacuation stands.

pub mod evac;
pub mod objects;
pub mod render;
