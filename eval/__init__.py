"""Evaluation: benchmark runners, answer parsing and synthetic benchmarks.

- ``eval.benchmarks``: runners reading V*Bench, HR-Bench, MME-RealWorld, TextVQA, RealWorldQA, our 4KPro-style
  and generic JSONL files as published (``build_benchmark``), scored as their official scorers do.
- ``eval.answers`` / ``eval.metrics``: multiple-choice parsing (ours and the official scorers' rules), VQA
  normalisation and soft accuracy, aggregates.
- ``eval.replies``: saved predictions of this project, lmms-eval, VLMEvalKit, MME-RealWorld and LLaVA.
- ``eval.harness``: the run loop (resume, ``--limit``, torchrun sharding, per-sample JSONL, summaries).
- ``eval.predictor``: the ``Predictor`` protocol and its VILA-HD engine implementation.
- ``eval.sweep`` / ``eval.plot``: selection-budget sweeps and the accuracy-vs-tokens plot.
- ``eval.synthetic``: the synthetic high-resolution benchmark generator.
- ``eval.lmms_eval_model``: the ``vila_hd`` model class for lmms-eval.
- ``eval.cli``: ``eval_main`` (``vila-hd eval``) and ``synth_main`` (``vila-hd synth``).

See docs/evaluation.md.
"""
