"""The edited checkpoint's model card (OUT/README.md): hub metadata, intended use, what was edited, provenance.

Rendered from the provenance file, and again by `verify` with its result, so the card never claims a
check that did not run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"


def render_card(provenance: dict[str, Any], verify: dict[str, Any] | None = None) -> str:
    base = provenance.get("base_model") or Path(provenance["source"]["path"]).name
    weights = provenance.get("base_model_weights")
    direction = provenance.get("direction_source", {})
    lines = [
        "---",
        f"base_model: {base}" + ("  # a quantised copy, see 'Source weights'" if weights else ""),
        "library_name: transformers",
        "tags:",
        "- weight-edit",
        "- refusal-direction",
        "- orthogonalized",
        "- research",
        "---",
        "",
        f"# {Path(str(base)).name}, refusal direction removed (weight-edit)",
        "",
        "**Intended use: evaluation of open-weight models** — measuring how refusal is represented and how",
        "robust safety training is. This checkpoint answers requests its base model refuses: it is not for",
        "deployment.",
        "",
        *([f"**Source weights:** {weights}.", ""] if weights else []),
        "## What was edited",
        "",
        f"- Edit: `{provenance['mode']}` projection of "
        + (
            f"a rank-{provenance['subspace']['rank']} subspace (the direction and the top principal components of "
            "the policy-area directions)"
            if provenance.get("subspace")
            else "one direction"
        )
        + " out of every weight that writes into the "
        f"residual stream ({len(provenance['edited_tensors'])} tensors: token embedding, attention and MLP "
        f"outputs and their biases), architecture family `{provenance['architecture']}`.",
        f"- Guarantee for this family and mode: `{provenance['guarantee']}`.",
        f"- Direction: sha256 `{provenance['direction']['sha256']}`"
        + (
            f", fit at layer {direction['layer']}, position {direction['position']}"
            if direction.get("layer") is not None
            else ""
        )
        + (", per-layer biprojected directions" if provenance.get("layer_directions") else "")
        + ".",
        "- Strength: "
        + (
            "full (1.0) on every writer."
            if not provenance.get("strengths")
            else "per layer (embedding "
            + f"{provenance['strengths']['embedding']:.2f}; attention "
            + " ".join(f"{s:.2f}" for s in provenance["strengths"]["attention"])
            + "; MLP "
            + " ".join(f"{s:.2f}" for s in provenance["strengths"]["mlp"])
            + ")."
        ),
        f"- Tied embeddings untied (explicit `lm_head.weight`): {'yes' if provenance['untied_embeddings'] else 'no'}.",
        *_dequantized_lines(provenance.get("dequantized")),
        f"- Tool: weight-edit {provenance['version']}.",
        "",
        "## Provenance",
        "",
        "| file | source sha256 | edited sha256 |",
        "|---|---|---|",
        *[
            f"| {shard} | `{provenance['source']['shards'][shard]['sha256']}` | `{entry['sha256']}` |"
            for shard, entry in provenance["output"]["shards"].items()
        ],
        "",
        "## Verification",
        "",
    ]
    if verify is None:
        lines.append("Not verified yet: run `weight-edit verify` on this folder.")
    else:
        lines += [
            f"`weight-edit verify`: **{'passed' if verify['passed'] else 'FAILED'}** on {verify['prompts']} prompts "
            f"(stored {verify['stored_dtype']}) — {verify['guarantee_text']}.",
            "",
            "| metric | value |",
            "|---|---|",
            *[f"| {k} | {v:.3g} |" for k, v in verify["metrics"].items()],
        ]
    return "\n".join(lines) + "\n"


def write_card(folder: Path, provenance: dict[str, Any], verify: dict[str, Any] | None = None) -> Path:
    """Write the card atomically (a reader never sees half a file)."""
    path = folder / CARD_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(render_card(provenance, verify), encoding="utf-8")
    os.replace(partial, path)
    return path


def _dequantized_lines(record: dict | None) -> list[str]:
    """The format change of a shipped quantized source's edited tensors, and what it costs in size."""
    if not record:
        return []
    method = record["method"] if isinstance(record["method"], str) else " and ".join(record["method"])
    growth = record["output_bytes"] - record["source_bytes"]
    return [
        f"- Stored format changed: {len(record['tensors'])} {method} tensors (the quantized residual writers and "
        f"what must leave quantization with them) are stored in {record['dtype']}: "
        f"{record['source_bytes'] / 1e6:.1f} MB quantized became {record['output_bytes'] / 1e6:.1f} MB "
        f"(+{growth / 1e6:.1f} MB); {record['still_quantized']} tensors stay quantized."
    ]
