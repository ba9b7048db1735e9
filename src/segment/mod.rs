//! The `segment` command's runner (`tclseg segment`): image files and folders in, label maps, overlays and JSON out.
//!
//! Threads: `jobs` decoder threads read images into a bounded queue; the calling thread owns the engine and
//! segments images in batches (their crops share ONNX Runtime runs); one writer thread encodes and writes the
//! outputs. Every queue is bounded, so a slow disk or a slow model holds the readers back instead of filling
//! memory. A failure is recorded against its image and the run goes on.
//!
//! With a shard (`--shard I/N`) a run takes only its share of the inputs and writes its own report; `merge`
//! reads a split's reports back together.

mod merge;
mod run;

pub use merge::{merge_reports, Merged};
pub use run::{report_name, run, Outcome, OutputKinds, Progress, SegmentJob, Summary};
