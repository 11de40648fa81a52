"""modules.extra_networks: <name:args> prompt tags and the registry that activates every network per batch."""
from __future__ import annotations

import re
from collections import defaultdict

from modules import errors

re_extra_net = re.compile(r"<(\w+):([^>]+)>")
extra_network_registry: dict = {}


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = [i for i in self.items if "=" not in i]
        self.named = dict(i.split("=", 1) for i in self.items if "=" in i)

    def __eq__(self, other):
        return isinstance(other, ExtraNetworkParams) and self.items == other.items


class ExtraNetwork:
    def __init__(self, name: str):
        self.name = name

    def activate(self, p, params_list) -> None:
        pass

    def deactivate(self, p) -> None:
        pass


def initialize() -> None:
    extra_network_registry.clear()


def register_extra_network(extra_network: ExtraNetwork) -> None:
    extra_network_registry[extra_network.name] = extra_network


def parse_prompt(prompt: str):
    res: dict = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts: list[str]):
    res, extra_data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        extra_data = extra_data if extra_data is not None else parsed
        res.append(updated)
    return res, extra_data or defaultdict(list)


def activate(p, extra_network_data: dict) -> None:
    """Activate the networks named in ``extra_network_data``, and every other one with no params (unloading it)."""
    activated = []
    for name, params in extra_network_data.items():
        network = extra_network_registry.get(name)
        if network is None:
            continue
        try:
            network.activate(p, params)
            activated.append(network)
        except Exception:
            errors.report(f"activating extra network {name} with arguments {params}", exc_info=True)
    for name, network in extra_network_registry.items():
        if network in activated:
            continue
        try:
            network.activate(p, [])
        except Exception:
            errors.report(f"activating extra network {name}", exc_info=True)


def deactivate(p, extra_network_data: dict) -> None:
    for name in extra_network_data:
        network = extra_network_registry.get(name)
        if network is not None:
            try:
                network.deactivate(p)
            except Exception:
                errors.report(f"deactivating extra network {name}", exc_info=True)
