"""One rank of the training runs tests/train/test_fault_injection.py kills: ``vila-hd train CONFIG`` with its progress
reported on an events file, one line per event (``<time> <kind> <detail>``):

- ``step N``: optimizer step N is done;
- ``write PATH``: a checkpoint file is about to be written (every ``torch.save``: DeepSpeed's states, the RNG);
- ``atomic PATH``: ``trainer_state.json`` or ``latest`` is about to be replaced;
- ``publish DIR``: the temporary checkpoint directory is about to be renamed to its final name.

Checkpoint events are held ``pause`` seconds, so that a kill aimed at one lands inside the checkpoint write.
Usage: ``python -c "import fault_child; fault_child.main(sys.argv[1:])" EVENTS_PREFIX PAUSE CONFIG``; the rank
comes from the environment (``RANK``), as under any launcher.
"""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> int:
    events_prefix, pause, config = argv[0], float(argv[1]), argv[2]
    rank = int(os.environ.get("RANK", "0"))
    import torch

    torch.set_num_threads(1)
    import vila_hd.train.checkpoint as ckpt
    from vila_hd.train import trainer

    log = open(f"{events_prefix}.rank{rank}", "a", buffering=1)

    def event(kind: str, detail) -> None:
        log.write(f"{time.time():.4f} {kind} {detail}\n")
        log.flush()

    def held(kind: str, function, path_arg: int):
        def wrapper(*args, **kwargs):
            event(kind, args[path_arg] if len(args) > path_arg else "")
            if pause:
                time.sleep(pause)
            return function(*args, **kwargs)

        return wrapper

    torch.save = held("write", torch.save, 1)
    ckpt._write_atomic = held("atomic", ckpt._write_atomic, 0)
    ckpt._publish = held("publish", ckpt._publish, 1)
    optimizer_step = trainer.Trainer._optimizer_step

    def counted(self, micro):
        result = optimizer_step(self, micro)
        event("step", self.step + 1)
        return result

    trainer.Trainer._optimizer_step = counted
    from vila_hd.train.cli import train_main

    return train_main([config]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
