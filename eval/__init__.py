"""Evaluation: benchmark runners, answer parsing and synthetic benchmarks.

- ``vila_hd.eval.benchmarks``: runners reading V*Bench, HR-Bench, MME-RealWorld, TextVQA, RealWorldQA, our 4KPro-style
  and generic JSONL files as published (``build_benchmark``), scored as their official scorers do.
- ``vila_hd.eval.answers`` / ``vila_hd.eval.metrics``: multiple-choice parsing (ours and the official scorers' rules), VQA
  normalisation and soft accuracy, aggregates.
- ``vila_hd.eval.replies``: saved predictions of this project, lmms-eval, VLMEvalKit, MME-RealWorld and LLaVA.
- ``vila_hd.eval.harness``: the run loop (resume, ``--limit``, torchrun sharding, per-sample JSONL, summaries).
- ``vila_hd.eval.predictor``: the ``Predictor`` protocol and its VILA-HD engine implementation.
- ``vila_hd.eval.sweep`` / ``vila_hd.eval.plot``: selection-budget sweeps and the accuracy-vs-tokens plot.
- ``vila_hd.eval.synthetic``: the synthetic high-resolution benchmark generator.
- ``vila_hd.eval.lmms_eval_model``: the ``vila_hd`` model class for lmms-eval.
- ``vila_hd.eval.cli``: ``eval_main`` (``vila-hd eval``) and ``synth_main`` (``vila-hd synth``).

See docs/evaluation.md.
"""
