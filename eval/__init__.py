"""Evaluation: benchmark runners, answer parsing and synthetic benchmarks.

- ``eval.benchmarks``: runners reading V*Bench, HR-Bench, MME-RealWorld, TextVQA, our 4KPro-style and generic
  JSONL files as published (``build_benchmark``).
- ``eval.answers`` / ``eval.metrics``: multiple-choice parsing, VQA normalisation and soft accuracy, aggregates.
- ``eval.harness``: the run loop (resume, ``--limit``, torchrun sharding, per-sample JSONL, summaries).
- ``eval.predictor``: the ``Predictor`` protocol and its VILA-HD engine implementation.
- ``eval.sweep`` / ``eval.plot``: selection-budget sweeps and the accuracy-vs-tokens plot.
- ``eval.synthetic``: the synthetic high-resolution benchmark generator.
- ``eval.lmms_eval_model``: the ``vila_hd`` model class for lmms-eval.
- ``eval.cli``: ``eval_main`` (``vila-hd eval``) and ``synth_main`` (``vila-hd synth``).

See docs/evaluation.md.
"""
