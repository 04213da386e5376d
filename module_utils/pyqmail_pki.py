"""The preflight checks of the CA and the server certificate (rows of CHECKS in
``pyqmail_inventory``: the role ``pyqmail_certificates``' variables).

Why its own module: the modules ``pyqmail_ca`` and ``pyqmail_certificate`` make the CA and
the certificates on the hosts, late in a run; these rows refuse, before any task runs, what
would fail there or go wrong quietly: a renewal margin that would re-make the CA or a
certificate on every run, a CA that expires within the certificates' own margin, a CA host
outside the inventory, names a certificate cannot carry, a provided key without its
certificate. The name rule is the module's (``pyqmail_crypto``), imported only when the names
are checked: every other check works without ``cryptography``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_checkbase import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    PEM_CERT,
    Problems,
)


def check_provided(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """Your own key and certificate come together (and a chain only with them)."""
    key = values["pyqmail_certificates__provided_key"]
    chain = values["pyqmail_certificates__provided_chain"]
    if bool(key) != bool(value):
        yield (
            f"{name}: set pyqmail_certificates__provided_key and {name} together, "
            "or neither to use the CA"
        )
    elif chain and not value:
        yield f"pyqmail_certificates__provided_chain: is set without {name}"


def check_ca_host(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """The CA host must be a host of the inventory (certificates are issued there)."""
    if value not in values.get("groups", {}).get("all", [value]):
        yield f"{name}: {value!r} is not a host of the inventory"


def check_ca_common_name(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """The CA's CN: 1 to 64 characters (X.509 upper bound)."""
    del values
    if not 1 <= len(value) <= 64:
        yield f"{name}: must have 1 to 64 characters, not {len(value)}"


def check_cert_names(name: str, value: list[str], values: Mapping[str, Any]) -> Problems:
    """The server certificate's names, as pyqmail_certificate checks them."""
    del values
    # cryptography is imported only here: every other check works without it.
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_crypto import (  # noqa: PLC0415
        CryptoError,
        check_names,
    )

    try:
        check_names(value, "server")
    except CryptoError as exc:
        yield f"{name}: {exc}"


def check_renew(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """Renewal must start before expiry, or every run would renew the certificate."""
    valid = values["pyqmail_certificates__valid_days"]
    if not 0 <= value < valid:
        yield f"{name}: {value} must be 0 or more and smaller than valid_days ({valid})"


def check_ca_renew(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """pyqmail_ca's renewal margin: below the CA's validity (or every run re-makes the CA, as
    pyqmail_ca refuses), and not below the certificates' own margin (pyqmail_certificate
    refuses to issue from a CA that expires within it, and the CA would not be renewed yet)."""
    valid = values["pyqmail_certificates__ca_valid_days"]
    leaf = values["pyqmail_certificates__renew_before_days"]
    if not 0 <= value < valid:
        yield (
            f"{name}: {value} must be 0 or more and smaller than "
            f"pyqmail_certificates__ca_valid_days ({valid}), or every run would re-make the CA"
        )
    elif value < leaf < values["pyqmail_certificates__valid_days"]:  # else: leaf's own problem
        yield (
            f"{name}: {value} must be at least pyqmail_certificates__renew_before_days ({leaf}): "
            f"certificates are not issued from a CA expiring within {leaf} days, and the CA is "
            f"renewed only {value} days before it expires"
        )


def check_pem_list(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """A PEM certificate (for clientca.pem)."""
    del values
    if PEM_CERT not in value:
        yield f"{name}: is not a PEM certificate ({PEM_CERT} missing)"
