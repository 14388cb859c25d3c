"""Spec-Bench style benchmark: vanilla ``generate``, Kangaroo and peer decoders (e.g. HF prompt lookup), all of
them ``Decoder``s, interleaved per question in one process (``python -m kangaroo_infer bench``).

Writes ``results.json`` (per decoder: overall and per-category speedup, τ, tokens/s, identity; a measured cost
profile and the speedup limit it implies), ``answers.jsonl`` (one record per question: ``{"decoders": {name:
run}}`` plus the question's fields), ``speedup.png`` and prints a table; optionally one Spec-Bench model-answer file
per decoder (``--spec-bench-dir``). ``--sweep`` and ``--batch-size`` run the other two benchmarks
(``throughput.py``), ``--cost-profile-only`` the cost profile alone (``cost.py``).

Modules: ``decoders`` (the Decoder abstraction and every decoder), ``records`` (answers.jsonl records, the earlier
schema converted, summaries), ``run`` (the question benchmark and its resume), ``out_dir`` (``--out``'s files and
their checks), ``spec_bench`` (Spec-Bench answer files), ``report`` (plot and tables), ``cost`` (cost profile),
``throughput`` (sweep and batched throughput).
"""

from .cost import cost_profile, profile_only, rounds_limit, speedup_limit
from .decoders import (
    DEFAULT_PLD_TOKENS,
    PEER_KINDS,
    Decoder,
    DecoderRun,
    DraftModel,
    Peer,
    PeerRun,
    make_decoders,
    make_peers,
    run_kangaroo,
    run_vanilla,
)
from .out_dir import (
    ANSWERS,
    OWNER,
    PLOT,
    RESULTS,
    SETTINGS,
    SWEEP,
    check_out_dir,
    check_out_files,
    display_name,
    require_matplotlib,
)
from .records import first_difference, summarize, summarize_decoders, upgrade_record
from .report import plot, print_batch_table, print_table
from .run import bench, check_bench_args, run_config
from .spec_bench import spec_bench_model_ids, write_spec_bench
from .throughput import batch_throughput, left_padded, sweep

__all__ = [
    "ANSWERS", "DEFAULT_PLD_TOKENS", "OWNER", "PEER_KINDS", "PLOT", "RESULTS", "SETTINGS", "SWEEP", "Decoder",
    "DecoderRun", "DraftModel", "Peer", "PeerRun", "batch_throughput", "bench", "check_bench_args", "check_out_dir",
    "check_out_files", "cost_profile", "display_name", "first_difference", "left_padded", "make_decoders", "make_peers",
    "plot", "print_batch_table", "print_table", "profile_only", "require_matplotlib", "rounds_limit", "run_config",
    "run_kangaroo", "run_vanilla", "spec_bench_model_ids", "speedup_limit", "summarize", "summarize_decoders", "sweep",
    "upgrade_record", "write_spec_bench",
]  # fmt: skip
