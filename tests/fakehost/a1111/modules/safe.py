"""modules.safe: the webui's safe loader, which replaces ``torch.load`` for the whole process.

What it does, as the real one does it: before loading, it opens the file as a zip and checks the record names
against an allow-list (1.6.0 knows only ``data.pkl``, ``version`` and ``data/N``; 1.8+ also ``byteorder`` and
``.data/serialization_id``), then unpickles ``data.pkl`` with a restricted unpickler that knows a short list of
globals. A refused file is reported on the console and ``None`` is returned, not an exception. Given a file
object, the check reads it and the real load then continues from wherever the check left the position.
"""
from __future__ import annotations

import collections
import pickle
import re
import sys
import zipfile

import torch
from modules import errors
from modules._variant import FLAGS

_STORAGES = ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage",
             "BFloat16Storage")
_RECORDS = (r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$" if FLAGS.infotext_utils
            else r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")


class RestrictedUnpickler(pickle.Unpickler):
    def persistent_load(self, saved_id):
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
            return getattr(torch._utils, name)
        if module == "torch" and (name in _STORAGES or name == "float32"):
            return getattr(torch, name)
        raise Exception(f"global '{module}/{name}' is forbidden")


def check_pt(filename) -> None:
    with zipfile.ZipFile(filename) as z:
        for name in z.namelist():
            if not re.match(_RECORDS, name):
                raise Exception(f"bad file inside {filename}: {name}")
        pickles = [n for n in z.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise Exception(f"data.pkl not found in {filename}")
        with z.open(pickles[0]) as file:
            RestrictedUnpickler(file).load()


def load(filename, *args, **kwargs):
    try:
        check_pt(filename)
    except Exception:
        errors.report(f"Error verifying pickled file from {filename}", exc_info=True)
        return None
    return unsafe_torch_load(filename, *args, **kwargs)


unsafe_torch_load = torch.load


def install() -> None:
    torch.load = load


def uninstall() -> None:
    torch.load = unsafe_torch_load
    sys.modules.pop(__name__, None)
