//! What the planner's charts draw of a long series: a bounded number of points spread
//! evenly, so that an update costs the same however long the run (pure; tested here).

/// Indices of at most `max` points spread evenly over `n`, always keeping the last.
pub fn thin(n: usize, max: usize) -> Vec<usize> {
    if n <= max {
        return (0..n).collect();
    }
    if max < 2 {
        return vec![n - 1];
    }
    (0..max).map(|k| k * (n - 1) / (max - 1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinning_keeps_the_ends_and_the_limit() {
        assert_eq!(thin(3, 10), vec![0, 1, 2]);
        let t = thin(100_000, 1_000);
        assert_eq!(t.len(), 1_000);
        assert_eq!((t[0], t[t.len() - 1]), (0, 99_999));
        assert!(t.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(thin(5, 1), vec![4]);
    }
}
