"""pytest fixtures that install a stand-in webui host for one test and remove it afterwards."""
from __future__ import annotations

import pytest

from .host import FakeHost


def _host(variant: str, tmp_path):
    host = FakeHost(variant, tmp_path / "webui")
    host.install()
    try:
        yield host
    finally:
        host.uninstall()


@pytest.fixture
def host_v160(tmp_path):
    yield from _host("v1.6.0", tmp_path)


@pytest.fixture
def host_v1101(tmp_path):
    yield from _host("v1.10.1", tmp_path)


@pytest.fixture
def host_forge(tmp_path):
    yield from _host("forge", tmp_path)


@pytest.fixture
def host_reforge(tmp_path):
    yield from _host("reforge", tmp_path)


@pytest.fixture
def host_classic(tmp_path):
    yield from _host("forge-classic", tmp_path)


@pytest.fixture
def host_neo(tmp_path):
    yield from _host("forge-neo", tmp_path)


@pytest.fixture(params=["v1.6.0", "v1.10.1"])
def host(request, tmp_path):
    yield from _host(request.param, tmp_path)
