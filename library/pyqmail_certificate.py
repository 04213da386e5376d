#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pyqmail_certificate
short_description: qmail's servercert.pem / clientcert.pem (private key, certificate, chain)
description:
  - Writes one PEM file in qmail-tls's order, B(private key, then certificate, then chain),
    which qmail-smtpd, qmail-remote, pyqmail-smtpd and Postfix's C(smtpd_tls_chain_files)
    read.
  - Either B(generates) the key and certificate (self-signed, or signed on the host by the
    local CA that M(pyqmail.mail.pyqmail_ca) keeps in O(ca_path); the CA key never leaves that
    host), or
    B(assembles) files the user already has (for example from an ACME client) after checking
    that the key matches the certificate, the chain is in order and each link is signed by the
    next, nothing is expired or not yet valid, and the certificate is for TLS O(purpose)s.
  - A generated certificate is regenerated only when needed - the file is missing or
    unusable, expires within O(renew_before_days), O(names), O(key_type) or O(purpose)
    changed, the CA changed, or O(force) is set - and the result says why in RV(reason).
    The private key is kept across renewals (so DANE C(3 1 1) records stay valid) unless the
    key type changes, the file is unusable or O(force=true).
  - Writes go to a temporary file in the same directory that has the final owner, group and
    mode before its first byte (a key file is created 0600), then an atomic rename.
    A change of owner, group or mode alone reports C(changed).
  - No key material ever appears in results, diffs or logs.
author:
  - pyqmail maintainers (@pyqmail)
requirements:
  - cryptography >= 38 (Debian 12 package C(python3-cryptography)) on the managed host
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: In check mode nothing is generated or written; RV(fingerprint) is then null.
  diff_mode:
    support: full
    details: Before/after summaries (subject, names, key type, issuer, not_after, fingerprint,
      owner/mode); never key material.
  platform:
    platforms: posix
options:
  path:
    description:
      - The file to write, for example C(/var/qmail/control/servercert.pem) or
        C(/var/qmail/control/clientcert.pem). Its directory must exist.
    type: path
    required: true
  purpose:
    description:
      - V(server) for C(servercert.pem) (extended key usage serverAuth, checked with
        C(openssl verify -purpose sslserver)), V(client) for C(clientcert.pem) used by
        outbound delivery (clientAuth). Client names may be email addresses.
    type: str
    choices: [server, client]
    default: server
  names:
    description:
      - The host names and IP addresses the certificate is for (subjectAltName); the
        first one is also the subject CN, so it must be at most 64 characters.
      - DNS names in ASCII (IDNA C(xn--) form), no trailing dot; a leading C(*.) wildcard only
        for servers. IPv4/IPv6 addresses become IP SANs.
      - Required when generating. With O(provided_cert), if given, the certificate must
        cover every name listed.
    type: list
    elements: str
  key_type:
    description:
      - Private key to generate. Neither qmail nor Postfix can use a passphrase, so none is set.
      - Default V(ec256) when generating. With O(provided_key), if given, the provided key must
        be of this type.
    type: str
    choices: [ec256, ec384, rsa2048, rsa3072, rsa4096]
  ca_path:
    description:
      - Directory of a CA created by M(pyqmail.mail.pyqmail_ca) on the same host (C(ca.key),
        C(ca.pem)). The certificate is signed there and C(ca.pem) is appended as the chain.
      - Omit to make a self-signed certificate.
    type: path
  provided_key:
    description:
      - Path on the managed host of the user's own private key (PEM, no passphrase).
      - Requires O(provided_cert); excludes O(ca_path).
    type: path
  provided_cert:
    description:
      - Path of the user's own certificate (PEM). It may be followed by its chain in the same
        file (certbot's C(fullchain.pem)).
    type: path
  provided_chain:
    description:
      - Path of the intermediate certificates (PEM), each issuer after the certificate it signs
        (certbot's C(chain.pem)). Certificates already in O(provided_cert) are not repeated.
    type: path
  valid_days:
    description:
      - Validity of a generated certificate, in days (never beyond the CA's own end).
    type: int
    default: 397
  renew_before_days:
    description:
      - Regenerate a generated certificate when it expires within this many days. Must be
        smaller than O(valid_days). For O(provided_cert) only a warning is given.
    type: int
    default: 30
  force:
    description:
      - Regenerate the key and the certificate even if they are up to date.
    type: bool
    default: false
  owner:
    description: Owner of the file (the guide has the user qmail-smtpd runs as).
    type: str
  group:
    description: Group of the file.
    type: str
  mode:
    description: Mode of the file (it holds a private key).
    type: raw
    default: '0400'
  backup:
    description: Keep a timestamped copy of the file before replacing it.
    type: bool
    default: false
notes:
  - For several hosts, give each host its own CA (or provided files); a certificate is signed
    on the host that holds the CA key, which never travels.
  - C(clientca.pem) (the CAs whose client certificates may relay) holds only public
    certificates; write it with M(ansible.builtin.copy) from the
    RV(pyqmail.mail.pyqmail_ca#module:ca_cert) result of one or more
    M(pyqmail.mail.pyqmail_ca) tasks (see EXAMPLES).
seealso:
  - module: pyqmail.mail.pyqmail_ca
"""

EXAMPLES = r"""
- name: Local CA on the mail host (ca.key never leaves it)
  pyqmail.mail.pyqmail_ca:
    path: /etc/pyqmail/ca
    common_name: "{{ inventory_hostname }} pyqmail CA"
  register: pyqmail_ca_result

- name: Server certificate for qmail-smtpd, signed by the local CA
  pyqmail.mail.pyqmail_certificate:
    path: /var/qmail/control/servercert.pem
    names: [mx.example.org, mail.example.org, 192.0.2.25]
    ca_path: /etc/pyqmail/ca
    owner: pyqmaild
    group: pyqmail
    mode: '0400'
  register: servercert

- name: Say why it was (or was not) regenerated
  ansible.builtin.debug:
    msg: "{{ servercert.reason }}; valid until {{ servercert.not_after }}"

- name: Client certificate for outbound delivery (qmail-remote's clientcert.pem)
  pyqmail.mail.pyqmail_certificate:
    path: /var/qmail/control/clientcert.pem
    purpose: client
    names: [mx.example.org]
    key_type: rsa2048
    ca_path: /etc/pyqmail/ca
    owner: pyqmails

- name: clientca.pem - the CAs whose client certificates may relay (one or more)
  ansible.builtin.copy:
    dest: /var/qmail/control/clientca.pem
    content: "{{ pyqmail_ca_result.ca_cert }}{{ partner_ca_pem | default('') }}"
    owner: root
    group: pyqmail
    mode: '0644'

- name: Self-signed certificate (no CA)
  pyqmail.mail.pyqmail_certificate:
    path: /var/qmail/control/servercert.pem
    names: [mx.example.org]
    key_type: ec384

- name: Certificate from an ACME client, assembled in qmail's order after checks
  pyqmail.mail.pyqmail_certificate:
    path: /var/qmail/control/servercert.pem
    provided_key: /etc/letsencrypt/live/mx.example.org/privkey.pem
    provided_cert: /etc/letsencrypt/live/mx.example.org/cert.pem
    provided_chain: /etc/letsencrypt/live/mx.example.org/chain.pem
    names: [mx.example.org]
    owner: pyqmaild
    backup: true
"""

RETURN = r"""
reason:
  description: Why the file was (re)written or left alone.
  returned: always
  type: str
  sample: "expires within 30 days (renew_before_days): not_after 2027-01-02T03:04:05Z"
path:
  description: The file written.
  returned: always
  type: str
  sample: /var/qmail/control/servercert.pem
names:
  description: The certificate's subjectAltNames, in order (first = CN).
  returned: always
  type: list
  elements: str
  sample: [mx.example.org, 192.0.2.25]
not_after:
  description: End of validity (UTC, ISO 8601). In check mode, the planned end.
  returned: always
  type: str
  sample: "2027-12-24T22:32:22Z"
fingerprint:
  description: SHA-256 fingerprint of the certificate, as C(openssl x509 -fingerprint -sha256)
    prints it; null in check mode when a new certificate would be made.
  returned: always
  type: str
  sample: "3A:7F:...:09"
key_type:
  description: Type of the private key.
  returned: always
  type: str
  sample: ec256
issuer:
  description: V(self-signed), or the issuing CA's subject and key id.
  returned: always
  type: str
  sample: "CN=mx pyqmail CA (key 3b2054de99561a20)"
backup_file:
  description: Copy of the previous file, when O(backup=true) and it was replaced.
  returned: changed and backup made
  type: str
"""

import datetime as dt
import os
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from ansible_collections.pyqmail.mail.plugins.module_utils import pyqmail_crypto as crypto
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_certkeys import (
        CaError,
        load_ca,
        read_existing,
        tlsa_warning,
    )
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_files import (
        ensure_file,
        file_args,
        read_if_exists,
    )
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_files import set_attributes

    IMPORT_ERROR = crypto.CRYPTOGRAPHY_IMPORT_ERROR  # the module_utils import needs no cryptography
except ImportError:
    IMPORT_ERROR = traceback.format_exc()

OPTION_OF_FIELD = {
    "key": "provided_key",
    "cert": "provided_cert",
    "chain": "provided_chain",
}


class CertificateModule:
    """Maps options, reads what exists, decides, writes."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        self.path: str = module.params["path"]
        self.purpose: str = module.params["purpose"]
        self.now = crypto.utcnow()
        self.diff: dict[str, object] = {"before": "", "after": ""}
        self.attr_diff: dict[str, dict[str, object]] = {"before": {}, "after": {}}

    def fail(self, msg: str, **kwargs: object) -> None:
        self.module.fail_json(msg=msg, path=self.path, **kwargs)

    # --- arguments ---------------------------------------------------------------------------

    def check_arguments(self) -> None:
        p = self.params
        if os.path.isdir(self.path):
            self.fail(f"path {self.path} is a directory; give the file to write (servercert.pem)")
        if p["valid_days"] < 1:
            self.fail(f"valid_days must be at least 1, not {p['valid_days']}")
        if p["renew_before_days"] < 0:
            self.fail(f"renew_before_days must be 0 or more, not {p['renew_before_days']}")
        if p["provided_cert"] is None and p["renew_before_days"] >= p["valid_days"]:
            self.fail(
                f"renew_before_days ({p['renew_before_days']}) must be smaller than valid_days "
                f"({p['valid_days']}), or every run would renew the certificate"
            )
        if p["provided_cert"] is not None and p["force"]:
            self.fail("force cannot renew a provided_cert; renew it where it comes from")
        self.names: tuple[str, ...] | None = None
        if p["names"] is not None:
            try:
                self.names = crypto.check_names(p["names"], self.purpose)
            except crypto.CryptoError as exc:
                self.fail(f"names: {exc}")

    # --- helpers -----------------------------------------------------------------------------

    def read(self, path: str, option: str) -> bytes:
        try:
            data = read_if_exists(path)
        except OSError as exc:
            self.fail(f"{option}: cannot read {path}: {exc}")
        if data is None:
            self.fail(f"{option}: {path} does not exist; set {option} to an existing file")
        return data

    def read_current(self) -> bytes | None:
        try:
            return read_if_exists(self.path)
        except OSError as exc:
            self.fail(f"cannot read the existing {self.path}: {exc}")
        return None

    def finish(
        self,
        changed: bool,
        reason: str,
        summary: dict[str, object],
        before: crypto.CertSummary | None,
        backup_file: str | None = None,
    ) -> None:
        before_text = crypto.diff_text(before)
        after_text = crypto.diff_text(summary)
        for key, value in self.attr_diff["before"].items():
            before_text += f"{key}: {value}\n"
        for key, value in self.attr_diff["after"].items():
            after_text += f"{key}: {value}\n"
        result: dict[str, object] = {
            "changed": changed,
            "reason": reason,
            "path": self.path,
            "names": summary["names"],
            "not_after": summary["not_after"],
            "fingerprint": summary["fingerprint"],
            "key_type": summary["key_type"],
            "issuer": summary["issuer"],
        }
        if backup_file:
            result["backup_file"] = backup_file
        if self.module._diff:
            result["diff"] = {
                "before_header": self.path,
                "after_header": self.path,
                "before": before_text,
                "after": after_text,
            }
        self.module.exit_json(**result)

    def attributes_only(self) -> bool:
        args = file_args(self.module, self.path, self.params["mode"])
        return set_attributes(self.module, args, self.attr_diff)

    # --- the CA ------------------------------------------------------------------------------

    def load_ca(self) -> tuple[crypto.PrivateKey, crypto.x509.Certificate] | None:
        """The CA key and certificate, or None in check mode when the CA is still to come."""
        p = self.params
        try:
            return load_ca(p["ca_path"], p["renew_before_days"], self.now, self.module.check_mode)
        except CaError as exc:
            self.fail(str(exc))
        return None

    # --- generating --------------------------------------------------------------------------

    def generate(self) -> None:
        p = self.params
        if self.names is None:
            self.fail("names is required unless provided_cert is given")
        names = self.names
        key_type = p["key_type"] or "ec256"
        ca: tuple[crypto.PrivateKey, crypto.x509.Certificate] | None = None
        ca_cert = None
        if p["ca_path"] is not None:
            ca = self.load_ca()
            if ca is None:
                planned = {
                    "names": list(names),
                    "key_type": key_type,
                    "issuer": f"the CA still to be created in {p['ca_path']}",
                    "not_after": None,
                    "fingerprint": None,
                }
                self.finish(
                    True,
                    f"ca_path {p['ca_path']} holds no CA yet (check mode: pyqmail_ca would "
                    "create it first); the certificate would be issued by it",
                    planned,
                    None,
                )
                return
            ca_cert = ca[1]
        existing = self.read_current()
        bundle, current, problem = read_existing(existing, ca_cert)
        wanted = crypto.Wanted(
            names=names,
            key_type=key_type,
            purpose=self.purpose,
            issuer=crypto.issuer_label(ca_cert) if ca_cert is not None else crypto.SELF_SIGNED,
            chain=(crypto.fingerprint(ca_cert),) if ca_cert is not None else (),
        )
        needed, reason = crypto.needs_regeneration(
            current,
            wanted,
            now=self.now,
            renew_before_days=p["renew_before_days"],
            force=p["force"],
            problem=problem,
        )
        if not needed and current is not None:
            changed = self.attributes_only()
            if changed:
                reason += "; owner/group/mode changed"
            self.finish(changed, reason, current.as_dict(), current)
            return
        if self.module.check_mode:
            end = self.now + dt.timedelta(days=p["valid_days"])
            if ca_cert is not None:
                end = min(end, crypto.not_after(ca_cert))
            planned = {
                "names": list(names),
                "key_type": key_type,
                "issuer": wanted.issuer,
                "not_after": crypto.iso(end),
                "fingerprint": None,
            }
            self.finish(True, reason, planned, current)
            return
        reuse = bundle is not None and not p["force"] and crypto.key_type_of(bundle.key) == key_type
        key = bundle.key if reuse and bundle is not None else crypto.generate_key(key_type)
        cert = crypto.issue(
            names,
            self.purpose,
            key,
            p["valid_days"],
            ca_key=ca[0] if ca else None,
            ca_cert=ca_cert,
            now=self.now,
        )
        chain = [ca_cert] if ca_cert is not None else []
        content = crypto.assemble(key, cert, chain)
        _changed, backup_file = ensure_file(
            self.module,
            self.path,
            content,
            p["mode"],
            secret=True,
            backup=p["backup"],
            existing=existing,
            diff=self.attr_diff,
        )
        summary = crypto.summarize(cert, chain, ca_cert)
        if reuse:
            reason += " (private key kept)"
        elif existing is not None:
            self.warn_tlsa(bundle.key if bundle else None, key, "force" if p["force"] else "")
        self.finish(True, reason, summary.as_dict(), current, backup_file)

    def warn_tlsa(self, old_key: object | None, new_key: object, why: str) -> None:
        """Warns that the TLSA record changes with the key, for a server certificate only: the
        record pins the key senders see on port 25; a client certificate (clientcert.pem) is
        in no TLSA record, and the warning would send the admin to change DNS for nothing."""
        if self.purpose != "server":
            return
        for warning in tlsa_warning(self.path, old_key, new_key, why):
            self.module.warn(warning)

    # --- assembling the user's files ---------------------------------------------------------

    def assemble_provided(self) -> None:
        p = self.params
        options = {"key": "provided_key", "cert": "provided_cert", "chain": "provided_chain"}
        data = {f: self.read(p[o], o) for f, o in options.items() if p[o] is not None}
        try:
            key = crypto.load_private_key(data["key"], "key")
            certs = crypto.load_certificates(data["cert"], "cert")
            chain = (
                crypto.load_certificates(data["chain"], "chain", required=True)
                if "chain" in data
                else []
            )
            leaf, full_chain = crypto.check_provided(key, certs, chain, self.purpose, self.now)
        except crypto.CryptoError as exc:
            option = OPTION_OF_FIELD.get(exc.field or "", exc.field or "provided_cert")
            where = p.get(option) if option in options.values() else None
            self.fail(f"{option}{f' ({where})' if where else ''}: {exc}")
        actual_type = crypto.key_type_of(key)
        if p["key_type"] is not None and p["key_type"] != actual_type:
            self.fail(
                f"key_type is {p['key_type']} but provided_key is {actual_type}; "
                "set key_type to match or leave it out"
            )
        covered = crypto.cert_names(leaf)
        missing = [n for n in self.names or () if n not in covered]
        if missing:
            self.fail(
                f"provided_cert ({p['provided_cert']}) does not cover names: "
                f"{', '.join(missing)} (it has {', '.join(covered) or 'no SANs'})"
            )
        summary = crypto.summarize(leaf, full_chain)
        if summary.not_after - self.now <= dt.timedelta(days=p["renew_before_days"]):
            self.module.warn(
                f"provided_cert expires on {crypto.iso(summary.not_after)}, within "
                f"renew_before_days ({p['renew_before_days']}); renew it where it comes from"
            )
        content = crypto.assemble(key, leaf, full_chain)
        existing = self.read_current()
        bundle, current, _problem = read_existing(existing, None)
        if bundle is not None:
            self.warn_tlsa(bundle.key, key, "the provided key changed")
        if existing is None:
            reason = "missing"
        elif existing == content:
            reason = "up to date: the file matches the provided files"
        elif current is None:
            reason = "existing file unusable; replaced by the provided files"
        elif current.fingerprint != summary.fingerprint:
            reason = f"provided certificate changed: {current.fingerprint} -> {summary.fingerprint}"
        else:
            reason = "provided key or chain changed (or the file was not in qmail's order)"
        changed, backup_file = ensure_file(
            self.module,
            self.path,
            content,
            p["mode"],
            secret=True,
            backup=p["backup"],
            existing=existing,
            diff=self.attr_diff,
        )
        if changed and existing == content:
            reason += "; owner/group/mode changed"
        self.finish(changed, reason, summary.as_dict(), current, backup_file)

    def run(self) -> None:
        self.check_arguments()
        if self.params["provided_cert"] is not None:
            self.assemble_provided()
        else:
            self.generate()


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "purpose": {"type": "str", "choices": ["server", "client"], "default": "server"},
            "names": {"type": "list", "elements": "str"},
            "key_type": {
                "type": "str",
                "choices": ["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"],
            },
            "ca_path": {"type": "path"},
            "provided_key": {"type": "path"},
            "provided_cert": {"type": "path"},
            "provided_chain": {"type": "path"},
            "valid_days": {"type": "int", "default": 397},
            "renew_before_days": {"type": "int", "default": 30},
            "force": {"type": "bool", "default": False},
            "owner": {"type": "str"},
            "group": {"type": "str"},
            "mode": {"type": "raw", "default": "0400"},
            "backup": {"type": "bool", "default": False},
        },
        mutually_exclusive=[
            ("ca_path", "provided_key"),
            ("ca_path", "provided_cert"),
            ("ca_path", "provided_chain"),
        ],
        required_together=[("provided_key", "provided_cert")],
        required_by={"provided_chain": "provided_cert"},
        required_one_of=[("names", "provided_cert")],
        supports_check_mode=True,
    )
    if IMPORT_ERROR is not None:
        module.fail_json(
            msg=missing_required_lib("cryptography (Debian: python3-cryptography)"),
            exception=IMPORT_ERROR,
        )
    CertificateModule(module).run()


if __name__ == "__main__":
    main()
