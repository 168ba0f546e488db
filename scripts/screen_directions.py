"""Screen direction variants against the fitted direction: first-token refusal and KL at uniform strengths.

`tune` searches per-layer strengths for one direction. This asks the other question of the issue
"choose the edit automatically": would another direction from the same fit trace a better
refusal/KL curve? Each variant is removed at a few uniform strengths (every layer's attention and MLP
writes at s, the embeddings at min(s, 1)) through the exact hook twin of the written checkpoint, on
the fit areas' validation prompts only (never the held-out areas), and scored like a `tune` trial:
mean first-token refusal probability mass on unsafe prompts, the fraction with refusal log-odds > 0,
and mean first-token KL(source ‖ edited) on safe prompts. Variants, all from `fit`'s files:

* `layer L`: the diff-in-means at the fitted position of each layer in `--layers` (the fitted layer's
  is the fitted direction itself);
* `mean of L-1..L+1`: the normalised mean of the fitted layer's and its neighbours' unit directions;
* `biprojected`: the fitted direction made orthogonal to each layer's harmless mean (`apply --biproject`);
* `project mode`: the fitted direction, plain projection instead of norm-preserving.

Only scores are written (`--out` CSV); no completion is generated.

    python scripts/screen_directions.py --fit-dir runs/reference/fit --out artifacts/reference/search/direction_screen.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import settings  # noqa: E402


def main() -> None:
    import torch
    from safetensors.torch import load_file

    from weight_edit.activations import tokenized_batches
    from weight_edit.architecture import architecture_for
    from weight_edit.chat import post_instruction_ids, refusal_token_ids
    from weight_edit.checkpoint import Checkpoint
    from weight_edit.dataset import load_split
    from weight_edit.direction_file import load_direction
    from weight_edit.edit_math import biprojected_directions, unit
    from weight_edit.edit_plan import EditPlan, Strengths
    from weight_edit.hooks import weight_equivalent_ablation
    from weight_edit.models import auto_batch_size, input_device, load_model, resolve_model
    from weight_edit.records import write_csv
    from weight_edit.search import TrialScorer, first_token_log_probs
    from weight_edit.workflow import checks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-dir", type=Path, default=Path("runs/reference/fit"))
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the one the fit names)")
    parser.add_argument("--validation-prompts", type=int, default=20, help="per label, round-robin over fit areas")
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 1.2])
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="default: fitted layer -4 .. +4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    direction, sidecar = load_direction(args.fit_dir / settings.DIRECTION_FILE)
    if sidecar is None:
        sys.exit(f"{args.fit_dir} has no direction.json: run `weight-edit fit` first")
    means = load_file(str(args.fit_dir / "activation_means.safetensors"))
    layer, position = int(sidecar["layer"]), int(sidecar["position"])
    folder = resolve_model(args.model or sidecar["model"]["folder"])
    checkpoint = Checkpoint(folder)
    arch = architecture_for(checkpoint.config)
    num_layers = arch.num_layers(checkpoint.config)
    targets = arch.targets(checkpoint.config, checkpoint.tensor_names, shapes=checkpoint.shapes)
    seed = (sidecar.get("split") or {}).get("seed", settings.SEED)
    data, split = load_split(settings.DEFAULT_DATASET, seed)
    checks.same_split(sidecar, data, split, args.fit_dir / settings.DIRECTION_SIDECAR)  # never a held-out prompt

    def texts(label: str) -> list[str]:
        return split.texts("validation", label, args.validation_prompts)

    contrast = sidecar.get("contrast", "safe")  # KL on the contrast's validation prompts, as `tune` measures it
    unsafe, safe = texts("unsafe"), texts(contrast)
    model, tokenizer = load_model(folder, dtype=args.dtype, device=args.device)
    batch_size = args.batch_size or auto_batch_size(model)
    prepared = tokenized_batches(
        tokenizer, [*unsafe, *safe], batch_size, input_device(model), post_instruction_ids(tokenizer), by_length=True
    )
    source = first_token_log_probs(model, prepared)
    trial_scores = TrialScorer(source, len(unsafe), refusal_token_ids(tokenizer, settings.REFUSAL_PREFIXES))

    def scores(log_probs: torch.Tensor) -> dict[str, float]:
        fraction, mass, kl = trial_scores(log_probs)
        return {"refusal_prob": round(mass, 5), "refusal_score": round(fraction, 4), "kl": round(kl, 5)}

    def layer_direction(index: int) -> torch.Tensor | None:
        """The unit diff-in-means at (index, position); None where it vanishes (e.g. the embedding's layer 0)."""
        diff = (means["unsafe"][index, position] - means[contrast][index, position]).double()
        return unit(diff).float() if diff.norm() > 0 else None

    candidates = {x: layer_direction(x) for x in range(num_layers)}
    candidates[layer] = direction
    layers = [x for x in (args.layers or range(layer - 4, layer + 5)) if 0 <= x < num_layers]
    skipped = [x for x in layers if candidates[x] is None]
    if skipped:
        print(f"skipped layers {skipped}: unsafe and {contrast} means are equal there", flush=True)
    neighbours = [x for x in (layer - 1, layer, layer + 1) if 0 <= x < num_layers and candidates[x] is not None]
    variants: list[tuple[str, torch.Tensor, torch.Tensor | None, str]] = [
        (f"layer {x}" + (" (fitted)" if x == layer else ""), candidates[x], None, "")
        for x in layers
        if candidates[x] is not None
    ]
    variants += [
        (
            f"mean of layers {neighbours[0]}..{neighbours[-1]}",
            unit(sum(unit(candidates[x]) for x in neighbours)),
            None,
            "",
        ),
        ("biprojected (fitted)", direction, biprojected_directions(direction, means[contrast][:, position, :]), ""),
        ("project mode (fitted)", direction, None, "project"),
    ]
    rows = [{"variant": "source", "mode": "", "strength": 0.0, **scores(source), "seconds": 0.0}]
    print(f"{len(unsafe)} + {len(safe)} validation prompts; source: {rows[0]}", flush=True)
    for name, vector, layer_directions, mode in variants:
        for strength in args.strengths:
            started = time.perf_counter()
            strengths = Strengths(min(strength, 1.0), (strength,) * num_layers, (strength,) * num_layers)
            plan = EditPlan.build(vector, num_layers, None, layer_directions, strengths)
            edit_mode = mode or "norm-preserving"
            with weight_equivalent_ablation(model, targets, plan, edit_mode, read_tensor=checkpoint.read):
                row = scores(first_token_log_probs(model, prepared))
            seconds = round(time.perf_counter() - started, 1)
            rows.append({"variant": name, "mode": edit_mode, "strength": strength, **row, "seconds": seconds})
            print(f"{name:28s} {edit_mode:16s} s={strength:.2f} {row}", flush=True)
    if args.out:
        print(f"wrote {write_csv(args.out, rows)}")


if __name__ == "__main__":
    main()
