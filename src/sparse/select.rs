//! O(n) top-k selection of positions with a total, index-tie-broken order, so that mask updates
//! are deterministic and never need a full sort of a layer.

use std::cmp::Ordering;

/// Reorders `candidates` so that its first `k` entries are the `k` positions with the smallest
/// `key`, ties broken by the lower position first, and returns them (in unspecified order).
/// Keys are compared with [`f32::total_cmp`].
pub(crate) fn smallest_k(
    candidates: &mut [usize],
    k: usize,
    key: impl Fn(usize) -> f32,
) -> &[usize] {
    select_first_k(candidates, k, |&a, &b| {
        key(a).total_cmp(&key(b)).then(a.cmp(&b))
    })
}

/// Like [`smallest_k`] but the `k` positions with the largest `key`, ties broken by the lower
/// position first.
pub(crate) fn largest_k(
    candidates: &mut [usize],
    k: usize,
    key: impl Fn(usize) -> f32,
) -> &[usize] {
    select_first_k(candidates, k, |&a, &b| {
        key(b).total_cmp(&key(a)).then(a.cmp(&b))
    })
}

fn select_first_k(
    candidates: &mut [usize],
    k: usize,
    cmp: impl FnMut(&usize, &usize) -> Ordering,
) -> &[usize] {
    let k = k.min(candidates.len());
    if k > 0 && k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, cmp);
    }
    &candidates[..k]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smallest_and_largest_break_ties_by_lower_index() {
        let keys = [3.0f32, 1.0, 2.0, 1.0, 5.0, 2.0, 5.0];
        let mut c: Vec<usize> = (0..keys.len()).collect();
        let mut got = smallest_k(&mut c, 3, |i| keys[i]).to_vec();
        got.sort_unstable();
        // Smallest: 1.0 at 1 and 3, then 2.0 at 2 (index 2 beats index 5).
        assert_eq!(got, vec![1, 2, 3]);

        let mut c: Vec<usize> = (0..keys.len()).collect();
        let mut got = largest_k(&mut c, 3, |i| keys[i]).to_vec();
        got.sort_unstable();
        // Largest: 5.0 at 4 and 6, then 3.0 at 0.
        assert_eq!(got, vec![0, 4, 6]);

        let mut c: Vec<usize> = (0..keys.len()).collect();
        let got = largest_k(&mut c, 1, |i| keys[i]).to_vec();
        assert_eq!(got, vec![4]);
    }

    #[test]
    fn k_zero_and_k_beyond_len() {
        let mut c = vec![4usize, 2, 9];
        assert!(smallest_k(&mut c, 0, |i| i as f32).is_empty());
        let mut all = largest_k(&mut c, 10, |i| i as f32).to_vec();
        all.sort_unstable();
        assert_eq!(all, vec![2, 4, 9]);
    }
}
