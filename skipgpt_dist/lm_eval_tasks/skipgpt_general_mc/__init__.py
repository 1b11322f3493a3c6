"""skipgpt_general_mc: 150 hand-written 4-choice general-knowledge completions (geography, science, mathematics,
units, history, animals, everyday facts, language), scored by loglikelihood like skipgpt_mc; no Hub needed."""
