#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pyqmail_tlsa
short_description: The DANE TLSA 3 1 1 data of a certificate file (read only)
description:
  - Reads the first certificate of a PEM file on the host - C(control/servercert.pem), which
    holds the private key too - and returns the SHA-256 of its SubjectPublicKeyInfo - the data
    of a C(TLSA 3 1 1) record (DANE-EE, SPKI, SHA-256; RFC 7671, RFC 7672) for
    C(_25._tcp.<host>).
  - Only the certificate is parsed; the private key in the same file is neither read into a
    result nor logged, so the file never leaves the host.
  - Changes nothing. A missing file is not an error (C(exists=false)), so the task works in
    check mode on a host where the certificate is not made yet.
author:
  - pyqmail maintainers (@pyqmail)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Reads the same in check mode.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  path:
    description:
      - The PEM file with the certificate (the first C(CERTIFICATE) block is used).
    type: path
    default: /var/qmail/control/servercert.pem
requirements:
  - python3-cryptography on the host
"""

EXAMPLES = r"""
- name: Read the TLSA data of the server certificate
  pyqmail.mail.pyqmail_tlsa:
    path: /var/qmail/control/servercert.pem
  register: tlsa

- name: Show the record
  ansible.builtin.debug:
    msg: "_25._tcp.mx1.example.org. IN TLSA 3 1 1 {{ tlsa.spki_sha256 }}"
  when: tlsa.exists
"""

RETURN = r"""
exists:
  description: Whether the file exists.
  returned: always
  type: bool
spki_sha256:
  description: SHA-256 of the certificate's SubjectPublicKeyInfo (DER), lower-case hex; "" when
    the file does not exist.
  returned: always
  type: str
  sample: 8cb0fc6c527506a053f4f14c8464bebbd6dede2738d11468dd953d7d6a3021f1
not_after:
  description: End of the certificate's validity (UTC, ISO 8601); "" when the file does not
    exist.
  returned: always
  type: str
  sample: "2027-12-24T22:32:22Z"
"""

import hashlib
import os
import traceback

from ansible.module_utils.basic import AnsibleModule

try:
    from cryptography.hazmat.primitives import serialization

    from ansible_collections.pyqmail.mail.plugins.module_utils import pyqmail_crypto as crypto

    IMPORT_ERROR = crypto.CRYPTOGRAPHY_IMPORT_ERROR  # the module_utils import needs no cryptography
except ImportError:
    IMPORT_ERROR = traceback.format_exc()


def tlsa_311(data: bytes) -> tuple[str, str]:
    """(SHA-256 of the SPKI in hex, not_after) of the first certificate in ``data``."""
    cert = crypto.load_certificates(data, "path", required=True)[0]
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest(), crypto.not_after(cert).strftime("%Y-%m-%dT%H:%M:%SZ")


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "default": "/var/qmail/control/servercert.pem"},
        },
        supports_check_mode=True,
    )
    if IMPORT_ERROR is not None:
        module.fail_json(
            msg="cannot import cryptography / module_utils/pyqmail_crypto", exception=IMPORT_ERROR
        )
    path = module.params["path"]
    if not os.path.exists(path):
        module.exit_json(changed=False, exists=False, spki_sha256="", not_after="")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        digest, not_after = tlsa_311(data)
    except OSError as exc:
        module.fail_json(msg=f"{path}: {exc.strerror}")
    except crypto.CryptoError as exc:
        module.fail_json(msg=f"{path}: {exc}")
    module.exit_json(changed=False, exists=True, spki_sha256=digest, not_after=not_after)


if __name__ == "__main__":
    main()
