"""Write the sha256 of every public benchmark prompt (normalised) to tests/data/benchmark_prompt_keys.sha256.

The benchmark files stay outside the project (evaluation only, never embedded); their hashes let the test
suite check, on any machine, that no prompt of the embedded dataset appears in them. Regenerate after the
shared files change:

    python scripts/benchmark_hashes.py --benchmarks ../shared/benchmarks/refusal
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weight_edit.prompt_files import BenchmarkSpec, load_prompt_file, prompt_key  # noqa: E402

DEFAULT_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "refusal"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "benchmark_prompt_keys.sha256"


def key_hash(text: str) -> str:
    return hashlib.sha256(prompt_key(text).encode("utf-8")).hexdigest()


def benchmark_key_hashes(folder: Path) -> list[str]:
    """Sorted, unique hashes of the normalised prompts of every CSV in `folder`."""
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise SystemExit(f"{folder}: no benchmark CSV files")
    return sorted({key_hash(p.text) for f in files for p in load_prompt_file(BenchmarkSpec("harmful", f.stem, f))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmarks", type=Path, default=DEFAULT_BENCHMARKS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    hashes = benchmark_key_hashes(args.benchmarks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(h + "\n" for h in hashes))
    print(f"wrote {len(hashes)} prompt hashes from {args.benchmarks} to {args.out}")


if __name__ == "__main__":
    main()
