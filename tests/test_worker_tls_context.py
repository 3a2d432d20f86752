"""A worker puts TLS around its adopted socket with the context the
``ssl:`` listen string names, found through Twisted's public API (the
endpoint's ``listenSSL`` call), not its private attribute."""

from twisted.internet import ssl

from upasmail import workers
from upasmail.testing import self_signed_pem


def test_the_context_is_the_listen_strings(tmp_path):
    cert, key = self_signed_pem("mx.example.org")
    (tmp_path / "cert.pem").write_text(cert)
    (tmp_path / "key.pem").write_text(key)
    description = "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (
        tmp_path / "key.pem", tmp_path / "cert.pem")
    ctx = workers.tls_context(description)
    assert isinstance(ctx, ssl.CertificateOptions)
    loaded = ssl.Certificate.loadPEM(cert)
    assert ctx.certificate.digest("sha256") == loaded.original.digest("sha256")

