"""Score adapters on the cached greedy answers behind a training run's val/onpolicy_* metrics (its held-out prompts).

Usage: python score_held_out.py RUN_DIR/onpolicy/answers-*.json ADAPTER_DIR [ADAPTER_DIR ...]
The training log has the trained adapter's scores on these answers at each validation; this gives the same figures
for any exported adapter (e.g. the one the run started from), with the public kangaroo_infer.evaluate API.
"""

import json
import sys

from kangaroo_infer.adapter import KangarooAdapter
from kangaroo_infer.arch import Backbone
from kangaroo_infer.base import load_base
from kangaroo_infer.evaluate import EvalAnswer, score_answers

saved = json.load(open(sys.argv[1]))
base = load_base(saved["identity"]["base"], dtype=saved["identity"]["dtype"])
answers = [EvalAnswer(p, a) for p, a in zip(saved["prompts"], saved["answers"], strict=True)]
for directory in sys.argv[2:]:
    result = score_answers(Backbone.of(base), KangarooAdapter.from_pretrained(directory, base), answers)["overall"]
    scores = {k: result[k] for k in ("positions", "top1", "accept", "tau_estimate")}
    print(json.dumps({"answers": sys.argv[1], "adapter": directory, **scores}))
