//! Where pipelines write and read, checked across the whole config: each output folder must be a pipeline's own
//! (retention and the temp sweep act on everything under it), and no output folder may lie in a watched folder
//! (its outputs would come back as new images, forever). Folders are compared resolved (`sink::paths`): `..`,
//! symlinks and whole components, so `/x/../same` is `/same` and `same/sub` is inside `same`.

use std::path::PathBuf;

use crate::sink::paths::{overlap, Overlap};

/// One pipeline's folders, gathered during validation.
pub(crate) struct PipelinePaths {
    /// Where it is in the file, e.g. `pipeline[1] 'inbox'`.
    pub at: String,
    pub name: String,
    pub output: PathBuf,
    /// A `folder://` source's folder.
    pub watched: Option<PathBuf>,
    /// A `file://` source's file, when the pipeline deletes old outputs (retention would delete it too).
    pub file_under_retention: Option<PathBuf>,
}

/// Appends an error per overlap.
pub(crate) fn check(pipelines: &[PipelinePaths], errors: &mut Vec<String>) {
    for (j, p) in pipelines.iter().enumerate() {
        for other in &pipelines[..j] {
            let how = match overlap(&p.output, &other.output) {
                None => continue,
                Some(Overlap::Same) => "is the same folder as",
                Some(Overlap::Inside) => "is inside",
                Some(Overlap::Contains) => "contains",
            };
            errors.push(format!(
                "{}.output.dir: {} {how} {}, the output.dir of pipeline '{}'; give each pipeline a folder of its \
                 own, outside the others' (retention and the temp sweep act on a whole output folder)",
                p.at,
                p.output.display(),
                other.output.display(),
                other.name
            ));
        }
    }
    for p in pipelines {
        for source in pipelines {
            let whose = if source.name == p.name {
                "this pipeline".to_string()
            } else {
                format!("pipeline '{}'", source.name)
            };
            if let Some(watched) = &source.watched {
                match overlap(&p.output, watched) {
                    Some(Overlap::Same | Overlap::Inside) => errors.push(format!(
                        "{}.output.dir: {} is inside the watched folder {} of {whose}: its outputs would be read \
                         back as new images; move output.dir outside {}",
                        p.at,
                        p.output.display(),
                        watched.display(),
                        watched.display()
                    )),
                    Some(Overlap::Contains) => errors.push(format!(
                        "{}.output.dir: {} holds the watched folder {} of {whose}; retention and the temp sweep \
                         act on everything under output.dir: move one of them",
                        p.at,
                        p.output.display(),
                        watched.display()
                    )),
                    None => {}
                }
            }
        }
        if let Some(file) = &p.file_under_retention {
            if overlap(file, &p.output) == Some(Overlap::Inside) {
                errors.push(format!(
                    "{}.output.dir: {} holds the source file {}, which retention would delete; move one of them",
                    p.at,
                    p.output.display(),
                    file.display()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(name: &str, output: PathBuf, watched: Option<PathBuf>) -> PipelinePaths {
        PipelinePaths {
            at: format!("pipeline '{name}'"),
            name: name.into(),
            output,
            watched,
            file_under_retention: None,
        }
    }

    fn errors(pipelines: &[PipelinePaths]) -> Vec<String> {
        let mut errors = Vec::new();
        check(pipelines, &mut errors);
        errors
    }

    #[test]
    fn same_nested_and_watched_folders_are_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        std::fs::create_dir_all(root.join("x")).expect("mkdir");
        std::fs::create_dir_all(root.join("real")).expect("mkdir");
        std::os::unix::fs::symlink(root.join("real"), root.join("link")).expect("symlink");
        let same = errors(&[
            pipeline("a", root.join("x/../same"), None),
            pipeline("b", root.join("same"), None),
        ]);
        assert_eq!(same.len(), 1, "{same:?}");
        assert!(
            same[0].contains("same folder") && same[0].contains("'a'"),
            "{same:?}"
        );
        let linked = errors(&[
            pipeline("a", root.join("link"), None),
            pipeline("b", root.join("real"), None),
        ]);
        assert_eq!(linked.len(), 1, "{linked:?}");
        let nested = errors(&[
            pipeline("a", root.join("same"), None),
            pipeline("b", root.join("same/sub"), None),
        ]);
        assert!(
            nested.len() == 1 && nested[0].contains("is inside"),
            "{nested:?}"
        );
        assert!(errors(&[
            pipeline("a", root.join("same"), None),
            pipeline("b", root.join("same-2"), None),
        ])
        .is_empty());
        let feedback = errors(&[pipeline(
            "inbox",
            root.join("in/masks"),
            Some(root.join("in")),
        )]);
        assert!(
            feedback.len() == 1 && feedback[0].contains("would be read back"),
            "{feedback:?}"
        );
        let across = errors(&[
            pipeline("inbox", root.join("out"), Some(root.join("in"))),
            pipeline("cam", root.join("in/cam"), None),
        ]);
        assert!(
            across.len() == 1 && across[0].contains("pipeline 'inbox'"),
            "{across:?}"
        );
        let mut clip = pipeline("clip", root.join("out"), None);
        clip.file_under_retention = Some(root.join("out/clip.mp4"));
        let video = errors(&[clip]);
        assert!(
            video.len() == 1 && video[0].contains("retention would delete"),
            "{video:?}"
        );
        let holds = errors(&[pipeline("inbox", root.to_path_buf(), Some(root.join("in")))]);
        assert!(holds.len() == 1 && holds[0].contains("holds"), "{holds:?}");
    }
}
