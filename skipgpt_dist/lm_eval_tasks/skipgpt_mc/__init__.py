"""skipgpt_mc: 36 easy 4-choice completions (capitals, opposites, counting, colours, animals), scored by
loglikelihood; a small local smoke task for the lm-eval integration (no Hugging Face Hub needed)."""
