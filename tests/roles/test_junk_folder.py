"""One Junk folder: where pyqmail-send puts a quarantined message, what Dovecot shows as
\\Junk (auto-subscribed, so mail clients find it), and what the mailbox role creates.

The name lives in three layers (the daemon, Dovecot's configuration template, the role's
defaults); renamed in one alone, quarantined mail would land in a folder no client is told is
the junk folder.
"""

from __future__ import annotations

import re

import yaml

from pyqmail.send.local import JUNK_FOLDER
from tests.roles.playbook import ROLES

TEMPLATE = ROLES / "pyqmail_dovecot" / "templates" / "etc" / "dovecot" / "dovecot.conf.j2"
DEFAULTS = ROLES / "pyqmail_mailboxes" / "defaults" / "main.yml"


def test_dovecot_marks_the_delivery_folder_as_junk() -> None:
    blocks = dict(re.findall(r"mailbox (\w+) \{\n\s*special_use = \\(\w+)", TEMPLATE.read_text()))
    assert blocks.get(JUNK_FOLDER) == "Junk", blocks


def test_every_new_mailbox_has_the_junk_folder() -> None:
    defaults = yaml.safe_load(DEFAULTS.read_text())
    assert JUNK_FOLDER in defaults["pyqmail_mailboxes__folders"]
