"""WSGI app of the demo lake's Rucio TLS front: rucio's app, told the client's verified DN.

Rucio's ``/auth/x509`` and ``/auth/x509_proxy`` read the client DN from the WSGI environ key
``SSL_CLIENT_S_DN``, which Apache's mod_ssl sets. Here gunicorn terminates TLS itself
(``rucio_tls_gunicorn.py``, client certificates optional, verified against the demo CA, proxies
allowed), so the DN is taken from the certificate of this very TLS connection, which OpenSSL has
verified; no header or other client-controlled input is ever trusted for it. A certificate the CA
did not issue never gets here: the TLS handshake fails, as it does at a real Rucio server.

The DN is written in the slash form of mod_ssl's ``LegacyDNStringFormat`` (as grid tools print it
and as the identity is registered); rucio strips a proxy's trailing ``/CN=<number>`` itself.
"""

from rucio.web.rest.flaskapi.v1.main import application as rucio_application

# OpenSSL's long attribute names (what getpeercert() gives) -> the short ones of a DN string
SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "domainComponent": "DC",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "emailAddress": "emailAddress",
    "userId": "UID",
}


def client_dn(sock):
    """The verified peer certificate's subject as ``/O=.../CN=...``; '' without a certificate."""
    getpeercert = getattr(sock, "getpeercert", None)
    cert = getpeercert() if getpeercert is not None else None
    if not cert:
        return ""
    return "".join(
        f"/{SHORT_NAMES.get(name, name)}={value}" for rdn in cert.get("subject", ()) for name, value in rdn
    )


def application(environ, start_response):
    environ.pop("SSL_CLIENT_S_DN", None)
    dn = client_dn(environ.get("gunicorn.socket"))
    if dn:
        environ["SSL_CLIENT_S_DN"] = dn
    return rucio_application(environ, start_response)
