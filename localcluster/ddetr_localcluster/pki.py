"""Certificates and keys for the local control plane: one CA, the API server's serving
certificate, an admin client certificate (group system:masters) and the service-account
signing key pair. Written once per cluster directory; nothing here leaves the machine.
`client_cert` adds the real node's client certificates (kubelet, kube-proxy, CoreDNS)."""
from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = dt.timedelta(days=30)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(parts)


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALID_FOR))


def write_pki(directory: Path, service_ip: str, extra_ips: tuple[str, ...] = ()) -> dict[str, Path]:
    """Create every file the components need under `directory`; returns their paths by role."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {role: directory / name for role, name in (
        ("ca_cert", "ca.crt"), ("ca_key", "ca.key"), ("server_cert", "apiserver.crt"),
        ("server_key", "apiserver.key"), ("admin_cert", "admin.crt"), ("admin_key", "admin.key"),
        ("sa_key", "sa.key"), ("sa_pub", "sa.pub"))}
    if all(p.exists() for p in paths.values()):
        return paths

    ca_key = _key()
    ca_name = _name("ddetr-local-ca")
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key())
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    def leaf(subject: x509.Name, usage, sans: list[x509.GeneralName] | None = None):
        key = _key()
        builder = (_builder(subject, ca_name, key.public_key())
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = leaf(_name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.DNSName("localhost"), x509.DNSName("kubernetes"), x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"), x509.DNSName("kubernetes.default.svc.cluster.local"),
        *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", service_ip, *extra_ips))])
    admin_key, admin_cert = leaf(_name("ddetr-admin", "system:masters"), ExtendedKeyUsageOID.CLIENT_AUTH)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    pem = serialization.Encoding.PEM
    paths["ca_cert"].write_bytes(ca_cert.public_bytes(pem))
    paths["ca_key"].write_bytes(_pem_key(ca_key))
    paths["server_cert"].write_bytes(server_cert.public_bytes(pem))
    paths["server_key"].write_bytes(_pem_key(server_key))
    paths["admin_cert"].write_bytes(admin_cert.public_bytes(pem))
    paths["admin_key"].write_bytes(_pem_key(admin_key))
    paths["sa_key"].write_bytes(_pem_key(sa_key))
    paths["sa_pub"].write_bytes(sa_key.public_key().public_bytes(
        pem, serialization.PublicFormat.SubjectPublicKeyInfo))
    for key in ("ca_key", "server_key", "admin_key", "sa_key"):
        paths[key].chmod(0o600)
    return paths


def client_cert(directory: Path, name: str, common_name: str, organization: str | None = None) -> tuple[Path, Path]:
    """A client certificate signed by the cluster CA of `directory` (write_pki's): the API
    server reads the user from CN and the group from O. Returns (cert, key) paths."""
    pem = serialization.Encoding.PEM
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    key = _key()
    cert = (_builder(_name(common_name, organization), ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(_pem_key(key))
    key_path.chmod(0o600)
    return cert_path, key_path
