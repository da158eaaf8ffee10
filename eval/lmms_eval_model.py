"""An lmms-eval model class, ``vila_hd``, so the standard lmms-eval tasks run on VILA-HD checkpoints.

lmms-eval is an optional extra (``pip install lmms-eval``); nothing here imports it until the class is asked
for. Run lmms-eval's own CLI with the model registered:

    python -m vila_hd.eval.lmms_eval_model --model vila_hd \\
        --model_args pretrained=nvidia/VILA-HD-8B-PS3-4K-SigLIP2,steps=6 --tasks vstar_bench,hrbench --batch_size 1

or, in Python, ``vila_hd.eval.lmms_eval_model.register()`` before calling lmms-eval's ``cli_evaluate``.

``model_args``: ``pretrained`` (directory or Hub id), ``adapter``, ``device``, ``dtype``, ``device_map``,
``steps`` / ``tokens`` (selection budget), ``mode`` (top-down / bottom-up), ``max_new_tokens`` (default when the
task gives none). The class implements lmms-eval's "simple" model interface: ``generate_until`` (requests
``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``; the reply is cut at the first ``until``
string) and ``loglikelihood`` (requests ``(context, doc_to_target, doc_to_visual, doc_id, task, split)``;
returns ``(sum of log-probabilities of the continuation, whether greedy decoding would produce it)``).
Under ``accelerate launch`` / ``torchrun`` each process loads the model on its own GPU (``LOCAL_RANK``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from vila_hd.arguments import parse_look_close

MODEL_NAME = "vila_hd"
CLASS_PATH = "vila_hd.eval.lmms_eval_model.VilaHDLmms"
_GENERATION_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k"}


def build_model_class(base: type | None = None) -> type:
    """The lmms-eval model class on lmms-eval's ``lmms`` base (or ``base``, e.g. a stand-in in tests)."""
    if base is None:
        try:
            from lmms_eval.api.model import lmms as base
        except ImportError as err:
            raise ImportError("the vila_hd lmms-eval model needs lmms-eval (pip install lmms-eval)") from err

    class VilaHDLmms(base):
        """VILA-HD in lmms-eval (see the module docstring for ``model_args``)."""

        def __init__(self, pretrained: str | None = None, adapter: str | None = None, device: str | None = None,
                     dtype: str = "auto", device_map: str | None = None, steps: Any = None, tokens: Any = None,
                     mode: str | None = None, max_new_tokens: int = 128, batch_size: int = 1,
                     predictor: Any = None, **unused: Any):
            super().__init__()
            from vila_hd.eval.harness import distributed_rank_world

            self._rank, self._world_size = distributed_rank_world()
            if predictor is None:
                if not pretrained:
                    raise ValueError("vila_hd needs model_args pretrained=<checkpoint directory or Hub id>")
                predictor = _load_predictor(pretrained, adapter, device, dtype, device_map)
            self.predictor = predictor
            self.pretrained = pretrained
            self.batch_size_per_gpu = int(batch_size)
            self.defaults: dict[str, Any] = {"max_new_tokens": int(max_new_tokens)}
            for key, value in (("steps", steps), ("tokens", tokens), ("mode", mode)):
                if value not in (None, ""):
                    self.defaults[key] = value if key == "mode" else parse_look_close(key, value)

        @property
        def batch_size(self) -> int:
            return self.batch_size_per_gpu

        def _doc_images(self, doc_to_visual, doc_id, task, split) -> list[Any]:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            images = []
            for visual in _flatten(visuals):
                if visual is None:
                    continue
                if isinstance(visual, str) and visual.lower().endswith((".mp4", ".avi", ".mov", ".mkv", ".webm")):
                    raise ValueError(f"task {task}: video input ({visual}) is not supported by vila_hd")
                images.append(visual)
            return images

        def generate_until(self, requests) -> list[str]:
            replies = []
            for request in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                images = self._doc_images(doc_to_visual, doc_id, task, split)
                options = dict(self.defaults)
                options.update({k: v for k, v in (gen_kwargs or {}).items() if k in _GENERATION_KEYS and v is not None})
                if (gen_kwargs or {}).get("do_sample") is False:
                    options["temperature"] = 0
                prediction = self.predictor(images, _as_text(context), options)
                replies.append(cut_at_stop(prediction.text, (gen_kwargs or {}).get("until")))
            return replies

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            """Requests on the same document and context (a multiple-choice question's options) are scored
            together: the images and the context run once, each option from their KV cache."""
            groups: dict[tuple, list[tuple[int, str]]] = {}
            first: dict[tuple, tuple] = {}
            for i, request in enumerate(requests):
                context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
                continuation = (doc_to_target if isinstance(doc_to_target, str)
                                else doc_to_target(self.task_dict[task][split][doc_id]))
                key = (task, split, doc_id, _as_text(context))
                groups.setdefault(key, []).append((i, continuation))
                first.setdefault(key, (doc_to_visual, doc_id, task, split))
            results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
            for key, members in groups.items():
                images = self._doc_images(*first[key])
                scored = self.predictor.continuation_losses(images, key[3], [c for _, c in members], self.defaults)
                for (i, _), (total, _, greedy) in zip(members, scored):
                    results[i] = (-total, greedy)
            return results

        def generate_until_multi_round(self, requests) -> list[str]:
            raise NotImplementedError("vila_hd does not implement multi-round generation in lmms-eval")

    VilaHDLmms.__module__ = __name__
    return VilaHDLmms


def _load_predictor(pretrained, adapter, device, dtype, device_map):
    from vila_hd.engine import Engine
    from vila_hd.eval.predictor import EnginePredictor

    if device is None and device_map is None and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return EnginePredictor(Engine.from_pretrained(pretrained, adapter, device=device, dtype=dtype,
                                                  device_map=device_map))


def cut_at_stop(text: str, until: str | Sequence[str] | None) -> str:
    """``text`` up to the first of the stop strings (lmms-eval's ``until``)."""
    if not until:
        return text
    stops = [until] if isinstance(until, str) else list(until)
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


def _as_text(context: Any) -> str:
    return context[0] if isinstance(context, (list, tuple)) else str(context)


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out = []
    for v in visuals:
        out.extend(_flatten(v))
    return out


_CLASS: type | None = None


def __getattr__(name: str):
    # lmms-eval imports the class by its dotted path; it is built (on lmms-eval's base) on first access.
    global _CLASS
    if name == "VilaHDLmms":
        if _CLASS is None:
            _CLASS = build_model_class()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> type:
    """Make ``--model vila_hd`` known to lmms-eval (its decorator registry and its model tables)."""
    cls = __getattr__("VilaHDLmms")
    try:
        from lmms_eval.api.registry import register_model

        register_model(MODEL_NAME)(cls)
    except (ImportError, ValueError, AssertionError):  # older / newer registries; already registered
        pass
    try:
        import lmms_eval.models as models
    except ImportError:
        return cls
    for table in ("AVAILABLE_SIMPLE_MODELS", "AVAILABLE_MODELS"):
        if isinstance(getattr(models, table, None), dict):
            getattr(models, table)[MODEL_NAME] = CLASS_PATH
    return cls


def main(argv: Sequence[str] | None = None) -> None:
    """lmms-eval's command line with ``vila_hd`` registered."""
    register()
    from lmms_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
