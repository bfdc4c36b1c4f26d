//! Ferry's node agent data plane (crate docs are completed below).

pub mod abi;
pub mod cookie;
pub mod domain;
pub mod node;
pub mod phases;
mod xml;

pub use xml::XmlError;
