//! Evaluation (`tclseg eval`): the paper's unified mIoU protocol (tcl.md §5) on the deployment code path — the
//! same engine, preprocessing and sliding window that `segment` and `serve` use.
//!
//! `datasets` knows the eight datasets' layouts, class lists and background handling (and `folder` for users'
//! own data); `run` scores one dataset; `metrics` is mmseg's mIoU; `report` formats tables.

pub mod datasets;
pub mod metrics;
pub mod report;
pub mod run;
