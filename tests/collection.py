"""The checkout as the collection pyqmail.mail, for tests that load its plugins in-process.

collections/ansible_collections/pyqmail/mail is a symlink to the checkout and plugins/* link
to library/, module_utils/, filter_plugins/ and action_plugins/: with collections/ on sys.path
the modules' own imports (``ansible_collections.pyqmail.mail.plugins.module_utils.*``) resolve
in the test process exactly as Ansible's payload builder resolves them for a host.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
COLLECTIONS = REPO / "collections"
FQCN_PREFIX = "pyqmail.mail."
MODULE_UTILS = "ansible_collections.pyqmail.mail.plugins.module_utils"

if str(COLLECTIONS) not in sys.path:
    sys.path.insert(0, str(COLLECTIONS))


def module_utils(name: str) -> ModuleType:
    """``plugins/module_utils/<name>.py`` imported under its collection name."""
    return importlib.import_module(f"{MODULE_UTILS}.{name}")


def fqcn(name: str) -> str:
    """A module's fully qualified name: pyqmail_tcprules -> pyqmail.mail.pyqmail_tcprules."""
    return name if "." in name else FQCN_PREFIX + name
