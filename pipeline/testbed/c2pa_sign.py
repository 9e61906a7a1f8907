"""Content Credentials for the synthetic web: images signed with a C2PA manifest carrying a
training-and-mining assertion, as a camera or an editing tool would embed them.

The signing certificate is a throw-away ES256 chain (a root and a leaf with the emailProtection
extended key usage, which c2pa-rs accepts for claim signing) generated once per process with
`cryptography`; it is not trusted by anyone, which does not matter to kiln: an opt-out is honoured
whoever signed it (pipeline/c2pa_check.py). Signing goes through c2pa-python's Builder, the same
library that reads the manifests, so the bytes are what real tools write.
"""

from __future__ import annotations

import datetime
import functools
import io

CREATED = {"label": "c2pa.actions", "data": {"actions": [{
    "action": "c2pa.created",
    "digitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture",
}]}}


def training_mining(**entries: str) -> dict:
    """A training-and-mining assertion: training_mining(c2pa_ai_training="notAllowed") -> c2pa.ai_training."""
    return {"label": "c2pa.training-mining", "data": {"entries": {
        k.replace("_", ".", 1): {"use": v} for k, v in entries.items()}}}


@functools.lru_cache(maxsize=1)
def credentials() -> tuple[bytes, bytes]:
    """(PEM chain leaf+root, PEM PKCS#8 key of the leaf): ES256, valid from yesterday for 30 days."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kiln synthetic web"),
                          x509.NameAttribute(NameOID.COUNTRY_NAME, "US")])

    def usage(**on):
        flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment",
                               "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
                               "encipher_only", "decipher_only"), False)
        return x509.KeyUsage(**{**flags, **on})

    now = datetime.datetime.now(datetime.timezone.utc)
    root_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def cert(subject, issuer, key):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))

    root = (cert(name("kiln synthetic root"), name("kiln synthetic root"), root_key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
            .sign(root_key, hashes.SHA256()))
    leaf = (cert(name("kiln synthetic signer"), root.subject, leaf_key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    chain = leaf.public_bytes(pem) + root.public_bytes(pem)
    key = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return chain, key


def sign(data: bytes, mime: str, assertions: list[dict]) -> bytes:
    """`data` (an image of type `mime`) with an embedded, signed C2PA manifest holding `assertions`."""
    import c2pa

    chain, key = credentials()
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain, key, None))
    builder = c2pa.Builder({"claim_generator_info": [{"name": "kiln-synthetic-web", "version": "0"}],
                            "assertions": [CREATED, *assertions]})
    out = io.BytesIO()
    builder.sign(signer, mime, io.BytesIO(data), out)
    return out.getvalue()
