"""Run-time interventions with PyTorch hooks: the references the weight edit is checked against.

* `residual_ablation`: the paper's directional ablation, x ← x − r̂ r̂ᵀ x on every layer's input and on
  every attention and MLP output.
* `weight_equivalent_ablation`: the exact run-time twin of the weight edit, placed on the modules
  whose weights `apply` edits (input rescale for the norm-preserving mode, output projection).
* `activation_addition`: adds a vector to one layer's input (the paper's induce score).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from weight_edit.architecture import Architecture, ArchitectureError, EditTarget
from weight_edit.edit_math import EditMode, input_scale, norm_adjusted_basis, norm_scale, orthonormal_rows
from weight_edit.edit_plan import EditPlan

Transform = Callable[[torch.Tensor], torch.Tensor]


def _projector(basis: torch.Tensor, strength: float = 1.0) -> Transform:
    """x ← x − s QᵀQ x for orthonormal rows Q [k, d] (a unit vector [d] is one row)."""
    q_cache: dict[tuple, torch.Tensor] = {}

    def project(x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in q_cache:
            q_cache[key] = basis.reshape(-1, basis.shape[-1]).to(device=x.device, dtype=x.dtype)
        q = q_cache[key]
        return x - strength * ((x @ q.T) @ q)

    return project


def _per_row_projector(rows: torch.Tensor) -> Transform:
    """x ← x − r_b r_bᵀ x with unit rows [batch, d]: each batch row gets its own direction (screening)."""

    def project(x: torch.Tensor) -> torch.Tensor:
        rr = rows.to(device=x.device, dtype=x.dtype)
        batch = rr.shape[0]
        if x.ndim == 2 and x.shape[0] != batch:
            # a mixture-of-experts module sees the batch's tokens flattened row by row: [batch * seq, d]
            flat = x.reshape(batch, -1, x.shape[-1])
            rr = rr[:, None, :]
            return (flat - (flat * rr).sum(-1, keepdim=True) * rr).reshape(x.shape)
        rr = rr.reshape(batch, *([1] * (x.ndim - 2)), rr.shape[-1])
        return x - (x * rr).sum(-1, keepdim=True) * rr

    return project


def _renormed_projector(basis: torch.Tensor, strength: float = 1.0) -> Transform:
    """The embedding's twin of the norm-preserving edit: project, restore each row's norm, project again at s = 1."""
    project = _projector(basis, strength)

    def project_keep_norm(x: torch.Tensor) -> torch.Tensor:
        projected = project(x)
        norms, new_norms = x.norm(dim=-1, keepdim=True), projected.norm(dim=-1, keepdim=True)
        scale = torch.where(new_norms > 0, norms / new_norms.clamp_min(1e-30), 0.0)
        return project(projected * scale) if strength == 1.0 else projected * scale

    return project_keep_norm


def _output_hook(transform: Transform):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (transform(output[0]), *output[1:])
        return transform(output)

    return hook


def _input_hook(transform: Transform):
    def hook(module, args, kwargs):
        if args:
            return (transform(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": transform(kwargs["hidden_states"])}

    return hook


@contextmanager
def _hooks(registrations: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in registrations:
            handle.remove()


def check_module_root(model: torch.nn.Module, arch: Architecture) -> None:
    """Check that the model's modules sit where the family table says (its `module_root`): hooks placed by name
    on another class's layout would silently miss, so a mismatch is refused in one line."""
    expected = arch.token_embedding_module()
    try:
        found = model.get_submodule(expected) is model.get_input_embeddings()
    except AttributeError:
        found = False
    if not found:
        names = [name for name, module in model.named_modules() if module is model.get_input_embeddings()]
        raise ArchitectureError(
            f"{type(model).__name__} keeps its token embedding at {names[0] if names else '?'}, not at {expected} "
            f"as the '{arch.family}' table expects of the class it loads ({arch.loader}): load the model with "
            "weight_edit.models.load_model"
        )


def _model_config(model: torch.nn.Module) -> dict:
    config = model.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


@contextmanager
def residual_ablation(
    model: torch.nn.Module, arch: Architecture, num_layers: int, direction: torch.Tensor, per_row: bool = False
) -> Iterator[None]:
    """The paper's ablation of `direction` [d] or of the span of rows [k, d] from every layer's input and from the
    output of every module that writes into the residual stream (attention, linear attention, MLP, experts...).

    With `per_row`, `direction` [batch, d] gives each batch row its own direction (to screen many at once).
    """
    check_module_root(model, arch)
    if per_row:
        rows = direction.float()
        project = _per_row_projector(rows / rows.norm(dim=-1, keepdim=True))
    else:
        project = _projector(orthonormal_rows(direction.float()))
    handles = []
    for layer, modules in arch.writer_modules(_model_config(model), num_layers):
        handles.append(
            model.get_submodule(arch.layer_module_name(layer)).register_forward_pre_hook(
                _input_hook(project), with_kwargs=True
            )
        )
        for name in modules:
            handles.append(model.get_submodule(name).register_forward_hook(_output_hook(project)))
    with _hooks(handles):
        yield


@contextmanager
def weight_equivalent_ablation(
    model: torch.nn.Module,
    targets: list[EditTarget],
    plan: EditPlan,
    mode: EditMode,
    read_tensor: Callable[[str], torch.Tensor] | None = None,
) -> Iterator[None]:
    """Hooks that reproduce `apply`'s edit of `plan`, computed from the unedited in-memory weights.

    A weight that accelerate offloaded (a meta tensor outside the forward pass) is read by its on-disk
    name through `read_tensor` (e.g. `Checkpoint.read`), which is the same tensor.

    Exact for "module" hooks in both modes; "block" hooks (fused experts) only project the block's output,
    which equals the plain projection of every expert but not the norm-preserving rescale.
    """
    handles = []
    blocks: set[str] = set()
    for target in targets:
        if target.is_bias:
            continue  # the module's output projection covers its bias
        module = model.get_submodule(target.module)
        rows, strength = plan.basis_for(target).float(), plan.strength_for(target)
        if target.layer is None:  # token or position embedding: rows are residual vectors
            if mode == "norm-preserving":
                transform = _renormed_projector(rows, strength)
            else:
                transform = _projector(rows, strength)
            handles.append(module.register_forward_hook(_output_hook(transform)))
            continue
        u = rows
        if target.output_norms:
            gammas = [
                (_materialised(model.get_submodule(norm.module).weight, norm.tensor, read_tensor).float(), norm.offset)
                for norm in target.output_norms
            ]
            u = norm_adjusted_basis(rows.to(gammas[0][0].device), norm_scale(gammas))
        if target.hook == "block":
            if target.module not in blocks:
                blocks.add(target.module)
                handles.append(module.register_forward_hook(_output_hook(_projector(u, strength))))
            continue
        if mode == "norm-preserving":
            weight = _materialised(module.weight, target.tensor, read_tensor).float()
            scale = input_scale(weight, u.to(weight.device), target.residual_axis, strength)

            def rescale(x: torch.Tensor, scale: torch.Tensor = scale) -> torch.Tensor:
                return x * scale.to(device=x.device, dtype=x.dtype)

            handles.append(module.register_forward_pre_hook(_input_hook(rescale), with_kwargs=True))
        handles.append(module.register_forward_hook(_output_hook(_projector(u, strength))))
    with _hooks(handles):
        yield


def _materialised(
    parameter: torch.Tensor, on_disk: str | None, read_tensor: Callable[[str], torch.Tensor] | None
) -> torch.Tensor:
    """The parameter's values, from the checkpoint when accelerate has offloaded it (meta device)."""
    if not parameter.is_meta:
        return parameter.detach()
    if read_tensor is None or on_disk is None:
        raise ValueError(f"'{on_disk}' is offloaded (meta device): pass read_tensor to read it from the checkpoint")
    return read_tensor(on_disk)


@contextmanager
def activation_addition(model: torch.nn.Module, arch: Architecture, layer: int, vector: torch.Tensor) -> Iterator[None]:
    def add(x: torch.Tensor) -> torch.Tensor:
        return x + vector.to(device=x.device, dtype=x.dtype)

    check_module_root(model, arch)
    module = model.get_submodule(arch.layer_module_name(layer))
    with _hooks([module.register_forward_pre_hook(_input_hook(add), with_kwargs=True)]):
        yield
