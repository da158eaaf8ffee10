"""Library noise that says nothing a user can act on, dropped by message (ground layer: no project imports).

DeepSpeed logs start-up banners wherever it is imported: its accelerator auto-detection on a machine without a
GPU, and the CPU communication op it builds on the first init. ``save_pretrained`` imports DeepSpeed too when it
is installed (accelerate's ``unwrap_model`` looks for its engine class), so commands that never train (convert,
merge-lora) would print them. :func:`drop_deepspeed_banners` installs the filter on DeepSpeed's logger once.
"""

from __future__ import annotations

import logging
import re

DEEPSPEED_BANNERS = re.compile(r"Setting (ds_)?accelerator to |DeepSpeed \S+ built successfully$")


class DropDeepSpeedBanners(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not DEEPSPEED_BANNERS.match(record.getMessage())


def drop_deepspeed_banners() -> None:
    """Filter DeepSpeed's logger ("DeepSpeed", see deepspeed.utils.logging) before it first logs (idempotent)."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, DropDeepSpeedBanners) for f in logger.filters):
        logger.addFilter(DropDeepSpeedBanners())
