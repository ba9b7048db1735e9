//! Evaluation (`tclseg eval`, issue #6): the paper's mIoU protocol on the deployment code path. So far only the
//! metric itself lives here; the dataset readers and the command follow.

pub mod metrics;
