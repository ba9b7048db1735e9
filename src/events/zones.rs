//! Named polygon zones in image coordinates, and the area of each query inside each zone.
//!
//! A zone is rasterised once per frame size (pixel centres inside the polygon, even-odd rule) and cached, so the
//! per-frame cost is one pass over the label map per zone.

use std::collections::{BTreeMap, HashMap};

/// A zone's rasterised mask for one frame size.
struct Raster {
    inside: Vec<bool>,
    count: usize,
}

/// A query's statistics inside one zone.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneArea {
    /// Pixels of the query inside the zone over the zone's pixels.
    pub fraction: f64,
    pub bbox: Option<[usize; 4]>,
}

/// The zones of one pipeline, with their rasters cached per frame size.
#[derive(Default)]
pub struct Zones {
    polygons: BTreeMap<String, Vec<[f64; 2]>>,
    cache: HashMap<(String, usize, usize), Raster>,
}

impl Zones {
    pub fn new(polygons: BTreeMap<String, Vec<[f64; 2]>>) -> Zones {
        Zones {
            polygons,
            cache: HashMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.polygons.is_empty()
    }

    /// For each zone, the area of each of `labels_of_interest` inside it. A label map whose length does not match
    /// `width * height` yields nothing: the caller handed an inconsistent frame and the zones cannot be measured.
    pub fn measure(
        &mut self,
        labels: &[u16],
        width: usize,
        height: usize,
        labels_of_interest: &[u16],
    ) -> BTreeMap<String, BTreeMap<u16, ZoneArea>> {
        let mut out = BTreeMap::new();
        if labels.len() != width * height || labels.is_empty() {
            return out;
        }
        for (name, polygon) in &self.polygons {
            let raster = self
                .cache
                .entry((name.clone(), width, height))
                .or_insert_with(|| rasterise(polygon, width, height));
            let mut per_label: BTreeMap<u16, (usize, [usize; 4])> = BTreeMap::new();
            for (i, (&l, &inside)) in labels.iter().zip(&raster.inside).enumerate() {
                if !inside || !labels_of_interest.contains(&l) {
                    continue;
                }
                let (x, y) = (i % width, i / width);
                let e = per_label
                    .entry(l)
                    .or_insert((0, [usize::MAX, usize::MAX, 0, 0]));
                e.0 += 1;
                e.1 = [e.1[0].min(x), e.1[1].min(y), e.1[2].max(x), e.1[3].max(y)];
            }
            let areas = labels_of_interest
                .iter()
                .map(|&l| {
                    let area = match per_label.get(&l) {
                        Some(&(n, [x0, y0, x1, y1])) if raster.count > 0 => ZoneArea {
                            fraction: n as f64 / raster.count as f64,
                            bbox: Some([x0, y0, x1 - x0 + 1, y1 - y0 + 1]),
                        },
                        _ => ZoneArea {
                            fraction: 0.0,
                            bbox: None,
                        },
                    };
                    (l, area)
                })
                .collect();
            out.insert(name.clone(), areas);
        }
        out
    }
}

/// Pixel centres inside `polygon` (even-odd rule).
fn rasterise(polygon: &[[f64; 2]], width: usize, height: usize) -> Raster {
    let mut inside = vec![false; width * height];
    let mut count = 0;
    if polygon.len() >= 3 {
        for y in 0..height {
            let py = y as f64 + 0.5;
            for x in 0..width {
                let px = x as f64 + 0.5;
                if contains(polygon, px, py) {
                    inside[y * width + x] = true;
                    count += 1;
                }
            }
        }
    }
    Raster { inside, count }
}

fn contains(polygon: &[[f64; 2]], px: f64, py: f64) -> bool {
    let mut inside = false;
    let mut j = polygon.len() - 1;
    for i in 0..polygon.len() {
        let ([xi, yi], [xj, yj]) = (polygon[i], polygon[j]);
        if (yi > py) != (yj > py) && px < (xj - xi) * (py - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_square_zone_counts_only_the_pixels_inside_it() {
        // 4x4 frame, zone = left half; label 1 fills the top row.
        let mut zones = Zones::new(BTreeMap::from([(
            "left".to_string(),
            vec![[0.0, 0.0], [2.0, 0.0], [2.0, 4.0], [0.0, 4.0]],
        )]));
        let mut labels = vec![0u16; 16];
        labels[..4].fill(1);
        let m = zones.measure(&labels, 4, 4, &[1]);
        let a = &m["left"][&1];
        assert!((a.fraction - 2.0 / 8.0).abs() < 1e-9, "{a:?}");
        assert_eq!(a.bbox, Some([0, 0, 2, 1]));
        // A mismatched label map measures nothing rather than panicking.
        assert!(zones.measure(&labels[..3], 4, 4, &[1]).is_empty());
    }

    #[test]
    fn a_triangle_uses_the_even_odd_rule_on_pixel_centres() {
        let r = rasterise(&[[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], 4, 4);
        // Centres (x+0.5, y+0.5) with x + y + 1 < 4: 3 + 2 + 1 = 6 pixels.
        assert_eq!(r.count, 6);
        assert!(r.inside[0] && !r.inside[15]);
    }
}
