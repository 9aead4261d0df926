"""`pipeline tune`: the smallest (or fastest) recipe for one artifact whose accuracy stays inside a budget.

A *candidate* is a set of overrides of one artifact's params (``int4.block_size=64``, ...). Each is an
ordinary DVC experiment: queued with ``dvc exp run --queue -S ... evaluate@<artifact>``, run by DVC's own
queue workers (``dvc queue start -j N``) and read back from ``dvc exp show --json``. No scheduler or
thread of ours: the search only decides what to queue next. A candidate costs one build and one scoring
pass: the reference's outputs are recorded once and shared by every experiment's workspace
(``PIPELINE_OUTPUTS_DIR``, pipeline/scoring/outputs.py), so no second model is ever loaded. A candidate this
commit already has as an experiment (same name = same overrides) is not queued again; one run on another
commit is restored from DVC's run-cache when it is queued.

Strategies (reasoning about the knobs, the way llama.cpp's quant mixes and Olive's search do, rather
than enumerating blindly):

- ``greedy``: round 1 runs the start recipe (params.yaml as committed) and each knob's other values
  alone; round 2 combines the moves that improved the objective, cumulatively, best first (inside the
  budget before outside); round 3 takes the best recipes still over budget and keeps their most
  sensitive projections at 8 bits (``tune.promote``, ordered by the importance matrix) until it holds;
- ``grid``: every combination (refused past ``max_candidates``); ``random``: ``max_candidates`` draws.

Across machines, ``--slice K/N`` runs every N-th candidate of each round starting at the K-th, and
``--remote R`` shares them: ``dvc exp push R`` (the experiment's git ref to that git remote, its
artifacts to the DVC remote) after a round, ``dvc exp pull R`` before one. A round with candidates
still missing from other slices stops with a message; ``--collect`` only pulls and reports.

The decode objective is measured here, after each round, one artifact at a time (``dvc get`` of the
candidate, our runtime, best of 3): figures taken while the queue's workers share the CPU, or on
another machine, would rank noise.
"""
