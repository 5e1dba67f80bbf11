"""TLS of the gRPC and HTTP ports, optionally mutual (docs/security.md): one set of PEM files,
checked when the server is configured."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from ..api.auth import read_secret


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mutual TLS, clients must present a cert it signed

    def validate(self) -> None:
        """Parse the PEM material now, as the TLS library will: a certificate or key that does
        not parse, or a key that does not match the certificate, is a usage error naming the
        flag, not a "Failed to bind" traceback later."""
        for path, flag in ((self.cert, "--tls-cert"), (self.key, "--tls-key")):
            read_secret(path, flag)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            raise ValueError(f"--tls-cert {self.cert} / --tls-key {self.key}: not a PEM "
                             f"certificate chain and its matching private key ({reason}); "
                             "check both files") from None
        if self.client_ca is not None:
            read_secret(self.client_ca, "--tls-client-ca")
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (ssl.SSLError, ValueError) as exc:
                raise ValueError(f"--tls-client-ca {self.client_ca}: not a PEM CA bundle "
                                 f"({getattr(exc, 'reason', None) or exc})") from None

    def ssl_context(self) -> ssl.SSLContext:
        """The same material for the HTTP port (TLS 1.2 or later; client certificates
        required when ``client_ca`` is set)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(cafile=self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def credentials(self) -> grpc.ServerCredentials:
        pairs = [(read_secret(self.key, "--tls-key"), read_secret(self.cert, "--tls-cert"))]
        if self.client_ca is None:
            return grpc.ssl_server_credentials(pairs)
        return grpc.ssl_server_credentials(pairs, read_secret(self.client_ca, "--tls-client-ca"),
                                           require_client_auth=True)
