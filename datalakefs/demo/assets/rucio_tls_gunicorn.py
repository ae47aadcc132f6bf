"""gunicorn settings of the demo lake's Rucio TLS front (``gunicorn --config THIS``).

OpenSSL refuses RFC 3820 proxy certificates unless the verifier sets X509_V_FLAG_ALLOW_PROXY_CERTS;
the environment variable OPENSSL_ALLOW_PROXY_CERTS that older OpenSSL honoured is ignored by
OpenSSL 3 (checked with `openssl verify` on OpenSSL 3.0), and nginx has no directive for the flag,
so the front is gunicorn's own TLS, whose SSLContext can set it.
"""

import ssl


def ssl_context(conf, default_ssl_context_factory):
    context = default_ssl_context_factory()
    context.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
    return context
