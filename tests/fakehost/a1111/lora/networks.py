"""The built-in Lora extension's `networks` module, reduced to its default merged-weights mode.

Loaded networks stay loaded between generations; every patched Linear/Conv2d forward first brings its
weight in line with ``loaded_networks``: back up the clean weight once, restore it, add each network's delta.
"""
from __future__ import annotations

import torch
from modules import extra_networks, script_callbacks, shared

available_networks: dict[str, dict[str, torch.Tensor]] = {}  # name -> {network_layer_name: weight delta}
loaded_networks: list[LoadedNetwork] = []


class LoadedNetwork:
    def __init__(self, name: str, multiplier: float):
        self.name, self.te_multiplier, self.unet_multiplier, self.dyn_dim = name, multiplier, multiplier, None
        self.deltas = available_networks[name]


def register_network(name: str, deltas: dict[str, torch.Tensor]) -> None:
    """Make ``<lora:name:m>`` available (the stand-in takes deltas directly instead of reading a file)."""
    available_networks[name] = deltas


def load_networks(names: list[str], te_multipliers=None, unet_multipliers=None, dyn_dims=None) -> None:
    loaded_networks.clear()
    for i, name in enumerate(names):
        multiplier = (te_multipliers or [1.0] * len(names))[i]
        loaded_networks.append(LoadedNetwork(name, multiplier))


def network_apply_weights(module: torch.nn.Module) -> None:
    layer_name = getattr(module, "network_layer_name", None)
    if layer_name is None:
        return
    wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in loaded_networks)
    if getattr(module, "network_current_names", ()) == wanted:
        return
    backup = getattr(module, "network_weights_backup", None)
    if backup is None and wanted:
        backup = module.network_weights_backup = module.weight.detach().to("cpu", copy=True)
    with torch.no_grad():
        if backup is not None:
            module.weight.copy_(backup)
        for network in loaded_networks:
            delta = network.deltas.get(layer_name)
            if delta is not None:
                module.weight += delta.to(module.weight) * network.te_multiplier
    module.network_current_names = wanted


def assign_network_names_to_compvis_modules(sd_model) -> None:
    mapping = {}
    for name, module in sd_model.cond_stage_model.wrapped.named_modules():
        mapping[name.replace(".", "_")] = module
        module.network_layer_name = name.replace(".", "_")
    for name, module in sd_model.model.named_modules():
        mapping[name.replace(".", "_")] = module
        module.network_layer_name = name.replace(".", "_")
    sd_model.network_layer_mapping = mapping


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")

    def activate(self, p, params_list) -> None:
        additional = shared.opts.sd_lora  # Settings > "Add network to prompt": joins every generation
        if additional != "None" and additional in available_networks and \
                not any(params.items[0] == additional for params in params_list):
            p.all_prompts = [prompt + f"<lora:{additional}:1>" for prompt in p.all_prompts]  # None on a bare p
            params_list.append(extra_networks.ExtraNetworkParams(items=[additional, "1"]))
        names = [params.positional[0] for params in params_list]
        multipliers = [float(params.positional[1]) if len(params.positional) > 1 else 1.0 for params in params_list]
        load_networks(names, multipliers, multipliers)

    def deactivate(self, p) -> None:
        pass  # loaded networks stay merged until the next activate


class Originals:
    """The class-level forward patches, undoable like the Lora extension's LoraPatches."""

    def __init__(self):
        self.saved = {cls: cls.forward for cls in (torch.nn.Linear, torch.nn.Conv2d)}

    def patch(self) -> None:
        for cls, original in self.saved.items():
            def forward(self, input, _original=original):
                network_apply_weights(self)
                return _original(self, input)

            cls.forward = forward

    def undo(self) -> None:
        for cls, original in self.saved.items():
            cls.forward = original


originals: Originals | None = None


def install() -> None:
    """What scripts/lora_script.py does at load: patch forwards, name modules on load, register <lora:...>."""
    global originals
    originals = Originals()
    originals.patch()
    script_callbacks.on_model_loaded(assign_network_names_to_compvis_modules)
    extra_networks.register_extra_network(ExtraNetworkLora())
