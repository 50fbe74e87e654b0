"""Reward functions as values: reward models, their algebra, scoring and evaluation.

One module per stage: `values` (the expression trees), `data` (JSONL data sets), `ops`
(the pointwise operations, one definition each), `builtins` (the alg functions),
`pointwise` (evaluating trees), `plan` (which model scores which texts), `engine`
(loading, batching, scoring, writing), `cache` (on-disk scores), `evaluate` (accuracy,
RewardBench sections, plots), `generate` (sampling a policy), `trl` (a reward function
for TRL trainers).
"""
