//! Integer splitting of a layer-wide regrowth budget: shares proportional to per-layer weights,
//! each capped by the layer's free positions (the excess moved to the others), rounded by the
//! largest-remainder method so the parts sum to the budget exactly.

/// Splits `total` into one integer per layer, proportional to `weights` (non-negative), with
/// part `l` at most `caps[l]`. A layer whose share exceeds its cap gets the cap and the excess
/// is split between the others in proportion to their weights; if the positively weighted
/// layers cannot hold the whole budget, the rest goes to the other layers in proportion to
/// their free capacity. Fractions are resolved by the largest remainder (ties: lower index).
/// The parts sum to `min(total, sum of caps)`.
pub(crate) fn split_largest_remainder(total: usize, weights: &[f64], caps: &[usize]) -> Vec<usize> {
    let n = weights.len();
    let mut alloc = vec![0usize; n];
    let mut remaining = total.min(caps.iter().sum());
    let mut w: Vec<f64> = weights
        .iter()
        .map(|&x| if x.is_finite() && x > 0.0 { x } else { 0.0 })
        .collect();
    for _round in 0..2 {
        let mut open: Vec<bool> = (0..n).map(|l| w[l] > 0.0 && caps[l] > alloc[l]).collect();
        loop {
            if remaining == 0 {
                return alloc;
            }
            let wsum: f64 = (0..n).filter(|&l| open[l]).map(|l| w[l]).sum();
            if wsum <= 0.0 {
                break;
            }
            let shares: Vec<f64> = (0..n)
                .map(|l| {
                    if open[l] {
                        remaining as f64 * w[l] / wsum
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut capped = false;
            for l in 0..n {
                let room = caps[l] - alloc[l];
                if open[l] && shares[l] >= room as f64 {
                    alloc[l] += room;
                    remaining -= room;
                    open[l] = false;
                    capped = true;
                }
            }
            if capped {
                continue;
            }
            // Every open share is below its room: floor, then hand out the remainder.
            let mut parts: Vec<usize> = (0..n)
                .map(|l| {
                    if open[l] {
                        shares[l].floor() as usize
                    } else {
                        0
                    }
                })
                .collect();
            let mut order: Vec<usize> = (0..n).filter(|&l| open[l]).collect();
            order.sort_by(|&a, &b| {
                let (fa, fb) = (shares[a] - shares[a].floor(), shares[b] - shares[b].floor());
                fb.total_cmp(&fa).then(a.cmp(&b))
            });
            let mut given: usize = parts.iter().sum();
            // Floating point can leave the floors one off either way; fix that first.
            for &l in order.iter().rev() {
                if given <= remaining {
                    break;
                }
                if parts[l] > 0 {
                    parts[l] -= 1;
                    given -= 1;
                }
            }
            'outer: while given < remaining {
                let before = given;
                for &l in &order {
                    if given == remaining {
                        break 'outer;
                    }
                    if alloc[l] + parts[l] < caps[l] {
                        parts[l] += 1;
                        given += 1;
                    }
                }
                if given == before {
                    break;
                }
            }
            for l in 0..n {
                alloc[l] += parts[l];
            }
            remaining -= given;
            break;
        }
        // The weighted layers are full: spread the rest by free capacity.
        w = (0..n).map(|l| (caps[l] - alloc[l]) as f64).collect();
    }
    alloc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportional_with_largest_remainder() {
        // 10 * [1, 1, 1] / 3 = 3.33 each: floors 3+3+3, the extra one to the lowest index.
        assert_eq!(
            split_largest_remainder(10, &[1.0, 1.0, 1.0], &[10; 3]),
            [4, 3, 3]
        );
        // 7 * [0.5, 0.25, 0.25] = 3.5, 1.75, 1.75 -> floors 3, 1, 1; remainders .5 .75 .75.
        assert_eq!(
            split_largest_remainder(7, &[0.5, 0.25, 0.25], &[10; 3]),
            [3, 2, 2]
        );
    }

    #[test]
    fn caps_move_the_excess() {
        // 12 * [3, 1] / 4 = 9, 3, but layer 0 holds 5: 5 + 7.
        assert_eq!(split_largest_remainder(12, &[3.0, 1.0], &[5, 100]), [5, 7]);
        // Weighted layers full: the zero-weight layer takes the rest.
        assert_eq!(split_largest_remainder(6, &[1.0, 0.0], &[2, 10]), [2, 4]);
        // Never more than the caps allow.
        assert_eq!(split_largest_remainder(50, &[1.0, 1.0], &[3, 4]), [3, 4]);
        assert_eq!(split_largest_remainder(0, &[1.0, 1.0], &[3, 4]), [0, 0]);
    }
}
