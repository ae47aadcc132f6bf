"""Operations support of a running daemon: transfer rates and the optional Prometheus endpoint."""
