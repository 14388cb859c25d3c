"""Print the markdown table of benchmarks/serve_check/: vLLM modes (serve_check) and kangaroo bench, fp32 and bf16."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(name: str, cells: dict[str, str]) -> str:
    return f"| {name} | {cells.get('float32', '-')} | {cells.get('bfloat16', '-')} |"


def main(root: Path) -> None:
    rows: dict[str, dict[str, str]] = {}
    for dtype in ("float32", "bfloat16"):
        path = root / f"vllm_{dtype}" / "results.json"
        if path.is_file():
            modes = json.loads(path.read_text())["modes"]
            n = json.loads(path.read_text())["prompts"]
            for mode, m in modes.items():
                text = f"{m['tokens_per_s']:.1f} tok/s"
                if mode != "plain":
                    text += f", {m['speedup_vs_plain']:.2f}x, equal {m['equal_to_plain']}/{n}"
                if m["mean_acceptance_length"]:
                    text += f", {m['mean_acceptance_length']:.2f} tok/step"
                rows.setdefault(f"vllm:{mode}", {})[dtype] = text
        path = root / f"kangaroo_{dtype}" / "results.json"
        if path.is_file():
            r = json.loads(path.read_text())
            decoders = r.get("decoders") or {"kangaroo": r, **r.get("peers", {})}  # newer and older bench layouts
            o, a = decoders["kangaroo"]["overall"], decoders["kangaroo-adapter"]["overall"]
            rows.setdefault("kangaroo:vanilla", {})[dtype] = f"{o['vanilla_tokens_per_s']:.1f} tok/s"
            for key, m in (("default", o), ("adapter", a)):
                tps = m.get("tokens_per_s", m.get("kangaroo_tokens_per_s"))
                same = "identical" if m["identical"] else "NOT identical"
                rows.setdefault(f"kangaroo:{key}", {})[dtype] = (
                    f"{tps:.1f} tok/s, {m['speedup']:.2f}x, τ {m['tau']:.2f}, {same} to `generate`"
                )
    names = {
        "vllm:plain": "vLLM 0.32, no speculation (1 compute core)",
        "vllm:draft": "vLLM + exported draft (`draft_model`, k = 2)",
        "vllm:ngram": "vLLM n-gram lookup (k = 4)",
        "vllm:hf": "HF `generate`, same run (transformers 5.19, 2 threads)",
        "kangaroo:vanilla": "HF `generate`, kangaroo `bench` (transformers 5.24, 2 threads)",
        "kangaroo:default": "kangaroo defaults (adapter + lookup), vs that `generate`",
        "kangaroo:adapter": "kangaroo adapter only (`--lookup-tokens 0`)",
    }
    print("| decoder | fp32 | bf16 |")
    print("|---|---|---|")
    for key, name in names.items():
        if key in rows:
            print(row(name, rows[key]))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
