//! The eight datasets of the paper's unified protocol (tcl.md §5), each read in the layout mmsegmentation
//! documents under one data root, plus `folder` for users' own data. Class names are mmseg's, verbatim
//! (`classes/*.txt`, one per line; ADE's 'bed ' keeps its trailing space).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// How a dataset treats background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    /// Class 0 is "background", predicted where no query beats the threshold (VOC, Context, COCO-Object).
    Threshold,
    /// No background class (label 255 pixels are ignored).
    None,
}

/// Where images and labels live under the data root.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub images: &'static str,
    pub labels: &'static str,
    /// A split file listing image stems; None: every image under `images` (recursively).
    pub split: Option<&'static str>,
    pub image_suffix: &'static str,
    pub label_suffix: &'static str,
}

#[derive(Debug, Clone, Copy)]
pub struct DatasetSpec {
    pub key: &'static str,
    /// Column title in the paper's table.
    pub title: &'static str,
    pub layout: Layout,
    classes: &'static str,
    /// Keep only the first n classes of the list (COCO-Object: background + the 80 things).
    prefix: Option<usize>,
    /// Prepend "background" to the list (COCO-Object).
    add_background: bool,
    /// Drop the list's first class, "background" (VOC20, Context59).
    drop_first: bool,
    pub background: Background,
    /// mmseg's reduce_zero_label: 0 → ignore, k → k−1.
    pub reduce_zero_label: bool,
}

const VOC: &str = include_str!("classes/voc.txt");
const CONTEXT: &str = include_str!("classes/context.txt");
const COCO_STUFF: &str = include_str!("classes/coco_stuff.txt");
const CITYSCAPES: &str = include_str!("classes/cityscapes.txt");
const ADE20K: &str = include_str!("classes/ade20k.txt");

const VOC_LAYOUT: Layout = Layout {
    images: "VOCdevkit/VOC2012/JPEGImages",
    labels: "VOCdevkit/VOC2012/SegmentationClass",
    split: Some("VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"),
    image_suffix: ".jpg",
    label_suffix: ".png",
};
const CONTEXT_LAYOUT: Layout = Layout {
    images: "VOCdevkit/VOC2010/JPEGImages",
    labels: "VOCdevkit/VOC2010/SegmentationClassContext",
    split: Some("VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"),
    image_suffix: ".jpg",
    label_suffix: ".png",
};

/// The paper's column order.
pub const PAPER_SUITE: [&str; 8] = [
    "voc",
    "context",
    "coco_object",
    "voc20",
    "context59",
    "coco_stuff",
    "cityscapes",
    "ade20k",
];

/// The paper's numbers for TCL with PAMR (tcl.md §6.1), in `PAPER_SUITE` order, then the average.
pub const PAPER_TCL_PAMR: [f64; 9] = [55.0, 30.4, 31.6, 83.2, 33.9, 22.4, 24.0, 17.1, 37.2];

pub const DATASETS: [DatasetSpec; 8] = [
    DatasetSpec {
        key: "voc",
        title: "VOC",
        layout: VOC_LAYOUT,
        classes: VOC,
        prefix: None,
        add_background: false,
        drop_first: false,
        background: Background::Threshold,
        reduce_zero_label: false,
    },
    DatasetSpec {
        key: "context",
        title: "Context",
        layout: CONTEXT_LAYOUT,
        classes: CONTEXT,
        prefix: None,
        add_background: false,
        drop_first: false,
        background: Background::Threshold,
        reduce_zero_label: false,
    },
    DatasetSpec {
        key: "coco_object",
        title: "Object",
        layout: Layout {
            images: "coco_stuff164k/images/val2017",
            labels: "coco_stuff164k/annotations/val2017",
            split: None,
            image_suffix: ".jpg",
            label_suffix: "_instanceTrainIds.png",
        },
        classes: COCO_STUFF,
        prefix: Some(80),
        add_background: true,
        drop_first: false,
        background: Background::Threshold,
        reduce_zero_label: false,
    },
    DatasetSpec {
        key: "voc20",
        title: "VOC20",
        layout: VOC_LAYOUT,
        classes: VOC,
        prefix: None,
        add_background: false,
        drop_first: true,
        background: Background::None,
        reduce_zero_label: true,
    },
    DatasetSpec {
        key: "context59",
        title: "Context59",
        layout: CONTEXT_LAYOUT,
        classes: CONTEXT,
        prefix: None,
        add_background: false,
        drop_first: true,
        background: Background::None,
        reduce_zero_label: true,
    },
    DatasetSpec {
        key: "coco_stuff",
        title: "Stuff",
        layout: Layout {
            images: "coco_stuff164k/images/val2017",
            labels: "coco_stuff164k/annotations/val2017",
            split: None,
            image_suffix: ".jpg",
            label_suffix: "_labelTrainIds.png",
        },
        classes: COCO_STUFF,
        prefix: None,
        add_background: false,
        drop_first: false,
        background: Background::None,
        reduce_zero_label: false,
    },
    DatasetSpec {
        key: "cityscapes",
        title: "City",
        layout: Layout {
            images: "cityscapes/leftImg8bit/val",
            labels: "cityscapes/gtFine/val",
            split: None,
            image_suffix: "_leftImg8bit.png",
            label_suffix: "_gtFine_labelTrainIds.png",
        },
        classes: CITYSCAPES,
        prefix: None,
        add_background: false,
        drop_first: false,
        background: Background::None,
        reduce_zero_label: false,
    },
    DatasetSpec {
        key: "ade20k",
        title: "ADE",
        layout: Layout {
            images: "ade/ADEChallengeData2016/images/validation",
            labels: "ade/ADEChallengeData2016/annotations/validation",
            split: None,
            image_suffix: ".jpg",
            label_suffix: ".png",
        },
        classes: ADE20K,
        prefix: None,
        add_background: false,
        drop_first: false,
        background: Background::None,
        reduce_zero_label: true,
    },
];

/// One class: its name and the prompts to embed (empty: the bundle's templates around the name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassDef {
    pub name: String,
    pub prompts: Vec<String>,
}

/// A dataset ready to read: classes, background handling, and the (image, label) pairs in order.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub key: String,
    pub classes: Vec<ClassDef>,
    pub background: Background,
    pub reduce_zero_label: bool,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Identifies the sample in reports and prediction files: the path relative to the image folder, without the
    /// image suffix.
    pub id: String,
    pub image: PathBuf,
    pub label: PathBuf,
}

pub fn spec(key: &str) -> Option<&'static DatasetSpec> {
    DATASETS.iter().find(|d| d.key == key)
}

impl DatasetSpec {
    pub fn class_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .classes
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect();
        if let Some(n) = self.prefix {
            names.truncate(n);
        }
        if self.add_background {
            names.insert(0, "background".into());
        }
        if self.drop_first {
            names.remove(0);
        }
        names
    }

    /// Finds the samples under `root` (the mmseg data root).
    pub fn open(&self, root: &Path) -> Result<Dataset> {
        let expected = || {
            format!(
                "expected the mmsegmentation layout under {}: {}/ (images *{}) and {}/ (labels *{}){}",
                root.display(),
                self.layout.images,
                self.layout.image_suffix,
                self.layout.labels,
                self.layout.label_suffix,
                self.layout
                    .split
                    .map(|s| format!(" and the split file {s}"))
                    .unwrap_or_default()
            )
        };
        let images = root.join(self.layout.images);
        let labels = root.join(self.layout.labels);
        for dir in [&images, &labels] {
            if !dir.is_dir() {
                bail!(
                    "dataset '{}': {} is not a folder; {}",
                    self.key,
                    dir.display(),
                    expected()
                );
            }
        }
        let ids = match self.layout.split {
            Some(split) => read_split(&root.join(split)).with_context(expected)?,
            None => list_ids(&images, self.layout.image_suffix)?,
        };
        if ids.is_empty() {
            bail!("dataset '{}': no images found; {}", self.key, expected());
        }
        let samples = ids
            .into_iter()
            .map(|id| Sample {
                image: images.join(format!("{id}{}", self.layout.image_suffix)),
                label: labels.join(format!("{id}{}", self.layout.label_suffix)),
                id,
            })
            .collect();
        Ok(Dataset {
            key: self.key.to_string(),
            classes: self
                .class_names()
                .into_iter()
                .map(|name| ClassDef {
                    name,
                    prompts: Vec::new(),
                })
                .collect(),
            background: self.background,
            reduce_zero_label: self.reduce_zero_label,
            samples,
        })
    }
}

/// A split file: one image stem per line.
fn read_split(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the split file {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Every file under `dir` ending in `suffix`, as its relative path without the suffix, sorted.
fn list_ids(dir: &Path, suffix: &str) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(rel) = path
                .strip_prefix(dir)
                .ok()
                .and_then(|r| r.to_str())
                .and_then(|r| r.strip_suffix(suffix))
            {
                ids.push(rel.to_string());
            }
        }
    }
    ids.sort();
    Ok(ids)
}

/// `--dataset folder`: `<root>/images/*.{jpg,png,...}`, `<root>/labels/<stem>.png` and `<root>/classes.txt`.
///
/// `classes.txt` has one class per line, in label order: `name`, or `name: prompt one; prompt two`. A first
/// class named `background` (without prompts) makes it a with-background dataset (threshold); `#` starts a
/// comment line.
pub fn open_folder(root: &Path) -> Result<Dataset> {
    let class_file = root.join("classes.txt");
    let text = std::fs::read_to_string(&class_file).with_context(|| {
        format!(
            "cannot read {} (one class per line, `name` or `name: prompt; prompt`)",
            class_file.display()
        )
    })?;
    let mut classes = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, prompts) = match line.split_once(':') {
            Some((name, prompts)) => (
                name.trim(),
                prompts
                    .split(';')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect(),
            ),
            None => (line, Vec::new()),
        };
        if name.is_empty() {
            bail!(
                "{} line {}: a class needs a name",
                class_file.display(),
                n + 1
            );
        }
        classes.push(ClassDef {
            name: name.to_string(),
            prompts,
        });
    }
    if classes.is_empty() || classes.len() > 255 {
        bail!(
            "{}: {} classes; give 1 to 255 (label values 0..254; 255 means ignore)",
            class_file.display(),
            classes.len()
        );
    }
    let background = if classes[0].name == "background" && classes[0].prompts.is_empty() {
        Background::Threshold
    } else {
        Background::None
    };
    let images = root.join("images");
    let labels = root.join("labels");
    for dir in [&images, &labels] {
        if !dir.is_dir() {
            bail!(
                "dataset folder {}: {} is missing; expected images/, labels/ (a <stem>.png per image) and classes.txt",
                root.display(),
                dir.display()
            );
        }
    }
    let mut samples = Vec::new();
    for input in crate::source::inputs::expand(&[images.display().to_string()])? {
        let id = input.relative.with_extension("").display().to_string();
        samples.push(Sample {
            label: labels.join(format!("{id}.png")),
            image: input.path,
            id,
        });
    }
    if samples.is_empty() {
        bail!(
            "dataset folder {}: no images in {}",
            root.display(),
            images.display()
        );
    }
    Ok(Dataset {
        key: "folder".into(),
        classes,
        background,
        reduce_zero_label: false,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_lists_match_the_protocol() {
        let count = |k: &str| spec(k).expect(k).class_names().len();
        assert_eq!(PAPER_SUITE.map(count), [21, 60, 81, 20, 59, 171, 19, 150]);
        let ade = spec("ade20k").expect("ade").class_names();
        assert_eq!(
            ade[7], "bed ",
            "ADE's trailing space is part of the protocol"
        );
        let object = spec("coco_object").expect("obj").class_names();
        assert_eq!(
            (object[0].as_str(), object[80].as_str()),
            ("background", "toothbrush")
        );
        // mmseg's Pascal Context list is alphabetical after background, as its converted labels are.
        let context59 = spec("context59").expect("ctx59").class_names();
        assert_eq!(&context59[..4], ["aeroplane", "bag", "bed", "bedclothes"]);
        assert_eq!(context59[58], "wood");
        let voc20 = spec("voc20").expect("voc20").class_names();
        assert_eq!(
            (voc20[0].as_str(), voc20[19].as_str()),
            ("aeroplane", "tvmonitor")
        );
    }
}
