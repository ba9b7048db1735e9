//! Command-line definitions (clap only; the work happens in `commands`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tclseg::model::{DeviceChoice, EngineOptions, Precision, Processing};
use tclseg::sink::overlay::OverlayFormat;

#[derive(Debug, Parser)]
#[command(
    name = "tclseg",
    version,
    about = "Segment anything you can name, in live video and image folders (TCL)"
)]
pub struct Cli {
    /// Log filter (tracing syntax), e.g. `debug` or `tclseg=debug,ort=info`.
    #[arg(
        long,
        global = true,
        env = "TCLSEG_LOG",
        default_value = "info,ort=error"
    )]
    pub log: String,

    /// Log line format: text (for terminals and journald) or json (one object per line).
    #[arg(long, global = true, env = "TCLSEG_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the streaming daemon: pipelines from a config file (see pipelines/), HTTP control on localhost,
    /// reload on SIGHUP, graceful drain on SIGTERM, systemd notify and watchdog.
    Serve(ServeArgs),
    /// Segment images, folders and globs with text queries: label PNGs, overlays, JSON sidecars.
    Segment(SegmentArgs),
    /// Train TCL on image–caption data (torchrun), then export and verify a bundle.
    Train(TrainArgs),
    /// The paper's 8-dataset mIoU protocol on the deployment code path (or your own labelled folder).
    Eval(EvalArgs),
    /// Model bundles: export, verify, list.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Show what a source offers (codecs, resolution, frame rate) without configuring a pipeline.
    Probe {
        /// A source URI as a pipeline would take it (rtsp://, http(s)://, file:///, v4l2:///).
        uri: String,
        /// Seconds to wait for the streams.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Pipeline configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Combine the reports of a sharded `segment` (`segment-report.<I>-of-<N>.json` in its --out): totals, and
    /// which shards are missing, did not finish or left images undone (exit status 1 when any is).
    MergeReports(MergeReportsArgs),
}

#[derive(Debug, Args)]
pub struct MergeReportsArgs {
    /// The folder the shards wrote to (their common --out).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// The number of shards of the split (default: the one the folder's reports name).
    #[arg(long, value_name = "N")]
    pub shards: Option<u32>,
}

/// `--shard` and `--shards` for a batch command (`segment`, `eval`).
#[derive(Debug, Args)]
pub struct BatchShardArgs {
    /// Take only shard I of N of the inputs (I counts from 0), chosen by a hash of each image's path under its
    /// folder, so adding files moves no other; `auto`: I from JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) or
    /// SLURM_ARRAY_TASK_ID (a Slurm job array).
    #[arg(long, value_name = "I/N|auto")]
    pub shard: Option<String>,
    /// The number of shards, for --shard auto (default: SLURM_ARRAY_TASK_COUNT; a Kubernetes Job needs it).
    #[arg(long, value_name = "N", requires = "shard")]
    pub shards: Option<u32>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training config (TOML; see trainer/configs/).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Processes (GPUs) on this node; on a CPU-only machine, CPU processes (gloo).
    #[arg(long, default_value_t = 1)]
    pub gpus: usize,
    /// Continue from the newest checkpoint in the config's checkpoint.dir.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many more steps (a short run; the schedule still follows optim.steps).
    #[arg(long, value_name = "N")]
    pub max_steps: Option<u64>,
    /// Bundle folder to export to after training (default: <checkpoint.dir>/bundle).
    #[arg(long, value_name = "DIR")]
    pub export: Option<PathBuf>,
    /// Train only; no export.
    #[arg(long)]
    pub no_export: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["dataset", "suite"])))]
pub struct EvalArgs {
    /// voc, context, coco_object, voc20, context59, coco_stuff, cityscapes, ade20k, or folder.
    #[arg(long)]
    pub dataset: Option<String>,
    /// `paper`: all eight datasets in a row, then the paper's summary table.
    #[arg(long)]
    pub suite: Option<String>,
    /// The data root in mmsegmentation's layout (for `folder`: the folder with images/, labels/, classes.txt).
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// Model bundle folder (default: as for `segment`).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub refine: RefineArgs,
    /// Score only the first N images of each split.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Write the JSON report here (temp file + rename).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Score saved predictions (`<DIR>/<id>.png`, class indices) instead of running the model.
    #[arg(long, value_name = "DIR")]
    pub predictions: Option<PathBuf>,
    /// Save each prediction as `<DIR>/<id>.png` (class indices).
    #[arg(long, value_name = "DIR")]
    pub save_predictions: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Decoder threads.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    // Scores only a share of each split (see `segment --shard`); the mIoU is then of that share: save the
    // shards' predictions in one folder and score them together with --predictions.
    #[command(flatten)]
    pub shard: BatchShardArgs,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a daemon config without starting anything; every problem is listed with its location.
    Check {
        /// The config file (TOML).
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The config file (TOML; see pipelines/ for examples).
    #[arg(long, short = 'c', env = "TCLSEG_CONFIG", value_name = "FILE")]
    pub config: PathBuf,
    /// Run only shard I of N of the config's pipelines (I counts from 0), chosen by a hash of each pipeline's
    /// name, so one config serves a fleet and each camera has one owner; `auto`: I from the number at the end
    /// of the host name, as a Kubernetes StatefulSet names its pods (tclseg-3 → 3).
    #[arg(long, env = "TCLSEG_SHARD", value_name = "I/N|auto")]
    pub shard: Option<String>,
    /// The number of shards, for --shard auto (the StatefulSet's replicas).
    #[arg(long, env = "TCLSEG_SHARDS", value_name = "N")]
    pub shards: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// List the bundles found in model folders.
    List {
        /// Folders to search (default: $TCLSEG_MODELS, colon-separated, then ./models).
        #[arg(long = "dir")]
        dirs: Vec<PathBuf>,
    },
    /// Check a bundle: manifest, every file's sha256, every graph loads, one crop runs through all graphs.
    Verify {
        /// The bundle folder (the one holding model.toml).
        dir: PathBuf,
        /// Which precision to run the crop at; `all` runs each precision the bundle has.
        #[arg(long, value_enum, default_value_t = PrecisionArg::All)]
        precision: PrecisionArg,
        /// ONNX Runtime intra-op threads (0: ONNX Runtime's default, one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Export a bundle (drives the Python trainer): from the official files, a trainer checkpoint, or random
    /// weights of a named size.
    Export(ExportArgs),
    /// Time the engine on the same images at several batch sizes: one JSON object per batch size on stdout.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model bundle folder (default: as for `segment`).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Image files, folders (searched recursively) and glob patterns; a batch cycles through them.
    #[arg(long, required = true, num_args = 1.., value_name = "PATH")]
    pub images: Vec<String>,
    /// A thing to segment (repeat for more; default: red square, blue circle, green triangle).
    #[arg(
        short = 'q',
        long = "query",
        value_name = "NAME",
        conflicts_with = "queries"
    )]
    pub query: Vec<String>,
    /// A TOML file of queries, as for `segment`.
    #[arg(long, value_name = "FILE")]
    pub queries: Option<PathBuf>,
    /// Images per engine call, comma-separated; each size is timed in turn.
    #[arg(long, value_name = "LIST", default_value = "1,8,32")]
    pub batch: String,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Untimed calls before the timed ones, per batch size.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub warmup: usize,
    /// Timed calls per batch size.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub iterations: usize,
    #[command(flatten)]
    pub refine: RefineArgs,
    /// Also time this head of the bundle (e.g. `tcl`; its own threshold, PAMR as --pamr/--no-pamr say, else its
    /// default) on the same batches, call by call in turn with --head's, and report --head's crops/s as a ratio to it (`crops_per_s_ratio`): measured in the
    /// same run, the ratio holds where a shared machine's load moves the absolute figures.
    #[arg(long, value_name = "HEAD")]
    pub against: Option<String>,
    /// Before timing each batch size, segment every image once (untimed) and write its label map as
    /// `<DIR>/b<batch>/<image>.png`, the label PNG `segment` writes (class indices; 0 is background).
    #[arg(long, value_name = "DIR")]
    pub save_labels: Option<PathBuf>,
    /// Refuse images with more pixels than this (checked from the header, before decoding).
    #[arg(long, value_name = "PIXELS", default_value_t = 100_000_000)]
    pub max_pixels: u64,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["random", "clip", "checkpoint"])))]
pub struct ExportArgs {
    /// Random weights of a named size (`vit-b16`: the official shapes; `tiny`: for tests).
    #[arg(long, value_name = "SIZE")]
    pub random: Option<String>,
    /// Seed for --random.
    #[arg(long, requires = "random", default_value_t = 0)]
    pub seed: u64,
    /// OpenAI's CLIP ViT-B/16 file (ViT-B-16.pt). Alone it gives the training-free heads; with --tcl, TCL too.
    #[arg(long, value_name = "FILE")]
    pub clip: Option<PathBuf>,
    /// The official TCL checkpoint (tcl.pth); needs --clip. Adds the TCL head.
    #[arg(long, value_name = "FILE", requires = "clip")]
    pub tcl: Option<PathBuf>,
    /// Heads on the shared trunk, comma-separated, the first the bundle's default: tcl, maskclip, sclip,
    /// clearclip, naclip, pearl (default: tcl; with --clip alone, every training-free head).
    #[arg(long, value_name = "LIST")]
    pub heads: Option<String>,
    /// Accept a --clip file whose sha256 is not OpenAI's ViT-B/16 (a re-hosted copy, a fine-tuned CLIP). Its
    /// weights are then vouched for by nobody; the bundle records `clip_verified = false` and the file's sha256.
    #[arg(long, requires = "clip")]
    pub allow_unverified_clip: bool,
    /// A checkpoint written by `tclseg train`.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// Output folder (created; written to a temporary folder and renamed, never half a bundle).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Bundle name (default: the output folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Precisions of the image graphs, comma-separated: fp32 (always), fp16, int8 (quantized from fp32).
    #[arg(long, default_value = "fp32,fp16")]
    pub precision: String,
    /// Replace an existing bundle at --out.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("query_source").required(true).args(["query", "queries"])))]
pub struct SegmentArgs {
    /// Image files, folders (searched recursively) and glob patterns.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<String>,
    /// A thing to segment (repeat for more); label k is the k-th query, 0 is background.
    #[arg(short = 'q', long = "query", value_name = "NAME")]
    pub query: Vec<String>,
    /// A TOML file of queries with prompts, colours, thresholds and background prompts.
    #[arg(long, value_name = "FILE")]
    pub queries: Option<PathBuf>,
    /// Output folder; outputs mirror the input tree.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Model bundle folder (default: $TCLSEG_MODEL, else models/default, else the built-in synthetic-shapes model).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Outputs per image, comma-separated: labels, overlay, json, scores.
    #[arg(long, default_value = "labels,overlay,json")]
    pub format: String,
    /// Overlay image format.
    #[arg(long, value_enum, default_value_t = OverlayFormat::Jpeg)]
    pub overlay_format: OverlayFormat,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub refine: RefineArgs,
    /// Weight of the raw MaskCLIP ("kp") masks in the blend (default: the bundle's, 0.3).
    #[arg(long, value_name = "WEIGHT")]
    pub kp_weight: Option<f32>,
    /// Images per inference call (their crops run together).
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Image decoder threads.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Redo images whose outputs exist and are newer than the image.
    #[arg(long)]
    pub force: bool,
    /// Stop after this many images failed.
    #[arg(long, value_name = "N")]
    pub max_failures: Option<usize>,
    /// Refuse images with more pixels than this (checked from the header, before decoding).
    #[arg(long, value_name = "PIXELS", default_value_t = 100_000_000)]
    pub max_pixels: u64,
    // Shards write `segment-report.<I>-of-<N>.json`; `tclseg merge-reports OUT` combines them.
    #[command(flatten)]
    pub shard: BatchShardArgs,
}

/// Where and how the model runs, shared by `segment`, `eval` and `models bench`.
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Execution device: auto tries CUDA and falls back to the CPU (logged); cuda and tensorrt refuse to run
    /// without it.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Precision of the image graphs: int8 (CPU; needs int8 graphs in the bundle), bf16 (ARM64 CPUs only), auto
    /// (from the CPU's flags and the graphs the bundle holds: int8 on AVX2/VNNI/AMX CPUs, fp16 on a GPU).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Crops per ONNX Runtime run, across images (0: 1 on the CPU, where bigger batches only cost memory; on a
    /// GPU all windows of a call's images, at most 32 under TensorRT).
    #[arg(long, default_value_t = 0)]
    pub crop_batch: usize,
    /// ONNX Runtime intra-op threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where resizing, windows, averaging and argmax run: on the host (native; the CPU default) or on the
    /// device beside the model, with tensors kept there (the GPU default). Both give the same labels.
    #[arg(long, value_enum, default_value_t = Processing::Auto)]
    pub processing: Processing,
}

impl EngineArgs {
    /// The engine's options; `spin`: idle threads busy-wait (right for a command that keeps the cores busy).
    pub fn options(&self) -> EngineOptions {
        EngineOptions {
            device: self.device,
            precision: self.precision,
            threads: self.threads,
            crop_batch: self.crop_batch,
            spin: true,
            processing: self.processing,
        }
    }
}

/// PAMR and the background threshold, shared by `segment` and `eval`.
#[derive(Debug, Args)]
pub struct RefineArgs {
    /// Refine masks with PAMR (the paper's setting).
    #[arg(long, overrides_with = "no_pamr")]
    pub pamr: bool,
    /// Skip PAMR (faster; background threshold default becomes the bundle's no-PAMR value).
    #[arg(long)]
    pub no_pamr: bool,
    /// Background threshold (default: the bundle's, 0.4 with PAMR and 0.5 without; a training-free head's
    /// probability threshold, 0 unless its [heads] table says otherwise).
    #[arg(long, value_name = "SCORE")]
    pub bg_thresh: Option<f32>,
    /// The bundle head that scores the classes: tcl, maskclip, sclip, clearclip, naclip, pearl (default: the
    /// bundle's default head; `tclseg models info` lists a bundle's heads).
    #[arg(long, value_name = "NAME")]
    pub head: Option<String>,
    /// The evaluation protocol: `tcl` (default: the bundle's own input, prompts and scoring, for every head) or
    /// a training-free method's own (naclip, sclip, clearclip, maskclip, pearl: its window and stride, scale,
    /// CLIP's normalisation, the 80 ImageNet templates, its logit scale and threshold, logits fused over
    /// windows), which runs that method's head. An unknown name is refused with the bundle's protocols listed.
    #[arg(long, value_name = "NAME")]
    pub protocol: Option<String>,
}

impl RefineArgs {
    /// PAMR as asked: on with --pamr, off with --no-pamr, else the head's default (TCL: on).
    pub fn pamr_override(&self) -> Option<bool> {
        if self.no_pamr {
            Some(false)
        } else if self.pamr {
            Some(true)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    All,
    Fp32,
    Fp16,
    Int8,
}
