"""TLS for smtpd: the ``-c`` certificate, STARTTLS and implicit TLS.

upas reads only the certificate from ``-c`` and gets the key from
factotum.  Here ``-c cert.pem`` is a PEM file with the certificate (then
any chain certificates, as in a ``fullchain.pem``) and, unless ``--key``
names a separate file, the private key.  ``CertificateFile`` turns them
into Twisted ``CertificateOptions`` limited to TLS 1.2 and later with
Twisted's modern cipher list, and re-reads them when either file changes
(a renewed certificate is used from the next handshake on; a broken
renewal is logged and the last good pair stays).

``ImplicitTLSFactory`` wraps the smtpd factory for port-465 style
listeners (``--smtps``): the whole connection is TLS with the same
options.  ``describe`` gives the ``Received:`` comment text.
"""

import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from ..conf import ConfigError, WatchedFile, read_text
from .listening import Dropped

log = Logger(namespace="smtpd")

_CERT_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*",
                         re.S)


def options_from_pem(cert_pem, key_pem=None, source="certificate"):
    """CertificateOptions (TLS 1.2+) from PEM text; ConfigError says what is wrong."""
    blocks = _CERT_BLOCK.findall(cert_pem)
    if not blocks:
        raise ConfigError("%s: no PEM certificate found" % source)
    key_text = key_pem if key_pem is not None else _CERT_BLOCK.sub("", cert_pem)
    if "PRIVATE KEY-----" not in key_text:
        raise ConfigError("%s: no PEM private key found (give --key for a separate "
                          "key file)" % source)
    try:
        certs = [x509.load_pem_x509_certificate(b.encode("ascii")) for b in blocks]
        key = serialization.load_pem_private_key(key_text.encode("ascii"), password=None)
    except (ValueError, TypeError) as e:  # includes encrypted keys: no one to ask
        raise ConfigError("%s: unusable certificate or key: %s" % (source, e)) from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, public)
            != certs[0].public_key().public_bytes(serialization.Encoding.DER, public)):
        raise ConfigError("%s: the private key does not belong to the certificate" % source)
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=certs[0],
        extraCertChain=certs[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


@implementer(IOpenSSLContextFactory)
class CertificateFile:
    """The ``-c`` (and ``--key``) files as an OpenSSL context factory.

    ``getContext()`` gives the current context, so Twisted's STARTTLS and
    ``TLSMemoryBIOFactory`` pick up a renewed certificate by themselves.
    """

    def __init__(self, cert_path, key_path=None):
        self.cert_path = cert_path
        self.key_path = key_path
        self._cert = WatchedFile(cert_path, lambda text, path: text, None)
        self._key = WatchedFile(key_path, lambda text, path: text, None) if key_path else None
        self._texts = None
        self._options = None

    def load(self):
        """Read and check both files now (start-up); raise ConfigError."""
        key = read_text(self.key_path) if self.key_path else None
        options_from_pem(read_text(self.cert_path), key, self.cert_path)
        return self.options()

    def options(self):
        texts = (self._cert.current(), self._key.current() if self._key else None)
        if texts != self._texts:
            self._texts = texts
            try:
                if texts[0] is None or (self._key and texts[1] is None):
                    raise ConfigError("%s: cannot read the certificate or key" % self.cert_path)
                self._options = options_from_pem(texts[0], texts[1], self.cert_path)
                log.info("TLS certificate loaded from {path}", path=self.cert_path,
                         event="smtpd.config")
            except ConfigError as e:
                log.error("{err}; keeping the previous certificate", err=e,
                          event="smtpd.config", path=self.cert_path)
        if self._options is None:
            raise ConfigError("%s: no usable certificate" % self.cert_path)
        return self._options

    def getContext(self):
        return self.options().getContext()


class ImplicitTLSFactory(TLSMemoryBIOFactory):
    """TLS from the first byte (port 465)."""

    def __init__(self, contextFactory, wrappedFactory):
        TLSMemoryBIOFactory.__init__(self, contextFactory, False, wrappedFactory)

    def buildProtocol(self, addr):
        inner = self.wrappedFactory.buildProtocol(addr)
        if isinstance(inner, Dropped):
            # -k: closed before the handshake, which TLS could only abort
            # (a reset); on the bare socket the peer sees a plain close
            return inner
        return self.protocol(self, inner)


def describe(transport):
    """``TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)``, or None."""
    try:
        conn = transport.getHandle()
        version = conn.get_protocol_version_name()
        cipher = conn.get_cipher_name()
        bits = conn.get_cipher_bits()
    except Exception:  # not TLS, or the handshake has not finished
        return None
    if not (version and cipher):
        return None
    return "%s with cipher %s (%s/%s bits)" % (version, cipher, bits, bits)


def version_cipher(transport):
    """``TLSv1.3/TLS_AES_256_GCM_SHA384`` for the log, or None."""
    try:
        conn = transport.getHandle()
        version, cipher = conn.get_protocol_version_name(), conn.get_cipher_name()
    except Exception:  # not TLS, or the handshake has not finished
        return None
    return "%s/%s" % (version, cipher) if version and cipher else None
