"""Run a stage script (argv[1], its arguments after it) as `accelerate launch` would, recording what every training
step of each rank receives: one JSON line per micro-batch in <RECORD_BATCHES>.rank<k>.jsonl with each row's real
length, the padded width and each row's real token ids. For tests of the batches a multi-process run trains on."""

import json
import os
import runpy
import sys

from transformers import Trainer

_step = Trainer.training_step


def training_step(self, model, inputs, *args, **kwargs):
    mask = inputs["attention_mask"]
    rows = [ids[m.bool()].tolist() for ids, m in zip(inputs["input_ids"], mask)]
    with open(f"{os.environ['RECORD_BATCHES']}.rank{self.args.process_index}.jsonl", "a") as f:
        f.write(json.dumps({"lengths": mask.sum(1).tolist(), "width": mask.shape[1], "rows": rows}) + "\n")
    return _step(self, model, inputs, *args, **kwargs)


if __name__ == "__main__":
    Trainer.training_step = training_step
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
