"""PS3 localized contrastive pre-training (reference spec §10).

- :mod:`.data`: box-caption records (JSONL / ``datasets``), the joint image + box crop, GT maps, caption hooks;
- :mod:`.model`: :class:`PS3ForPretraining` (both towers + SigLIP logit scale / bias) and its losses;
- :mod:`.losses`: SigLIP sigmoid loss with negatives from every rank, selection BCE;
- :mod:`.init`: SigLIP / SigLIP2 (transformers) or PS3 initialisation, export in the official PS3 layout;
- :mod:`.config`, :mod:`.loop`: recipes and the run on the MLLM trainer (``vila-hd pretrain`` = :func:`pretrain_main`);
- :mod:`.synthetic`: seeded synthetic box-caption data for tests and the demo.
"""
