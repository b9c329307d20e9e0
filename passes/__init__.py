"""Target-independent FX graph rewrites, run in this order by the backend.

``match`` finds linear and attention ops and records a decision for each; ``smooth`` computes
SmoothQuant scales and folds them into the producer where it can; ``quantize`` replaces the
chosen linears by q-ops with weights quantized once, now. No pass knows which target will run
the graph. Every decision lives in ``node.meta["qcompile"]`` as a frozen dataclass (``meta.py``).
"""
