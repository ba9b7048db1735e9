//! tclseg: open-vocabulary segmentation with TCL (CVPR 2023).
//!
//! The library holds everything the `tclseg` binary's subcommands are thin wrappers over. Imports run downward:
//! commands → `trainer`, `model`. See ARCHITECTURE.md for the data flow and where each concern lives.

pub mod batch;
pub mod config;
pub mod daemon;
pub mod eval;
pub mod events;
pub mod gst;
pub mod model;
pub mod pipeline;
pub mod queries;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod trainer;
