//! COCO run-length encoding of binary masks, in pycocotools' compressed string form, so that the JSON
//! sidecars load with `pycocotools.mask.decode` unchanged.

/// Run lengths of `mask` (row-major `width`×`height`) in COCO's column-major order, starting with a run of 0s.
pub fn counts(mask: impl Fn(usize) -> bool, width: usize, height: usize) -> Vec<u32> {
    let mut counts = Vec::new();
    let mut current = false;
    let mut run = 0u32;
    for x in 0..width {
        for y in 0..height {
            let v = mask(y * width + x);
            if v != current {
                counts.push(run);
                run = 0;
                current = v;
            }
            run += 1;
        }
    }
    counts.push(run);
    counts
}

/// pycocotools' string encoding of run lengths: each count (from the third on, as the difference to the
/// count two before) in 5-bit groups with a continuation bit, offset into printable ASCII by 48.
pub fn compress(counts: &[u32]) -> String {
    let mut out = String::new();
    for (i, &c) in counts.iter().enumerate() {
        let mut x = i64::from(c);
        if i > 2 {
            x -= i64::from(counts[i - 2]);
        }
        loop {
            let mut group = (x & 0x1f) as u8;
            x >>= 5;
            let more = if group & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                group |= 0x20;
            }
            out.push(char::from(group + 48));
            if !more {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_major_runs() {
        // 2x3 image, row-major:   0 1 1
        //                         0 1 0
        // column-major sequence:  0 0 1 1 1 0  -> runs 2, 3, 1
        let m = [0, 1, 1, 0, 1, 0];
        assert_eq!(counts(|i| m[i] == 1, 3, 2), vec![2, 3, 1]);
        assert_eq!(counts(|i| m[i] == 7, 3, 2), vec![6]);
        let all = [1; 4];
        assert_eq!(counts(|i| all[i] == 1, 2, 2), vec![0, 4]);
    }

    #[test]
    fn compressed_strings_match_pycocotools() {
        // pycocotools.mask.encode of the masks above gives b'231' and b'6' and b'04'.
        // Expected strings were produced by pycocotools 2.0 (mask.encode on Fortran-ordered uint8 arrays).
        assert_eq!(compress(&[2, 3, 1]), "231");
        assert_eq!(compress(&[6]), "6");
        assert_eq!(compress(&[0, 4]), "04");
        assert_eq!(compress(&[100]), "T3");
        assert_eq!(compress(&[1, 1, 50, 3]), "11b12");
        let rows = [
            [1, 0, 0, 0, 1, 1, 1, 1, 0],
            [1, 1, 0, 1, 0, 1, 0, 1, 0],
            [0, 0, 0, 0, 1, 1, 1, 0, 1],
            [1, 1, 1, 1, 0, 0, 1, 0, 0],
            [0, 1, 1, 0, 0, 0, 0, 0, 0],
            [1, 0, 1, 0, 1, 1, 0, 1, 0],
            [0, 0, 0, 1, 0, 0, 0, 0, 0],
        ];
        let flat: Vec<u8> = rows.iter().flatten().copied().collect();
        let c = counts(|i| flat[i] == 1, 9, 7);
        assert_eq!(compress(&c), "021O0010O141MNO011OO10O21NO001200O001");
    }
}
