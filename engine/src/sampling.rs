//! Per-sequence sampling with HuggingFace `generate` semantics.
//!
//! [`SamplingParams`] are the knobs a request sets; [`Sampler`] applies them to one row of
//! logits per step. The processors run in the order `transformers` runs them:
//!
//! 1. repetition penalty (`RepetitionPenaltyLogitsProcessor`): every distinct id already in
//!    the context has its logit divided by the penalty when positive, multiplied when negative;
//! 2. OpenAI's penalties ([`Penalties`], vLLM's order): each id's logit loses
//!    `frequency_penalty` times the number of times it was generated, plus `presence_penalty`
//!    once if it was generated at all (generated tokens only, not the prompt), then gains its
//!    `logit_bias`;
//! 3. minimum length (`MinNewTokensLengthLogitsProcessor`): EOS is impossible until
//!    `min_new_tokens` tokens have been generated;
//! 4. banned ids: ids at or past `allowed_vocab` are impossible. GPT-J's embedding has 50400
//!    rows but only the first 50257 are real tokens; the `<|extratoken_N|>` rows were never
//!    trained and must never be produced;
//!
//! then either greedy search (argmax, ties to the lowest id) or, when sampling, the warpers
//! temperature, top-k (`TopKLogitsWarper`, ties at the k-th value kept) and top-p
//! (`TopPLogitsWarper`: the smallest set of most likely tokens whose probability adds up to at
//! least `top_p`, never empty), then a draw from the softmax.
//!
//! Each sequence has its own [`Sampler`] with its own ChaCha8 generator seeded from
//! [`SamplingParams::seed`], so a seed gives the same tokens whatever else shares the batch.
//! The sampler keeps its scratch buffers between calls: a step allocates nothing vocab-sized.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// OpenAI's logit adjustments, over the tokens a sequence generated: none by default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Penalties {
    /// Subtracted once from the logit of every id generated at least once (OpenAI: -2 to 2).
    pub presence: f32,
    /// Subtracted from an id's logit once per time it was generated (OpenAI: -2 to 2).
    pub frequency: f32,
    /// Added to the logits of these ids (OpenAI's `logit_bias`: -100 to 100).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Penalties {
    /// True when they change nothing.
    pub fn is_none(&self) -> bool {
        self.presence == 0.0 && self.frequency == 0.0 && self.logit_bias.is_empty()
    }
}

/// How one sequence picks its next token. Field meanings follow HuggingFace `generate`.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Sample from the distribution (true) or take the most likely token (false).
    pub do_sample: bool,
    /// Logits are divided by this before sampling; 0 means greedy. Must be finite and >= 0.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (ties at the boundary kept); 0 turns it off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`;
    /// 1.0 turns it off. Must be in (0, 1].
    pub top_p: f32,
    /// Penalty for tokens already in the context (prompt and generated); 1.0 turns it off.
    /// Must be finite and > 0.
    pub repetition_penalty: f32,
    /// EOS cannot be produced before this many new tokens.
    pub min_new_tokens: usize,
    /// Seed of this sequence's random generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy decoding with every processor off, as `generate` does with no arguments.
    fn default() -> Self {
        Self {
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            min_new_tokens: 0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges of the float parameters; the message names the parameter, the
    /// allowed range and the value given.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "`temperature` must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("`top_p` must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!(
                "`repetition_penalty` must be a finite number > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }

    /// True when the next token is the argmax (no randomness involved).
    pub fn is_greedy(&self) -> bool {
        !self.do_sample || self.temperature == 0.0
    }
}

/// The sampling state of one sequence: its parameters, its random generator and scratch space.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    eos_token_id: u32,
    /// The ids that end the sequence, EOS and a request's stop token ids, sorted and
    /// without repeats: banned until `min_new_tokens`.
    ends: Vec<u32>,
    penalties: Penalties,
    /// The generated ids, sorted, and how many times each was generated, for the
    /// penalties (both reused, so a step allocates nothing).
    generated_ids: Vec<u32>,
    counts: Vec<(u32, u32)>,
    allowed_vocab: usize,
    rng: ChaCha8Rng,
    /// Processed scores of the current row (vocab-sized, reused).
    scores: Vec<f32>,
    /// Candidate ids still in play while warping (reused).
    candidates: Vec<u32>,
}

impl Sampler {
    /// A sampler for one sequence. Ids `>= allowed_vocab` are never produced (GPT-J: 50257).
    pub fn new(params: &SamplingParams, eos_token_id: u32, allowed_vocab: usize) -> Self {
        Self {
            params: params.clone(),
            eos_token_id,
            ends: vec![eos_token_id],
            penalties: Penalties::default(),
            generated_ids: Vec::new(),
            counts: Vec::new(),
            allowed_vocab,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            scores: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// Ids besides EOS that end the sequence when produced, so that the minimum length
    /// holds them back as it holds back EOS (vLLM's `min_tokens` with `stop_token_ids`).
    pub fn with_stop_token_ids(mut self, ids: &[u32]) -> Self {
        self.ends = std::iter::once(self.eos_token_id)
            .chain(ids.iter().copied())
            .collect();
        self.ends.sort_unstable();
        self.ends.dedup();
        self
    }

    /// OpenAI's presence and frequency penalties and logit bias.
    pub fn with_penalties(mut self, penalties: &Penalties) -> Self {
        self.penalties = penalties.clone();
        self
    }

    /// The parameters this sampler applies.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits.
    ///
    /// `context` is the prompt followed by the tokens generated so far (for the repetition
    /// penalty); `generated` is how many tokens have been generated so far (for the minimum
    /// length). If no token is possible at all (every logit NaN or `-inf`, or every id
    /// banned), EOS is returned so that the sequence ends instead of producing garbage.
    pub fn sample(&mut self, logits: &[f32], context: &[u32], generated: usize) -> u32 {
        if self.params.is_greedy()
            && self.params.repetition_penalty == 1.0
            && self.penalties.is_none()
        {
            return self.greedy(logits, generated).unwrap_or(self.eos_token_id);
        }
        self.process(logits, context, generated);
        if self.params.is_greedy() {
            return argmax(&self.scores).unwrap_or(self.eos_token_id);
        }
        let kept = self.warp();
        if kept == 0 {
            return self.eos_token_id;
        }
        self.draw(kept)
    }

    /// The greedy pick when the only processors in play are the minimum length's ban and the
    /// vocabulary's end: the best id of `logits` itself, skipping the ids those would set to
    /// `-inf`, so the same id `argmax` of the processed scores gives, without first copying a
    /// vocabulary-sized row (at 64 sequences a step that copy and the scalar pick took ~4 ms
    /// of the engine thread while the pool waited).
    fn greedy(&self, logits: &[f32], generated: usize) -> Option<u32> {
        let allowed = &logits[..self.allowed_vocab.min(logits.len())];
        if generated >= self.params.min_new_tokens {
            return argmax(allowed);
        }
        let banned = self
            .ends
            .iter()
            .map(|&id| id as usize)
            .take_while(|&id| id < allowed.len());
        // The best of each stretch between banned ids (`ends` is sorted); the first of
        // equals wins, as in `argmax`, since the stretches come in order and only a greater
        // value replaces.
        let mut best: Option<(usize, f32)> = None;
        let mut start = 0;
        for end in banned.chain(std::iter::once(allowed.len())) {
            if let Some(i) = argmax(&allowed[start..end]) {
                let i = start + i as usize;
                if best.is_none_or(|(_, b)| allowed[i] > b) {
                    best = Some((i, allowed[i]));
                }
            }
            start = end + 1;
        }
        best.map(|(i, _)| i as u32)
    }

    /// Copies `logits` into `scores` and applies the logits processors (penalty, min-length,
    /// ban). NaN becomes `-inf`, so it can never win.
    fn process(&mut self, logits: &[f32], context: &[u32], generated: usize) {
        self.scores.clear();
        self.scores.extend(
            logits
                .iter()
                .map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x }),
        );
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            // Read from the unprocessed logits, so an id that occurs several times in the
            // context is penalised once, as HF's gather/scatter does.
            for &id in context {
                if let (Some(&x), Some(s)) =
                    (logits.get(id as usize), self.scores.get_mut(id as usize))
                {
                    if !x.is_nan() {
                        *s = if x < 0.0 { x * penalty } else { x / penalty };
                    }
                }
            }
        }
        if !self.penalties.is_none() {
            self.apply_penalties(context, generated);
        }
        if generated < self.params.min_new_tokens {
            for &id in &self.ends {
                if let Some(s) = self.scores.get_mut(id as usize) {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
        if let Some(banned) = self.scores.get_mut(self.allowed_vocab..) {
            banned.fill(f32::NEG_INFINITY);
        }
    }

    /// OpenAI's penalties over the generated tokens (the last `generated` of `context`),
    /// then the logit bias.
    fn apply_penalties(&mut self, context: &[u32], generated: usize) {
        let Penalties {
            presence,
            frequency,
            ref logit_bias,
        } = self.penalties;
        if presence != 0.0 || frequency != 0.0 {
            self.counts.clear();
            let start = context.len().saturating_sub(generated);
            self.generated_ids.clear();
            self.generated_ids.extend_from_slice(&context[start..]);
            self.generated_ids.sort_unstable();
            for &id in &self.generated_ids {
                match self.counts.last_mut() {
                    Some((last, n)) if *last == id => *n += 1,
                    _ => self.counts.push((id, 1)),
                }
            }
            for &(id, n) in &self.counts {
                if let Some(s) = self.scores.get_mut(id as usize) {
                    *s -= frequency * n as f32 + presence;
                }
            }
        }
        for &(id, bias) in logit_bias {
            if let Some(s) = self.scores.get_mut(id as usize) {
                *s += bias;
            }
        }
    }

    /// Temperature, top-k, top-p and softmax. Afterwards `candidates[..kept]` are the ids that
    /// may be drawn and `scores[id]` their unnormalised probabilities; returns `kept` (0 only
    /// when no id is possible).
    fn warp(&mut self) -> usize {
        let temperature = self.params.temperature;
        if temperature != 1.0 {
            for s in &mut self.scores {
                *s /= temperature;
            }
        }
        let scores = &self.scores;
        self.candidates.clear();
        self.candidates
            .extend((0..scores.len() as u32).filter(|&i| scores[i as usize] > f32::NEG_INFINITY));
        if self.candidates.is_empty() {
            return 0;
        }
        // Best first, ties to the lower id: makes top-k, top-p and the draw deterministic.
        let by_score_desc = |a: &u32, b: &u32| {
            scores[*b as usize]
                .total_cmp(&scores[*a as usize])
                .then(a.cmp(b))
        };

        let top_k = self.params.top_k;
        if top_k > 0 && top_k < self.candidates.len() {
            self.candidates
                .select_nth_unstable_by(top_k - 1, by_score_desc);
            let kth = scores[self.candidates[top_k - 1] as usize];
            // HF keeps every token whose score is >= the k-th score, so ties survive.
            self.candidates.retain(|&i| scores[i as usize] >= kth);
        }

        // Softmax over the candidates, written over their scores (the buffer is ours).
        let max = self
            .candidates
            .iter()
            .map(|&i| scores[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f64;
        for &i in &self.candidates {
            let s = self.scores[i as usize];
            let p = if max == f32::INFINITY {
                // A +inf logit takes all the mass (shared between equal +inf logits).
                if s == f32::INFINITY {
                    1.0
                } else {
                    0.0
                }
            } else {
                ((s - max) as f64).exp()
            };
            self.scores[i as usize] = p as f32;
            total += p;
        }

        let top_p = self.params.top_p as f64;
        let mut kept = self.candidates.len();
        if top_p < 1.0 {
            // A token with probability below (1 - top_p) / n can never be kept: all the tokens
            // at most as likely add up to less than 1 - top_p. Dropping them first means the
            // sort below touches the head of the distribution, not all 50k ids.
            let floor = ((1.0 - top_p) / self.candidates.len() as f64 * total) as f32;
            let probs = &self.scores;
            self.candidates.retain(|&i| probs[i as usize] >= floor);
            self.candidates.sort_unstable_by(|a, b| {
                probs[*b as usize]
                    .total_cmp(&probs[*a as usize])
                    .then(a.cmp(b))
            });
            // Smallest prefix (most likely first) whose probability reaches top_p, at least one.
            kept = self.candidates.len();
            let mut cum = 0.0f64;
            for (n, &i) in self.candidates.iter().enumerate() {
                cum += probs[i as usize] as f64 / total;
                if cum >= top_p {
                    kept = n + 1;
                    break;
                }
            }
        }
        kept
    }

    /// One draw from the generator among `candidates[..kept]`, weighted by their probabilities.
    fn draw(&mut self, kept: usize) -> u32 {
        let kept = &self.candidates[..kept];
        let mass: f64 = kept.iter().map(|&i| self.scores[i as usize] as f64).sum();
        let mut u = self.rng.random::<f64>() * mass;
        for &i in kept {
            let p = self.scores[i as usize] as f64;
            if u < p {
                return i;
            }
            u -= p;
        }
        // Rounding can leave `u` a hair above the last probability: the last one wins then.
        kept.iter()
            .rev()
            .copied()
            .find(|&i| self.scores[i as usize] > 0.0)
            .unwrap_or(kept[0])
    }
}

/// Index of the largest finite-or-infinite score, ties to the lowest index; `None` when
/// every score is `-inf`.
/// The first id of the greatest score above `-inf`; NaN never wins. Two passes: the
/// greatest value, lane by lane over chunks of 16 (which the compiler turns into vector
/// maxima: `x > m` is false for NaN), then the first score equal to it.
fn argmax(scores: &[f32]) -> Option<u32> {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = scores.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if max == f32::NEG_INFINITY {
        return None;
    }
    scores.iter().position(|&x| x == max).map(|i| i as u32)
}

/// The plain one-pass pick `argmax` must equal.
#[cfg(test)]
fn argmax_scalar(scores: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &s) in scores.iter().enumerate() {
        if s > f32::NEG_INFINITY && best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 3;
    const NEG: f32 = f32::NEG_INFINITY;

    fn greedy() -> SamplingParams {
        SamplingParams::default()
    }

    fn sampled(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            do_sample: true,
            temperature,
            top_k,
            top_p,
            seed,
            ..SamplingParams::default()
        }
    }

    /// The processed scores after penalty, min-length and ban.
    fn processed(
        params: SamplingParams,
        allowed: usize,
        logits: &[f32],
        ctx: &[u32],
        generated: usize,
    ) -> Vec<f32> {
        let mut s = Sampler::new(&params, EOS, allowed);
        s.process(logits, ctx, generated);
        s.scores.clone()
    }

    /// Draw frequencies of each id over `n` draws.
    fn frequencies(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(&params, EOS, logits.len());
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits, &[], 10) as usize] += 1;
        }
        counts
    }

    /// The greedy shortcut picks what the processed path picks: rows with NaN, `-inf`, ties
    /// (±0 among them), a maximum on a banned id, and a vocabulary end, before and after the
    /// minimum length, with and without stop ids; and `argmax` equals the one-pass pick.
    #[test]
    fn greedy_shortcut_equals_the_processed_pick() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for case in 0..400usize {
            let n = 1 + case % 53;
            let pool = [
                0.0,
                -0.0,
                1.5,
                1.5,
                -2.0,
                NEG,
                f32::NAN,
                f32::INFINITY,
                3.25,
            ];
            let logits: Vec<f32> = (0..n)
                .map(|_| {
                    if rng.random_bool(0.5) {
                        pool[rng.random_range(0..pool.len())]
                    } else {
                        rng.random_range(-4.0..4.0)
                    }
                })
                .collect();
            assert_eq!(argmax(&logits), argmax_scalar(&logits), "{logits:?}");
            let params = SamplingParams {
                min_new_tokens: 2,
                ..greedy()
            };
            let allowed = n.saturating_sub(case % 3);
            let stops: &[u32] = if case % 2 == 0 { &[0, 5, 5] } else { &[] };
            for generated in [0, 2] {
                let mut s = Sampler::new(&params, EOS, allowed).with_stop_token_ids(stops);
                let fast = s.sample(&logits, &[], generated);
                s.process(&logits, &[], generated);
                let want = argmax_scalar(&s.scores).unwrap_or(EOS);
                assert_eq!(
                    fast, want,
                    "{logits:?} allowed {allowed} generated {generated}"
                );
            }
        }
    }

    #[test]
    fn default_is_greedy_and_valid() {
        let p = SamplingParams::default();
        assert!(p.is_greedy());
        assert_eq!(p.validate(), Ok(()));
        assert!(sampled(0.0, 0, 1.0, 0).is_greedy());
        assert!(!sampled(0.7, 0, 1.0, 0).is_greedy());
    }

    #[test]
    fn validate_names_the_parameter_and_range() {
        let bad = |f: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            f(&mut p);
            p.validate().unwrap_err()
        };
        assert_eq!(
            bad(|p| p.temperature = -0.5),
            "`temperature` must be a finite number >= 0, got -0.5"
        );
        assert!(bad(|p| p.temperature = f32::NAN).starts_with("`temperature`"));
        assert!(bad(|p| p.temperature = f32::INFINITY).starts_with("`temperature`"));
        assert_eq!(bad(|p| p.top_p = 0.0), "`top_p` must be in (0, 1], got 0");
        assert_eq!(bad(|p| p.top_p = 1.5), "`top_p` must be in (0, 1], got 1.5");
        assert!(bad(|p| p.top_p = f32::NAN).starts_with("`top_p`"));
        assert_eq!(
            bad(|p| p.repetition_penalty = 0.0),
            "`repetition_penalty` must be a finite number > 0, got 0"
        );
        assert!(bad(|p| p.repetition_penalty = f32::INFINITY).starts_with("`repetition_penalty`"));
        let ok = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            repetition_penalty: 0.5,
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_once_per_id() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..greedy()
        };
        let logits = [4.0, -1.0, 3.0, 0.5, 0.0];
        // Id 0 appears twice: penalised once (4/2 = 2, not 1). Out-of-range ids are ignored.
        let got = processed(params, 5, &logits, &[0, 1, 0, 4, 99], 10);
        assert_eq!(got, vec![2.0, -2.0, 3.0, 0.5, 0.0]);
    }

    #[test]
    fn repetition_penalty_changes_the_greedy_choice() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..greedy()
        };
        let mut s = Sampler::new(&params, EOS, 5);
        let logits = [4.0, -1.0, 3.0, 0.5, 0.0];
        assert_eq!(s.sample(&logits, &[], 10), 0);
        assert_eq!(s.sample(&logits, &[0], 10), 2); // 4/2 = 2 < 3
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens_only() {
        let mut s = Sampler::new(&greedy(), 0, 8).with_penalties(&Penalties {
            presence: 0.5,
            frequency: 1.0,
            logit_bias: Vec::new(),
        });
        // Context: prompt [3, 3], then generated [3, 5, 5].
        let logits = [0.0, 0.0, 0.0, 10.0, 0.0, 10.0, 0.0, 0.0];
        s.process(&logits, &[3, 3, 3, 5, 5], 3);
        assert_eq!(
            s.scores[3],
            10.0 - 1.0 - 0.5,
            "once generated, the prompt not counted"
        );
        assert_eq!(s.scores[5], 10.0 - 2.0 - 0.5);
        assert_eq!(s.scores[4], 0.0);
    }

    #[test]
    fn logit_bias_can_force_a_token() {
        let mut s = Sampler::new(&greedy(), 0, 8).with_penalties(&Penalties {
            logit_bias: vec![(6, 100.0), (2, -100.0)],
            ..Default::default()
        });
        let logits = [0.0, 0.0, 50.0, 1.0, 0.0, 0.0, 0.0, 0.0];
        assert_eq!(s.sample(&logits, &[1], 0), 6);
        s.process(&logits, &[1], 0);
        assert_eq!(s.scores[2], -50.0);
    }

    #[test]
    fn min_new_tokens_suppresses_eos_until_reached() {
        let params = SamplingParams {
            min_new_tokens: 2,
            ..greedy()
        };
        let logits = [0.0, 1.0, 2.0, 9.0, 0.0];
        let mut s = Sampler::new(&params, EOS, 5);
        assert_eq!(s.sample(&logits, &[], 0), 2);
        assert_eq!(s.sample(&logits, &[], 1), 2);
        assert_eq!(s.sample(&logits, &[], 2), EOS);
        assert_eq!(processed(params, 5, &logits, &[], 1)[EOS as usize], NEG);
    }

    #[test]
    fn min_new_tokens_suppresses_stop_token_ids_too() {
        let params = SamplingParams {
            min_new_tokens: 1,
            ..greedy()
        };
        let logits = [0.0, 8.0, 2.0, 9.0, 0.0];
        let mut s = Sampler::new(&params, EOS, 5).with_stop_token_ids(&[1]);
        assert_eq!(s.sample(&logits, &[], 0), 2);
        assert_eq!(s.sample(&logits, &[], 1), EOS);
        let mut s = Sampler::new(&params, EOS, 5);
        assert_eq!(s.sample(&logits, &[], 0), 1);
    }

    #[test]
    fn ids_past_allowed_vocab_are_banned() {
        let logits = [1.0, 0.0, 0.0, 0.0, 5.0, 7.0];
        assert_eq!(
            processed(greedy(), 4, &logits, &[], 0),
            vec![1.0, 0.0, 0.0, 0.0, NEG, NEG]
        );
        assert_eq!(Sampler::new(&greedy(), EOS, 4).sample(&logits, &[], 0), 0);
        // Sampling never draws a banned id either.
        let counts = frequencies_allowed(sampled(1.0, 0, 1.0, 7), &logits, 4, 500);
        assert_eq!(counts[4] + counts[5], 0);
    }

    fn frequencies_allowed(
        params: SamplingParams,
        logits: &[f32],
        allowed: usize,
        n: usize,
    ) -> Vec<usize> {
        let mut s = Sampler::new(&params, EOS, allowed);
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits, &[], 10) as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_ties_go_to_the_lowest_id_and_nan_never_wins() {
        let mut s = Sampler::new(&greedy(), EOS, 6);
        assert_eq!(s.sample(&[1.0, 5.0, 2.0, 5.0, 5.0, 0.0], &[], 0), 1);
        assert_eq!(
            s.sample(&[f32::NAN, 1.0, f32::NAN, 0.0, 0.0, 0.0], &[], 0),
            1
        );
        // Nothing possible at all: EOS ends the sequence.
        assert_eq!(s.sample(&[NEG; 6], &[], 0), EOS);
    }

    #[test]
    fn temperature_zero_is_greedy_even_when_sampling() {
        let mut s = Sampler::new(&sampled(0.0, 0, 1.0, 1), EOS, 4);
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 1.0, 1.1, 0.5], &[], 10), 2);
        }
    }

    #[test]
    fn top_k_keeps_the_k_best_and_ties_at_the_boundary() {
        let logits = [3.0, 1.0, 2.0, 0.0, 2.0, -1.0];
        // k = 1: only id 0 can come out.
        let c = frequencies(sampled(1.0, 1, 1.0, 3), &logits, 200);
        assert_eq!(c[0], 200);
        // k = 2: the 2nd best score is 2.0, shared by ids 2 and 4; both stay (HF keeps >= kth).
        let c = frequencies(sampled(1.0, 2, 1.0, 3), &logits, 3000);
        assert!(c[0] > 0 && c[2] > 0 && c[4] > 0, "{c:?}");
        assert_eq!(c[1] + c[3] + c[5], 0, "{c:?}");
        // k larger than the vocabulary: no-op.
        let c = frequencies(sampled(1.0, 100, 1.0, 3), &logits, 3000);
        assert!(c.iter().all(|&n| n > 0), "{c:?}");
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities 0.5, 0.3, 0.2 (ids 0, 1, 2); id 3 impossible.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln(), NEG];
        // p = 0.5: id 0 alone reaches it.
        assert_eq!(frequencies(sampled(1.0, 0, 0.5, 1), &logits, 300)[0], 300);
        // p = 0.49: still id 0 alone (0.5 >= 0.49).
        assert_eq!(frequencies(sampled(1.0, 0, 0.49, 1), &logits, 300)[0], 300);
        // p = 0.6: ids 0 and 1 (0.5 < 0.6 <= 0.8); never id 2.
        let c = frequencies(sampled(1.0, 0, 0.6, 1), &logits, 3000);
        assert!(c[0] > 0 && c[1] > 0 && c[2] == 0, "{c:?}");
        // p = 0.81: all three.
        let c = frequencies(sampled(1.0, 0, 0.81, 1), &logits, 3000);
        assert!(c[0] > 0 && c[1] > 0 && c[2] > 0, "{c:?}");
        // A tiny p keeps at least one token.
        assert_eq!(frequencies(sampled(1.0, 0, 1e-6, 1), &logits, 100)[0], 100);
    }

    #[test]
    fn top_k_then_top_p_renormalises_within_the_kept_set() {
        // Probabilities 0.30, 0.26, 0.24, 0.20. top_k = 2 keeps ids 0 and 1, renormalised to
        // 0.54 / 0.46, so top_p = 0.5 keeps id 0 alone (without renormalising, 0.30 < 0.5
        // would have kept id 1 too).
        let logits = [0.30f32.ln(), 0.26f32.ln(), 0.24f32.ln(), 0.20f32.ln()];
        let c = frequencies(sampled(1.0, 2, 0.5, 9), &logits, 300);
        assert_eq!(c[0], 300, "{c:?}");
    }

    /// HF's TopPLogitsWarper, written the slow way: sort ascending, drop the prefix whose
    /// cumulative probability is <= 1 - top_p, always keep the most likely token.
    fn reference_top_p(logits: &[f32], top_p: f64) -> Vec<u32> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        ids.sort_by(|a, b| {
            logits[*a as usize]
                .total_cmp(&logits[*b as usize])
                .then(b.cmp(a))
        });
        let mut cum = 0.0;
        let mut kept = Vec::new();
        for (n, &i) in ids.iter().enumerate() {
            cum += ((logits[i as usize] - max) as f64).exp() / total;
            if cum > 1.0 - top_p || n == ids.len() - 1 {
                kept.push(i);
            }
        }
        kept.sort();
        kept
    }

    #[test]
    fn top_p_matches_the_reference_on_wide_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for round in 0..20 {
            // Peaked rows like a language model's: a few large logits over a long flat tail.
            let logits: Vec<f32> = (0..5000)
                .map(|i| {
                    let bump = if i % 997 == round { 8.0 } else { 0.0 };
                    rng.random::<f32>() * 3.0 + bump
                })
                .collect();
            for &top_p in &[0.1f32, 0.5, 0.9, 0.95, 0.999] {
                let mut s = Sampler::new(&sampled(1.0, 0, top_p, 0), EOS, logits.len());
                s.process(&logits, &[], 10);
                let kept = s.warp();
                let mut got = s.candidates[..kept].to_vec();
                got.sort();
                let want = reference_top_p(&logits, top_p as f64);
                // Floating-point sums in another order may move the boundary by one token.
                let diff = got.len().abs_diff(want.len());
                assert!(
                    diff <= 1,
                    "top_p {top_p}: kept {} vs {}",
                    got.len(),
                    want.len()
                );
                let common = got.iter().filter(|i| want.binary_search(i).is_ok()).count();
                assert_eq!(common, got.len().min(want.len()), "top_p {top_p}");
            }
        }
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        // Probabilities 0.25 / 0.75 at temperature 1. At temperature 0.5 they become
        // 1 : 9 (squared ratio), i.e. 0.1 / 0.9; at temperature 2, 1 : sqrt(3) = 0.366 / 0.634.
        let logits = [0.25f32.ln(), 0.75f32.ln(), NEG, NEG];
        let n = 4000;
        let c = frequencies(sampled(0.5, 0, 1.0, 11), &logits, n);
        assert!((300..=500).contains(&c[0]), "expected ~400, got {c:?}");
        let c = frequencies(sampled(2.0, 0, 1.0, 11), &logits, n);
        assert!((1330..=1600).contains(&c[0]), "expected ~1464, got {c:?}");
    }

    #[test]
    fn draws_follow_the_distribution() {
        let logits = [0.25f32.ln(), 0.75f32.ln(), NEG, NEG];
        let c = frequencies(sampled(1.0, 0, 1.0, 42), &logits, 4000);
        // Binomial(4000, 0.25): mean 1000, sd ~27; 900..1100 is more than 3.5 sd.
        assert!((900..=1100).contains(&c[0]), "expected ~1000, got {c:?}");
        assert_eq!(c[0] + c[1], 4000);
    }

    #[test]
    fn same_seed_same_draws_different_seed_different_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed: u64| -> Vec<u32> {
            let mut s = Sampler::new(&sampled(1.0, 0, 1.0, seed), EOS, 50);
            (0..200).map(|_| s.sample(&logits, &[], 10)).collect()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn a_sequences_draws_do_not_depend_on_other_samplers() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 5) as f32 * 0.4).collect();
        let mut alone = Sampler::new(&sampled(0.9, 20, 0.95, 77), EOS, 50);
        let expected: Vec<u32> = (0..100).map(|_| alone.sample(&logits, &[], 10)).collect();
        let mut a = Sampler::new(&sampled(0.9, 20, 0.95, 77), EOS, 50);
        let mut other = Sampler::new(&sampled(1.0, 0, 1.0, 78), EOS, 50);
        let got: Vec<u32> = (0..100)
            .map(|_| {
                other.sample(&logits, &[], 10);
                a.sample(&logits, &[], 10)
            })
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn wide_rows_reuse_the_scratch_buffers() {
        let logits: Vec<f32> = (0..50400)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect();
        let mut s = Sampler::new(&sampled(0.8, 50, 0.9, 1), 50256, 50257);
        for _ in 0..5 {
            let id = s.sample(&logits, &[1, 2, 3], 0);
            assert!(id < 50257);
        }
        let cap = (s.scores.capacity(), s.candidates.capacity());
        s.sample(&logits, &[1, 2, 3], 0);
        assert_eq!((s.scores.capacity(), s.candidates.capacity()), cap);
    }
}
