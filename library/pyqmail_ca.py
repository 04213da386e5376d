#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pyqmail_ca
short_description: A local certificate authority for pyqmail's server and client certificates
description:
  - Keeps a small CA in a directory on the managed host - C(ca.key) (private, mode 0600) and
    C(ca.pem) (its self-signed certificate, mode 0644) - that
    M(pyqmail.mail.pyqmail_certificate) uses through its
    O(pyqmail.mail.pyqmail_certificate#module:ca_path) option to sign C(servercert.pem) and
    C(clientcert.pem) on the same host. The CA key never leaves the host; only the public
    certificate is returned (RV(ca_cert)), for C(clientca.pem) or a client's trust store.
  - The CA may sign leaf certificates only (basicConstraints CA, pathlen 0).
  - The CA certificate is re-made only when needed - missing or unusable, expires within
    O(renew_before_days), O(common_name) or O(key_type) changed, or O(force) - and
    RV(reason) says why. The CA key is kept when its type is unchanged (and O(force) is not
    set), so certificates it signed stay valid unless the common name changes.
  - Writes go to a temporary file in the same directory that has the final owner, group and
    mode before its first byte (a key file is created 0600), then an atomic rename;
    a change of owner, group or mode alone reports C(changed).
author:
  - pyqmail maintainers (@pyqmail)
requirements:
  - cryptography >= 38 (Debian 12 package C(python3-cryptography)) on the managed host
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Nothing is generated or written in check mode; RV(ca_cert) is then empty when a
      new CA certificate would be made.
  diff_mode:
    support: full
    details: Before/after summaries of the CA certificate (subject, key type, not_after,
      fingerprint, owner/mode); never the key.
  platform:
    platforms: posix
options:
  path:
    description:
      - Directory of the CA; created with mode 0700 if missing. Holds C(ca.key) and C(ca.pem).
    type: path
    required: true
  common_name:
    description:
      - Subject CN of the CA certificate, at most 64 characters. Give each CA its own name
        (for example with the host name), since several CAs may share one C(clientca.pem).
    type: str
    required: true
  key_type:
    description: Type of the CA key.
    type: str
    choices: [ec256, ec384, rsa2048, rsa3072, rsa4096]
    default: ec384
  valid_days:
    description: Validity of the CA certificate, in days.
    type: int
    default: 3650
  renew_before_days:
    description:
      - Re-make the CA certificate when it expires within this many days. Must be smaller
        than O(valid_days).
    type: int
    default: 90
  force:
    description: Make a new CA key and certificate even if they are up to date.
    type: bool
    default: false
  owner:
    description: Owner of C(ca.key) and C(ca.pem).
    type: str
  group:
    description: Group of C(ca.key) and C(ca.pem).
    type: str
  mode:
    description: Mode of C(ca.key).
    type: raw
    default: '0600'
  cert_mode:
    description: Mode of C(ca.pem) (public).
    type: raw
    default: '0644'
  backup:
    description: Keep timestamped copies of the files before replacing them.
    type: bool
    default: false
seealso:
  - module: pyqmail.mail.pyqmail_certificate
"""

EXAMPLES = r"""
- name: Local CA (ca.key stays on this host)
  pyqmail.mail.pyqmail_ca:
    path: /etc/pyqmail/ca
    common_name: "{{ inventory_hostname }} pyqmail CA"
  register: pyqmail_ca_result

- name: Server certificate signed by it
  pyqmail.mail.pyqmail_certificate:
    path: /var/qmail/control/servercert.pem
    names: [mx.example.org]
    ca_path: /etc/pyqmail/ca
    owner: pyqmaild

- name: clientca.pem - the CAs whose client certificates may relay (this CA and a partner's)
  ansible.builtin.copy:
    dest: /var/qmail/control/clientca.pem
    content: "{{ pyqmail_ca_result.ca_cert }}{{ hostvars['mx2'].pyqmail_ca_result.ca_cert }}"
    owner: root
    group: pyqmail
    mode: '0644'
"""

RETURN = r"""
reason:
  description: Why the CA was (re)made or left alone.
  returned: always
  type: str
  sample: "up to date: valid until 2036-11-20T22:32:22Z"
ca_cert:
  description: The CA certificate in PEM (public; empty in check mode when a new one would be
    made). Concatenate several for C(clientca.pem).
  returned: always
  type: str
ca_cert_path:
  description: Path of C(ca.pem).
  returned: always
  type: str
  sample: /etc/pyqmail/ca/ca.pem
ca_key_path:
  description: Path of C(ca.key) (the key itself is never returned).
  returned: always
  type: str
  sample: /etc/pyqmail/ca/ca.key
common_name:
  description: Subject CN of the CA.
  returned: always
  type: str
key_type:
  description: Type of the CA key.
  returned: always
  type: str
  sample: ec384
not_after:
  description: End of validity of the CA certificate (UTC, ISO 8601); planned in check mode.
  returned: always
  type: str
fingerprint:
  description: SHA-256 fingerprint of C(ca.pem) (null in check mode when it would change).
  returned: always
  type: str
"""

import datetime as dt
import os
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from ansible_collections.pyqmail.mail.plugins.module_utils import pyqmail_crypto as crypto
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_files import (
        ensure_file,
        file_args,
        read_if_exists,
    )
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_files import set_attributes

    IMPORT_ERROR = crypto.CRYPTOGRAPHY_IMPORT_ERROR  # the module_utils import needs no cryptography
except ImportError:
    IMPORT_ERROR = traceback.format_exc()


class CAModule:
    """Maps options, reads the CA directory, decides, writes ca.key then ca.pem."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        self.path: str = module.params["path"]
        self.key_path = os.path.join(self.path, "ca.key")
        self.cert_path = os.path.join(self.path, "ca.pem")
        self.now = crypto.utcnow()
        # owner/group/mode differences per file, for --diff
        self.attr_diffs: dict[str, dict[str, dict[str, object]]] = {
            name: {"before": {}, "after": {}} for name in ("ca.key", "ca.pem")
        }

    def fail(self, msg: str) -> None:
        self.module.fail_json(msg=msg, path=self.path)

    def check_arguments(self) -> None:
        p = self.params
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            self.fail(f"path {self.path} exists and is not a directory; give the CA's directory")
        if not p["common_name"] or len(p["common_name"]) > 64:
            self.fail("common_name must have 1 to 64 characters")
        if p["valid_days"] < 1:
            self.fail(f"valid_days must be at least 1, not {p['valid_days']}")
        if not 0 <= p["renew_before_days"] < p["valid_days"]:
            self.fail(
                f"renew_before_days ({p['renew_before_days']}) must be 0 or more and smaller "
                f"than valid_days ({p['valid_days']}), or every run would renew the CA"
            )

    def read(self, path: str) -> bytes | None:
        try:
            return read_if_exists(path)
        except OSError as exc:
            self.fail(f"cannot read {path}: {exc}")
        return None

    def load_current(
        self, key_data: bytes | None, cert_data: bytes | None
    ) -> tuple[crypto.PrivateKey | None, crypto.x509.Certificate | None, str | None]:
        """(usable key or None, usable certificate or None, problem or None)."""
        key = None
        try:
            if key_data is not None:
                key = crypto.load_private_key(key_data, "ca.key")
        except crypto.CryptoError as exc:
            return None, None, f"{self.key_path}: {exc}"
        if cert_data is None:
            return key, None, None if key is None else f"{self.cert_path} is missing"
        try:
            certs = crypto.load_certificates(cert_data, "ca.pem", required=True)
        except crypto.CryptoError as exc:
            return key, None, f"{self.cert_path}: {exc}"
        if len(certs) != 1:
            return key, None, f"{self.cert_path} holds {len(certs)} certificates, not one"
        if key is None:
            return None, None, f"{self.key_path} is missing"
        if not crypto.key_matches(key, certs[0]):
            return key, None, f"{self.cert_path} does not belong to {self.key_path}"
        return key, certs[0], None

    def run(self) -> None:
        self.check_arguments()
        p = self.params
        changed = False
        if not os.path.isdir(self.path):
            changed = True
            if not self.module.check_mode:
                try:
                    os.makedirs(self.path, mode=0o700)
                except OSError as exc:
                    self.fail(f"cannot create the CA directory {self.path}: {exc}")
        key_data, cert_data = self.read(self.key_path), self.read(self.cert_path)
        key, cert, problem = self.load_current(key_data, cert_data)
        current = crypto.summarize_ca(cert) if cert is not None else None
        needed, reason = crypto.ca_needs_regeneration(
            current,
            p["common_name"],
            p["key_type"],
            now=self.now,
            renew_before_days=p["renew_before_days"],
            force=p["force"],
            problem=problem,
        )
        backups: list[str] = []
        if not needed and cert is not None:
            for path, mode in ((self.key_path, p["mode"]), (self.cert_path, p["cert_mode"])):
                args = file_args(self.module, path, mode)
                diff = self.attr_diffs[os.path.basename(path)]
                changed = set_attributes(self.module, args, diff) or changed
            if changed:
                reason += "; owner/group/mode changed"
            self.finish(changed, reason=reason, after=current, before=current, cert=cert)
            return
        reuse = key is not None and not p["force"] and crypto.key_type_of(key) == p["key_type"]
        if self.module.check_mode:
            planned = {
                "names": [p["common_name"]],
                "key_type": p["key_type"],
                "issuer": crypto.SELF_SIGNED,
                "not_after": crypto.iso(self.now + dt.timedelta(days=p["valid_days"])),
                "fingerprint": None,
            }
            self.finish(True, reason=reason, after=planned, before=current, cert=None)
            return
        if reuse and key is not None:
            reason += " (CA key kept)"
            args = file_args(self.module, self.key_path, p["mode"])
            set_attributes(self.module, args, self.attr_diffs["ca.key"])
        else:
            key = crypto.generate_key(p["key_type"])
            _changed, backup = ensure_file(
                self.module,
                self.key_path,
                crypto.key_to_pem(key),
                p["mode"],
                secret=True,
                backup=p["backup"],
                existing=key_data,
                diff=self.attr_diffs["ca.key"],
            )
            backups += [backup] if backup else []
        new_cert = crypto.create_ca(p["common_name"], key, p["valid_days"], self.now)
        _changed, backup = ensure_file(
            self.module,
            self.cert_path,
            crypto.cert_to_pem(new_cert),
            p["cert_mode"],
            backup=p["backup"],
            existing=cert_data,
            diff=self.attr_diffs["ca.pem"],
        )
        backups += [backup] if backup else []
        self.finish(
            True,
            reason=reason,
            after=crypto.summarize_ca(new_cert),
            before=current,
            cert=new_cert,
            backups=backups,
        )

    def finish(
        self,
        changed: bool,
        *,
        reason: str,
        after: crypto.CertSummary | dict[str, object],
        before: crypto.CertSummary | None,
        cert: crypto.x509.Certificate | None,
        backups: list[str] | None = None,
    ) -> None:
        data = after.as_dict() if isinstance(after, crypto.CertSummary) else after
        result: dict[str, object] = {
            "changed": changed,
            "reason": reason,
            "ca_cert": crypto.cert_to_pem(cert).decode("ascii") if cert is not None else "",
            "ca_cert_path": self.cert_path,
            "ca_key_path": self.key_path,
            "common_name": self.params["common_name"],
            "key_type": data["key_type"],
            "not_after": data["not_after"],
            "fingerprint": data["fingerprint"],
        }
        if backups:
            result["backup_files"] = backups
        if self.module._diff:
            before_text = crypto.diff_text(before)
            after_text = crypto.diff_text(after)
            for name, diff in self.attr_diffs.items():
                for key, value in diff["before"].items():
                    before_text += f"{name} {key}: {value}\n"
                for key, value in diff["after"].items():
                    after_text += f"{name} {key}: {value}\n"
            result["diff"] = {
                "before_header": self.cert_path,
                "after_header": self.cert_path,
                "before": before_text,
                "after": after_text,
            }
        self.module.exit_json(**result)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "common_name": {"type": "str", "required": True},
            "key_type": {
                "type": "str",
                "choices": ["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"],
                "default": "ec384",
            },
            "valid_days": {"type": "int", "default": 3650},
            "renew_before_days": {"type": "int", "default": 90},
            "force": {"type": "bool", "default": False},
            "owner": {"type": "str"},
            "group": {"type": "str"},
            "mode": {"type": "raw", "default": "0600"},
            "cert_mode": {"type": "raw", "default": "0644"},
            "backup": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    if IMPORT_ERROR is not None:
        module.fail_json(
            msg=missing_required_lib("cryptography (Debian: python3-cryptography)"),
            exception=IMPORT_ERROR,
        )
    CAModule(module).run()


if __name__ == "__main__":
    main()
