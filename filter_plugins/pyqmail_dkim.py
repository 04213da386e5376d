# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters of the role pyqmail_dkim.

``pyqmail_dkim_prefix``: the default selector prefix of a host, from its inventory name
(``host_prefix`` in ``module_utils/pyqmail_dkim.py``, with the other selector rules, so the
role's default and the module's checks never disagree). A filter rather than Jinja: the
rules (a DNS label, a letter first, a bounded length) need tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ansible.errors import AnsibleFilterError
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_dkim import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    host_prefix,
)


def dkim_prefix(host: Any) -> str:
    """``inventory_hostname`` -> the host's selector prefix (``mx1.example.org`` -> ``mx1-``)."""
    if not isinstance(host, str) or not host.strip():
        raise AnsibleFilterError(
            f"pyqmail_dkim_prefix: {host!r} is not a host name (give inventory_hostname)"
        )
    return str(host_prefix(host))


class FilterModule:
    """The pyqmail_dkim role's filters."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {"pyqmail_dkim_prefix": dkim_prefix}
