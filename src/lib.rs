//! tclseg: open-vocabulary segmentation with TCL (CVPR 2023).
//!
//! The library holds everything the `tclseg` binary's subcommands are thin wrappers over. Imports run downward
//! through floors (lowest first): `telemetry`, `gst`, `trainer`, `shard` → `model` → `queries`, `source` → `sink`, `events` →
//! `config` → `pipeline`, `segment`, `eval`, `bench` → `daemon`; `tests/layering.rs` checks them. See
//! ARCHITECTURE.md for the data flow and a table of where each concern lives.

pub mod bench;
pub mod config;
pub mod daemon;
pub mod eval;
pub mod events;
pub mod gst;
pub mod model;
pub mod pipeline;
pub mod queries;
pub mod segment;
pub mod shard;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod trainer;
