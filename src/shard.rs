//! Splitting work over machines: which share of a folder's images (`segment --shard`, `eval --shard`) or of a
//! config's pipelines (`serve --shard`) one process takes, so a job engine (a Kubernetes Indexed Job, a Slurm
//! job array, a StatefulSet, systemd units on several hosts) can run many copies of tclseg without a cluster
//! layer of our own.
//!
//! The owner of an item is a pure function of its key (an image's path under its root, a pipeline's name) and
//! the shard count, never of its position in a list: adding files or pipelines does not move the others, and
//! every copy agrees without talking to the others. The key's SHA-256 (FIPS 180-4, the same bytes on every
//! platform and in every version of the `sha2` crate; not std's `DefaultHasher`, whose output may change
//! between Rust releases) gives a 64-bit number, and jump consistent hashing (Lamping and Veach, 2014) maps it
//! to a shard: when the count grows from N to N+1 only about 1/(N+1) of the items move, so adding a daemon to a
//! fleet moves a few cameras instead of reshuffling all of them.

use std::fmt;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The most shards a split takes (a job array of a million tasks is not a use anyone has).
pub const MAX_SHARDS: u32 = 100_000;

/// One share of a split: shard `index` of `count`, counting from 0 (as Kubernetes' completion indexes and
/// StatefulSet ordinals do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Shard `index` of `count`; an error that says what is wrong when `count` is 0 (or too large) or the
    /// index is not below it.
    pub fn new(index: u32, count: u32) -> Result<Shard> {
        if count == 0 {
            bail!("a split into 0 shards is no split: the shard count must be at least 1");
        }
        if count > MAX_SHARDS {
            bail!("{count} shards is more than the {MAX_SHARDS} tclseg splits work into");
        }
        if index >= count {
            bail!(
                "shard {index} of {count} does not exist: shards count from 0, so the last of {count} is {}",
                count - 1
            );
        }
        Ok(Shard { index, count })
    }

    /// `I/N` as written on the command line (`2/8`).
    pub fn parse(text: &str) -> Result<Shard> {
        let (i, n) = text
            .split_once('/')
            .ok_or_else(|| anyhow!("'{text}' is not a shard: write I/N, e.g. 0/4 (or auto)"))?;
        let number = |part: &str, what: &str| -> Result<u32> {
            part.trim().parse::<u32>().map_err(|_| {
                anyhow!("'{text}' is not a shard: the {what} '{part}' is not a whole number (write I/N, e.g. 0/4)")
            })
        };
        Shard::new(number(i, "index")?, number(n, "count")?)
    }

    /// The file-name form, `2-of-8` (a `/` cannot be in a file name).
    pub fn file_tag(&self) -> String {
        format!("{}-of-{}", self.index, self.count)
    }

    /// Whether this shard owns the item with `key`.
    pub fn owns(&self, key: &str) -> bool {
        owner(key, self.count) == self.index
    }
}

/// The shard (of `count`, at least 1) that owns the item with `key`: jump consistent hashing of the first 8
/// bytes of the key's SHA-256.
pub fn owner(key: &str, count: u32) -> u32 {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    jump(u64::from_be_bytes(first), count.max(1))
}

/// Jump consistent hash, in exact integer arithmetic (the published form divides in floating point; this one
/// computes the same quotient without rounding, so no platform's float rules can change an answer).
/// Hand-written: it is eight lines, and a crate for it would be one more dependency to vet for no gain.
fn jump(mut key: u64, count: u32) -> u32 {
    let (mut bucket, mut next): (u64, u64) = (0, 0);
    while next < u64::from(count) {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        next = (u128::from(bucket + 1) * (1u128 << 31) / (u128::from(key >> 33) + 1)) as u64;
    }
    // bucket < count, so it fits.
    bucket as u32
}

/// Where `--shard auto` reads a batch task's index: the first that is set.
pub const BATCH_INDEX_VARIABLES: [&str; 2] = ["JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"];

/// The shard of a batch task (`segment`, `eval`): `I/N` as given, or with `auto` the task's index from the job
/// engine: `JOB_COMPLETION_INDEX` (Kubernetes Indexed Job), else `SLURM_ARRAY_TASK_ID` less
/// `SLURM_ARRAY_TASK_MIN` (divided by `SLURM_ARRAY_TASK_STEP` for an array with a step); the count from
/// `shards`, else `SLURM_ARRAY_TASK_COUNT`. `env` looks a variable up (`std::env::var` outside tests).
pub fn batch_shard(
    arg: &str,
    shards: Option<u32>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Shard> {
    if arg != "auto" {
        return fixed(arg, shards);
    }
    let number = |name: &str| -> Result<Option<u64>> {
        match env(name) {
            None => Ok(None),
            Some(v) if v.trim().is_empty() => Ok(None),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map(Some)
                .map_err(|_| anyhow!("--shard auto: {name}='{v}' is not a whole number")),
        }
    };
    let to_u32 = |value: u64, what: &str| -> Result<u32> {
        u32::try_from(value).map_err(|_| anyhow!("--shard auto: {what} {value} is too large"))
    };
    let (index, count) = if let Some(index) = number("JOB_COMPLETION_INDEX")? {
        let count = shards.ok_or_else(|| {
            anyhow!(
                "--shard auto found JOB_COMPLETION_INDEX={index} (a Kubernetes Indexed Job), but Kubernetes does \
                 not tell a pod how many completions its Job has: give --shards N with N = the Job's \
                 spec.completions"
            )
        })?;
        (to_u32(index, "JOB_COMPLETION_INDEX")?, count)
    } else if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
        let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let step = number("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
        let offset = id.checked_sub(min).ok_or_else(|| {
            anyhow!("--shard auto: SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}")
        })?;
        if offset % step != 0 {
            bail!(
                "--shard auto: SLURM_ARRAY_TASK_ID={id} is not on the array's step {step} from {min}; give the \
                 array as a plain range (--array=0-{{N-1}})"
            );
        }
        let count = match (shards, number("SLURM_ARRAY_TASK_COUNT")?) {
            (Some(n), _) => n,
            (None, Some(n)) => to_u32(n, "SLURM_ARRAY_TASK_COUNT")?,
            (None, None) => bail!(
                "--shard auto found SLURM_ARRAY_TASK_ID={id} but not SLURM_ARRAY_TASK_COUNT: give --shards N"
            ),
        };
        (to_u32(offset / step, "the array index")?, count)
    } else {
        bail!(
            "--shard auto needs the task's index from the job engine, and neither {} is set: run it as a \
             Kubernetes Indexed Job or a Slurm job array, or give the shard as --shard I/N",
            BATCH_INDEX_VARIABLES.join(" nor ")
        );
    };
    Shard::new(index, count).map_err(|e| {
        anyhow!("--shard auto: {e} (a Slurm array must be a plain range, --array=0-{{N-1}}, with N = --shards)")
    })
}

/// The shard of a daemon (`serve`): `I/N` as given, or with `auto` the ordinal at the end of the host name, as a
/// Kubernetes StatefulSet names its pods (`tclseg-3` → 3); the count from `shards`.
pub fn host_shard(arg: &str, shards: Option<u32>, hostname: &str) -> Result<Shard> {
    if arg != "auto" {
        return fixed(arg, shards);
    }
    let ordinal = hostname
        .trim()
        .rsplit_once('-')
        .and_then(|(_, tail)| tail.parse::<u32>().ok())
        .ok_or_else(|| {
            anyhow!(
                "--shard auto takes the ordinal at the end of the host name (tclseg-3 → shard 3, as a \
                 Kubernetes StatefulSet names its pods), but the host name '{}' does not end in -<number>; give \
                 --shard I/N (or TCLSEG_SHARD=I/N)",
                hostname.trim()
            )
        })?;
    let count = shards.ok_or_else(|| {
        anyhow!(
            "--shard auto found ordinal {ordinal} in the host name '{}', but not the number of shards: give \
             --shards N (or TCLSEG_SHARDS=N), N = the StatefulSet's replicas",
            hostname.trim()
        )
    })?;
    Shard::new(ordinal, count).map_err(|e| {
        anyhow!(
            "--shard auto (host name '{}'): {e}; --shards must equal the StatefulSet's replicas",
            hostname.trim()
        )
    })
}

/// `I/N` given, with a `--shards` that, if also given, must agree.
fn fixed(arg: &str, shards: Option<u32>) -> Result<Shard> {
    let shard = Shard::parse(arg).map_err(|e| anyhow!("--shard {arg}: {e}"))?;
    match shards {
        Some(n) if n != shard.count => bail!(
            "--shard {arg} and --shards {n} disagree on the number of shards (--shards is only needed with \
             --shard auto)"
        ),
        _ => Ok(shard),
    }
}

/// A path's shard key: its components joined with `/` whatever the platform's separator, so every machine of a
/// cluster computes the same key for the same file under the same root.
pub fn path_key(relative: &std::path::Path) -> String {
    relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    /// Every key has exactly one owner for every count from 1 to 8, owners are spread over all shards, and
    /// adding keys (files) does not move a single key that was there before.
    #[test]
    fn every_key_has_one_owner_and_added_keys_move_nothing() {
        let before: Vec<String> = (0..400).map(|i| format!("cam/{i:04}.jpg")).collect();
        let added: Vec<String> = (0..300).map(|i| format!("new/sub/{i}.png")).collect();
        for count in 1..=8u32 {
            let shards: Vec<Shard> = (0..count).map(|i| Shard::new(i, count).unwrap()).collect();
            let split = |keys: &[String]| -> BTreeMap<String, u32> {
                keys.iter()
                    .map(|k| {
                        let owners: Vec<u32> = shards
                            .iter()
                            .filter(|s| s.owns(k))
                            .map(|s| s.index)
                            .collect();
                        assert_eq!(owners.len(), 1, "{k} of {count}: owners {owners:?}");
                        (k.clone(), owners[0])
                    })
                    .collect()
            };
            let first = split(&before);
            let all: Vec<String> = before.iter().chain(&added).cloned().collect();
            let second = split(&all);
            for (key, owner) in &first {
                assert_eq!(
                    second[key], *owner,
                    "{key} moved when files were added ({count} shards)"
                );
            }
            assert_eq!(second.len(), before.len() + added.len());
            // No shard is left empty by 700 keys (each has 1/count of them on average).
            for s in &shards {
                let n = second.values().filter(|o| **o == s.index).count();
                assert!(
                    n > 700 / count as usize / 2,
                    "shard {s} of {count} got only {n} of 700"
                );
            }
        }
    }

    /// Growing the count from N to N+1 moves a key only to the new shard (jump hashing's promise), and only
    /// some of them.
    #[test]
    fn a_new_shard_takes_keys_only_for_itself() {
        let keys: Vec<String> = (0..500).map(|i| format!("pipeline-{i}")).collect();
        for count in 1..8u32 {
            let moved: Vec<&String> = keys
                .iter()
                .filter(|k| owner(k, count) != owner(k, count + 1))
                .collect();
            for k in &moved {
                assert_eq!(owner(k, count + 1), count, "{k} moved to an old shard");
            }
            // About 500/(count+1) move; twice that would mean the split is not consistent.
            let expected = keys.len() / (count as usize + 1);
            assert!(
                !moved.is_empty() && moved.len() < 2 * expected,
                "{} of 500 moved from {count} to {} shards (about {expected} expected)",
                moved.len(),
                count + 1
            );
        }
    }

    /// The owners of a few keys, pinned: a change to the hash would silently reshuffle a cluster's work
    /// between versions (half the fleet on the old rule, half on the new), so it must fail here first. The
    /// values come from an independent Python rendering of the same rule (hashlib's SHA-256, the integer jump).
    #[test]
    fn owners_are_stable_across_versions() {
        let pinned: [(&str, [u32; 8], u32); 5] = [
            ("a.jpg", [0, 1, 2, 2, 4, 5, 5, 5], 810),
            ("sub/dir/b.png", [0, 1, 1, 3, 3, 3, 3, 3], 534),
            ("cam-entrance", [0, 1, 2, 2, 2, 2, 6, 6], 47),
            ("cam-loading-dock", [0, 1, 2, 2, 2, 2, 2, 2], 306),
            ("tclseg", [0, 0, 0, 0, 0, 0, 6, 6], 649),
        ];
        for (key, owners, of_1000) in pinned {
            for (n, want) in (1..=8u32).zip(owners) {
                assert_eq!(owner(key, n), want, "{key} of {n}");
            }
            assert_eq!(owner(key, 1000), of_1000, "{key} of 1000");
        }
    }

    #[test]
    fn parse_accepts_i_of_n_and_names_what_is_wrong() {
        assert_eq!(Shard::parse("2/8").unwrap(), Shard { index: 2, count: 8 });
        assert_eq!(
            Shard::parse(" 0 / 1 ").unwrap(),
            Shard { index: 0, count: 1 }
        );
        let err = |t: &str| format!("{:#}", Shard::parse(t).unwrap_err());
        assert!(err("4/4").contains("shards count from 0"), "{}", err("4/4"));
        assert!(err("0/0").contains("at least 1"), "{}", err("0/0"));
        assert!(err("3").contains("write I/N"), "{}", err("3"));
        assert!(err("a/4").contains("index 'a'"), "{}", err("a/4"));
        assert!(
            err("-1/4").contains("not a whole number"),
            "{}",
            err("-1/4")
        );
        assert_eq!(Shard::parse("3/10").unwrap().file_tag(), "3-of-10");
    }

    #[test]
    fn batch_auto_reads_kubernetes_and_slurm() {
        let k8s = env_of(&[("JOB_COMPLETION_INDEX", "3")]);
        assert_eq!(
            batch_shard("auto", Some(5), &k8s).unwrap(),
            Shard { index: 3, count: 5 }
        );
        let no_count = format!("{:#}", batch_shard("auto", None, &k8s).unwrap_err());
        assert!(no_count.contains("--shards N"), "{no_count}");
        let too_big = format!("{:#}", batch_shard("auto", Some(3), &k8s).unwrap_err());
        assert!(too_big.contains("shard 3 of 3 does not exist"), "{too_big}");

        let slurm = env_of(&[
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(
            batch_shard("auto", None, &slurm).unwrap(),
            Shard { index: 2, count: 4 }
        );
        assert_eq!(
            batch_shard("auto", Some(6), &slurm).unwrap(),
            Shard { index: 2, count: 6 }
        );
        let stepped = env_of(&[
            ("SLURM_ARRAY_TASK_ID", "6"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(
            batch_shard("auto", None, &stepped).unwrap(),
            Shard { index: 3, count: 4 }
        );

        let none = format!(
            "{:#}",
            batch_shard("auto", Some(2), &env_of(&[])).unwrap_err()
        );
        assert!(
            none.contains("JOB_COMPLETION_INDEX") && none.contains("SLURM_ARRAY_TASK_ID"),
            "{none}"
        );
        let bad = env_of(&[("JOB_COMPLETION_INDEX", "x")]);
        let bad = format!("{:#}", batch_shard("auto", Some(2), &bad).unwrap_err());
        assert!(bad.contains("JOB_COMPLETION_INDEX='x'"), "{bad}");
        // A fixed shard ignores the environment; --shards must agree with it.
        assert_eq!(
            batch_shard("1/2", None, &k8s).unwrap(),
            Shard { index: 1, count: 2 }
        );
        let disagree = format!("{:#}", batch_shard("1/2", Some(3), &k8s).unwrap_err());
        assert!(disagree.contains("disagree"), "{disagree}");
    }

    #[test]
    fn host_auto_reads_the_statefulset_ordinal() {
        assert_eq!(
            host_shard("auto", Some(4), "tclseg-3").unwrap(),
            Shard { index: 3, count: 4 }
        );
        assert_eq!(
            host_shard("auto", Some(12), "cams-eu-west-11\n").unwrap(),
            Shard {
                index: 11,
                count: 12
            }
        );
        let plain = format!("{:#}", host_shard("auto", Some(4), "gpu-box").unwrap_err());
        assert!(
            plain.contains("'gpu-box' does not end in -<number>"),
            "{plain}"
        );
        let no_count = format!("{:#}", host_shard("auto", None, "tclseg-0").unwrap_err());
        assert!(no_count.contains("TCLSEG_SHARDS"), "{no_count}");
        let beyond = format!("{:#}", host_shard("auto", Some(3), "tclseg-3").unwrap_err());
        assert!(beyond.contains("replicas"), "{beyond}");
        assert_eq!(
            host_shard("0/2", None, "anything").unwrap(),
            Shard { index: 0, count: 2 }
        );
    }

    #[test]
    fn path_keys_use_slashes() {
        let p: std::path::PathBuf = ["sub", "dir", "a.jpg"].iter().collect();
        assert_eq!(path_key(&p), "sub/dir/a.jpg");
    }
}
