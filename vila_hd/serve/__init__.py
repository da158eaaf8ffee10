"""``vila-hd serve``: an OpenAI-compatible HTTP server on the project's :class:`vila_hd.engine.Engine`.

- :mod:`vila_hd.serve.schema`: request validation (OpenAI's chat-completions body, VILA-HD's extra fields,
  image URLs) into :class:`~vila_hd.serve.schema.ChatRequest`; every bad input is an :class:`APIError`.
- :mod:`vila_hd.serve.batcher`: the bounded queue and the single generation thread that batches compatible
  requests into one left-padded ``Engine.generate_batch``.
- :mod:`vila_hd.serve.app`: the FastAPI app factory (:func:`create_app`, an engine injected).
- :mod:`vila_hd.serve.cli`: the ``vila-hd serve`` command (``SERVE``); :mod:`vila_hd.serve.arguments`: the
  model / generation / serving-limit flags and :func:`~vila_hd.serve.arguments.load_engine`, shared with chat,
  infer and eval.

FastAPI and uvicorn are imported only here (the ``serve`` extra).
"""
