"""Calibration-time weight algorithms: AWQ, GPTQ, clip search, scale refit and tuning (each the math
for one step), ``rounding`` (which runs them block by block for a recipe) and ``auto`` (a format
per linear within a perplexity budget). They write ``PreparedWeight`` records into the model's
state; the quantize pass turns those into graph constants."""
