//! Writers for segmentation results: label PNGs, colour overlays, JSON sidecars with COCO RLE. Every file is
//! written to a temporary sibling and renamed into place, so a reader (or a crash) never sees half a file and
//! an earlier result is never damaged; `encode` encodes one image's outputs and `files` writes them as one unit.

pub mod atomic;
pub mod encode;
pub mod files;
pub mod frame_numbers;
pub mod label_png;
pub mod overlay;
pub mod paths;
pub mod retention;
pub mod rle;
pub mod sidecar;
pub mod template;
pub mod video;

pub use atomic::write_atomic;
