"""The baselines AXIS is compared with (paper Table 1, Figure 5): alternative Stage 1 merges in
``merges``, aTLAS in ``atlas``, and the plain references (zero-shot, linear probe, LoRA) in
``references``. The harness that runs them all is ``axis_stream.experiments.evaluate.run``."""
