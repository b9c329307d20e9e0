"""Target-independent FX graph rewrites, run in this order by the backend.

``match`` finds linear ops and records a decision for each; ``smooth`` computes SmoothQuant
scales and folds them into the producer where it can; ``quantize`` replaces the chosen linears by
q-ops with weights quantized once, now; ``embedding`` stores embedding tables in INT8;
``attention`` describes every attention op and rewrites those the recipe quantizes
(``pipeline.run_passes`` runs them all, in that order). No pass knows which target will run
the graph. Every decision lives in ``node.meta["qcompile"]`` as a frozen dataclass (``meta.py``).
"""
