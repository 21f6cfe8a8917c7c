"""``axis-stream evaluate``: the paper's comparisons, run on your own models with one harness.

An experiment file names a base, a pool of source checkpoints (in the fixed order they are added),
targets, methods, trainable-parameter budgets N, seeds, and optional ablations and robustness
settings. For every target, its own source (same name) is left out of the pool and the first 1, 2,
... of the remaining sources are aggregated (leave-one-out, paper section 4.1). Every method is
trained with Stage 2's own recipe, head and data (``adapt.recipe``); budgets are matched to AXIS's
Stage 2 count at N (aTLAS through P, LoRA through its rank). Each finished run appends its rows to
``<output_dir>/results.csv`` at once (fsynced); a restarted evaluation skips the rows already there,
and a run stopped mid-training continues from its last finished epoch. At the end it prints a
summary table and draws PNG plots from the whole CSV.

Method names: the Stage 1 merges of ``core.merges`` (``axis``, ``axis-global``, ``ta``,
``average``, ``ties``, ``dare``, ``tsvm`` and the continual ``opcm``, ``continual-ta``,
``continual-ties``, ``running-average``), each followed by Stage 2 or, with ``stage2 = false``,
measured as merged models (``merged``), and ``atlas``, ``zeroshot``, ``linear-probe``, ``lora``.
``orders`` runs the experiment in several arrival orders; ``multitask`` adds the multi-task pass
(``multitask``: accuracy on the source tasks folded so far, backward transfer). The experiment file is parsed here (not in ``config``): it is not the
daemon's configuration.
"""
