//! Ferry's node agent data plane (crate docs are completed below).

pub mod abi;
pub mod begin;
pub mod cmdline;
pub mod confirm;
pub mod cookie;
pub mod domain;
pub mod error;
pub mod finish;
pub mod node;
pub mod perform;
pub mod phases;
pub mod prepare;
pub mod qmp;
pub mod supervisor;
mod xml;

pub use xml::XmlError;
