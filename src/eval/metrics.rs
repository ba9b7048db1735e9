//! mmsegmentation's `mIoU` metric: intersection and union accumulated per class over a whole split, IoU per class,
//! the mean over classes that occur (a nan-mean), reported ×100; plus pixel accuracy.

/// Label value that marks pixels to ignore (mmseg's `ignore_index`).
pub const IGNORE: u8 = 255;

/// Per-class intersection and union areas accumulated over many images.
#[derive(Debug, Clone)]
pub struct IouAccumulator {
    classes: usize,
    intersect: Vec<u64>,
    pred_area: Vec<u64>,
    label_area: Vec<u64>,
}

/// Why a prediction/label pair cannot be scored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricError {
    #[error("prediction has {pred} pixels, the label map {label}: they must be the same size")]
    SizeMismatch { pred: usize, label: usize },
    #[error("the label map holds class {value}, but the dataset has {classes} classes (and {IGNORE} for ignore)")]
    UnknownClass { value: u8, classes: usize },
}

/// Scores of an accumulated split.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// IoU per class in 0..1; NaN for a class absent from both predictions and labels.
    pub iou: Vec<f64>,
    /// Accuracy per class (intersection / label area); NaN for a class absent from the labels.
    pub accuracy: Vec<f64>,
    /// Mean IoU over the classes whose IoU is defined, ×100.
    pub miou: f64,
    /// Correct pixels / labelled pixels, ×100.
    pub pixel_accuracy: f64,
}

impl IouAccumulator {
    pub fn new(classes: usize) -> IouAccumulator {
        IouAccumulator {
            classes,
            intersect: vec![0; classes],
            pred_area: vec![0; classes],
            label_area: vec![0; classes],
        }
    }

    /// Adds one image: `pred` class indices, `label` class indices with [`IGNORE`] for unlabelled pixels.
    /// Predicted classes outside the range count as wrong everywhere (they add to no class's area).
    pub fn add(&mut self, pred: &[u16], label: &[u8]) -> Result<(), MetricError> {
        if pred.len() != label.len() {
            return Err(MetricError::SizeMismatch {
                pred: pred.len(),
                label: label.len(),
            });
        }
        if let Some(&value) = label
            .iter()
            .find(|&&l| l != IGNORE && l as usize >= self.classes)
        {
            return Err(MetricError::UnknownClass {
                value,
                classes: self.classes,
            });
        }
        for (&p, &l) in pred.iter().zip(label) {
            if l == IGNORE {
                continue;
            }
            self.label_area[l as usize] += 1;
            let p = p as usize;
            if p < self.classes {
                self.pred_area[p] += 1;
                if p == l as usize {
                    self.intersect[p] += 1;
                }
            }
        }
        Ok(())
    }

    pub fn scores(&self) -> Scores {
        let ratio = |a: u64, b: u64| {
            if b == 0 {
                f64::NAN
            } else {
                a as f64 / b as f64
            }
        };
        let iou: Vec<f64> = (0..self.classes)
            .map(|c| {
                ratio(
                    self.intersect[c],
                    self.pred_area[c] + self.label_area[c] - self.intersect[c],
                )
            })
            .collect();
        let accuracy = (0..self.classes)
            .map(|c| ratio(self.intersect[c], self.label_area[c]))
            .collect();
        let defined: Vec<f64> = iou.iter().copied().filter(|v| !v.is_nan()).collect();
        let miou = if defined.is_empty() {
            f64::NAN
        } else {
            100.0 * defined.iter().sum::<f64>() / defined.len() as f64
        };
        let correct: u64 = self.intersect.iter().sum();
        let labelled: u64 = self.label_area.iter().sum();
        Scores {
            iou,
            accuracy,
            miou,
            pixel_accuracy: 100.0 * ratio(correct, labelled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_split() {
        // 3 classes. Image 1: label [0 0 1 1 255], pred [0 1 1 1 2]. Image 2: label [2 2], pred [2 0].
        let mut acc = IouAccumulator::new(3);
        acc.add(&[0, 1, 1, 1, 2], &[0, 0, 1, 1, IGNORE])
            .expect("same size");
        acc.add(&[2, 0], &[2, 2]).expect("same size");
        let s = acc.scores();
        // class 0: I=1, pred=2, label=2 -> 1/3; class 1: I=2, pred=3, label=2 -> 2/3; class 2: I=1, pred=1, label=2 -> 1/2
        let expected = [1.0 / 3.0, 2.0 / 3.0, 0.5];
        for (got, want) in s.iou.iter().zip(expected) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        assert!((s.miou - 100.0 * (1.0 / 3.0 + 2.0 / 3.0 + 0.5) / 3.0).abs() < 1e-9);
        assert!(
            (s.pixel_accuracy - 100.0 * 4.0 / 6.0).abs() < 1e-9,
            "ignored pixel left out"
        );
    }

    #[test]
    fn absent_classes_are_left_out_of_the_mean_and_false_positives_count() {
        let mut acc = IouAccumulator::new(4);
        // class 2 never appears in labels or predictions; class 3 is only predicted.
        acc.add(&[0, 1, 3, 0], &[0, 1, 1, 0]).expect("ok");
        let s = acc.scores();
        assert!(s.iou[2].is_nan());
        assert_eq!(s.iou[3], 0.0, "a class only predicted has IoU 0");
        assert!(s.accuracy[3].is_nan());
        assert!((s.miou - 100.0 * (1.0 + 0.5 + 0.0) / 3.0).abs() < 1e-9);
    }

    #[test]
    fn bad_pairs_are_refused() {
        let mut acc = IouAccumulator::new(2);
        assert_eq!(
            acc.add(&[0], &[0, 1]),
            Err(MetricError::SizeMismatch { pred: 1, label: 2 })
        );
        assert_eq!(
            acc.add(&[0, 0], &[0, 7]),
            Err(MetricError::UnknownClass {
                value: 7,
                classes: 2
            })
        );
        let empty = IouAccumulator::new(2).scores();
        assert!(empty.miou.is_nan() && empty.pixel_accuracy.is_nan());
    }
}
