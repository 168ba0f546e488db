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

from weight_edit.architecture import Architecture
from weight_edit.edit_math import EditMode, input_scale, unit

Transform = Callable[[torch.Tensor], torch.Tensor]


def _projector(r: torch.Tensor) -> Transform:
    def project(x: torch.Tensor) -> torch.Tensor:
        rr = r.to(device=x.device, dtype=x.dtype)
        return x - (x @ rr).unsqueeze(-1) * rr

    return project


def _renormed_projector(r: torch.Tensor) -> Transform:
    project = _projector(r)

    def project_keep_norm(x: torch.Tensor) -> torch.Tensor:
        projected = project(x)
        norms, new_norms = x.norm(dim=-1, keepdim=True), projected.norm(dim=-1, keepdim=True)
        scale = torch.where(new_norms > 0, norms / new_norms.clamp_min(1e-30), 0.0)
        return project(projected * scale)

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


@contextmanager
def residual_ablation(
    model: torch.nn.Module, arch: Architecture, num_layers: int, direction: torch.Tensor
) -> Iterator[None]:
    project = _projector(unit(direction.float()))
    handles = []
    for layer in range(num_layers):
        handles.append(
            model.get_submodule(arch.module_name(arch.layer_module, layer)).register_forward_pre_hook(
                _input_hook(project), with_kwargs=True
            )
        )
        for template in (arch.attention_module, arch.mlp_module):
            handles.append(
                model.get_submodule(arch.module_name(template, layer)).register_forward_hook(_output_hook(project))
            )
    with _hooks(handles):
        yield


@contextmanager
def weight_equivalent_ablation(
    model: torch.nn.Module, arch: Architecture, num_layers: int, direction: torch.Tensor, mode: EditMode
) -> Iterator[None]:
    """Hooks that reproduce `apply`'s edit exactly, computed from the unedited module weights."""
    r = unit(direction.float())
    project = _projector(r)
    handles = []
    embedding = model.get_submodule(arch.embedding["module"])
    handles.append(
        embedding.register_forward_hook(_output_hook(_renormed_projector(r) if mode == "norm-preserving" else project))
    )
    for layer in range(num_layers):
        for writer in arch.writers:
            module = model.get_submodule(arch.module_name(writer["module"], layer))
            if mode == "norm-preserving":
                weight = module.weight.detach().float()
                scale = input_scale(weight, r.to(weight.device), writer["residual_axis"])

                def rescale(x: torch.Tensor, scale: torch.Tensor = scale) -> torch.Tensor:
                    return x * scale.to(device=x.device, dtype=x.dtype)

                handles.append(module.register_forward_pre_hook(_input_hook(rescale), with_kwargs=True))
            handles.append(module.register_forward_hook(_output_hook(project)))
    with _hooks(handles):
        yield


@contextmanager
def activation_addition(model: torch.nn.Module, arch: Architecture, layer: int, vector: torch.Tensor) -> Iterator[None]:
    def add(x: torch.Tensor) -> torch.Tensor:
        return x + vector.to(device=x.device, dtype=x.dtype)

    module = model.get_submodule(arch.module_name(arch.layer_module, layer))
    with _hooks([module.register_forward_pre_hook(_input_hook(add), with_kwargs=True)]):
        yield
