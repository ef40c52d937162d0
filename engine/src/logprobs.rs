//! Log-probabilities of tokens under the model: `log_softmax` of one row of logits, read at
//! one token and at the row's most likely tokens.
//!
//! They are the model's own distribution over its whole output row (the 50400 rows of GPT-J's
//! `lm_head`, as HuggingFace's `log_softmax(logits)` sees them), taken before any sampling
//! transform: temperature, penalties, top-k/top-p and banned ids change which token is drawn,
//! not the probabilities reported. Each row is reduced alone and in index order, so a row's
//! values depend only on its logits, which are batch-invariant: log-probabilities are too.

/// One token's log-probability and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub id: u32,
    /// `log_softmax(logits)[id]`.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (ties: lower id
    /// first); as many as were asked for.
    pub top: Vec<(u32, f32)>,
}

/// `id`'s log-probability under `logits`, with the `top` most likely tokens.
///
/// The log-sum-exp is accumulated in f64 from the row's maximum, so the result is within f32
/// rounding of the exact value (an id past the row is impossible: `-inf`).
pub fn token_logprob(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .map(|&l| (f64::from(l) - f64::from(max)).exp())
        .sum();
    let lse = f64::from(max) + sum.ln();
    let at = |l: f32| (f64::from(l) - lse) as f32;
    TokenLogprob {
        id,
        logprob: logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&l| at(l)),
        top: top_k(logits, top)
            .into_iter()
            .map(|(i, l)| (i, at(l)))
            .collect(),
    }
}

/// The `k` largest logits with their ids, largest first, ties to the lower id.
fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (i, &l) in logits.iter().enumerate() {
        if best.len() == k && best.last().is_none_or(|&(_, low)| l <= low) {
            continue;
        }
        // After every value at least as large: ties keep the lower id first.
        let at = best.partition_point(|&(_, v)| v >= l);
        best.insert(at, (i as u32, l));
        best.truncate(k);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let t = token_logprob(&logits, 4, 3);
        assert!((f64::from(t.logprob) - (0.5 - z.ln())).abs() < 1e-6);
        // Ties keep the lower id first.
        let ids: Vec<u32> = t.top.iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, [1, 3, 0]);
        assert_eq!(t.top[0].1, t.top[1].1);
        let total: f64 = logits
            .iter()
            .enumerate()
            .map(|(i, _)| f64::from(token_logprob(&logits, i as u32, 0).logprob).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
    }

    #[test]
    fn large_logits_do_not_overflow_and_bad_ids_are_impossible() {
        let logits = [1000.0f32, 999.0];
        let t = token_logprob(&logits, 1, 5);
        let want = -1.0 - (1.0f64 + (-1.0f64).exp()).ln();
        assert!((f64::from(t.logprob) - want).abs() < 1e-5, "{t:?}");
        assert_eq!(t.top.len(), 2);
        assert_eq!(token_logprob(&logits, 7, 0).logprob, f32::NEG_INFINITY);
    }
}
